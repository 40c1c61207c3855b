#!/bin/bash
# Optional: build rust-vmm's vhost-device-vsock (crates.io, pinned, --locked)
# as the vhost-user vsock backend on the machine for a TCG KVM host that gets
# a virtio-vsock device (`-device vhost-user-vsock-device`).
# SAFETY: use it ONLY with `uds-path=` (Unix sockets on the machine). Its
# `forward-cid`/`forward-listen` options and its own `cargo test` open AF_VSOCK
# on the machine, which must never happen here. (0.3.0 does not compile
# without its default `backend_vsock` feature, so that code is in the binary;
# with uds-path it is never reached: vsock::Vsock* appear only in the
# BackendType::Vsock paths.)
# Prints the path of the binary. Cached under $VR_CACHE/vhost-device-vsock/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ver="${VR_VHOST_DEVICE_VSOCK_VERSION:-0.3.0}"
rustc_ver="$(rustc --version 2>/dev/null)" || vr_die "rustc not found (needed for cargo install)"
hash="$(vr_recipe_hash "${BASH_SOURCE[0]}" -- "vhost-device-vsock=$ver" "$rustc_ver")"
dest="$VR_CACHE/vhost-device-vsock/$hash"
if [ -x "$dest/bin/vhost-device-vsock" ]; then
	printf '%s\n' "$dest/bin/vhost-device-vsock"
	exit 0
fi
mkdir -p "$VR_CACHE/tmp"
exec 9>"$VR_CACHE/.vhost-device-vsock.lock"
flock -w 1800 9 || vr_die "timed out waiting for the vhost-device-vsock build lock"
if [ -x "$dest/bin/vhost-device-vsock" ]; then
	printf '%s\n' "$dest/bin/vhost-device-vsock"
	exit 0
fi
work="$VR_CACHE/tmp/vhost-device-vsock-$hash.$$"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
vr_log "cargo install vhost-device-vsock $ver (a few minutes)"
CARGO_TARGET_DIR="$work/target" cargo install --locked --quiet \
	--version "$ver" --root "$work/root" vhost-device-vsock >&2 ||
	vr_die "cargo install vhost-device-vsock $ver failed"
rm -rf "$work/target"
vr_publish "$work/root" "$dest"
vr_log "vhost-device-vsock ready: $dest/bin/vhost-device-vsock"
printf '%s\n' "$dest/bin/vhost-device-vsock"
