//! Busy polling of the device thread (`busy_poll_us`, [`DeviceConfig::busy_poll`]): data flows
//! as without it, and an idle device still goes to sleep once its polling time has passed (the
//! thread's CPU time over a quiet second stays far below the second).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use vsock_router::device::DeviceConfig;
use vsock_router::sim::{PairBackend, SimGuest};

const T: Duration = Duration::from_secs(10);

/// CPU seconds of this process's thread named `name`, from `/proc/self/task/*/schedstat`.
fn thread_cpu(name: &str) -> Option<f64> {
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            return Some(s.split_whitespace().next()?.parse::<u64>().ok()? as f64 * 1e-9);
        }
    }
    None
}

#[test]
fn a_polling_device_moves_data_and_sleeps_when_idle() {
    let cid = 41;
    let mut cfg = DeviceConfig::new(cid);
    cfg.busy_poll = Duration::from_micros(2000);
    let (backend, host) = PairBackend::new();
    let (mut g, _dev) = SimGuest::with_device(cfg, backend);
    let port = g.connect(2, 1234).expect("connected");
    let (_, mut s) = host.accept(T).expect("host side");
    for round in 0..200u32 {
        let msg = round.to_le_bytes();
        g.send(port, &msg, T).unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
        s.write_all(&back).unwrap();
        assert_eq!(g.recv_exact(port, 4, T), msg);
    }
    let name = format!("vsock-{cid}");
    let before = thread_cpu(&name).expect("the device thread");
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu(&name).expect("the device thread") - before;
    let wall = start.elapsed().as_secs_f64();
    // Polling 2 ms per wait would be the whole second if the thread never slept.
    assert!(
        used < 0.2 * wall,
        "idle device thread used {used:.3} s of {wall:.3} s"
    );
    assert!(g.violations.is_empty(), "{:?}", g.violations);
}
