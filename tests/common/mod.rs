//! Helpers shared by the integration tests of the library (`mod common;`). Each test file
//! compiles its own copy and uses only some of them.
#![allow(dead_code)]

use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::sim::{PairBackend, PairHost, SimGuest};

/// The simulated guest's CID.
pub const GUEST: u64 = 3;

/// A device with `cfg` between a simulated guest and socket-pair host streams.
pub fn setup_with(cfg: DeviceConfig) -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    let (backend, host) = PairBackend::new();
    let (g, dev) = SimGuest::with_device(cfg, backend);
    (g, dev, host)
}

/// [`setup_with`] the default configuration for [`GUEST`].
pub fn setup() -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    setup_with(DeviceConfig::new(GUEST))
}

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// How many file descriptors this process has open (`/proc/self/fd`).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
