# Linux's vsock conformance suite (tools/testing/vsock/vsock_test from linux-source-6.1, shipped
# as /vr/bin/vsock_test) between two guests, for integration/tests/conformance.rs. One side is
# the vsock_test server, the other the client; every case runs alone (one vsock_test run per
# case, all other cases --skip'ped), so a failing case cannot hide the ones after it. Each side
# reports every case as
#   VRTEST vsock_test/<index>-<slug> PASS|FAIL|SKIP <detail>
# and prints the whole output of a failing case as "vsock_test[<index>]: <line>" lines.
#
# Parameters (environment first, for a guest that sources this file from its own scenario, like
# the enclave; else the kernel command line): VR_ROLE / vr.role= server|client, VR_PEER /
# vr.peer= the other side's CID, VR_CT_DEVICE / vr.ct_device= how to name this guest's vsock
# device in a SKIP reason (default "the device").
#
# vsock_test needs a TCP control connection between its two sides; these guests only have
# loopback, so it is tunnelled over vsock (through the devices under test): the client's
# vsock_test connects to 127.0.0.1:7000, where `vr-socat TCP-LISTEN:7000 VSOCK-CONNECT:<peer>:2000`
# carries it to the server, whose `socat VSOCK-LISTEN:2000 TCP:127.0.0.1:7000` hands it to the
# server's vsock_test. The server also answers on vsock port 2001 with its state file (the plan,
# then "ready <i>" once case i's tunnel listens) and takes the client's hello on port 2002.
# vsock_test's own cases use port 1234. Every vsock connection goes from the client to the
# server (across the uplink: from the inner guest to the enclave by g2h fallback). The tunnel
# ends gracefully: each socat shuts its write side at its input's end of stream and exits only
# when both directions ended (-t) and is not killed before (bounded), so the last control line
# ("COMPLETED", after which vsock_test exits at once) still arrives. Our own connects use
# vr-socat (the harness's socat with a 60 s AF_VSOCK connect timeout instead of 2 s); vsock_test
# keeps the kernel's default, as the suite is written.

ct_role="${VR_ROLE:-$(vr_cmdline_arg vr.role)}"
ct_peer="${VR_PEER:-$(vr_cmdline_arg vr.peer)}"
ct_device="${VR_CT_DEVICE:-$(vr_cmdline_arg vr.ct_device | tr _ ' ')}"
ct_device="${ct_device:-the device}"
ct_tunnel=2000 ct_state_port=2001 ct_hello_port=2002 ct_control=7000
# Bounds: one vsock_test run (its own per-step timeout is 10 s), waiting for the peer.
ct_case_limit=150 ct_peer_limit=300

