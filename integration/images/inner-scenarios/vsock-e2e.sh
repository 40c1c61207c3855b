# Inner-guest side of integration/tests/vsock_e2e.rs (vsock-vmm on the KVM host's KVM).
# The host side serves CID 2 ports through <socket>_<port> and tells us its phase on port 999.
up=$(vr_pattern_file /tmp/up.bin 8388608)

# 1. guest -> host, one way, 8 MiB.
vr_check g2h-upload socat -u FILE:/tmp/up.bin VSOCK-CONNECT:2:1234
# 1b. Both ways on one connection: we send 8 MiB and shut our write side; the host reads to
# EOF, then answers with the same 8 MiB and closes.
socat -t 120 -T 180 'FILE:/tmp/up.bin!!CREATE:/tmp/both.bin' VSOCK-CONNECT:2:1236
vr_expect_eq g2h-half-close-reply "$up" "$(vr_sha256 /tmp/both.bin)"

# 1c. The other half-close: the host sends 8 MiB and shuts its write side first; we read to
# EOF, then answer with the same 8 MiB on the same connection.
socat -t 120 -T 180 VSOCK-CONNECT:2:1237 SYSTEM:'cat >/tmp/rev.bin; cat /tmp/up.bin'
vr_expect_eq h2g-half-close-got "$up" "$(vr_sha256 /tmp/rev.bin)"

# 2. host -> guest: the host connects to <socket> with "CONNECT 5000".
socat -u VSOCK-LISTEN:5000 CREATE:/tmp/h2g.bin
vr_expect_eq h2g-data "$up" "$(vr_sha256 /tmp/h2g.bin)"

# 3. 20 concurrent connections each way, 256 KiB each, a different stream on each.
vr_pattern_file /tmp/s.bin 262144 >/dev/null
for i in $(seq 0 19); do { echo "stream $i"; cat /tmp/s.bin; } >/tmp/s$i.bin; done
rx=
for i in $(seq 0 19); do
	socat -u VSOCK-LISTEN:$((5100 + i)) CREATE:/tmp/r$i.bin &
	rx="$rx $!"
done
tx=
for i in $(seq 0 19); do
	socat -u FILE:/tmp/s$i.bin VSOCK-CONNECT:2:$((1300 + i)) &
	tx="$tx $!"
done
failed=
for p in $tx; do wait "$p" || failed="$failed $p"; done
vr_expect_eq g2h-concurrent-sent "" "$failed"
for p in $rx; do wait "$p"; done
bad=
for i in $(seq 0 19); do
	[ "$(vr_sha256 /tmp/r$i.bin)" = "$(vr_sha256 /tmp/s$i.bin)" ] || bad="$bad $i"
done
vr_expect_eq h2g-concurrent-20 "" "$bad"

# 5. An unowned CID with fallback on: through the uplink stand-in.
vr_check fallback-connect sh -c 'echo fallback-hello | socat -u - VSOCK-CONNECT:77:6000'
# A connection that stays open until the host has switched to strict mode, then sends.
(vr_wait_for 240 vr_host_phase_is strict; echo held-open) | socat -u - VSOCK-CONNECT:77:6002 &
held=$!
vr_wait_for 240 vr_host_phase_is strict || vr_fail phase-strict "host never switched"
vr_expect_reset 77 6001
wait "$held"
vr_expect_eq held-connection-survived 0 "$?"
