# Sibling A (CID 3) of integration/tests/vsock_e2e.rs: send 4 MiB to CID 5 port 9000 (retrying
# until B listens), shut the write side, read B's answer.
want=$(vr_pattern_file /tmp/up.bin 4194304)
try() {
	socat -t 120 'FILE:/tmp/up.bin!!CREATE:/tmp/back.bin' VSOCK-CONNECT:5:9000 2>/dev/null &&
		[ "$(wc -c </tmp/back.bin)" -eq 4194304 ]
}
vr_wait_for 120 try
vr_expect_eq sibling-a-got "$want" "$(vr_sha256 /tmp/back.bin)"
