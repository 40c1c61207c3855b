# Sibling B (CID 5) of integration/tests/vsock_e2e.rs: keep accepting on port 9000 (A retries
# until we listen; each connection lands in its own file), read each to EOF, answer with the
# same pattern. A names the connection that worked (its local port, on our port 9001): exactly
# that one must carry the pattern, from CID 3.
want=$(vr_pattern_file /tmp/up.bin 4194304)
vr_collect -l /tmp/socat.log 9000 /tmp/got.d cat /tmp/up.bin &
rx=$!
vr_collect 9001 /tmp/final.d &
fin=$!
final_port() { _f=$(vr_collected /tmp/final.d) && [ -n "$_f" ] && grep -x '[0-9][0-9]*\|none' "$_f"; }
vr_wait_for 350 final_port >/dev/null
port=$(final_port)
kill "$rx" "$fin"
vr_info sibling-b-connections "$(vr_collected_count /tmp/got.d)"
f=$(vr_collected /tmp/got.d "${port:-none}")
vr_expect_eq sibling-b-got "$want" "$(if [ -f "$f" ]; then vr_sha256 "$f"; else echo "no connection from port '$port'"; fi)"
vr_info sibling-b-peer "$(grep -i "accepting connection.* port:$port " /tmp/socat.log)"
vr_check sibling-b-sees-cid-3 grep -qi "accepting connection from.*cid:3 port:$port " /tmp/socat.log
