#!/bin/bash
# Assemble the initramfs of the TCG "KVM host" for one test run.
#
# usage: make-host-initramfs.sh -o OUT.cpio [-s SCENARIO.sh] [-b BIN]...
#          [-f SRC[:DEST]]... [--inner-kernel VMLINUX] [--inner-initramfs CPIO]
#          [--host-kernel-dir DIR] [--tools-dir DIR]
#
#   -s FILE   scenario script, run by /init as /vr/scenario.sh (sourced, with
#             the helpers of rootfs/vrtest.sh; see README.md)
#   -b FILE   extra executable -> /vr/bin/<name> (on PATH) + its ldd libraries
#   -f S[:D]  extra file S -> D (absolute path in the guest; default
#             /vr/files/<name>); executables keep their mode
#   --inner-kernel / --inner-initramfs   -> /vr/inner/vmlinux, /vr/inner/initramfs.cpio
#   --host-kernel-dir   output of build-host-kernel.sh (modules/ are taken from it)
#   --tools-dir DIR     static helpers (build-tools.sh) -> /vr/bin
# Defaults for the last four come from $VR_CACHE/artifacts.env (build-all.sh).
# Writes an uncompressed newc cpio; prints its path.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out="" scenario="" bins=() files=()
if [ -f "$VR_CACHE/artifacts.env" ]; then
	# shellcheck disable=SC1091
	. "$VR_CACHE/artifacts.env"
fi
inner_kernel="${VR_INNER_VMLINUX:-}"
inner_initramfs="${VR_INNER_INITRAMFS:-}"
host_dir="${VR_HOST_KERNEL_DIR:-}"
tools_dir="${VR_TOOLS_DIR:-}"
while [ "$#" -gt 0 ]; do
	case "$1" in
	-o | --output) out="$2"; shift 2 ;;
	-s | --scenario) scenario="$2"; shift 2 ;;
	-b | --bin) bins+=("$2"); shift 2 ;;
	-f | --file) files+=("$2"); shift 2 ;;
	--inner-kernel) inner_kernel="$2"; shift 2 ;;
	--inner-initramfs) inner_initramfs="$2"; shift 2 ;;
	--host-kernel-dir) host_dir="$2"; shift 2 ;;
	--tools-dir) tools_dir="$2"; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
	*) vr_die "unknown argument '$1' (see --help)" ;;
	esac
done
[ -n "$out" ] || vr_die "-o OUT.cpio is required"
[ -n "$host_dir" ] || vr_die "no --host-kernel-dir and no VR_HOST_KERNEL_DIR (run build-all.sh)"
[ -d "$host_dir/modules" ] || vr_die "$host_dir/modules missing (not a build-host-kernel.sh output?)"
[ -z "$scenario" ] || [ -f "$scenario" ] || vr_die "scenario $scenario not found"
vr_ensure_pkgs busybox-static socat cpio

work="$(mktemp -d "${TMPDIR:-/tmp}/vr-host-initramfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
vr_make_base_root "$root"
install -m 0755 "$VR_IMAGES_DIR/rootfs/host-init" "$root/init"
install -m 0644 "$VR_IMAGES_DIR/rootfs/common-init.sh" "$root/lib/vr-common-init.sh"
install -m 0644 "$VR_IMAGES_DIR/rootfs/vrtest.sh" "$root/lib/vrtest.sh"
mkdir -p "$root/lib/modules/vr" "$root/vr/bin" "$root/vr/inner" "$root/vr/files"
cp "$host_dir"/modules/*.ko "$host_dir"/modules/load-order-* "$root/lib/modules/vr/"
[ -z "$scenario" ] || install -m 0644 "$scenario" "$root/vr/scenario.sh"
if [ -n "$inner_kernel" ]; then
	[ -f "$inner_kernel" ] || vr_die "inner kernel $inner_kernel not found"
	cp "$inner_kernel" "$root/vr/inner/vmlinux"
fi
if [ -n "$inner_initramfs" ]; then
	[ -f "$inner_initramfs" ] || vr_die "inner initramfs $inner_initramfs not found"
	cp "$inner_initramfs" "$root/vr/inner/initramfs.cpio"
fi
if [ -n "$tools_dir" ]; then
	for t in "$tools_dir"/*; do install -m 0755 "$t" "$root/vr/bin/"; done
fi
for b in "${bins[@]}"; do
	[ -x "$b" ] || vr_die "extra binary $b not found or not executable"
	vr_copy_with_libs "$root" "$b"
	mv "$root/$b" "$root/vr/bin/$(basename "$b")"
done
for f in "${files[@]}"; do
	src="${f%%:*}"
	dst="/vr/files/$(basename "$src")"
	[ "$src" = "$f" ] || dst="${f#*:}"
	[ -f "$src" ] || vr_die "extra file $src not found"
	case "$dst" in /*) ;; *) vr_die "destination $dst must be absolute" ;; esac
	mkdir -p "$root$(dirname "$dst")"
	cp -p "$src" "$root$dst"
done
mkdir -p "$(dirname "$out")"
vr_make_cpio "$root" "$out"
printf '%s\n' "$out"
