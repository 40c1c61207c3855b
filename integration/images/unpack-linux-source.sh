#!/bin/bash
# Unpack Debian's /usr/src/linux-source-6.1.tar.xz once per package version
# into $VR_CACHE/src/ and print the source directory.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs linux-source-6.1 xz-utils
ver="$(vr_pkg_version linux-source-6.1)"
dest="$VR_CACHE/src/linux-source-$ver"
if [ -f "$dest/.vr-complete" ]; then
	printf '%s\n' "$dest"
	exit 0
fi
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || vr_die "$tarball missing although linux-source-6.1 is installed"
tmp="$VR_CACHE/tmp/src.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
vr_log "unpacking $tarball ($ver)"
tar -C "$tmp" -xJf "$tarball"
[ -d "$tmp/linux-source-6.1" ] || vr_die "unexpected layout in $tarball"
touch "$tmp/linux-source-6.1/.vr-complete"
vr_publish "$tmp/linux-source-6.1" "$dest"
printf '%s\n' "$dest"
