//! The uplink topology's lower half: the TCG "KVM host" gets a virtio-vsock
//! device from QEMU's `vhost-user-vsock-device`, served on the machine by
//! rust-vmm's vhost-device-vsock over Unix sockets only (`uds-path`; no
//! AF_VSOCK on the machine). The KVM host's `/dev/vsock` is then a real
//! parent `/dev/vsock` for vsock-vmm's G2H uplink.
//!
//! The first run builds vhost-device-vsock from crates.io (a few minutes,
//! cached). Run alone: `cargo test -p vsock-integration --test vhost_user -- --nocapture`.

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vsock_integration::{
    accept_and_read_unless, artifacts_or_skip, connect_and_send_unless, pattern,
    rerun_on_platform_fault, sha256_hex, start_vhost_user_vsock, GuestRun,
};

const LEN: usize = 1 << 20;

const SCENARIO: &str = r#"
vr_check kvm-host-dev-vsock test -c /dev/vsock
sum="$(vr_pattern_file /tmp/d 1048576)"
vr_check g2h-send vr-socat -u FILE:/tmp/d VSOCK-CONNECT:2:5000
# The machine retries until we listen: keep accepting; its last connection is the one.
vr_collect 5001 /tmp/back.d &
back=$!
vr_wait_for 60 vr_collected_is /tmp/back.d "$sum"
kill "$back"
vr_info h2g-connections "$(vr_collected_count /tmp/back.d)"
vr_expect_eq h2g-receive "$sum" "$(f=$(vr_collected /tmp/back.d); [ -f "$f" ] && vr_sha256 "$f")"
"#;

#[test]
fn kvm_host_vsock_through_vhost_user_backend() {
    let name = "kvm_host_vsock_through_vhost_user_backend";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let want = pattern(LEN);
    let run = rerun_on_platform_fault(name, || {
        let dir = tempfile::Builder::new()
            .prefix("vr-vhost-user.")
            .tempdir()?;
        let vhost_socket = dir.path().join("vhu.sock");
        let uds = dir.path().join("vm.vsock");
        let backend = start_vhost_user_vsock(3, &vhost_socket, &uds)?;
        let g2h_listener = UnixListener::bind(dir.path().join("vm.vsock_5000"))?;
        let vm = GuestRun::kvm_host(SCENARIO)
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
            .spawn(artifacts)?;
        // The machine's side runs beside the guest and gives up when its run ends.
        let ended = Arc::new(AtomicBool::new(false));
        let machine_side = {
            let (ended, want, uds) = (Arc::clone(&ended), want.clone(), uds.clone());
            std::thread::spawn(move || {
                let stop = || ended.load(Ordering::Relaxed);
                let g2h = accept_and_read_unless(&g2h_listener, Duration::from_secs(90), &stop);
                let h2g =
                    connect_and_send_unless(&uds, 5001, &want, Duration::from_secs(60), &stop);
                (g2h, h2g)
            })
        };
        let outcome = vm.wait();
        ended.store(true, Ordering::Relaxed);
        let (g2h, h2g) = machine_side.join().expect("machine side");
        let backend_log = backend.log();
        drop(backend);
        Ok((outcome?, g2h, h2g, backend_log))
    });
    let (outcome, g2h, h2g, backend_log) = run.unwrap();
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
