# The inner guest of routerd_e2e.rs's SOCK_SEQPACKET uplink test (issue 11): its vsock-vmm has
# uplink=/dev/vsock, the KVM host's virtio-vsock device, which vsock-routerd serves on the
# machine; that daemon's VM has uplink=unix:DIR, so CID 77 (owned by nobody anywhere) ends at
# SOCK_SEQPACKET Unix listeners on the machine, DIR/77_6000 and DIR/77_6001.
#   fallback: on one connection to 77:6000 three messages up (3000, 3000, 1000 bytes: socat
#     sends each read of a 7000-byte file, -b 3000, as one message) and two back (the machine
#     sends 1500 and 2500 bytes); one 100000-byte message to 77:6001 (two packets of the KVM
#     host's virtio transport, and 25 of ours). socat -v logs one "length=" line per message,
#     "> " for those it sent and "< " for those it received.
#   strict (the KVM host switched vsock-vmm to fallback off): the same connect is reset.
# The KVM host's phases (fallback, strict, finish): CID 2 port 999 (vr_host_phase_is); this
# guest reports the end of each phase on ports 998 and 997 and ends when the host says finish.
# rsu_lens DIRECTION LOG: the lengths of socat -v's headers for one direction ("> " or "< "
# and a time stamp; the data it dumps has no newline, so a header may start mid-line).
rsu_lens() { grep -ao "$1 [0-9/]* [0-9:.]* *length=[0-9]*" "$2" | sed 's/.*length=//' | tr '\n' ' ' | sed 's/ $//'; }
rsu_le() { printf '%08x' "$1" | sed 's/\(..\)\(..\)\(..\)\(..\)/\4\3\2\1/'; }
# socat's generic address of a struct sockaddr_vm after its family: reserved, port, CID, flags;
# the kernel's connect timeout raised from 2 s to 60 (SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD, level
# AF_VSOCK = 40, option 6, a struct timeval), as vr-socat does for streams: the connect crosses
# vsock-vmm, the emulated KVM host's kernel and the daemon before the guest gets its answer.
# socat 1.7.4.4 applies setsockopt-bin only after connect() (phase CONNECTED, seen in its -d -d
# -d -d log), setsockopt-listen before it (phase PREBIND, whatever the address type).
rsu_vaddr() { echo "SOCKET-CONNECT:40:0:x0000$(rsu_le "$2")$(rsu_le "$1")00000000,type=5,setsockopt-listen=40:6:x3c000000000000000000000000000000"; }
head -c 7000 /dev/zero | tr '\0' a >/tmp/m7000
head -c 100000 /dev/zero | tr '\0' b >/tmp/m100000
head -c 3000 /dev/zero | tr '\0' c >/tmp/m3000
vr_info vsock-features "$(for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && cat $d/features; done)"
socat -v -b 3000 -t 60 'OPEN:/tmp/m7000!!CREATE:/tmp/back' "$(rsu_vaddr 77 6000)" 2>/tmp/x1.log
vr_expect_eq fallback-exchange 0 "$?"
vr_expect_eq fallback-sent-lengths "3000 3000 1000" "$(rsu_lens '>' /tmp/x1.log)"
vr_expect_eq fallback-received-lengths "1500 2500" "$(rsu_lens '<' /tmp/x1.log)"
vr_expect_eq fallback-received-bytes "$(head -c 4000 /dev/zero | tr '\0' r | sha256sum | cut -d' ' -f1)" "$(vr_sha256 /tmp/back)"
socat -d -d -d -d -v -u -b 262144 OPEN:/tmp/m100000 "$(rsu_vaddr 77 6001)" 2>/tmp/x2.log
vr_expect_eq fallback-big-sent 0 "$?"
# socat's debug log shows the connect timeout going to the socket before its connect.
vr_info connect-timeout-option "$(grep -a -e 'setsockopt(' -e ' connect(' /tmp/x2.log | head -n 3)"
vr_expect_eq fallback-big-lengths 100000 "$(rsu_lens '>' /tmp/x2.log)"
echo done | vr-socat -u - VSOCK-CONNECT:2:998
vr_expect_eq fallback-done-sent 0 "$?"
vr_wait_for 300 vr_host_phase_is strict || vr_fail strict-phase "the KVM host never switched"
socat -u -b 3000 OPEN:/tmp/m3000 "$(rsu_vaddr 77 6000)" 2>/tmp/strict.err
vr_expect_eq strict-refused 1 "$?"
vr_check strict-econnreset grep -q 'Connection reset' /tmp/strict.err
echo done | vr-socat -u - VSOCK-CONNECT:2:997
vr_expect_eq strict-done-sent 0 "$?"
# The KVM host reads vsock-vmm's counters after that signal; this guest's end would end its
# vsock-vmm (and the API socket) first, so it waits for the host's last phase.
vr_wait_for 300 vr_host_phase_is finish || vr_fail finish-phase "the KVM host never finished"
