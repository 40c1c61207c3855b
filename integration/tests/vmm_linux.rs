//! `vsock-vmm` boots a real Linux guest (the inner guest image) on the KVM host's real KVM.
//!
//! Run alone: `cargo test -p vsock-integration --test vmm_linux -- --nocapture`.

use vsock_integration::{artifacts_or_skip, build_workspace_binary, GuestRun};

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
