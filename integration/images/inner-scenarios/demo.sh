# The README's main job, guest side: talk to the host over vsock and show the router's choices.
say() { echo "DEMO guest: $*"; }
say "booted"
say "I am CID $(cat /sys/class/vsock/vsock/local_cid 2>/dev/null || echo 3); connecting to CID 2 port 1234 (host service)"
reply=$(echo "hello from the nested guest" | vr-socat -t 5 - VSOCK-CONNECT:2:1234 2>&1)
say "host answered: $reply"
vr_check demo-guest-to-host test -n "$reply"
say "connecting to CID 77 port 6000: nobody on this machine owns CID 77; fallback is on"
reply=$(echo "hello parent" | vr-socat -t 5 - VSOCK-CONNECT:77:6000 2>&1)
say "the uplink stand-in answered: $reply"
vr_check demo-fallback test -n "$reply"
vr_wait_for 60 vr_host_phase_is strict
say "the host switched g2h_fallback off; connecting to CID 77 port 6000 again"
if echo x | vr-socat -t 5 - VSOCK-CONNECT:77:6000 2>/tmp/err; then
	vr_fail demo-strict "connected"
else
	say "refused: $(tail -n1 /tmp/err | sed 's/.*E //')"
	vr_pass demo-strict
fi
