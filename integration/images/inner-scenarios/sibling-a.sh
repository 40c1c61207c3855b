# Sibling A (CID 3) of integration/tests/vsock_e2e.rs: send 4 MiB to CID 5 port 9000 (retrying
# until B listens), shut the write side, read B's answer. Then tell B, on its port 9001, the
# local port of the connection that worked: B checks exactly that connection's bytes.
want=$(vr_pattern_file /tmp/up.bin 4194304)
try() {
	VR_SOCAT_LOCAL=/tmp/a.port vr-socat -t 120 'FILE:/tmp/up.bin!!CREATE:/tmp/back.bin' \
		VSOCK-CONNECT:5:9000 2>/dev/null &&
		[ "$(wc -c </tmp/back.bin)" -eq 4194304 ]
}
vr_retry sibling-a-connect 200 try || echo none >/tmp/a.port
vr_expect_eq sibling-a-got "$want" "$(vr_sha256 /tmp/back.bin)"
vr_retry sibling-a-final-port 60 vr-socat -u FILE:/tmp/a.port VSOCK-CONNECT:5:9001
