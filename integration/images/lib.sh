# Common helpers for the integration image scripts. Source it; do not run it.
# shellcheck shell=bash

VR_IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VR_CACHE="${VSOCK_ROUTER_CACHE:-$HOME/.cache/vsock-router}"
export VR_IMAGES_DIR VR_CACHE

vr_log() { printf '[images] %s\n' "$*" >&2; }
vr_die() {
	printf '[images] ERROR: %s\n' "$*" >&2
	exit 1
}

# Install the given Debian packages when they are missing (dpkg -s), running
# `apt-get update` at most once per process tree (VR_APT_UPDATED).
vr_ensure_pkgs() {
	local missing=() p
	for p in "$@"; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || vr_die "missing packages (${missing[*]}) and not root: install them with apt-get"
	local t0=$SECONDS
	if [ -z "${VR_APT_UPDATED:-}" ]; then
		vr_log "apt-get update ..."
		apt-get update -qq >&2 || vr_die "apt-get update failed"
		export VR_APT_UPDATED=1
		vr_log "apt-get update: $((SECONDS - t0)) s"
	fi
	t0=$SECONDS
	vr_log "installing ${#missing[@]} Debian packages (about a minute on a fresh machine): ${missing[*]}"
	# dpkg's own progress ("Reading database ... 5%", triggers) goes to a log,
	# shown only when the install fails.
	local log
	log="$(mktemp -t vr-apt.XXXXXX)"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
		tail -n 40 "$log" >&2
		rm -f "$log"
		vr_die "apt-get install ${missing[*]} failed (its last 40 lines above)"
	fi
	rm -f "$log"
	vr_log "installed in $((SECONDS - t0)) s"
}

# Installed version of a Debian package (empty when not installed).
vr_pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# sha256 (first 16 hex digits) of the given files' contents followed by extra
# strings: vr_recipe_hash FILE... -- STRING...
vr_recipe_hash() {
	{
		while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
			printf 'file %s\n' "$(basename "$1")"
			cat "$1"
			shift
		done
		[ "${1:-}" = "--" ] && shift
		printf 'extra %s\n' "$@"
	} | sha256sum | cut -c1-16
}

# Copy an executable and the shared libraries `ldd` lists (plus the dynamic
# loader) into the root directory $1, keeping their absolute paths.
vr_copy_with_libs() {
	local root="$1" bin="$2" lib
	[ -x "$bin" ] || vr_die "not an executable: $bin"
	install -D -m 0755 "$bin" "$root/$bin"
	# ldd prints "name => /path (addr)" or "/path (addr)"; static binaries
	# print "not a dynamic executable" and exit non-zero.
	if ldd "$bin" >/dev/null 2>&1; then
		while read -r lib; do
			[ -n "$lib" ] || continue
			[ -e "$root/$lib" ] && continue
			install -D -m 0755 "$(readlink -f "$lib")" "$root/$lib"
		done < <(ldd "$bin" | grep -o '/[^ ]*' | sort -u)
	fi
}

# Populate $1 with busybox (static) and its applet links, plus socat and its
# libraries, and the usual empty directories.
vr_make_base_root() {
	local root="$1" applet
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,root,usr/bin,usr/sbin,lib,lib64,vr}
	install -m 0755 /bin/busybox "$root/bin/busybox"
	for applet in $("$root/bin/busybox" --list); do
		[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
	done
	vr_copy_with_libs "$root" "$(command -v socat)"
	# Minimal identity files for tools that look users up.
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
}

# Write a newc cpio archive of directory $1 to file $2 (uncompressed; entries
# sorted and owned by root so the archive depends on content only).
vr_make_cpio() {
	local root="$1" out="$2"
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) >"$out.tmp" ||
		vr_die "cpio of $root failed"
	mv -f "$out.tmp" "$out"
}

# Publish a finished build directory $1 atomically as $2 (a cache entry).
vr_publish() {
	local tmp="$1" dest="$2"
	mkdir -p "$(dirname "$dest")"
	rm -rf "$dest.old"
	[ -e "$dest" ] && mv "$dest" "$dest.old"
	mv "$tmp" "$dest"
	rm -rf "$dest.old"
}

# Host TSC frequency in kHz, for `tsc_early_khz=` on TCG guests. Order:
# $VR_TSC_KHZ, the kernel's refined calibration in dmesg, /proc/cpuinfo
# "cpu MHz", then 2300000.
vr_tsc_khz() {
	local khz=""
	if [ -n "${VR_TSC_KHZ:-}" ]; then
		printf '%s\n' "$VR_TSC_KHZ"
		return
	fi
	khz=$(dmesg 2>/dev/null | grep -o 'tsc: Refined TSC clocksource calibration: [0-9.]* MHz' |
		tail -1 | grep -o '[0-9.]* MHz' | awk '{printf "%d", $1 * 1000}') || true
	if [ -z "$khz" ]; then
		khz=$(dmesg 2>/dev/null | grep -o 'tsc: Detected [0-9.]* MHz' | tail -1 |
			grep -o '[0-9.]* MHz' | awk '{printf "%d", $1 * 1000}') || true
	fi
	if [ -z "$khz" ]; then
		khz=$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo 2>/dev/null) || true
	fi
	case "$khz" in
	'' | *[!0-9]*) khz=2300000 ;;
	esac
	[ "$khz" -ge 100000 ] || khz=2300000
	printf '%s\n' "$khz"
}
