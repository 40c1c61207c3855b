# Helpers for scenario scripts (sourced by /init before a scenario runs, in
# both the inner guest and the KVM host). Busybox ash.
#
# Result lines on the console, one per check, parsed by the Rust harness:
#   VRTEST <name> PASS|FAIL|SKIP [detail...]
#   VRTEST-INFO <name> <value...>      (measurements; never a verdict)
#   VRTEST-DONE rc=<n>                 (printed by /init after the scenario)
# <name> is [A-Za-z0-9._:/-]+; detail is one line. vr_fail sets VR_FAILED=1,
# which makes /init report a non-zero exit code.
# shellcheck disable=SC2034

vr_oneline() { tr '\n\r\t' '   ' | cut -c1-300; }
vr_result() { # NAME STATUS DETAIL...
	_n="$1" _s="$2"
	shift 2
	echo "VRTEST $_n $_s $(printf '%s' "$*" | vr_oneline)"
}
vr_pass() { _n="$1"; shift; vr_result "$_n" PASS "$@"; }
vr_fail() { _n="$1"; shift; vr_result "$_n" FAIL "$@"; VR_FAILED=1; }
vr_skip() { _n="$1"; shift; vr_result "$_n" SKIP "$@"; }
vr_info() { _n="$1"; shift; echo "VRTEST-INFO $_n $(printf '%s' "$*" | vr_oneline)"; }

# vr_check NAME CMD [ARGS...]: run CMD, PASS when it exits 0, FAIL with the
# exit code and the last lines of its output otherwise. Returns CMD's status.
vr_check() {
	_n="$1"
	shift
	_log="/tmp/vrcheck.$$.log"
	if "$@" >"$_log" 2>&1; then
		vr_pass "$_n"
		rm -f "$_log"
		return 0
	else
		_rc=$?
		vr_fail "$_n" "rc=$_rc: $(tail -n 3 "$_log" | vr_oneline)"
		rm -f "$_log"
		return "$_rc"
	fi
}

# vr_expect_eq NAME EXPECTED ACTUAL: PASS when equal.
vr_expect_eq() {
	if [ "$2" = "$3" ]; then vr_pass "$1" "$3"; else vr_fail "$1" "expected '$2' got '$3'"; fi
}

# Value of KEY=value on the kernel command line (empty when absent).
vr_cmdline_arg() {
	for _a in $(cat /proc/cmdline); do
		case "$_a" in "$1="*) echo "${_a#*=}"; return 0 ;; esac
	done
	return 1
}

# vr_random_file PATH BYTES: fill PATH with BYTES random bytes; prints the
# sha256 (hex). Compare it with the hash the other end computes.
vr_random_file() {
	head -c "$2" /dev/urandom >"$1"
	vr_sha256 "$1"
}
# vr_pattern_file PATH BYTES: deterministic content, reproducible anywhere:
# the decimal line numbers "0\n1\n2\n..." truncated to BYTES. Prints sha256.
vr_pattern_file() {
	seq 0 "$(($2 / 2 + 1))" | head -c "$2" >"$1"
	vr_sha256 "$1"
}
vr_sha256() { sha256sum "$1" | cut -d' ' -f1; }

# Milliseconds since boot (for VRTEST-INFO timings).
vr_uptime_ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }

# vr_wait_for SECS CMD...: retry CMD every 0.1 s until it succeeds or SECS
# elapse (bounded); returns CMD's last status.
vr_wait_for() {
	_deadline=$(($(vr_uptime_ms) + $1 * 1000))
	shift
	while :; do
		"$@" && return 0
		[ "$(vr_uptime_ms)" -ge "$_deadline" ] && return 1
		usleep 100000
	done
}

