//! The nested-cloud topology with the real AF_VSOCK uplink (scenarios 6–9 of the integration
//! issue). On the machine, one `vsock-routerd` (`uplink=none`: no AF_VSOCK is opened on the
//! machine) serves two TCG guests as siblings on one "cloud host" (`vsock_integration::uplink`):
//!
//! - the KVM host, CID 3: `vsock-vmm` boots the inner guest (CID 5) on its KVM with
//!   `uplink=/dev/vsock` — the KVM host's real `/dev/vsock`, whose other end is the daemon;
//! - the enclave, CID 10: socat listeners, and a client to the KVM host's CID.
//!
//! Checked: the inner guest's connection to the enclave's CID takes the uplink with fallback on
//! and arrives hash-checked, and with fallback off (flipped through the API) it is reset and the
//! enclave sees no attempt (6); `vsock-connect` on the KVM host reaches the inner guest through
//! the registry, the enclave through the uplink (saying so), and fails with ENODEV in strict
//! mode and from a registry that is a local CID namespace (7); `vsock-vmm` refuses the KVM
//! host's own CID and an uplink device whose CID cannot be read; the enclave reaches a listener
//! in the inner guest through `listen=8000` (8); the
//! VMM's reboot exit and its SIGTERM exit are both status 0 with sockets and registry entry gone,
//! and a second VMM claims the CID again (9).
//!
//! Run alone: `cargo test -p vsock-integration --test uplink_e2e -- --nocapture`.

use std::time::Duration;

use vsock_integration::{
    artifacts_or_skip, build_workspace_binary, run_uplink, GuestRun, UplinkRun,
};

const KVM_HOST: &str = r#"
mkdir -p /tmp/reg
echo fallback > /tmp/phase
socat UNIX-LISTEN:/tmp/v.sock_999,fork SYSTEM:'cat /tmp/phase' &
socat -u UNIX-LISTEN:/tmp/v.sock_998 CREATE:/tmp/fallback-done &
socat -u UNIX-LISTEN:/tmp/v.sock_997 CREATE:/tmp/strict-done &
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=192M \
	--cmdline "$(vr_inner_cmdline vr.scenario=uplink vr.timeout=500)" \
	--vsock cid=5,socket=/tmp/v.sock,uplink=/dev/vsock,fallback=1,registry=/tmp/reg,listen=8000,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/api --log-level info >/tmp/inner.log 2>&1 &
vmm=$!

# 7. vsock-connect: the inner guest through the registry (retried until it listens) ...
vr_retry -w "vr_running $vmm" vsock-connect-registry 300 sh -c 'echo hello through the registry | vsock-connect --registry /tmp/reg 5 7100 2>/tmp/vc-reg.err'
rc=$?
vr_expect_eq vsock-connect-registry 0 "$rc"
# A guest that never answered fails every step after this one: say why and end it now.
[ "$rc" = 0 ] || { vr_info vsock-connect-registry-stderr "$(cat /tmp/vc-reg.err)"; vr_vmm_lost inner "$vmm" /tmp/api; }
# ... the enclave through the uplink, saying that the fallback was taken ...
vr_retry vsock-connect-uplink 300 sh -c 'echo hello-enclave | vsock-connect --registry /tmp/reg 10 7002 2>/tmp/vc-up.err'
vr_expect_eq vsock-connect-uplink 0 "$?"
vr_info vsock-connect-uplink-stderr "$(cat /tmp/vc-up.err)"
vr_check vsock-connect-fallback-notice grep -q 'g2h_fallback took the uplink' /tmp/vc-up.err
# ... and, in strict mode, not at all.
vsock-connect --registry /tmp/reg --fallback 0 10 7001 </dev/null 2>/tmp/vc-strict.err
vr_expect_eq vsock-connect-strict-fails 1 "$?"
vr_check vsock-connect-strict-enodev grep -q ENODEV /tmp/vc-strict.err
# ... nor from a registry that is a local CID namespace, fallback on (the enclave counts any
# attempt on 7001).
mkdir -p /tmp/lreg && echo local >/tmp/lreg/ns_mode
vsock-connect --registry /tmp/lreg 10 7001 </dev/null 2>/tmp/vc-local.err
vr_expect_eq vsock-connect-local-ns-fails 1 "$?"
vr_check vsock-connect-local-ns-enodev grep -q 'ENODEV.*local CID namespace' /tmp/vc-local.err

