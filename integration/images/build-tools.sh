#!/bin/bash
# Build the small static helper programs in tools/ (C, Debian gcc + libc6-dev)
# that scenarios use in the guests, e.g. vr-kvmcheck. Prints the directory.
# Cached under $VR_CACHE/tools/<recipe hash>/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs build-essential linux-libc-dev
hash="$(vr_recipe_hash "${BASH_SOURCE[0]}" "$VR_IMAGES_DIR"/tools/*.c -- \
	"gcc-12=$(vr_pkg_version gcc-12)" "libc6-dev=$(vr_pkg_version libc6-dev)" \
	"linux-libc-dev=$(vr_pkg_version linux-libc-dev)")"
dest="$VR_CACHE/tools/$hash"
if [ -f "$dest/.complete" ]; then
	printf '%s\n' "$dest"
	exit 0
fi
work="$VR_CACHE/tmp/tools-$hash.$$"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
for c in "$VR_IMAGES_DIR"/tools/*.c; do
	name="$(basename "$c" .c)"
	gcc -static -O2 -Wall -Wextra -Werror -o "$work/$name" "$c" || vr_die "compiling $c failed"
done
touch "$work/.complete"
vr_publish "$work" "$dest"
vr_log "tools built: $dest"
printf '%s\n' "$dest"
