//! SOCK_SEQPACKET with a real Linux guest and real host services: `vsock-vmm` boots the inner
//! guest on the KVM host's KVM (inside QEMU TCG), whose kernel acknowledges
//! VIRTIO_VSOCK_F_SEQPACKET, and socat plays the services on both sides (`type=5`; `socat -v`
//! logs one `length=` line per message it reads, so the logs show every message boundary):
//!
//! - guest → host service at `<socket>_7000`: three messages of 3000, 3000 and 1000 bytes on
//!   one connection (socat sends each read of a 7000-byte file, `-b 3000`, as a message), and
//!   one of 200000 bytes (four virtio packets, EOM on the last) on another;
//! - host program → guest through `<socket>_seqpacket` (one `CONNECT` message, one `OK` message
//!   back): messages of 4000 and 50000 bytes (the second crosses 13 RX buffers of 4 KiB);
//! - one port, one type: a SEQPACKET connect to a stream service is reset;
//! - strict and fallback: CID 77 is refused with fallback off; with fallback on the message
//!   reaches the `unix:` uplink stand-in's SOCK_SEQPACKET listener for `77_6000`;
//! - the API lists the guest's SEQPACKET connection with its type, and `/metrics` counts the
//!   messages.
//!
//! Every message's content is hash-checked at the receiving end (`vr_msg_hashes` over
//! `vr_pattern_file` content, which both ends make alike), besides its length.
//!
//! The guest's side is `images/inner-scenarios/seqpacket.sh`.
//!
//! Run alone: `cargo test -p vsock-integration --test seqpacket_e2e -- --nocapture`.

use std::time::Duration;

use vsock_integration::{artifacts_or_skip, build_workspace_binary, GuestRun};

const SCENARIO: &str = r#"
mkdir -p /tmp/up
lens() { grep -a 'length=' "$1" | sed 's/.*length=\([0-9]*\).*/\1/' | tr '\n' ' ' | sed 's/ $//'; }
# Host services: SOCK_SEQPACKET on 7000 (two connections) and on the uplink stand-in, a stream
# service on 7001.
socat -v -u -b 262144 UNIX-LISTEN:/tmp/v.sock_7000,type=5 OPEN:/tmp/g2h,creat 2>/tmp/g2h.log &
socat -v -u -b 262144 UNIX-LISTEN:/tmp/v.sock_7002,type=5 OPEN:/tmp/big,creat 2>/tmp/big.log &
socat -v -u -b 262144 UNIX-LISTEN:/tmp/up/77_6000,type=5 OPEN:/tmp/upl,creat 2>/tmp/upl.log &
socat -u UNIX-LISTEN:/tmp/v.sock_7001 OPEN:/tmp/wrongtype,creat &
# The two messages to the guest: 54000 bytes of vr_pattern_file's content, which the guest makes
# too and checks message by message.
vr_pattern_file /tmp/h2g-all 54000 >/dev/null
head -c 4000 /tmp/h2g-all >/tmp/c1
tail -c +4001 /tmp/h2g-all >/tmp/c2
echo strict >/tmp/phase
socat UNIX-LISTEN:/tmp/v.sock_999,fork SYSTEM:'cat /tmp/phase' &
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=192M \
	--cmdline "$(vr_inner_cmdline vr.scenario=seqpacket)" \
	--vsock cid=3,socket=/tmp/v.sock,uplink=unix:/tmp/up,fallback=0,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/api --log-level info >/tmp/inner.log 2>&1 &
