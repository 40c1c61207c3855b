//! The uplink topology's lower half: the TCG "KVM host" gets a virtio-vsock
//! device from QEMU's `vhost-user-vsock-device`, served on the machine by
//! rust-vmm's vhost-device-vsock over Unix sockets only (`uds-path`; no
//! AF_VSOCK on the machine). The KVM host's `/dev/vsock` is then a real
//! parent `/dev/vsock` for vsock-vmm's G2H uplink.
//!
//! The first run builds vhost-device-vsock from crates.io (a few minutes,
//! cached). Run alone: `cargo test -p vsock-integration --test vhost_user -- --nocapture`.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use vsock_integration::{
    accept_and_read, artifacts_or_skip, connect_and_send, pattern, sha256_hex,
    start_vhost_user_vsock, GuestRun,
};

const LEN: usize = 1 << 20;

#[test]
fn kvm_host_vsock_through_vhost_user_backend() {
    let name = "kvm_host_vsock_through_vhost_user_backend";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("vr-vhost-user.")
        .tempdir()
        .unwrap();
    let vhost_socket = dir.path().join("vhu.sock");
    let uds = dir.path().join("vm.vsock");
    let backend = start_vhost_user_vsock(3, &vhost_socket, &uds).unwrap();
    let g2h_listener = UnixListener::bind(dir.path().join("vm.vsock_5000")).unwrap();

    let scenario = r#"
vr_check kvm-host-dev-vsock test -c /dev/vsock
sum="$(vr_pattern_file /tmp/d 1048576)"
vr_check g2h-send socat -u FILE:/tmp/d VSOCK-CONNECT:2:5000
if timeout 60 socat -u VSOCK-LISTEN:5001 CREATE:/tmp/back; then
	vr_expect_eq h2g-receive "$sum" "$(vr_sha256 /tmp/back)"
else
	vr_fail h2g-receive "socat VSOCK-LISTEN:5001 failed"
fi
"#;
    let vm = GuestRun::kvm_host(scenario)
        .name(name)
        .modules(&["kvm", "vsock"])
        .memfd(true)
        .workdir(dir.path())
        .qemu_args([
            "-chardev",
            "socket,id=vu0,path={dir}/vhu.sock",
            "-device",
            "vhost-user-vsock-device,chardev=vu0",
        ])
        .spawn(artifacts)
        .unwrap();

    let want = pattern(LEN);
    let g2h = accept_and_read(&g2h_listener, Duration::from_secs(90));
    let h2g = connect_and_send(&uds, 5001, &want, Duration::from_secs(60));
    let outcome = vm.wait().unwrap();
    let backend_log = backend.log();
    drop(backend);
    outcome
        .check(&[
            "host-modules-vsock",
            "kvm-host-dev-vsock",
            "g2h-send",
            "h2g-receive",
        ])
        .unwrap_or_else(|e| panic!("{e}\n---- vhost-device-vsock log ----\n{backend_log}"));
    let got = g2h.unwrap_or_else(|e| panic!("guest -> host: {e}\n{}", outcome.console));
    assert_eq!(got.len(), LEN, "guest -> host length");
    assert_eq!(sha256_hex(&got), sha256_hex(&want), "guest -> host content");
    let ok = h2g.unwrap_or_else(|e| panic!("host -> guest: {e}\n{}", outcome.console));
    eprintln!(
        "host -> guest handshake: {ok}; wall time {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
}
