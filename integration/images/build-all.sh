#!/bin/bash
# Build (or find in the cache) every integration artifact and describe them in
# $VR_CACHE/artifacts.env, which is also printed on stdout (KEY=VALUE lines,
# values are absolute paths without spaces or quotes):
#   VR_CACHE               the cache directory
#   VR_INNER_VMLINUX       inner guest kernel (ELF, PVH entry)
#   VR_INNER_INITRAMFS     inner guest initramfs (newc cpio, uncompressed)
#   VR_HOST_KERNEL_DIR     KVM host kernel dir (see build-host-kernel.sh)
#   VR_HOST_VMLINUX        KVM host kernel, ELF (empty if extraction failed)
#   VR_HOST_BZIMAGE        KVM host kernel, bzImage
#   VR_HOST_KVER           its release (e.g. 6.1.0-56-amd64)
#   VR_TOOLS_DIR           static helpers (vr-kvmcheck), put on the KVM host's PATH
#   VR_TSC_KHZ             host TSC kHz for tsc_early_khz=
#   VR_QEMU                path of qemu-system-x86_64
# Progress goes to stderr: what each step builds, and for a step that is not a cache hit a
# "still working" line every 30 s and its time at the end; a warm run (about a second) is silent.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# vr_step NAME HINT CMD...: one build step; prints CMD's stdout (its result). CMD's progress
# lines go to stderr, except its "... cached: ..." lines. A step still running after 30 s says
# so every 30 s (the first time with HINT, how long a cold build takes), and a step that took
# more than 3 s (so it built something) reports its time.
vr_step() {
	local name="$1" hint="$2" start ticker rc took
	shift 2
	start=$(date +%s)
	# Bounded (at most 2 hours) and gone with this script; its stdout is not $(...)'s.
	(
		trap 'kill "$s" 2>/dev/null; exit 0' TERM
		for _ in $(seq 1 240); do
			sleep 30 &
			s=$!
			wait "$s"
			kill -0 "$$" 2>/dev/null || exit 0
			vr_log "$name: still working, $(($(date +%s) - start)) s so far${hint:+ ($hint)}"
			hint=""
		done
	) >/dev/null &
	ticker=$!
	set +e
	{
		"$@" 2>&1 1>&3 3>&- | grep -v --line-buffered ' cached: ' >&2
		rc=${PIPESTATUS[0]}
	} 3>&1
	set -e
	kill "$ticker" 2>/dev/null || true
	wait "$ticker" 2>/dev/null || true
	took=$(($(date +%s) - start))
	if [ "$rc" -ne 0 ]; then
		vr_log "$name: FAILED after $took s"
		return "$rc"
	fi
	[ "$took" -lt 3 ] || vr_log "$name: done in $took s"
}

# Says what it installs and how long that took (nothing when all are there).
vr_ensure_pkgs qemu-system-x86 busybox-static socat cpio linux-source-6.1 bc flex bison \
	libelf-dev libssl-dev build-essential linux-libc-dev xz-utils zstd
command -v qemu-system-x86_64 >/dev/null || vr_die "qemu-system-x86_64 missing although qemu-system-x86 is installed"
mkdir -p "$VR_CACHE"
# One build at a time per cache (parallel cargo tests call this too).
exec 9>"$VR_CACHE/.build-all.lock"
if ! flock -n 9; then
	vr_log "waiting for another build of $VR_CACHE to finish"
	flock -w 1800 9 || vr_die "timed out waiting for $VR_CACHE/.build-all.lock"
fi

inner_kernel="$(vr_step "inner kernel" "a cold build takes about 2.5 minutes on 2 idle cores" \
	"$VR_IMAGES_DIR/build-inner-kernel.sh")"
inner_initramfs="$(vr_step "inner initramfs" "" "$VR_IMAGES_DIR/build-inner-initramfs.sh")"
host_dir="$(vr_step "KVM host kernel" "download and unpack: under a minute" \
	"$VR_IMAGES_DIR/build-host-kernel.sh")"
tools_dir="$(vr_step "tools" "" "$VR_IMAGES_DIR/build-tools.sh")"
host_vmlinux=""
[ -f "$host_dir/vmlinux" ] && host_vmlinux="$host_dir/vmlinux"

# Cache housekeeping: mark the entries in use, drop entries unused for
# VR_CACHE_KEEP_DAYS (default 14) days and build leftovers older than a day.
keep_days="${VR_CACHE_KEEP_DAYS:-14}"
in_use=("$(dirname "$inner_kernel")" "$(dirname "$inner_initramfs")" "$host_dir" "$tools_dir"
	"$VR_CACHE/src/linux-source-$(vr_pkg_version linux-source-6.1)")
for d in "${in_use[@]}"; do [ -d "$d" ] && touch "$d/.last-used"; done
for d in "$VR_CACHE"/{inner-kernel,inner-initramfs,host-kernel,tools,src}/*/; do
	[ -d "$d" ] || continue
	stamp="$d/.last-used"
	[ -e "$stamp" ] || stamp="$d"
	if [ -n "$(find "$stamp" -maxdepth 0 -mtime "+$keep_days" 2>/dev/null)" ]; then
		vr_log "pruning unused cache entry ${d%/}"
		rm -rf "${d%/}"
	fi
done
find "$VR_CACHE/tmp" -mindepth 1 -maxdepth 1 -mtime +1 -exec rm -rf {} + 2>/dev/null || true

env_file="$VR_CACHE/artifacts.env"
cat >"$env_file.tmp" <<EOT
VR_CACHE=$VR_CACHE
VR_INNER_VMLINUX=$inner_kernel
VR_INNER_INITRAMFS=$inner_initramfs
VR_HOST_KERNEL_DIR=$host_dir
VR_HOST_VMLINUX=$host_vmlinux
VR_HOST_BZIMAGE=$host_dir/bzImage
VR_HOST_KVER=$(cat "$host_dir/KVER")
VR_TOOLS_DIR=$tools_dir
VR_TSC_KHZ=$(vr_tsc_khz)
VR_QEMU=$(command -v qemu-system-x86_64)
EOT
mv -f "$env_file.tmp" "$env_file"
cat "$env_file"
