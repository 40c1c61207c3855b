# The inner guest of integration/tests/seqpacket_e2e.rs: SOCK_SEQPACKET to host services (CID 2
# ports 7000, 7002; 7001 serves streams), from the host (it listens on 7100), and to CID 77
# (refused while the host is strict, then through the uplink stand-in). Message boundaries are
# read from socat -v's "length=" lines, one per message read; every message's content is
# hash-checked at the other end (vr_msg_hashes: the files are vr_pattern_file's content, which
# both ends make alike, so a message cut, merged, reordered or changed shows).
lens() { grep -a 'length=' "$1" | sed 's/.*length=\([0-9]*\).*/\1/' | tr '\n' ' ' | sed 's/ $//'; }
le() { printf '%08x' "$1" | sed 's/\(..\)\(..\)\(..\)\(..\)/\4\3\2\1/'; }
# socat's generic address of a struct sockaddr_vm after its family: reserved, port, CID, flags.
vaddr() { echo "x0000$(le "$2")$(le "$1")00000000"; }
# seq_to CID PORT BYTES FILE: FILE over one SOCK_SEQPACKET connection, each read of BYTES (a
# regular file gives full reads) one message.
seq_to() { socat -b "$3" -u "OPEN:$4" "SOCKET-CONNECT:40:0:$(vaddr "$1" "$2"),type=5"; }
vr_pattern_file /tmp/m7000 7000 >/dev/null
vr_pattern_file /tmp/m3000 3000 >/dev/null
vr_pattern_file /tmp/m200000 200000 >/dev/null
vr_info seqpacket-feature "$(for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && cut -c2 $d/features; done)"
seq_to 2 7000 3000 /tmp/m7000
vr_expect_eq g2h-sent 0 "$?"
seq_to 2 7002 262144 /tmp/m200000
vr_expect_eq g2h-big-sent 0 "$?"
seq_to 2 7001 3000 /tmp/m3000 2>/dev/null
vr_expect_eq stream-port-refuses-seqpacket 1 "$?"
# Host -> guest: listen, let the host connect through <socket>_seqpacket.
timeout 300 socat -d -d -v -u -b 262144 "SOCKET-LISTEN:40:0:$(vaddr 4294967295 7100),type=5" \
	OPEN:/tmp/h2g,creat 2>/tmp/h2g.log &
p=$!
vr_wait_for 30 grep -q 'listening on' /tmp/h2g.log
vr_info listening 7100
wait "$p"
vr_expect_eq h2g-lengths "4000 50000" "$(lens /tmp/h2g.log)"
vr_expect_eq h2g-bytes 54000 "$(wc -c </tmp/h2g)"
vr_pattern_file /tmp/h2g-sent 54000 >/dev/null
vr_expect_eq h2g-message-hashes "$(vr_msg_hashes /tmp/h2g-sent '4000 50000')" \
	"$(vr_msg_hashes /tmp/h2g "$(lens /tmp/h2g.log)")"
# Strict, then (the host switches) fallback to the uplink stand-in.
seq_to 77 6000 262144 /tmp/m3000 2>/dev/null
vr_expect_eq strict-refused 1 "$?"
vr_info strict-done
vr_wait_for 120 vr_host_phase_is fallback || vr_fail fallback-phase "the host never switched"
seq_to 77 6000 262144 /tmp/m3000
vr_expect_eq fallback-sent 0 "$?"
