# Inner-guest side of integration/tests/vsock_e2e.rs (vsock-vmm on the KVM host's KVM).
# The host side serves CID 2 ports through <socket>_<port>, tells us its phase on port 999 and,
# on port 996, the port of each host -> guest connection it got an OK line for
# ("<guest port> <OK port>", or "<guest port> none" when it gave up).
up=$(vr_pattern_file /tmp/up.bin 8388608)

# The file of the connection on guest port $1 that the host got its OK line for: the host's
# retries may have connected before (each lands in its own file); this one must be exact.
h2g_final() { # GUEST-PORT DIR
	vr_wait_for 400 sh -c "vr-socat -u VSOCK-CONNECT:2:996 - 2>/dev/null | grep -q '^$1 ' ||
		{ usleep 400000; false; }" ||
		{ echo "no-ok-line-from-host"; return; }
	_ok=$(vr-socat -u VSOCK-CONNECT:2:996 - 2>/dev/null | sed -n "s/^$1 //p" | head -n 1)
	[ "$_ok" != none ] || { echo "host-gave-up"; return; }
	vr_wait_for 60 sh -c "ls $2 | grep -q '\\.$_ok\$'"
	vr_collected "$2" "$_ok"
}

# 1. guest -> host, one way, 8 MiB.
vr_check g2h-upload vr-socat -u FILE:/tmp/up.bin VSOCK-CONNECT:2:1234
# 1b. Both ways on one connection: we send 8 MiB and shut our write side; the host reads to
# EOF, then answers with the same 8 MiB and closes.
vr-socat -t 120 -T 180 'FILE:/tmp/up.bin!!CREATE:/tmp/both.bin' VSOCK-CONNECT:2:1236
vr_expect_eq g2h-half-close-reply "$up" "$(vr_sha256 /tmp/both.bin)"

# 1c. The other half-close: the host sends 8 MiB and shuts its write side first; we read to
# EOF, then answer with the same 8 MiB on the same connection.
vr-socat -t 120 -T 180 VSOCK-CONNECT:2:1237 SYSTEM:'cat >/tmp/rev.bin; cat /tmp/up.bin'
vr_expect_eq h2g-half-close-got "$up" "$(vr_sha256 /tmp/rev.bin)"

# 2. host -> guest: the host connects to <socket> with "CONNECT 5000" (retrying until we listen).
vr_collect 5000 /tmp/h2g.d &
h2g=$!
f=$(h2g_final 5000 /tmp/h2g.d)
kill "$h2g"
vr_info h2g-connections "$(vr_collected_count /tmp/h2g.d)"
vr_expect_eq h2g-data "$up" "$(if [ -f "$f" ]; then vr_sha256 "$f"; else echo "$f"; fi)"

# 3. 20 concurrent connections each way, 256 KiB each, a different stream on each.
vr_pattern_file /tmp/s.bin 262144 >/dev/null
for i in $(seq 0 19); do { echo "stream $i"; cat /tmp/s.bin; } >/tmp/s$i.bin; done
rx=
for i in $(seq 0 19); do
	vr_collect $((5100 + i)) /tmp/r$i.d &
	rx="$rx $!"
done
tx=
for i in $(seq 0 19); do
	vr-socat -u FILE:/tmp/s$i.bin VSOCK-CONNECT:2:$((1300 + i)) &
	tx="$tx $!"
done
failed=
for p in $tx; do wait "$p" || failed="$failed $p"; done
vr_expect_eq g2h-concurrent-sent "" "$failed"
bad=
conns=
for i in $(seq 0 19); do
	f=$(h2g_final $((5100 + i)) /tmp/r$i.d)
	[ -f "$f" ] && [ "$(vr_sha256 "$f")" = "$(vr_sha256 /tmp/s$i.bin)" ] || bad="$bad $i"
	conns="$conns $(vr_collected_count /tmp/r$i.d)"
done
kill $rx
vr_info h2g-concurrent-connections "$conns"
vr_expect_eq h2g-concurrent-20 "" "$bad"

# 5. An unowned CID with fallback on: through the uplink stand-in.
vr_check fallback-connect sh -c 'echo fallback-hello | vr-socat -u - VSOCK-CONNECT:77:6000'
# A connection that stays open until the host has switched to strict mode, then sends.
(vr_wait_for 240 vr_host_phase_is strict; echo held-open) | vr-socat -u - VSOCK-CONNECT:77:6002 &
held=$!
vr_wait_for 240 vr_host_phase_is strict || vr_fail phase-strict "host never switched"
vr_expect_reset 77 6001
wait "$held"
vr_expect_eq held-connection-survived 0 "$?"