# vr_sibling_barrier [SECS]: for TCG guests that are siblings on the machine's
# vhost-device-vsock daemon (SiblingBarrier in integration/src/hybrid.rs):
# report "up" to the machine (CID 2 port 9000), then wait until the machine
# says every sibling is up (it connects to our port 9001). Send nothing to a
# sibling's CID before this returns: vhost-device-vsock 0.3.0 stops serving
# a guest that gets a sibling's packet before its device is running.
vr_sibling_barrier() {
	_secs="${1:-300}"
	timeout "$_secs" socat -u VSOCK-LISTEN:9001 CREATE:/tmp/vr-go &
	_go=$!
	if ! vr_wait_for "$_secs" sh -c 'echo up | socat -u - VSOCK-CONNECT:2:9000 2>/dev/null'; then
		kill "$_go" 2>/dev/null
		return 1
	fi
	wait "$_go"
}

# Inner guests only: vr_host_phase_is PHASE: the host side's phase, which the
# scenarios' host scripts serve on CID 2 port 999, is PHASE (use with vr_wait_for).
vr_host_phase_is() { [ "$(socat -T2 -u VSOCK-CONNECT:2:999 - 2>/dev/null)" = "$1" ]; }

# Inner guests only: vr_expect_reset CID PORT: a connect to (CID, PORT) must be
# refused with ECONNRESET (strict mode: no route). Reports strict-refused and
# strict-econnreset.
vr_expect_reset() {
	if echo x | socat -u - "VSOCK-CONNECT:$1:$2" 2>/tmp/vr-reset.err; then
		vr_fail strict-refused "connect to CID $1 port $2 succeeded"
	else
		vr_pass strict-refused "$(tail -n1 /tmp/vr-reset.err)"
	fi
	vr_check strict-econnreset grep -q 'Connection reset' /tmp/vr-reset.err
}

# CMD | vr_relay PREFIX: forward a nested guest's console (e.g. vsock-vmm's
# serial output) without confusing the outer harness: result lines become
# "VRTEST PREFIX/<name> ...", its VRTEST-DONE becomes the check
# "PREFIX/done" (PASS when rc=0; FAIL too when no VRTEST-DONE came at all),
# and every other line is printed as "PREFIX: <line>". Returns 1 when that
# done check failed.
vr_relay() {
	tr -d '\r' | awk -v p="$1" '
		/^VRTEST-DONE / { done = 1; rc = $2; sub(/^rc=/, "", rc)
			print "VRTEST " p "/done " (rc == "0" ? "PASS" : "FAIL") " rc=" rc; next }
		/^VRTEST-INFO / { $2 = p "/" $2; print; next }
		/^VRTEST-BOOT / { $1 = "VRTEST-INFO"; $2 = p "/boot-" $2; print; next }
		/^VRTEST / { $2 = p "/" $2; print; next }
		{ print p ": " $0 }
		END { if (!done) print "VRTEST " p "/done FAIL no VRTEST-DONE from " p
			if (done && rc == "0") exit 0
			exit 1 }'
}

# vr_cmd_arg SCRIPT: the kernel option that makes the inner guest's /init
# run SCRIPT (base64; keep scripts under ~1400 bytes).
vr_cmd_arg() { echo "vr.cmd=$(base64 -w0 "$1")"; }

# vr_inner_cmdline [EXTRA...]: kernel command line for the inner guest (the
# VMM adds its own virtio_mmio.device=...), e.g. for vsock-vmm:
#   --cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/inner.sh)")"
vr_inner_cmdline() {
	echo "console=ttyS0 quiet pci=off reboot=t tsc_early_khz=${VR_TSC_KHZ:-2300000} $*"
}

# vr_qemu_inner "APPEND" [QEMU ARGS...]: KVM host only, and only when the run
# ships QEMU (GuestRun::nested_qemu): boot /vr/inner/* with QEMU on this
# host's KVM (microvm without ACPI, so QEMU passes virtio_mmio.device=
# options; 256 MiB, 1 vCPU), console on stdout. A reference
# VMM to compare vsock-vmm with; pipe it through vr_relay.
vr_qemu_inner() {
	_append="$1"
	shift
	qemu-system-x86_64 -L /usr/share/qemu -accel kvm -cpu host -M microvm,rtc=on,acpi=off \
		-m 256M -smp 1 -nographic -no-reboot -monitor none \
		-kernel $VR_INNER/vmlinux -initrd $VR_INNER/initramfs.cpio \
		-append "$(vr_inner_cmdline "$_append")" \
		"$@" </dev/null 2>&1
}
