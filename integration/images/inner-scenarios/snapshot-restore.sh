# Inner-guest side of integration/tests/snapshot_e2e.rs (issue 12: snapshot and restore with
# vsock). The guest boots under vsock-vmm; the KVM host pauses it with two connections open,
# snapshots it and ends that VMM, then restores the snapshot several times, each restore in a new
# vsock-vmm process with a CID and a hybrid socket of its own (one of them the saved ones). This
# script runs once up to the snapshot and then goes on, from where it was paused, in every
# restored copy of the guest; each copy's lines reach the host through its own VMM's console.
#
# Host services (through whichever hybrid socket this copy's VMM has): CID 2 port 997 answers
# the CID this copy must have (the host knows which CID it gave the VMM behind that socket);
# port 999 the host's phase (vr_host_phase_is): "go" when the new connections may start (for
# two clones: once both run), "finish" when the guest may end. Port 7000 (the original only):
# the old guest -> host connection's service, which answers one line and then stops reading, so
# that our sends run out of credit and block. Port 7001: the service of a new connection. The
# host connects to our port 6000: the original's host side before the snapshot (the old host ->
# guest connection), every restored VMM's host side after it, to the same listener, which
# survives the restore.

# The CID the host side says this copy must have, into $_want.
host_says_cid() { _want=$(vr-socat -T 5 -u VSOCK-CONNECT:2:997 - 2>/dev/null) && [ -n "$_want" ]; }
# held PID FILE PATTERN: FILE's last line matches PATTERN and PID sleeps, still so 3 s later:
# the tool is blocked in its recv() or send() (it prints the line just before the call).
held() {
	_hl=$(tail -n 1 "$2")
	echo "$_hl" | grep -q "$3" || return 1
	[ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" = S ] || return 1
	sleep 3
	[ "$(tail -n 1 "$2")" = "$_hl" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f1)" = S ]
}
# line FILE PREFIX: the first line of FILE that starts with PREFIX.
line() { grep "^$2" "$1" | head -n 1; }

# 1. Before the snapshot.
vr_retry cid-query 120 host_says_cid
vr_expect_eq cid-before "$_want" "$(vr-vsockcheck cid)"
# The old host -> guest connection: our listener, which later takes a restored VMM's new one.
vr-vsockcheck serve 6000 'ack-h2g cid=%c' recv-block then 'ack-new-h2g cid=%c' >/tmp/h2g.out 2>&1 &
h2g=$!
vr_wait_for 60 grep -q '^1 listening port=6000$' /tmp/h2g.out || vr_fail h2g-listening "$(cat /tmp/h2g.out)"
vr_info listening 6000
# The old guest -> host connection, filled until our send blocks (the host stops reading).
vr-vsockcheck connect 2 7000 "hello-g2h cid=$_want" send-block >/tmp/g2h.out 2>&1 &
g2h=$!
vr_wait_for 300 held "$g2h" /tmp/g2h.out '^1 blocked-send ' ||
	vr_fail old-g2h-blocked "$(tail -n 3 /tmp/g2h.out)"
vr_wait_for 300 held "$h2g" /tmp/h2g.out '^1 blocking recv$' ||
	vr_fail old-h2g-blocked "$(tail -n 3 /tmp/h2g.out)"
vr_expect_eq old-g2h-reply "1 got=ack-g2h" "$(line /tmp/g2h.out '1 got=')"
vr_expect_eq old-h2g-line "1 got=hello-h2g" "$(line /tmp/h2g.out '1 got=')"
vr_info old-g2h "$(line /tmp/g2h.out '1 connected') $(tail -n 1 /tmp/g2h.out)"
vr_info old-h2g "$(line /tmp/h2g.out '1 accepted')"
# The host pauses and snapshots us once it reads this line; we print nothing until then.
vr_info ready-for-snapshot "g2h blocked in send(), h2g blocked in recv()"

# 2. After a restore (every copy goes on from here): both old connections are reset, the one
# blocked in send() and the one blocked in recv(), with ECONNRESET.
vr_wait_for 900 grep -q '^1 ended' /tmp/g2h.out
vr_expect_eq old-g2h-reset "1 ended send errno=ECONNRESET" "$(line /tmp/g2h.out '1 ended' | sed 's/ total=[0-9]*$//')"
vr_wait_for 120 grep -q '^1 ended' /tmp/h2g.out
vr_expect_eq old-h2g-reset "1 ended recv errno=ECONNRESET" "$(line /tmp/h2g.out '1 ended')"
# The CID this copy's VMM gave it, as the kernel now knows it.
vr_retry cid-query-after-restore 120 host_says_cid
vr_expect_eq cid-after-restore "$_want" "$(vr-vsockcheck cid)"
vr_wait_for 600 vr_host_phase_is go || vr_fail phase-go "the host side never said go"
# A new guest -> host connection, through this copy's VMM.
vr-vsockcheck connect 2 7001 "new-g2h cid=$_want" >/tmp/g2h2.out 2>&1
vr_expect_eq new-g2h-reply "1 got=ack-new-g2h" "$(line /tmp/g2h2.out '1 got=')"
vr_check new-g2h-peer grep -q '^1 connected local=[0-9]*:[0-9]* peer=2:7001$' /tmp/g2h2.out
# A new host -> guest connection, taken by the listener that survived the restore, addressed to
# the new CID, from a device port the old connection did not have (the saved port cursor).
vr_wait_for 600 grep -q '^2 closed$' /tmp/h2g.out || vr_fail new-h2g-closed "$(tail -n 3 /tmp/h2g.out)"
vr_expect_eq new-h2g-line "2 got=new-h2g" "$(line /tmp/h2g.out '2 got=')"
vr_expect_eq new-h2g-local-cid "$_want" "$(line /tmp/h2g.out '2 accepted' | sed -n 's/^2 accepted local=\([0-9]*\):6000 peer=2:[0-9]*$/\1/p')"
p1=$(line /tmp/h2g.out '1 accepted' | sed -n 's/.* peer=2:\([0-9]*\)$/\1/p')
p2=$(line /tmp/h2g.out '2 accepted' | sed -n 's/.* peer=2:\([0-9]*\)$/\1/p')
if [ -n "$p1" ] && [ -n "$p2" ] && [ "$p1" != "$p2" ]; then
	vr_pass new-h2g-new-device-port "old=$p1 new=$p2"
else
	vr_fail new-h2g-new-device-port "old='$p1' new='$p2'"
fi
vr_info checks-done "cid $_want"
# Stay up until the host says so (two clones: until both are done).
vr_wait_for 600 vr_host_phase_is finish || vr_fail phase-finish "the host side never said finish"