# The parent-CID check: this machine is CID 3 to its hypervisor, which no guest may take; a
# vsock device whose CID cannot be read (here a regular file: ENOTTY) is a clear error too.
vsock-vmm --kernel $VR_INNER/vmlinux --memory size=64M \
	--vsock cid=3,socket=/tmp/pc.sock,uplink=/dev/vsock 2>/tmp/pc.err
vr_expect_eq parent-cid-refused 2 "$?"
vr_check parent-cid-message grep -q "parent machine's own CID" /tmp/pc.err
vsock-vmm --kernel $VR_INNER/vmlinux --memory size=64M \
	--vsock cid=4,socket=/tmp/pc.sock,uplink=vsock:/tmp/phase 2>/tmp/pc2.err
vr_expect_eq parent-cid-unreadable 2 "$?"
vr_check parent-cid-unreadable-message grep -q IOCTL_VM_SOCKETS_GET_LOCAL_CID /tmp/pc2.err

# 6. After the guest's upload through the uplink, switch it to strict at run time.
if ! vr_wait_while "$vmm" 240 test -s /tmp/fallback-done; then
	vr_fail guest-fallback-phase "no signal from the guest"
	vr_vmm_lost inner "$vmm" /tmp/api
fi
vsock-vmm remote --api-socket /tmp/api fallback off >/dev/null 2>&1
echo strict > /tmp/phase
if ! vr_wait_while "$vmm" 300 test -s /tmp/strict-done; then
	vr_fail guest-strict-phase "no signal from the guest"
	vr_vmm_lost inner "$vmm" /tmp/api
fi
vsock-vmm remote --api-socket /tmp/api info >/tmp/info.json 2>&1
vr_check api-counts-uplink grep -q '"uplink": *[1-9]' /tmp/info.json
vr_check api-counts-refused grep -q '"refused": *[1-9]' /tmp/info.json
vr_info api-info "$(cat /tmp/info.json)"

# 9. The guest reboots when its scenario ends: status 0, sockets and registry entry gone.
for _ in $(seq 1 4000); do kill -0 "$vmm" 2>/dev/null || break; usleep 100000; done
wait "$vmm"
vr_expect_eq vmm-exit-status 0 "$?"
vr_relay inner </tmp/inner.log
vr_check reboot-cleanup test ! -e /tmp/v.sock -a ! -e /tmp/reg/5.sock

# 9. A second VMM claims CID 5 again; SIGTERM ends it with status 0 and the same clean-up.
echo 'sleep 600' >/tmp/idle.sh
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=128M \
	--cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/idle.sh)" vr.timeout=600)" \
	--vsock cid=5,socket=/tmp/v2.sock,uplink=/dev/vsock,registry=/tmp/reg,listen=8000,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/api2 >/tmp/inner2.log 2>&1 &
vmm2=$!
vr_wait_for 60 test -S /tmp/reg/5.sock
vr_expect_eq cid-claimed-again 0 "$?"
vr_wait_for 60 grep -q VRTEST-BOOT /tmp/inner2.log || vr_info second-guest "$(cat /tmp/inner2.log)"
kill -TERM "$vmm2"
wait "$vmm2"
vr_expect_eq sigterm-exit-status 0 "$?"
vr_check sigterm-cleanup test ! -e /tmp/v2.sock -a ! -e /tmp/reg/5.sock -a ! -e /tmp/api2
vr_info sigterm-log "$(tail -n 3 /tmp/inner2.log)"

# Tell the enclave we are done (through this host's own /dev/vsock).
vr_retry enclave-finish-sent 60 sh -c 'echo finish | vr-socat -u - VSOCK-CONNECT:10:7999'
vr_expect_eq enclave-finish-sent 0 "$?"
"#;

const ENCLAVE: &str = r#"
want=$(vr_pattern_file /tmp/up.bin 1048576)
# The senders retry (until the inner guest, the KVM host or its vsock-vmm is up): our listeners
# keep accepting, each connection in its own file; the last one, once the KVM host says it has
# finished (port 7999), is the one checked.
vr_collect -l /tmp/e7000.log 7000 /tmp/e7000.d &
socat -u VSOCK-LISTEN:7001,fork SYSTEM:'echo attempt >> /tmp/strict-attempts' &
vr_collect 7002 /tmp/e7002.d &
vr_collect 7999 /tmp/finish.d &

# 8. Connect to the KVM host's CID on port 8000; vsock-vmm's listen=8000 forwards to the inner
# guest, which answers with the hash of what it got. Retried until the inner guest listens.
inbound() {
	vr-socat -t 60 -T 120 'FILE:/tmp/up.bin!!CREATE:/tmp/reply' VSOCK-CONNECT:3:8000 2>/dev/null &&
		[ "$(cat /tmp/reply)" = "$want" ] && return 0
	sleep 1
	return 1
}
finished=$(echo finish | sha256sum | cut -d' ' -f1)
# ... and no longer once the KVM host has finished (it failed: its console says why).
vr_retry -w "! vr_collected_is /tmp/finish.d $finished" inbound-reply 400 inbound
vr_expect_eq inbound-reply "$want" "$(cat /tmp/reply 2>/dev/null)"

vr_wait_for 500 vr_collected_is /tmp/finish.d "$finished"
vr_expect_eq finish-received finish "$(f=$(vr_collected /tmp/finish.d); [ -f "$f" ] && cat "$f")"
vr_info connections "7000: $(vr_collected_count /tmp/e7000.d), 7002: $(vr_collected_count /tmp/e7002.d), 7999: $(vr_collected_count /tmp/finish.d)"
f=$(vr_collected /tmp/e7000.d)
vr_expect_eq uplink-data "$want" "$([ -f "$f" ] && vr_sha256 "$f")"
vr_check uplink-peer-is-kvm-host grep -qi "accepting connection from.*cid:3 port:${f##*.} " /tmp/e7000.log
vr_expect_eq vsock-connect-uplink-data hello-enclave "$(f=$(vr_collected /tmp/e7002.d); [ -f "$f" ] && cat "$f")"
vr_check strict-zero-enclave-attempts test ! -e /tmp/strict-attempts
"#;

#[test]
fn real_uplink_through_the_parents_dev_vsock() {
    let name = "real_uplink_through_the_parents_dev_vsock";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let connect = build_workspace_binary("vsock-router", "vsock-connect").unwrap();
    let enclave = GuestRun::kvm_host(ENCLAVE)
        .name("enclave")
        .modules(&["vsock"])
        .memory("512M")
        .smp(1)
        .timeout(Duration::from_secs(600));
    let host = GuestRun::kvm_host(KVM_HOST)
        .name(name)
        .binary(&vmm)
        .binary(&connect)
        .modules(&["kvm", "vsock"])
        .timeout(Duration::from_secs(600));
    let run = run_uplink(name, artifacts, &host, &enclave).unwrap();
    let sibling = [0, 1].map(|vm| run.counter(vm, "sibling"));
    let UplinkRun {
        host,
        enclave,
        vm_info,
        daemon_log,
    } = run;
    let verdicts = [
        host.check(&[
            "host-modules-kvm",
            "host-modules-vsock",
            "vsock-connect-registry",
            "vsock-connect-uplink",
            "vsock-connect-fallback-notice",
            "vsock-connect-strict-fails",
            "vsock-connect-strict-enodev",
            "vsock-connect-local-ns-fails",
            "vsock-connect-local-ns-enodev",
            "parent-cid-refused",
            "parent-cid-message",
            "parent-cid-unreadable",
            "parent-cid-unreadable-message",
            "api-counts-uplink",
            "api-counts-refused",
            "vmm-exit-status",
            "inner/uplink-upload",
            "inner/strict-refused",
            "inner/strict-econnreset",
            "inner/registry-vsock-connect-data",
            "inner/inbound-listen-status",
            "inner/inbound-data",
            "inner/done",
            "reboot-cleanup",
            "cid-claimed-again",
            "sigterm-exit-status",
            "sigterm-cleanup",
            "enclave-finish-sent",
        ]),
        enclave.check(&[
            "host-modules-vsock",
            "inbound-reply",
            "finish-received",
            "uplink-data",
            "uplink-peer-is-kvm-host",
            "vsock-connect-uplink-data",
            "strict-zero-enclave-attempts",
        ]),
    ];
    for (who, verdict) in ["KVM host", "enclave"].iter().zip(verdicts) {
        if let Err(e) = verdict {
            panic!("{who}: {e}\n---- vsock-routerd log ----\n{daemon_log}");
        }
    }
    // The KVM host's uplink connections and the enclave's to the KVM host are siblings in the
    // daemon: the cloud host itself counts them.
    for (who, count, info) in [
        ("KVM host", sibling[0], &vm_info[0]),
        ("enclave", sibling[1], &vm_info[1]),
    ] {
        assert!(
            count.is_some_and(|n| n >= 1),
            "{who}: the daemon counts no sibling connection: {info:?}\n---- vsock-routerd log ----\n{daemon_log}"
        );
    }
    eprintln!(
        "KVM host {:.1} s, enclave {:.1} s",
        host.elapsed.as_secs_f64(),
        enclave.elapsed.as_secs_f64()
    );
}
