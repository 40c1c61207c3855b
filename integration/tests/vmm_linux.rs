//! `vsock-vmm` boots a real Linux guest (the inner guest image) on the KVM host's real KVM.
//!
//! Run alone: `cargo test -p vsock-integration --test vmm_linux -- --nocapture`.

use vsock_integration::{
    artifacts_or_skip, build_workspace_binary, inner_triple_faults, parse_console, symbolize,
    GuestRun, Status,
};

#[test]
fn vsock_vmm_boots_linux_to_user_space() {
    let name = "vsock_vmm_boots_linux_to_user_space";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let scenario = r#"
cat > /tmp/inner.sh <<'EOS'
vr_pass userspace "uptime_ms=$(vr_uptime_ms)"
EOS
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio \
    --memory size=256M \
    --cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/inner.sh)")" 2>&1 | vr_relay inner
vr_info vmm-rc "$?"
"#;
    GuestRun::kvm_host(scenario)
        .name(name)
        .binary(vmm)
        .run(artifacts, &["inner/userspace", "inner/done"])
        .unwrap();
}

/// A guest that reboots with `reboot=t` triple-faults on purpose (after its vsock device
/// started): `vsock-vmm` exits 0 and logs the vCPU state (on Intel in the kernel's reboot path;
/// on AMD, whose KVM resets the vCPU at a triple fault, the reset state, said as such), and
/// the harness finds it. The inner kernel reports no fault before it, so the harness takes it
/// for the platform's (which `GuestRun::run` would run once more): one run, waited for here.
#[test]
fn a_triple_fault_is_logged_with_the_vcpu_state() {
    let name = "a_triple_fault_is_logged_with_the_vcpu_state";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let scenario = r#"
cat > /tmp/inner.sh <<'EOS'
vr_pass userspace
EOS
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=256M \
    --cmdline "$(vr_inner_cmdline "$(vr_cmd_arg /tmp/inner.sh)") reboot=t" \
    --vsock cid=3,socket=/tmp/v.sock,uplink=none --log-level info >/tmp/t.log 2>&1
vr_expect_eq vmm-exit 0 "$?"
vr_check device-activated grep -q "virtio-mmio: device type 19 activated" /tmp/t.log
vr_check inner-userspace grep -q "VRTEST userspace PASS" /tmp/t.log
vr_check triple-fault-logged grep -q "WARN.*vcpu0: triple fault: rip=0x" /tmp/t.log
vr_check exit-reason-names-it grep -q "exiting: vcpu0: triple fault (a reboot with reboot=t" /tmp/t.log
# The log again, for the test to parse, with the prefix vr_relay would give it.
sed 's/^/tf: /' /tmp/t.log
"#;
    let outcome = GuestRun::kvm_host(scenario)
        .name(name)
        .binary(vmm)
        .spawn(artifacts)
        .and_then(|vm| vm.wait());
    // The harness sees the crash: a silent triple fault is the platform's.
    let err = outcome.expect_err("a deliberate triple fault must be reported");
    assert!(err.is_platform_fault(), "{err}");
    assert!(
        err.to_string().contains(
            "tf: the inner guest crashed (vCPU triple fault, after vsock-vmm activated the vsock \
             device, without a word from its kernel)"
        ),
        "{err}"
    );
    let console = err.console().expect("a VM run").to_string();
    let report = parse_console(&console);
    for check in [
        "vmm-exit",
        "device-activated",
        "inner-userspace",
        "triple-fault-logged",
        "exit-reason-names-it",
    ] {
        assert_eq!(
            report.status(check),
            Some(Status::Pass),
            "{check}\n{console}"
        );
    }
    let faults = inner_triple_faults(&console);
    assert_eq!(faults.len(), 1, "{faults:?}\n{console}");
    let fault = &faults[0];
    assert!(fault.after_activation, "{fault:?}");
    eprintln!("{name}: {}", fault.state);
    if fault.state.contains("the reset state") {
        // KVM on AMD (the KVM host's CPU is an emulated AMD one) reinitializes the vCPU at a
        // triple fault: the state says so instead of showing a meaningless reset vector.
        assert!(
            fault.state.starts_with("rip=0xfff0 cs=0xf000: "),
            "{fault:?}"
        );
    } else {
        // Intel's KVM keeps the state: the crash is in the kernel's reboot path.
        let rip = fault.rip().expect("rip in the state");
        let symbol = symbolize(&artifacts.inner_vmlinux, rip)
            .unwrap_or_else(|| panic!("rip {rip:#x} is in no symbol of the inner kernel"));
        assert!(
            symbol.contains("restart"),
            "{symbol}: not in the reboot path"
        );
    }
}
