#!/usr/bin/env bash
# Runs every test of the project: unit and scenario tests of the library, the VMM's tests
# (KVM tests with tiny guests on /dev/kvm), and the integration tests that boot real Linux
# guests inside a QEMU (TCG) KVM host. Installs what it needs from Debian's archive; the guest
# images are built once and cached in ~/.cache/vsock-router.
set -euo pipefail
cd "$(dirname "$0")/.."

# AF_VSOCK is never opened on this machine: the library refuses to create one while this is set.
export VSOCK_ROUTER_FORBID_AF_VSOCK=1

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found: install a stable Rust toolchain (1.85 or newer) first" >&2
    exit 1
fi

# Guest images (kernel, initramfs, KVM host) and their apt dependencies: built once, cached.
if [ "${VR_INTEGRATION:-}" != skip ]; then
    bash integration/images/build-all.sh >/dev/null
    # rust-vmm's vhost-device-vsock from crates.io (pinned, cached): the "cloud host" of the
    # uplink tests, run in Unix-socket mode only.
    bash integration/images/build-vhost-user-backend.sh >/dev/null
fi

# Platform faults (the emulated KVM host's own kernel oopsing or locking up; each rerun once, see
# docs/testing.md, "Reliability"): every test process appends one line per fault to this file,
# and the summary is printed at the end, also when a test failed.
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
# Absolute: the tests run with their package's directory as the working directory.
VR_PLATFORM_FAULTS="$(realpath "$(mktemp "$target_dir/vr-platform-faults.XXXXXX")")"
export VR_PLATFORM_FAULTS
summary() {
    local n
    n=$(grep -c . "$VR_PLATFORM_FAULTS" 2>/dev/null || true)
    echo "platform faults (KVM-host kernel faults and silent resets; stalled reference guests; inner guests whose virtual CPU died before their vsock device ran or without a word from their kernel; each scenario rerun once): ${n:-0}"
    [ "${n:-0}" -eq 0 ] || sed 's/^/  /' "$VR_PLATFORM_FAULTS"
    rm -f "$VR_PLATFORM_FAULTS"
}
trap summary EXIT

cargo test --workspace --no-fail-fast "$@"