# Negotiated virtio features of this guest's vsock device (virtio device ID 19): the character
# for VIRTIO_VSOCK_F_SEQPACKET (bit 1) of sysfs "features", which lists bit 0 first. Prints
# 1 or 0, or "?" when no virtio vsock device is found.
ct_seqpacket_feature() {
	for _d in /sys/bus/virtio/devices/*; do
		[ "$(cat "$_d/device" 2>/dev/null)" = 0x0013 ] || continue
		cut -c2 "$_d/features"
		return 0
	done
	echo '?'
}

# ct_seqpacket_refusal: when the feature is absent, the kernel must refuse a SOCK_SEQPACKET
# connect locally (ESOCKTNOSUPPORT, nothing is sent). Prints socat's error for the SKIP detail:
# a connect to the peer's port 2003 (nobody listens there) through socat's generic socket
# address (AF_VSOCK = 40, protocol 0, type=5 for SOCK_SEQPACKET; after the family, struct sockaddr_vm holds 2
# reserved bytes, the port and the CID as little-endian u32, then 4 bytes of flags and zeros).
ct_seqpacket_refusal() {
	_le() { printf '%08x' "$1" | sed 's/\(..\)\(..\)\(..\)\(..\)/\4\3\2\1/'; }
	socat -u /dev/null "SOCKET-CONNECT:40:0:x0000$(_le 2003)$(_le "$ct_peer")00000000,type=5" 2>&1 |
		tail -n 1 | sed 's/^.*E //'
}

# ct_listening PORT: a TCP socket listens on PORT (IPv4) in this guest.
ct_listening() {
	awk -v p="$(printf ':%04X' "$1")" 'substr($2, length($2) - 4) == p && $4 == "0A" { f = 1 }
		END { exit !f }' /proc/net/tcp
}

# ct_end_tunnel PID: let the tunnel's socat forward the last bytes and end by itself once both
# directions ended (bounded), then reap it.
ct_end_tunnel() {
	vr_wait_for 30 vr_gone "$1" || vr_info vsock_test/tunnel "socat $1 still running after 30 s, killed"
	kill "$1" 2>/dev/null
	wait "$1" 2>/dev/null
}

# Case list from the binary itself: "<index> <slug> <type> <name>" per line, the slug being the
# name without "SOCK_", lower case, runs of other characters as "-".
vsock_test --list 2>/dev/null | awk -F '\t' '/^[0-9]+\t/ {
	s = tolower($2); sub(/^sock_/, "", s); gsub(/[^a-z0-9]+/, "-", s); gsub(/^-|-$/, "", s)
	t = ($2 ~ /^SOCK_SEQPACKET/) ? "seqpacket" : "stream"
	print $1, s, t, $2 }' >/tmp/ct-cases
ct_all="$(cut -d' ' -f1 /tmp/ct-cases | tr '\n' ' ')"
[ -n "$ct_all" ] || vr_fail vsock_test/list "vsock_test --list printed no cases"
ct_slug() { awk -v i="$1" '$1 == i { print $2 }' /tmp/ct-cases; }
ct_name() { awk -v i="$1" '$1 == i { $1 = $2 = $3 = ""; sub(/^ +/, ""); print }' /tmp/ct-cases; }
ct_type() { awk -v i="$1" '$1 == i { print $3 }' /tmp/ct-cases; }
ct_skip_args() { # INDEX: --skip for every other case
	for _j in $ct_all; do [ "$_j" = "$1" ] || printf ' --skip=%s' "$_j"; done
}

# ct_verdict INDEX RC LOG MS: this side's verdict on one case. PASS needs exit status 0, the
# case's "ok" and the final barrier's "ok" (which the peer only passes when its side of the
# case succeeded too).
ct_verdict() {
	_i="$1" _rc="$2" _log="$3" _ms="$4"
	_n="vsock_test/$_i-$(ct_slug "$_i")"
	if [ "$_rc" = 0 ] && grep -qF "$_i - $(ct_name "$_i")...ok" "$_log" &&
		grep -qF 'All tests have been executed. Waiting other peer...ok' "$_log"; then
		vr_pass "$_n" "ok in $_ms ms"
		return 0
	fi
	vr_fail "$_n" "rc=$_rc after $_ms ms: $(grep -v -e '\.\.\.skipped$' -e '^Control socket' "$_log" | tr '\n' ' ')"
	sed "s/^/vsock_test[$_i]: /" "$_log"
	return 1
}

# The control connection runs over TCP on loopback, which the inner guest's /init leaves down.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up

# The server's plan skips these cases; both sides report them.
ct_report_skips() {
	grep '^skip ' /tmp/ct-state | while read -r _ _i _why; do
		vr_skip "vsock_test/$_i-$(ct_slug "$_i")" "$_why"
	done
}

ct_feature="$(ct_seqpacket_feature)"
ct_refusal=-
[ "$ct_feature" = 1 ] || ct_refusal="$(ct_seqpacket_refusal)"
vr_info vsock_test/seqpacket-feature "$ct_role: bit 1 = $ct_feature; SOCK_SEQPACKET connect: $ct_refusal"

case "$ct_role" in
server)
	: >/tmp/ct-state
	socat VSOCK-LISTEN:$ct_state_port,reuseaddr,fork SYSTEM:'cat /tmp/ct-state' &
	ct_state_pid=$!
	# The client's hello: "hello <its feature bit>" and "<its device name>|<its connect probe>".
	timeout $ct_peer_limit socat -u VSOCK-LISTEN:$ct_hello_port CREATE:/tmp/ct-hello
	{ read -r _ ct_peer_feature; IFS='|' read -r ct_peer_device ct_peer_refusal; } </tmp/ct-hello ||
		ct_peer_feature=none
	vr_info vsock_test/hello "$(cat /tmp/ct-hello 2>/dev/null)"
	if [ "$ct_peer_feature" = none ]; then
		# Without a client no case can run: say so for each at once instead of waiting out
		# every case's limit.
		vr_fail vsock_test/hello "no hello from the client within $ct_peer_limit s"
		for i in $ct_all; do vr_fail "vsock_test/$i-$(ct_slug "$i")" "no client"; done
		ct_all=
	fi
	# The SEQPACKET cases run when both devices offer the feature, else they are skipped.
	why=
	[ "$ct_feature" = 1 ] || why="$ct_device does not offer VIRTIO_VSOCK_F_SEQPACKET yet (server: feature bit 1 = $ct_feature, SOCK_SEQPACKET connect: $ct_refusal)"
	[ "$ct_peer_feature" = 1 ] || why="${why:+$why; }$ct_peer_device does not offer VIRTIO_VSOCK_F_SEQPACKET yet (client: feature bit 1 = $ct_peer_feature, SOCK_SEQPACKET connect: $ct_peer_refusal)"
	plan=
	for i in $ct_all; do
		if [ "$(ct_type "$i")" = seqpacket ] && [ -n "$why" ]; then
			echo "skip $i $why" >>/tmp/ct-state
		else
			plan="$plan $i"
		fi
	done
	echo "plan$plan" >>/tmp/ct-state
	vr_info vsock_test/plan "$plan"
	ct_report_skips
	for i in $plan; do
		start=$(vr_uptime_ms)
		# shellcheck disable=SC2046
		timeout $ct_case_limit vsock_test --mode=server --control-port=$ct_control \
			--peer-cid="$ct_peer" $(ct_skip_args "$i") >/tmp/ct-$i.log 2>&1 &
		t=$!
		vr_wait_for 30 ct_listening $ct_control || vr_info vsock_test/$i-control "not listening after 30 s"
		# "ready" only once the tunnel listens (socat -d -d says so): a connect before that
		# would be reset.
		socat -d -d -t $ct_case_limit VSOCK-LISTEN:$ct_tunnel,reuseaddr TCP:127.0.0.1:$ct_control \
			2>/tmp/ct-tunnel-$i.log &
		tun=$!
		vr_wait_for 30 grep -q 'listening on' /tmp/ct-tunnel-$i.log ||
			vr_info vsock_test/$i-tunnel "not listening after 30 s: $(cat /tmp/ct-tunnel-$i.log)"
		echo "ready $i" >>/tmp/ct-state
		wait "$t"
		rc=$?
		ct_end_tunnel "$tun"
		ct_verdict "$i" "$rc" /tmp/ct-$i.log $(($(vr_uptime_ms) - start))
	done
	# The client says goodbye after its last case (bounded); then the state listener goes.
	if [ "$ct_peer_feature" != none ]; then
		timeout $ct_peer_limit socat -u VSOCK-LISTEN:$ct_hello_port CREATE:/tmp/ct-bye
		vr_info vsock_test/bye "$(cat /tmp/ct-bye 2>/dev/null)"
	fi
	kill "$ct_state_pid" 2>/dev/null
	;;
client)
	ct_get_state() { vr-socat -T 10 -u VSOCK-CONNECT:"$ct_peer":$ct_state_port - >/tmp/ct-state 2>/dev/null; }
	ct_state_has() { ct_get_state && grep -q "$1" /tmp/ct-state; }
	printf 'hello %s\n%s|%s\n' "$ct_feature" "$ct_device" "$ct_refusal" >/tmp/ct-hello
	plan=
	if ! vr_wait_for $ct_peer_limit sh -c "vr-socat -u FILE:/tmp/ct-hello VSOCK-CONNECT:$ct_peer:$ct_hello_port 2>/dev/null"; then
		vr_fail vsock_test/hello "cannot reach the server (CID $ct_peer port $ct_hello_port) within $ct_peer_limit s"
		for i in $ct_all; do vr_fail "vsock_test/$i-$(ct_slug "$i")" "no server"; done
	elif vr_wait_for 60 ct_state_has '^plan'; then
		plan="$(sed -n 's/^plan//p' /tmp/ct-state)"
	else
		vr_fail vsock_test/plan "no plan from the server: $(cat /tmp/ct-state)"
	fi
	vr_info vsock_test/plan "$plan"
	ct_report_skips
	for i in $plan; do
		if ! vr_wait_for $ct_case_limit ct_state_has "^ready $i\$"; then
			vr_fail "vsock_test/$i-$(ct_slug "$i")" "the server never got ready for it: $(tail -n 2 /tmp/ct-state | tr '\n' ' ')"
			continue
		fi
		start=$(vr_uptime_ms)
		# vr-socat connects to the server's tunnel first, then listens for our vsock_test.
		vr-socat -t $ct_case_limit TCP-LISTEN:$ct_control,bind=127.0.0.1,reuseaddr VSOCK-CONNECT:"$ct_peer":$ct_tunnel &
		tun=$!
		vr_wait_for 30 ct_listening $ct_control || vr_info vsock_test/$i-control "tunnel not listening after 30 s"
		# shellcheck disable=SC2046
		timeout $ct_case_limit vsock_test --mode=client --control-host=127.0.0.1 \
			--control-port=$ct_control --peer-cid="$ct_peer" $(ct_skip_args "$i") >/tmp/ct-$i.log 2>&1
		rc=$?
		ct_end_tunnel "$tun"
		ct_verdict "$i" "$rc" /tmp/ct-$i.log $(($(vr_uptime_ms) - start))
	done
	[ -z "$plan" ] ||
		vr_wait_for 60 sh -c "echo bye | vr-socat -u - VSOCK-CONNECT:$ct_peer:$ct_hello_port 2>/dev/null" ||
		vr_info vsock_test/bye "the server did not take the goodbye"
	;;
*)
	vr_fail vsock_test/role "vr.role must be server or client, got '$ct_role'"
	;;
esac
# The verdict is the checks' (VR_FAILED), not the last command's status.
:
