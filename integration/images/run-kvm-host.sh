#!/bin/bash
# Boot the TCG "KVM host" (stock Debian kernel, emulated AMD SVM) under QEMU.
#
# usage: run-kvm-host.sh --initrd CPIO [--kernel VMLINUX|bzImage]
#          [--append "ARGS"] [--serial-log FILE] [--modules kvm,vsock]
#          [--mem 2G] [--smp 2] [--memfd] [--monitor SOCK] [--timeout SECS] [--print-cmd]
#          [-- EXTRA QEMU ARGS...]
#
#   --serial-log F  serial console to file F (else to stdout, -nographic)
#   --modules       module sets /init loads (vr.modules=; default kvm)
#   --memfd         share guest RAM (memory-backend-memfd, share=on), needed for
#                   vhost-user devices, e.g.
#                   -- -chardev socket,id=c0,path=S -device vhost-user-vsock-device,chardev=c0,guest-cid=3
#   --monitor SOCK  QEMU's human monitor on the Unix socket SOCK (else none); QEMU
#                   then runs in SOCK's directory, so give the other paths absolute
#   --timeout S     kill QEMU after S seconds (via timeout(1)); without it QEMU
#                   is exec'd, so this script's PID is QEMU's PID
# The kernel defaults to VR_HOST_VMLINUX (or VR_HOST_BZIMAGE) from
# $VR_CACHE/artifacts.env. QEMU exits when the guest reboots (-no-reboot).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ -f "$VR_CACHE/artifacts.env" ]; then
	# shellcheck disable=SC1091
	. "$VR_CACHE/artifacts.env"
fi
kernel="${VR_HOST_VMLINUX:-${VR_HOST_BZIMAGE:-}}"
initrd="" append="" log="" modules="kvm" mem="2G" smp=2 memfd=0 timeout_s="" print=0 monitor=""
while [ "$#" -gt 0 ]; do
	case "$1" in
	--kernel) kernel="$2"; shift 2 ;;
	--initrd) initrd="$2"; shift 2 ;;
	--append) append="$2"; shift 2 ;;
	--serial-log) log="$2"; shift 2 ;;
	--modules) modules="$2"; shift 2 ;;
	--mem) mem="$2"; shift 2 ;;
	--smp) smp="$2"; shift 2 ;;
	--memfd) memfd=1; shift ;;
	--monitor) monitor="$2"; shift 2 ;;
	--timeout) timeout_s="$2"; shift 2 ;;
	--print-cmd) print=1; shift ;;
	--) shift; break ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
	*) vr_die "unknown argument '$1' (see --help)" ;;
	esac
done
if [ -z "$kernel" ] || [ ! -f "$kernel" ]; then vr_die "no host kernel (--kernel, or run build-all.sh)"; fi
if [ -z "$initrd" ] || [ ! -f "$initrd" ]; then vr_die "--initrd CPIO is required (make-host-initramfs.sh)"; fi
command -v qemu-system-x86_64 >/dev/null || vr_die "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"

# shellcheck disable=SC2054 # the commas belong to QEMU options
cmd=(qemu-system-x86_64 -accel tcg,thread=multi -cpu max -M microvm,rtc=on
	-m "$mem" -smp "$smp" -nographic -no-reboot
	-kernel "$kernel" -initrd "$initrd"
	-append "console=ttyS0 quiet pci=off panic=-1 tsc_early_khz=$(vr_tsc_khz) vr.modules=$modules $append")
if [ "$memfd" = 1 ]; then
	cmd+=(-object "memory-backend-memfd,id=vrmem,size=$mem,share=on" -machine memory-backend=vrmem)
fi
[ -z "$log" ] || cmd+=(-serial "file:$log")
if [ -n "$monitor" ]; then
	# A socket address holds at most 107 bytes: QEMU binds the name in the socket's directory,
	# which becomes its working directory (every other path it is given is absolute).
	monitor_dir="$(dirname "$monitor")"
	cd "$monitor_dir" || vr_die "--monitor: no directory $monitor_dir"
	cmd+=(-monitor "unix:$(basename "$monitor"),server=on,wait=off")
else
	cmd+=(-monitor none)
fi
cmd+=("$@")
if [ "$print" = 1 ]; then
	printf '%q ' "${cmd[@]}"
	printf '\n'
	exit 0
fi
if [ -n "$timeout_s" ]; then
	exec timeout --kill-after=5 "$timeout_s" "${cmd[@]}" </dev/null
fi
exec "${cmd[@]}" </dev/null
