//! The device as a vhost-user-vsock backend, driven through the real protocol: a simulated
//! Linux guest on memfd memory, a vhost-user frontend (rust-vmm's `vhost` crate, as VMMs use
//! it) handing the backend that memory, the rings, kick fds and call fds, and the real router
//! with its hybrid Unix sockets on the host side. No AF_VSOCK anywhere.

use std::io::{BufRead, BufReader, Read, Write};

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use vm_memory::{Address, Bytes};

use vsock_router::config::VsockConfig;
use vsock_router::device::DeviceConfig;
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::vhost_user::FrontendLink;
use vsock_router::sim::{SimGuest, LINUX_FEATURES};
use vsock_router::vhost_user::{SharedVsock, VhostUserVsock};

const T: Duration = Duration::from_secs(10);

/// A backend serving one VM on a vhost-user socket in a thread of this process, until the test
/// is done with it.
struct Daemon {
    vsock: SharedVsock<Router>,
    socket: PathBuf,
    hybrid: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl Daemon {
    fn start(dir: &Path, cid: u64) -> Daemon {
        let hybrid = dir.join(format!("vm{cid}.vsock"));
        let cfg: VsockConfig = format!("cid={cid},socket={},uplink=none", hybrid.display())
            .parse()
            .unwrap();
        let router = Router::new(&cfg, Arc::new(Policy::new(cfg.g2h_fallback))).unwrap();
        let vsock = VhostUserVsock::new(DeviceConfig::new(cid), router);
        let socket = dir.join(format!("vm{cid}.vhost-user"));
        let thread = {
            let (vsock, socket) = (vsock.clone(), socket.clone());
            thread::spawn(move || vsock_router::vhost_user::serve(&vsock, &socket).unwrap())
        };
        let until = Instant::now() + T;
        while !socket.exists() {
            assert!(Instant::now() < until, "no vhost-user socket");
            thread::sleep(Duration::from_millis(5));
        }
        Daemon {
            vsock,
            socket,
            hybrid,
            thread: Some(thread),
        }
    }

    /// A guest connected through a frontend with `rings` rings.
    fn guest(&self, cid: u64, rings: usize) -> (SimGuest, FrontendLink) {
        let (g, ctx) = SimGuest::new_shared(cid);
        let link = FrontendLink::connect(&self.socket, &g, &ctx, rings, LINUX_FEATURES).unwrap();
        (g, link)
    }

    fn wait_active(&self, active: bool) {
        let until = Instant::now() + T;
        while self.vsock.is_active() != active {
            assert!(
                Instant::now() < until,
                "device never became active={active}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.vsock.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Guest → host service on port 5000 through the hybrid socket, both ways on one connection.
fn echo_through(d: &Daemon, g: &mut SimGuest, len: usize) {
    let listener = UnixListener::bind(format!("{}_5000", d.hybrid.display())).unwrap();
    let data = pattern(len);
    let server = {
        let len = data.len();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = vec![0; len];
            s.read_exact(&mut got).unwrap();
            s.write_all(&got).unwrap();
            got
        })
    };
    let port = g.connect(2, 5000).expect("connect to the host service");
    g.send(port, &data, T).unwrap();
    let back = g.recv_exact(port, data.len(), T);
    assert!(back == data, "echo differs");
    assert!(server.join().unwrap() == data, "host got other bytes");
    assert!(g.close(port, T));
    let _ = std::fs::remove_file(format!("{}_5000", d.hybrid.display()));
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}

#[test]
fn qemu_style_two_rings_guest_to_host_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 13);
    let (mut g, mut link) = d.guest(13, 2);
    assert_eq!(link.guest_cid().unwrap(), 13);
    d.wait_active(true);
    echo_through(&d, &mut g, 300_000);
    assert!(g.interrupts > 0, "no interrupt through the call fd");
}

#[test]
fn three_rings_and_host_to_guest() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 4);
    let (mut g, _link) = d.guest(4, 3);
    d.wait_active(true);
    g.listen(1234);
    let mut host = UnixStream::connect(&d.hybrid).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let port = g
        .accept(T)
        .expect("the guest accepts the host's connection");
    let mut line = String::new();
    BufReader::new(host.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    host.write_all(b"from the host").unwrap();
    assert_eq!(g.recv_exact(port, 13, T), b"from the host");
    g.send(port, b"from the guest", T).unwrap();
    let mut got = [0u8; 14];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
}

#[test]
fn stop_reports_ring_positions_and_a_new_frontend_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 5);
    {
        let (mut g, mut link) = d.guest(5, 2);
        d.wait_active(true);
        echo_through(&d, &mut g, 10_000);
        let bases = link.stop().unwrap();
        d.wait_active(false);
        // GET_VRING_BASE reports where the device stopped, not where the ring was handed over:
        // the TX ring stands after the last chain the device took (and returned: TX chains go
        // back as soon as they are read), the RX ring after the last buffer it filled. (The
        // guest's last packet, its answer to the host's close, may still wait unread.)
        let used_idx = |used: vm_memory::GuestAddress| {
            let v: u16 = g.mem.read_obj(used.unchecked_add(2)).unwrap();
            u32::from(v)
        };
        assert_eq!(bases[1], used_idx(g.txq.used), "tx base");
        assert!(
            bases[1] > 0 && bases[1] <= u32::from(g.txq.avail_idx()),
            "{bases:?}"
        );
        assert_eq!(bases[0], used_idx(g.rxq.used), "rx base");
        assert!(
            bases[0] > 0 && bases[0] <= u32::from(g.rxq.avail_idx()),
            "rx base {bases:?}"
        );
    }
    // The first frontend is gone; the daemon serves the next one (a rebooted VM, say).
    let (mut g, _link) = d.guest(5, 2);
    d.wait_active(true);
    echo_through(&d, &mut g, 10_000);
}

#[test]
fn a_new_memory_table_while_running_and_a_device_reset() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 16);
    let (mut g, mut link) = d.guest(16, 2);
    d.wait_active(true);
    echo_through(&d, &mut g, 50_000);
    // The table again, while the device runs: it goes on over the new mapping.
    link.resend_memory(&g).unwrap();
    assert!(d.vsock.is_active());
    echo_through(&d, &mut g, 50_000);
    // RESET_DEVICE stops it; the frontend then sets it up again (a rebooted guest driver).
    link.reset_device().unwrap();
    d.wait_active(false);
    drop(link);
    d.wait_active(false);
    let (mut g, _link) = d.guest(16, 2);
    d.wait_active(true);
    echo_through(&d, &mut g, 50_000);
}

#[test]
fn a_legacy_driver_behind_the_frontend_is_served() {
    // QEMU's legacy virtio-mmio (the default of `-M microvm`): the driver acks no VERSION_1.
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), 17);
    let (mut g, ctx) = SimGuest::new_shared(17);
    let legacy = LINUX_FEATURES & !(1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
    let _link = FrontendLink::connect(&d.socket, &g, &ctx, 2, legacy).unwrap();
    d.wait_active(true);
    echo_through(&d, &mut g, 20_000);
}
