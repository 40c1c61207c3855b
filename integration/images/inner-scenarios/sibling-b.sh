# Sibling B (CID 5) of integration/tests/vsock_e2e.rs: accept one connection on port 9000, read
# to EOF, answer with the same pattern; log the peer address socat saw.
want=$(vr_pattern_file /tmp/up.bin 4194304)
socat -d -d -t 120 VSOCK-LISTEN:9000 SYSTEM:'cat > /tmp/got.bin; cat /tmp/up.bin' 2>/tmp/socat.log
vr_expect_eq sibling-b-got "$want" "$(vr_sha256 /tmp/got.bin)"
vr_info sibling-b-peer "$(grep -i 'accepting connection' /tmp/socat.log)"
vr_check sibling-b-sees-cid-3 grep -qi 'accepting connection from.*cid:3 ' /tmp/socat.log
