#!/bin/bash
# Fetch the "KVM host" kernel: the newest stock Debian linux-image-6.1.0-NN-amd64
# (apt-get download + dpkg-deb -x), extract its ELF vmlinux (PVH boot) from the
# bzImage, and collect the modules the host needs with their dependencies.
# Prints the cache directory on stdout:
#   $VR_CACHE/host-kernel/<recipe hash>/
#     vmlinux          ELF (or absent when extraction failed; use bzImage)
#     bzImage          the package's vmlinuz
#     KVER             kernel release, e.g. 6.1.0-56-amd64
#     modules/*.ko     flat; modules/load-order-<set> lists files in insmod order
# Module sets: kvm (kvm-amd), vsock (virtio-mmio + virtio vsock transport),
# vhost-vsock (kernel vhost-vsock, only ever loaded inside a TCG guest),
# vsock-loopback.
# VR_HOST_KERNEL_PKG=linux-image-6.1.0-NN-amd64 pins the package.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vr_ensure_pkgs xz-utils zstd

pkg="${VR_HOST_KERNEL_PKG:-}"
if [ -z "$pkg" ]; then
	pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' 2>/dev/null |
		awk '{print $1}' | sort -V | tail -1)"
	if [ -z "$pkg" ] && [ -z "${VR_APT_UPDATED:-}" ] && [ "$(id -u)" -eq 0 ]; then
		apt-get update -qq >&2 || vr_die "apt-get update failed"
		export VR_APT_UPDATED=1
		pkg="$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
			awk '{print $1}' | sort -V | tail -1)"
	fi
fi
[ -n "$pkg" ] || vr_die "no linux-image-6.1.0-NN-amd64 package known to apt (apt-get update?)"
pkg_ver="$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
if [ -z "$pkg_ver" ] || [ "$pkg_ver" = "(none)" ]; then vr_die "apt has no candidate for $pkg"; fi

# Module sets: the modules named here, plus their dependencies (modinfo).
declare -A sets=(
	[kvm]="irqbypass ccp kvm kvm_amd"
	[vsock]="virtio_mmio vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport"
	[vhost-vsock]="vsock vmw_vsock_virtio_transport_common vhost_vsock"
	[vsock-loopback]="vsock vmw_vsock_virtio_transport_common vsock_loopback"
)
set_desc="$(for s in "${!sets[@]}"; do echo "$s=${sets[$s]}"; done | sort)"
hash="$(vr_recipe_hash "${BASH_SOURCE[0]}" -- "$pkg=$pkg_ver" "$set_desc")"
dest="$VR_CACHE/host-kernel/$hash"
if [ -s "$dest/KVER" ] && [ -s "$dest/bzImage" ]; then
	vr_log "host kernel cached: $dest ($pkg $pkg_ver)"
	printf '%s\n' "$dest"
	exit 0
fi

work="$VR_CACHE/tmp/host-kernel-$hash.$$"
rm -rf "$work"
mkdir -p "$work/deb" "$work/x" "$work/out/modules"
trap 'rm -rf "$work"' EXIT
vr_log "downloading $pkg $pkg_ver"
(cd "$work/deb" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$pkg_ver" >&2) || vr_die "apt-get download $pkg=$pkg_ver failed"
dpkg-deb -x "$work"/deb/*.deb "$work/x" || vr_die "dpkg-deb -x failed"
kver="${pkg#linux-image-}"
[ -f "$work/x/boot/vmlinuz-$kver" ] || vr_die "no boot/vmlinuz-$kver in $pkg"
out="$work/out"
cp "$work/x/boot/vmlinuz-$kver" "$out/bzImage"
cp "$work/x/boot/config-$kver" "$out/config" 2>/dev/null || true
printf '%s\n' "$kver" >"$out/KVER"

# ELF vmlinux from the bzImage, through the kernel tree's extract-vmlinux.
src="$("$VR_IMAGES_DIR/unpack-linux-source.sh")"
if bash "$src/scripts/extract-vmlinux" "$out/bzImage" >"$work/vmlinux" 2>"$work/extract.log" &&
	[ "$(od -An -c -N4 "$work/vmlinux" | tr -d ' ')" = '177ELF' ]; then
	mv "$work/vmlinux" "$out/vmlinux"
else
	vr_log "WARNING: could not extract an ELF vmlinux ($(cat "$work/extract.log")); boot the bzImage"
fi

# Modules: index name -> file, then resolve each set depth-first.
moddir="$work/x/lib/modules/$kver"
[ -d "$moddir" ] || vr_die "no lib/modules/$kver in $pkg"
declare -A modfile=()
while IFS= read -r f; do
	n="$(basename "$f")"
	n="${n%%.ko*}"
	modfile["${n//-/_}"]="$f"
done < <(find "$moddir" -name '*.ko*')
resolve() { # NAME: append NAME's deps, then NAME, to $order (once each)
	local n="${1//-/_}" f deps d
	case " $order " in *" $n "*) return 0 ;; esac
	f="${modfile[$n]:-}"
	if [ -z "$f" ]; then
		# Built into the kernel? modules.builtin lists those.
		if grep -q "/${n//_/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
		vr_die "module $n is neither in $pkg nor built in"
	fi
	# The .modinfo section holds NUL-terminated "depends=a,b" strings.
	deps="$(tr '\0' '\n' <"$f" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')"
	for d in $deps; do resolve "$d"; done
	case " $order " in *" $n "*) return 0 ;; esac
	order="$order $n"
}
for s in "${!sets[@]}"; do
	order=""
	for m in ${sets[$s]}; do resolve "$m"; done
	: >"$out/modules/load-order-$s"
	for n in $order; do
		f="${modfile[$n]}"
		case "$f" in
		*.ko) cp "$f" "$out/modules/" ;;
		*.ko.xz) xz -dc "$f" >"$out/modules/$(basename "${f%.xz}")" ;;
		*.ko.zst) zstd -qdc "$f" >"$out/modules/$(basename "${f%.zst}")" ;;
		*) vr_die "unknown module format: $f" ;;
		esac
		f="$(basename "$f")"
		printf '%s\n' "${f%.ko*}.ko" >>"$out/modules/load-order-$s"
	done
	vr_log "module set $s: $(tr '\n' ' ' <"$out/modules/load-order-$s")"
done
printf '%s %s\n' "$pkg" "$pkg_ver" >"$out/PACKAGE"
vr_publish "$out" "$dest"
vr_log "host kernel ready: $dest ($pkg $pkg_ver)"
printf '%s\n' "$dest"
