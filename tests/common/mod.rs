//! Helpers shared by the integration tests of the library (`mod common;`). Each test file
//! compiles its own copy and uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::sim::{PairBackend, PairHost, SimGuest};
use vsock_router::wire::{op, sock_type, Header};

/// The simulated guest's CID.
pub const GUEST: u64 = 3;

/// A device with `cfg` between a simulated guest and socket-pair host streams.
pub fn setup_with(cfg: DeviceConfig) -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    let (backend, host) = PairBackend::new();
    let (g, dev) = SimGuest::with_device(cfg, backend);
    (g, dev, host)
}

/// [`setup_with`], the device without a thread of its own (`RunMode::External`): the
/// simulated guest runs it wherever it waits ([`SimGuest::drive_with`]), on a manual clock
/// when `manual_clock`.
pub fn driven_with(
    mut cfg: DeviceConfig,
    manual_clock: bool,
) -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    cfg.run = vsock_router::device::RunMode::External;
    let (mut g, dev, host) = setup_with(cfg);
    g.drive_with(dev.subscriber().expect("external mode"), manual_clock);
    (g, dev, host)
}

/// A STREAM REQUEST header from `src_cid:src_port` to host port 1 with a 4 KiB buffer, for
/// tests to change what they need.
pub fn request(src_cid: u64, src_port: u32) -> Header {
    Header {
        src_cid,
        dst_cid: 2,
        src_port,
        dst_port: 1,
        len: 0,
        type_: sock_type::STREAM,
        op: op::REQUEST,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 0,
    }
}

/// [`setup_with`] the default configuration, with a driver that acknowledges only `features`.
pub fn setup_features(features: u64) -> (SimGuest, VsockDevice<PairBackend>, PairHost) {
    let (backend, host) = PairBackend::new();
    let (g, dev) = SimGuest::with_device_features(DeviceConfig::new(GUEST), backend, features);
    (g, dev, host)
}

/// The features of a driver that knows no SOCK_SEQPACKET: VERSION_1 and EVENT_IDX.
pub const STREAM_ONLY_FEATURES: u64 =
    vsock_router::sim::LINUX_FEATURES & !(1 << vsock_router::device::VIRTIO_VSOCK_F_SEQPACKET);

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

/// A temporary directory for one test, removed on drop (also when the test fails); its name
/// starts with the test's, for a reader of `/tmp`.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A fresh, empty directory.
    pub fn new(name: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("vr-test-{name}-"))
                .tempdir()
                .unwrap(),
        )
    }

    /// `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        self.0.path()
    }
}

/// The time limit of a bulk transfer in a test: it ends the transfer only when no byte moved
/// for [`Progress::STALL`] (a stall is a bug), or after [`Progress::CAP`] in all, so a machine
/// slowed down by other work makes the test slower, never failed, while a stuck transfer still
/// fails within seconds of the stall limit.
pub struct Progress {
    start: std::time::Instant,
    last_move: std::time::Instant,
    moved: usize,
}

impl Progress {
    /// How long a transfer may go without moving a byte.
    pub const STALL: std::time::Duration = std::time::Duration::from_secs(30);
    /// The limit of the whole transfer, however it moves.
    pub const CAP: std::time::Duration = std::time::Duration::from_secs(900);

    /// Starts the clock.
    pub fn new() -> Progress {
        let now = std::time::Instant::now();
        Progress {
            start: now,
            last_move: now,
            moved: 0,
        }
    }

    /// Whether the transfer may go on, given how many bytes it has moved so far (any measure
    /// that grows while it works).
    pub fn going(&mut self, moved: usize) -> bool {
        let now = std::time::Instant::now();
        if moved != self.moved {
            self.moved = moved;
            self.last_move = now;
        }
        now - self.last_move < Self::STALL && now - self.start < Self::CAP
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}
