#!/bin/bash
# Build the inner (nested) guest kernel: Debian's linux-source-6.1,
# `make tinyconfig` + inner-kernel.config, no modules. Prints the path of the
# ELF vmlinux (PVH entry) on stdout. Cached under
# $VR_CACHE/inner-kernel/<recipe hash>/vmlinux.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs linux-source-6.1 bc flex bison libelf-dev libssl-dev build-essential xz-utils

fragment="$VR_IMAGES_DIR/inner-kernel.config"
src_ver="$(vr_pkg_version linux-source-6.1)"
gcc_ver="$(vr_pkg_version gcc-12)"
hash="$(vr_recipe_hash "${BASH_SOURCE[0]}" "$fragment" -- "linux-source-6.1=$src_ver" "gcc-12=$gcc_ver")"
dest="$VR_CACHE/inner-kernel/$hash"

if [ -s "$dest/vmlinux" ]; then
	vr_log "inner kernel cached: $dest/vmlinux"
	printf '%s\n' "$dest/vmlinux"
	exit 0
fi

src="$("$VR_IMAGES_DIR/unpack-linux-source.sh")"
work="$VR_CACHE/tmp/inner-kernel-$hash.$$"
rm -rf "$work"
mkdir -p "$work/build"
trap 'rm -rf "$work"' EXIT

vr_log "building inner kernel $hash (linux-source-6.1 $src_ver; a few minutes)"
start=$SECONDS
mk() { make -C "$src" O="$work/build" ARCH=x86_64 "$@"; }
mk tinyconfig >"$work/config.log" 2>&1 || { cat "$work/config.log" >&2; vr_die "make tinyconfig failed"; }
"$src/scripts/kconfig/merge_config.sh" -m -O "$work/build" "$work/build/.config" "$fragment" \
	>>"$work/config.log" 2>&1 || { cat "$work/config.log" >&2; vr_die "merge_config.sh failed"; }
mk olddefconfig >>"$work/config.log" 2>&1 || { cat "$work/config.log" >&2; vr_die "make olddefconfig failed"; }

# Every option the fragment sets must have survived olddefconfig as written.
missing=()
while IFS= read -r line; do
	case "$line" in
	CONFIG_*=*)
		grep -qxF "$line" "$work/build/.config" || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$work/build/.config" || echo unset))")
		;;
	'# CONFIG_'*' is not set')
		opt="${line#\# }"
		opt="${opt%% *}"
		if grep -qE "^$opt=" "$work/build/.config"; then missing+=("$line (got: $(grep -E "^$opt=" "$work/build/.config"))"); fi
		;;
	esac
done <"$fragment"
if [ "${#missing[@]}" -gt 0 ]; then
	printf '[images]   wanted but not in .config: %s\n' "${missing[@]}" >&2
	vr_die "inner kernel config incomplete (a dependency is missing from inner-kernel.config)"
fi

jobs="${VR_JOBS:-2}"
mk vmlinux -j"$jobs" >"$work/build.log" 2>&1 || {
	tail -50 "$work/build.log" >&2
	vr_die "inner kernel build failed (log above)"
}
file_desc="$(od -An -c -N4 "$work/build/vmlinux" | tr -d ' ')"
[ "$file_desc" = '177ELF' ] || vr_die "built vmlinux is not an ELF file"

out="$work/out"
mkdir -p "$out"
cp "$work/build/vmlinux" "$out/vmlinux"
strip --strip-debug "$out/vmlinux" 2>/dev/null || true
cp "$work/build/.config" "$out/config"
printf 'linux-source-6.1 %s\nbuild seconds %s\n' "$src_ver" "$((SECONDS - start))" >"$out/BUILD-INFO"
vr_publish "$out" "$dest"
vr_log "inner kernel built in $((SECONDS - start)) s: $dest/vmlinux"
printf '%s\n' "$dest/vmlinux"
