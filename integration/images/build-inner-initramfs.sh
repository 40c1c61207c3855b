#!/bin/bash
# Build the inner (nested) guest initramfs: busybox-static, socat with its
# libraries, the kernel's vsock_test (build-vsock-test.sh) as
# /vr/bin/vsock_test, the static helpers of tools/ (build-tools.sh, e.g.
# vr-vsockcheck) in /vr/bin, /init (rootfs/inner-init) and the named scenarios
# in inner-scenarios/. Prints the path of the uncompressed newc cpio on stdout.
# Cached under $VR_CACHE/inner-initramfs/<recipe hash>/initramfs.cpio.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs busybox-static socat cpio

recipe=("${BASH_SOURCE[0]}" "$VR_IMAGES_DIR/lib.sh" "$VR_IMAGES_DIR/rootfs/"* "$VR_IMAGES_DIR/inner-scenarios/"*.sh)
versions=()
for p in busybox-static socat libc6 libssl3 libwrap0; do versions+=("$p=$(vr_pkg_version "$p")"); done
vsock_test="$("$VR_IMAGES_DIR/build-vsock-test.sh")"
versions+=("vsock_test=$(sha256sum "$vsock_test" | cut -c1-16)")
# Cached by the hash of its own recipe (tools/*.c, compiler and libc versions): its directory's
# name stands for its content.
tools_dir="$("$VR_IMAGES_DIR/build-tools.sh")"
versions+=("tools=$(basename "$tools_dir")")
hash="$(vr_recipe_hash "${recipe[@]}" -- "${versions[@]}")"
dest="$VR_CACHE/inner-initramfs/$hash"
if [ -s "$dest/initramfs.cpio" ]; then
	vr_log "inner initramfs cached: $dest/initramfs.cpio"
	printf '%s\n' "$dest/initramfs.cpio"
	exit 0
fi

work="$VR_CACHE/tmp/inner-initramfs-$hash.$$"
rm -rf "$work"
mkdir -p "$work/root" "$work/out"
trap 'rm -rf "$work"' EXIT
root="$work/root"
vr_make_base_root "$root"
install -m 0755 "$VR_IMAGES_DIR/rootfs/inner-init" "$root/init"
install -m 0644 "$VR_IMAGES_DIR/rootfs/common-init.sh" "$root/lib/vr-common-init.sh"
install -m 0644 "$VR_IMAGES_DIR/rootfs/vrtest.sh" "$root/lib/vrtest.sh"
install -D -m 0755 "$vsock_test" "$root/vr/bin/vsock_test"
for t in "$tools_dir"/*; do install -m 0755 "$t" "$root/vr/bin/"; done
mkdir -p "$root/vr/scenarios"
cp "$VR_IMAGES_DIR/inner-scenarios/"*.sh "$root/vr/scenarios/"
vr_make_cpio "$root" "$work/out/initramfs.cpio"
vr_publish "$work/out" "$dest"
vr_log "inner initramfs built: $dest/initramfs.cpio ($(du -h "$dest/initramfs.cpio" | cut -f1))"
printf '%s\n' "$dest/initramfs.cpio"
