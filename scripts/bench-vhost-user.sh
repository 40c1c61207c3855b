#!/usr/bin/env bash
# Side by side in one run: vsock-routerd against rust-vmm's vhost-device-vsock 0.3.0 (from
# crates.io, built and cached as the integration tests build it), each a daemon of its own with
# the same command line, driven by one simulated Linux guest through a vhost-user frontend over
# memfd guest memory: bulk each way, 64-byte round trips, 100 connections; runs interleaved,
# the ratio of medians printed. A benchmark, not a test: no figure is checked.
#
#   scripts/bench-vhost-user.sh [--mib N] [--repeat R] [--rr N] [--only PAT] [--quick] [--pin D,R]
#
# Figures and method: docs/performance.md, "vhost-user".
set -euo pipefail
cd "$(dirname "$0")/.."
# Both daemons run in Unix-socket mode only (uds-path, no uplink): no AF_VSOCK on this machine.
export VSOCK_ROUTER_FORBID_AF_VSOCK=1
vdv="$(bash integration/images/build-vhost-user-backend.sh)"
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet -p vsock-routerd
cargo build --release --quiet -p vsock-router --example bench
echo "vhost-device-vsock: $vdv"
exec "$target/release/examples/bench" --vhost-user "$target/release/vsock-routerd,$vdv" "$@"