vmm=$!
vr_wait_while "$vmm" 400 grep -q 'VRTEST-INFO listening' /tmp/inner.log || {
	vr_fail guest-listening "$(tail -n 3 /tmp/inner.log)"
	vr_vmm_lost inner "$vmm" /tmp/api
}
# One CONNECT message, one OK message back, then two messages: each file goes into the pipe in
# one write once socat has read what came before (the OK shows it took the CONNECT line), and
# socat sends each read as a message.
{
	printf 'CONNECT 7100\n'
	vr_wait_for 120 grep -q '^OK ' /tmp/ok
	cat /tmp/c1
	vsock-vmm remote --api-socket /tmp/api connections >/tmp/conns.json 2>&1
	sleep 2
	cat /tmp/c2
	sleep 2
} | socat -b 262144 - UNIX-CONNECT:/tmp/v.sock_seqpacket,type=5 >/tmp/ok
vr_check ok-message grep -q '^OK [0-9]*$' /tmp/ok
vr_wait_while "$vmm" 300 grep -q 'VRTEST-INFO strict-done' /tmp/inner.log || {
	vr_fail guest-strict-done "$(tail -n 3 /tmp/inner.log)"
	vr_vmm_lost inner "$vmm" /tmp/api
}
vr_check no-uplink-in-strict-mode test ! -s /tmp/upl
vr_check api-shows-seqpacket sh -c "tr -d ' \n' </tmp/conns.json | grep -q '\"type\":\"seqpacket\"'"
# The three SEQPACKET connections so far have ended (a refused connect never opened one).
scrape() {
	vsock-vmm remote --api-socket /tmp/api metrics >/tmp/m.txt 2>&1 &&
		grep -q '^vsock_ended_connections_total{type="seqpacket"} 3$' /tmp/m.txt
}
vr_wait_for 60 scrape || vr_info metrics "$(grep -E '^vsock_(ended|messages)' /tmp/m.txt | tr '\n' ' ')"
metric() { awk -v n="$1" '$1 == n { print $2 }' /tmp/m.txt; }
vr_expect_eq m-seqpacket-ended 3 "$(metric 'vsock_ended_connections_total{type="seqpacket"}')"
vr_expect_eq m-messages-to-host 4 "$(metric 'vsock_messages_total{direction="to_host"}')"
vr_expect_eq m-messages-to-guest 2 "$(metric 'vsock_messages_total{direction="to_guest"}')"
vr_expect_eq m-seqpacket-handshakes 1 "$(metric 'vsock_handshakes_total{socket="host_seqpacket",result="completed"}')"
vsock-vmm remote --api-socket /tmp/api fallback on >/dev/null 2>&1
echo fallback >/tmp/phase
for _ in $(seq 1 3000); do kill -0 "$vmm" 2>/dev/null || break; usleep 100000; done
wait "$vmm"
vr_expect_eq vmm-exit-status 0 "$?"
vr_relay inner </tmp/inner.log
vr_expect_eq g2h-lengths "3000 3000 1000" "$(lens /tmp/g2h.log)"
vr_expect_eq g2h-bytes 7000 "$(wc -c </tmp/g2h)"
vr_expect_eq g2h-big-lengths 200000 "$(lens /tmp/big.log)"
vr_expect_eq uplink-lengths 3000 "$(lens /tmp/upl.log)"
# Every message's content, hashed at both ends: the guest's files are vr_pattern_file's too.
vr_pattern_file /tmp/e7000 7000 >/dev/null
vr_pattern_file /tmp/e200000 200000 >/dev/null
vr_pattern_file /tmp/e3000 3000 >/dev/null
vr_expect_eq g2h-message-hashes "$(vr_msg_hashes /tmp/e7000 '3000 3000 1000')" \
	"$(vr_msg_hashes /tmp/g2h "$(lens /tmp/g2h.log)")"
vr_expect_eq g2h-big-message-hash "$(vr_msg_hashes /tmp/e200000 200000)" \
	"$(vr_msg_hashes /tmp/big "$(lens /tmp/big.log)")"
vr_expect_eq uplink-message-hash "$(vr_msg_hashes /tmp/e3000 3000)" \
	"$(vr_msg_hashes /tmp/upl "$(lens /tmp/upl.log)")"
vr_check stream-service-got-nothing test ! -s /tmp/wrongtype
"#;

/// Checks of [`SCENARIO`] that must pass.
const CHECKS: &[&str] = &[
    "inner/g2h-sent",
    "inner/g2h-big-sent",
    "inner/stream-port-refuses-seqpacket",
    "inner/h2g-lengths",
    "inner/h2g-bytes",
    "inner/h2g-message-hashes",
    "inner/strict-refused",
    "inner/fallback-sent",
    "inner/done",
    "ok-message",
    "no-uplink-in-strict-mode",
    "api-shows-seqpacket",
    "m-seqpacket-ended",
    "m-messages-to-host",
    "m-messages-to-guest",
    "m-seqpacket-handshakes",
    "vmm-exit-status",
    "g2h-lengths",
    "g2h-bytes",
    "g2h-big-lengths",
    "uplink-lengths",
    "g2h-message-hashes",
    "g2h-big-message-hash",
    "uplink-message-hash",
    "stream-service-got-nothing",
];

#[test]
fn seqpacket_messages_with_host_services_both_ways_and_strict_vs_fallback() {
    let name = "seqpacket_messages_with_host_services_both_ways_and_strict_vs_fallback";
    if let Some(artifacts) = artifacts_or_skip(name) {
        let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
        GuestRun::kvm_host(SCENARIO)
            .name(name)
            .binary(vmm)
            .timeout(Duration::from_secs(600))
            .run(artifacts, CHECKS)
            .unwrap();
    }
}
