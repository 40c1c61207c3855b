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
# vr_msg_hashes FILE "LEN LEN ...": FILE holds messages one after the other, of the lengths
# LEN (as a SOCK_SEQPACKET receiver writes them); prints the sha256 of each message (its first
# 16 hex digits), space-separated, in order. Compare it with the hashes of what was sent.
vr_msg_hashes() {
	_off=0
	for _l in $2; do
		tail -c +"$((_off + 1))" "$1" | head -c "$_l" | sha256sum | cut -c1-16
		_off=$((_off + _l))
	done | tr '\n' ' ' | sed 's/ $//'
}

# Milliseconds since boot (for VRTEST-INFO timings).
vr_uptime_ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }

# Handshake budgets for emulated runs, where a 20-connection burst into a nested guest on a
# loaded 2-core machine can take far longer than the device's 2 s defaults (docs/testing.md,
# "Reliability"). For `vsock-vmm --vsock ...,$VR_VSOCK_TIMEOUTS`.
VR_VSOCK_TIMEOUTS=request_timeout_ms=30000,connect_timeout_ms=30000,handshake_timeout_ms=30000
# The guests' own AF_VSOCK connect timeout, for vr-socat (Linux's default is 2 s). Longer than
# the device's budgets, so that the device, the code under test, decides first.
export VR_VSOCK_CONNECT_TIMEOUT=60
# Every AF_VSOCK connect of a scenario goes through vr-socat (socat with that timeout; socat
# 1.7.4.4 cannot set it itself, see integration/src/bin/vr-socat.rs):
#   vr-socat -u FILE:/tmp/x VSOCK-CONNECT:2:1234

# vr_wait_for SECS CMD...: poll until CMD succeeds (every 0.1 s, at most SECS);
# returns CMD's last status. For waiting on a state; retries of an operation
# use vr_retry, which counts them.
vr_wait_for() {
	_deadline=$(($(vr_uptime_ms) + $1 * 1000))
	shift
	while :; do
		"$@" && return 0
		[ "$(vr_uptime_ms)" -ge "$_deadline" ] && return 1
		usleep 100000
	done
}

# vr_wait_vmms SECS NAME:PID:LOG...: wait until every VMM process has ended or SECS
# passed; once a minute print "VRTEST-INFO NAME-progress <last line of LOG>" for each
# one still running, so a run whose VMM logs go to files (relayed only at the end) still
# shows on the console how far each inner guest got. When one VMM has ended and its inner
# guest never printed VRTEST-DONE (it crashed), the others have lost their peer: after
# VR_PEER_GRACE seconds (default 20) each one still running is stopped (SIGTERM to its PID;
# "VRTEST-INFO NAME-stopped <why>"), instead of waiting out every case's limit.
# vr_running PID: the process runs (it exists and is no zombie: a background child that has
# exited stays one until its shell waits for it). vr_gone PID: the opposite, for vr_check and
# vr_wait_for.
vr_running() {
	kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}
