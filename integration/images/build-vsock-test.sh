#!/bin/bash
# Build Linux's own vsock conformance suite, tools/testing/vsock/vsock_test, as
# a static binary from Debian's linux-source-6.1 (the same source as the inner
# guest kernel): tools/testing/vsock is copied together with tools/include,
# which its Makefile includes as ../../include. Prints the path of the binary.
# Cached under $VR_CACHE/vsock-test/<recipe hash>/vsock_test; the hash covers
# this script and the versions of the source, compiler, libc and kernel
# headers. The binary opens AF_VSOCK sockets: run it only inside guests.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs linux-source-6.1 build-essential linux-libc-dev xz-utils
hash="$(vr_recipe_hash "${BASH_SOURCE[0]}" -- \
	"linux-source-6.1=$(vr_pkg_version linux-source-6.1)" "gcc-12=$(vr_pkg_version gcc-12)" \
	"libc6-dev=$(vr_pkg_version libc6-dev)" "linux-libc-dev=$(vr_pkg_version linux-libc-dev)")"
dest="$VR_CACHE/vsock-test/$hash"
if [ -x "$dest/vsock_test" ]; then
	touch "$dest/.last-used" 2>/dev/null || true
	printf '%s\n' "$dest/vsock_test"
	exit 0
fi

# One build at a time (build-all.sh and the conformance test both ask for it).
mkdir -p "$VR_CACHE/tmp"
exec 9>"$VR_CACHE/.vsock-test.lock"
flock -w 600 9 || vr_die "timed out waiting for the vsock_test build lock"
if [ -x "$dest/vsock_test" ]; then
	printf '%s\n' "$dest/vsock_test"
	exit 0
fi
src="$("$VR_IMAGES_DIR/unpack-linux-source.sh")"
[ -f "$src/tools/testing/vsock/vsock_test.c" ] || vr_die "no tools/testing/vsock/vsock_test.c in $src"
work="$VR_CACHE/tmp/vsock-test-$hash.$$"
rm -rf "$work"
mkdir -p "$work/tools/testing" "$work/out"
trap 'rm -rf "$work"' EXIT
cp -a "$src/tools/testing/vsock" "$work/tools/testing/vsock"
cp -a "$src/tools/include" "$work/tools/include"
# The Makefile's -I../../../usr/include (installed kernel headers) does not
# exist here, so <linux/vm_sockets.h> comes from linux-libc-dev (same 6.1).
make -C "$work/tools/testing/vsock" vsock_test LDFLAGS=-static >"$work/build.log" 2>&1 || {
	tail -40 "$work/build.log" >&2
	vr_die "building vsock_test failed (log above)"
}
bin="$work/tools/testing/vsock/vsock_test"
# Must be static: the inner guest has no C library of its own.
if ldd "$bin" >/dev/null 2>&1; then vr_die "vsock_test is not statically linked"; fi
install -m 0755 "$bin" "$work/out/vsock_test"
strip "$work/out/vsock_test"
# Never run it here (it opens AF_VSOCK): count the cases in the source instead.
cases="$(grep -c '^\s*\.name = "SOCK_' "$work/tools/testing/vsock/vsock_test.c" || true)"
[ "$cases" -gt 0 ] || vr_die "no test cases found in vsock_test.c"
printf 'linux-source-6.1 %s\ncases %s\n' "$(vr_pkg_version linux-source-6.1)" "$cases" >"$work/out/BUILD-INFO"
touch "$work/out/.last-used"
vr_publish "$work/out" "$dest"
vr_log "vsock_test built ($cases cases): $dest/vsock_test"
printf '%s\n' "$dest/vsock_test"
