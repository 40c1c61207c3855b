#!/usr/bin/env bash
# The main job: boot a Linux guest with the vsock device and show routing (guest → host, the
# g2h fallback to the uplink, and strict mode after a run-time switch). Installs QEMU and the
# other Debian packages it needs and builds the guest images on first use (cached).
set -euo pipefail
cd "$(dirname "$0")/.."
export VSOCK_ROUTER_FORBID_AF_VSOCK=1
cargo run --quiet --release -p vsock-integration --bin vsock-demo