vr_gone() { ! vr_running "$1"; }
# vr_wait_while PID SECS CMD...: as vr_wait_for SECS CMD, but gives up (status 2) as soon as
# process PID has ended (a nested VMM that is gone sends no more signals).
vr_wait_while() {
	_ww_pid=$1 _ww_deadline=$(($(vr_uptime_ms) + $2 * 1000))
	shift 2
	while :; do
		"$@" && return 0
		vr_running "$_ww_pid" || return 2
		[ "$(vr_uptime_ms)" -ge "$_ww_deadline" ] && return 1
		usleep 100000
	done
}
# vr_vmm_lost NAME PID [API]: a step that needs the nested guest failed while its VMM still
# runs. Prints what tells a stuck guest from a stuck VMM: each VMM thread's state, CPU ticks
# (twice, 2 s apart: a spinning thread's grow) and wait channel as NAME-thread infos; the API's
# info and connections (API: its socket) as lines "NAME-api-info: ...". Then ends the VMM (TERM,
# KILL after 10 s), so that the scenario runs on to relay the VMM's console now instead of
# timing out.
vr_vmm_lost() {
	_vl_n=$1 _vl_p=$2 _vl_a=${3:-}
	vr_running "$_vl_p" || return 0
	for _vl_round in 1 2; do
		for _vl_t in /proc/"$_vl_p"/task/*; do
			# Fields after the ")" that ends comm: 1 state, 12 utime, 13 stime.
			vr_info "$_vl_n-thread" "round $_vl_round: $(cat "$_vl_t/comm" 2>/dev/null)" \
				"$(sed 's/.*) //' "$_vl_t/stat" 2>/dev/null | cut -d' ' -f1,12,13)" \
				"wchan=$(cat "$_vl_t/wchan" 2>/dev/null)"
		done
		[ "$_vl_round" = 2 ] || sleep 2
	done
	if [ -n "$_vl_a" ]; then
		for _vl_what in info connections; do
			timeout 10 vsock-vmm remote --api-socket "$_vl_a" "$_vl_what" 2>&1 | head -n 60 |
				sed "s/^/$_vl_n-api-$_vl_what: /"
		done
	fi
	kill "$_vl_p" 2>/dev/null
	vr_wait_for 10 vr_gone "$_vl_p" || kill -KILL "$_vl_p" 2>/dev/null
	vr_info "$_vl_n-ended" "the VMM was ended after the failure above"
}
vr_wait_vmms() {
	_limit=$1
	shift
	_start=$(vr_uptime_ms)
	_next=$((_start + 60000))
	_lost= _lost_at= _stopped=
	while :; do
		_alive=
		for _v in "$@"; do
			_n="${_v%%:*}" _l="${_v##*:}" _p="${_v#*:}"
			_p="${_p%%:*}"
			if vr_running "$_p"; then
				_alive=1
			elif [ -z "$_lost" ] && [ $# -gt 1 ] && ! grep -q VRTEST-DONE "$_l" 2>/dev/null; then
				_lost="$_n" _lost_at=$(vr_uptime_ms)
			fi
		done
		[ -z "$_alive" ] && return 0
		_now=$(vr_uptime_ms)
		[ "$_now" -ge $((_start + _limit * 1000)) ] && return 1
		if [ -n "$_lost" ] && [ -z "$_stopped" ] &&
			[ "$_now" -ge $((_lost_at + ${VR_PEER_GRACE:-20} * 1000)) ]; then
			_stopped=1
			for _v in "$@"; do
				_n="${_v%%:*}" _p="${_v#*:}"
				_p="${_p%%:*}"
				vr_running "$_p" || continue
				vr_info "$_n-stopped" "its peer $_lost ended without VRTEST-DONE $(((_now - _lost_at) / 1000)) s ago"
				kill "$_p" 2>/dev/null
			done
		fi
		if [ "$_now" -ge "$_next" ]; then
			_next=$((_now + 60000))
			for _v in "$@"; do
				_n="${_v%%:*}" _l="${_v##*:}" _p="${_v#*:}"
				_p="${_p%%:*}"
				vr_running "$_p" &&
					vr_info "$_n-progress" "$(($((_now - _start)) / 1000)) s: $(tail -n 1 "$_l" 2>/dev/null)"
			done
		fi
		usleep 200000
	done
}

# vr_stall_watch SECS NAME PID LOG: in the background, while PID runs, ends it when LOG has
# not grown for SECS seconds, printing "VRTEST-PLATFORM-FAULT NAME made no progress for SECS s:
# <last line of LOG>", which the harness takes as the emulated platform's fault (the run is
# rerun once). Only for reference software that is not the code under test (QEMU as the
# reference VMM, whose inner guest hung on nested KVM): a stall of our own VMM is a failure.
vr_stall_watch() {
	(
		_secs=$1 _name=$2 _pid=$3 _log=$4 _size=-1 _since=$(vr_uptime_ms)
		while vr_running "$_pid"; do
			_now_size=$(wc -c <"$_log" 2>/dev/null || echo 0)
			if [ "$_now_size" != "$_size" ]; then
				_size=$_now_size _since=$(vr_uptime_ms)
			elif [ "$(vr_uptime_ms)" -ge $((_since + _secs * 1000)) ]; then
				echo "VRTEST-PLATFORM-FAULT $_name made no progress for $_secs s: $(tail -n 1 "$_log" 2>/dev/null | tr -d '\r')"
				kill "$_pid" 2>/dev/null
				break
			fi
			sleep 2
		done
	) &
}

# vr_retry [-w COND] NAME SECS CMD...: run CMD until it succeeds, 0.2 s apart,
# at most SECS seconds and 5*SECS retries, and (with -w) only while the shell
# command COND succeeds (e.g. the VMM still runs); prints "VRTEST-INFO NAME
# retries=<n>" (runs after the first; "retries=<n> gave-up" when it never
# succeeded), so that a retry is always visible. Returns CMD's last status.
vr_retry() {
	local cond=true
	[ "$1" != -w ] || { cond="$2"; shift 2; }
	local name="$1" deadline max tries=0 rc
	deadline=$(($(vr_uptime_ms) + $2 * 1000))
	max=$(($2 * 5))
	shift 2
	while :; do
		if "$@"; then
			vr_info "$name" "retries=$tries"
			return 0
		else
			rc=$?
		fi
		if ! eval "$cond"; then
			vr_info "$name" "retries=$tries gave-up (no longer: $cond)"
			return "$rc"
		fi
		if [ "$tries" -ge "$max" ] || [ "$(vr_uptime_ms)" -ge "$deadline" ]; then
			vr_info "$name" "retries=$tries gave-up"
			return "$rc"
		fi
		tries=$((tries + 1))
		usleep 200000
	done
}

# vr_collect [-o LISTEN-OPTIONS] [-l LOG] PORT DIR [ANSWER...]: a vsock
# listener that keeps accepting (a retrying sender may connect again after a
# failed try): every connection's bytes go to DIR/<uptime at its end>.<peer
# port> once the peer has shut its sending side (DIR/.part.<peer port> until
# then). With ANSWER, the connection then gets ANSWER's output: "hash" sends
# the sha256 of the bytes received, anything else is run as a command. -o
# adds socat options to VSOCK-LISTEN (",..."); -l logs socat's accepts to LOG
# (-d -d; else errors go to /tmp/vr-collect.PORT.log). Runs in the
# foreground: start it with "&", and kill $! to stop it.
vr_collect() {
	local opts="" log="" debug=""
	while :; do
		case "$1" in
		-o) opts="$2"; shift 2 ;;
		-l) log="$2"; debug="-d -d"; shift 2 ;;
		*) break ;;
		esac
	done
	local port="$1" dir="$2" dash=-u
	[ -n "$log" ] || log="/tmp/vr-collect.$port.log"
	shift 2
	mkdir -p "$dir"
	[ "$#" -eq 0 ] || dash=""
	# Written once per listener, atomically: other listeners' connections may run it meanwhile.
	cat >"/tmp/vr-store.sh.$port" <<'EOS'
d="$1"
shift
id="${SOCAT_PEERPORT:-$$}"
cat >"$d/.part.$id" || exit 1
f="$d/$(cut -d' ' -f1 /proc/uptime).$id"
mv "$d/.part.$id" "$f"
if [ "$1" = hash ]; then sha256sum <"$f" | head -c 64; elif [ "$#" -gt 0 ]; then exec "$@"; fi
EOS
	mv -f "/tmp/vr-store.sh.$port" /tmp/vr-store.sh
	# shellcheck disable=SC2086 # $debug and $dash are zero or more words
	exec socat $debug $dash -t 120 -T 300 "VSOCK-LISTEN:$port,fork$opts" \
		SYSTEM:"sh /tmp/vr-store.sh $dir $*" 2>"$log"
}
# The file of the connection that completed last in a vr_collect DIR, or of the
# one from peer port PORT (vr_collected DIR PORT); the number of connections
# accepted (vr_collected_count DIR, unfinished ones included).
vr_collected() {
	if [ -n "${2:-}" ]; then ls "$1" | grep "\.$2\$" | sort -n | tail -n 1 | sed "s|^|$1/|"
	else ls "$1" | sort -n | tail -n 1 | sed "s|^|$1/|"; fi
}
vr_collected_count() { ls -A "$1" | wc -l; }
# vr_collected_is DIR SHA256: the last completed connection carried exactly those bytes.
vr_collected_is() {
	_f="$(vr_collected "$1")"
	[ -n "$_f" ] && [ "$(vr_sha256 "$_f")" = "$2" ]
}

# Inner guests only: vr_host_phase_is PHASE: the host side's phase, which the
# scenarios' host scripts serve on CID 2 port 999, is PHASE (use with vr_wait_for).
vr_host_phase_is() { [ "$(vr-socat -T2 -u VSOCK-CONNECT:2:999 - 2>/dev/null)" = "$1" ]; }

# Inner guests only: vr_expect_reset CID PORT: a connect to (CID, PORT) must be
# refused with ECONNRESET (strict mode: no route). Reports strict-refused and
# strict-econnreset.
vr_expect_reset() {
	if echo x | vr-socat -u - "VSOCK-CONNECT:$1:$2" 2>/tmp/vr-reset.err; then
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
# CMD | vr_relay -u PREFIX: the same for a nested guest that was ended on
# purpose before its scenario could finish (paused, snapshotted and ended: its
# scenario goes on in the VMs restored from the snapshot): no PREFIX/done
# check, but "PREFIX/unfinished", PASS when no VRTEST-DONE came, FAIL when one
# did. Returns 1 when that check failed.
vr_relay() {
	_unfinished=0
	[ "$1" != -u ] || { _unfinished=1; shift; }
	tr -d '\r' | awk -v p="$1" -v u="$_unfinished" '
		/^VRTEST-DONE / { done = 1; rc = $2; sub(/^rc=/, "", rc)
			if (!u) print "VRTEST " p "/done " (rc == "0" ? "PASS" : "FAIL") " rc=" rc; next }
		/^VRTEST-INFO / { $2 = p "/" $2; print; next }
		/^VRTEST-BOOT / { $1 = "VRTEST-INFO"; $2 = p "/boot-" $2; print; next }
		/^VRTEST / { $2 = p "/" $2; print; next }
		{ print p ": " $0 }
		END { if (u) { print "VRTEST " p "/unfinished " (done ? "FAIL VRTEST-DONE rc=" rc " from " p : "PASS")
				exit done ? 1 : 0 }
			if (!done) print "VRTEST " p "/done FAIL no VRTEST-DONE from " p
			if (done && rc == "0") exit 0
			exit 1 }'
}

# vr_cmd_arg SCRIPT: the kernel option that makes the inner guest's /init
# run SCRIPT (base64; keep scripts under ~1400 bytes).
vr_cmd_arg() { echo "vr.cmd=$(base64 -w0 "$1")"; }

# vr_inner_cmdline [EXTRA...]: kernel command line for the inner guest (the
# VMM adds its own virtio_mmio.device=...), e.g. for vsock-vmm:
#   --cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/inner.sh)")"
# The guest reboots with reboot=${VR_INNER_REBOOT:-k}: through the i8042 reset,
# which vsock-vmm has, so a triple fault there is a crash.
vr_inner_cmdline() {
	echo "console=ttyS0 quiet pci=off reboot=${VR_INNER_REBOOT:-k} tsc_early_khz=${VR_TSC_KHZ:-2300000} $*"
}

# vr_qemu_inner "APPEND" [QEMU ARGS...]: KVM host only, and only when the run
# ships QEMU (GuestRun::nested_qemu): boot /vr/inner/* with QEMU on this
# host's KVM (microvm without ACPI, so QEMU passes virtio_mmio.device=
# options; 256 MiB, 1 vCPU), console on stdout. A reference
# VMM to compare vsock-vmm with; pipe it through vr_relay. microvm has no
# i8042, so the guest reboots with reboot=t (a triple fault ends QEMU, as
# -no-reboot asks). With reboot=k its kernel polls the missing controller's
# status port 655360 times (one VM exit each: minutes under emulation) and
# then jumps to the BIOS reset vector, which QEMU does not see as a reset.
vr_qemu_inner() {
	_append="$1"
	shift
	qemu-system-x86_64 -L /usr/share/qemu -accel kvm -cpu host -M microvm,rtc=on,acpi=off \
		-m 256M -smp 1 -nographic -no-reboot -monitor none \
		-kernel $VR_INNER/vmlinux -initrd $VR_INNER/initramfs.cpio \
		-append "$(VR_INNER_REBOOT=t vr_inner_cmdline "$_append")" \
		"$@" </dev/null 2>&1
}
