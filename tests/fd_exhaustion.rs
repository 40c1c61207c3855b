//! The device when its process has no file descriptor left: `accept()` on the host socket and
//! on an uplink listen socket fails with `EMFILE` while clients wait in the backlog. The device
//! must neither spin on the still-readable listeners nor drop the waiting clients: it rests
//! (`backend::backoff`) and serves them once descriptors are free again.
//!
//! One test in its own binary: it lowers `RLIMIT_NOFILE` for the whole process.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{open_fds, TempDir};
use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, RunMode};
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::SimGuest;

const T: Duration = Duration::from_secs(20);

/// Sets the soft `RLIMIT_NOFILE` for the test's span and puts the old one back on drop (also
/// when the test fails).
struct NofileLimit(libc::rlimit);

impl NofileLimit {
    fn lower_to(soft: u64) -> NofileLimit {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `old` is a valid rlimit for the kernel to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit; lowering the soft limit needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) }, 0);
        NofileLimit(old)
    }
}

impl Drop for NofileLimit {
    fn drop(&mut self) {
        // SAFETY: `self.0` is the limit read before, a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}

#[test]
fn out_of_descriptors_the_device_rests_and_then_serves_the_waiting_clients() {
    let dir = TempDir::new("fds");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let cfg: VsockConfig = format!(
        "cid=3,socket={},uplink=unix:{},listen=9000",
        dir.path("vm.sock").display(),
        up.display()
    )
    .parse()
    .unwrap();
    let router = Router::new(&cfg, Arc::new(Policy::new(true))).expect("router");
    let mut dcfg = DeviceConfig::new(3);
    // The test runs the device itself, so it can count the device's wake-ups.
    dcfg.run = RunMode::External;
    let (mut g, dev) = SimGuest::with_device(dcfg, router);
    let core = dev.subscriber().expect("an external-mode device");
    g.drive_with(dev.subscriber().expect("an external-mode device"), false);
    g.listen(5000);
    g.listen(9000);
    g.pump(Duration::from_millis(10));

    // No descriptor left but the two the clients take.
    let limit = NofileLimit::lower_to(open_fds() as u64 + 32);
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
        assert!(fillers.len() < 64, "the lowered limit is not enforced");
    }
    fillers.truncate(fillers.len() - 2);
    let mut host = UnixStream::connect(dir.path("vm.sock")).unwrap();
    host.write_all(b"CONNECT 5000\nfrom the host").unwrap();
    let mut parent = UnixStream::connect(up.join("listen_9000")).unwrap();
    parent.write_all(b"from the parent").unwrap();
    assert!(File::open("/dev/null").is_err(), "no descriptor is left");

    // For a second, run the device whenever it asks to run: a device that spins on the
    // readable listeners asks thousands of times; one that rests wakes about every 100 ms.
    let fd = core.poll_fd().expect("an active device");
    let start = Instant::now();
    let mut wakes = 0;
    while start.elapsed() < Duration::from_secs(1) {
        let ready = vsock_router::sys::poll_one(fd, libc::POLLIN, 50).unwrap();
        if ready != 0 {
            core.run_once(0).unwrap();
            wakes += 1;
        }
    }
    assert!(
        wakes <= 40,
        "the device woke {wakes} times in a second with no descriptor to accept into"
    );
    assert!(
        g.accept(Duration::ZERO).is_none(),
        "nothing reached the guest"
    );

    // Descriptors again: both clients are served, with what they sent.
    drop(fillers);
    drop(limit);
    let mut ports = vec![
        g.accept(T)
            .expect("the first waiting client reaches the guest"),
        g.accept(T)
            .expect("the second waiting client reaches the guest"),
    ];
    ports.sort_unstable();
    assert_eq!(ports, vec![5000, 9000]);
    assert_eq!(g.recv_exact(5000, 13, T), b"from the host");
    assert_eq!(g.recv_exact(9000, 15, T), b"from the parent");
    let mut ok = [0u8; 3];
    host.set_read_timeout(Some(T)).unwrap();
    host.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"OK ", "the host client gets its OK line");
    g.send(9000, b"ack", T).unwrap();
    let mut ack = [0u8; 3];
    parent.set_read_timeout(Some(T)).unwrap();
    parent.read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"ack");
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}
