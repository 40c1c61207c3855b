//! A device between the simulated guest and one of two host backends: the socket pair of the
//! tests (`PairBackend`) or the production router with its hybrid Unix host backend
//! (`<socket>_<port>` for guest connects), with real Unix listeners in this process.

use std::any::Any;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vsock_router::config::VsockConfig;
use vsock_router::device::DeviceConfig;
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::vhost_user::FrontendLink;
use vsock_router::sim::{PairBackend, PairHost, SimGuest, LINUX_FEATURES};
use vsock_router::stats::Counters;

use crate::cpu;

/// Which host backend the device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `sim::PairBackend`: a socket pair per connection.
    Pair,
    /// The router (`uplink=none`) and its hybrid Unix host backend.
    Unix,
    /// A vhost-user-vsock daemon in a process of its own, driven through a vhost-user frontend
    /// over memfd guest memory, with its hybrid Unix socket (`uds-path`).
    Vu(Daemon),
}

/// The vhost-user daemons the benchmark compares (`--vhost-user OURS,THEIRS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    /// `vsock-routerd`.
    Ours,
    /// rust-vmm's vhost-device-vsock.
    Vdv,
}

/// The daemons' binaries, set once by `--vhost-user`.
pub static DAEMONS: OnceLock<[PathBuf; 2]> = OnceLock::new();

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pair => "pair",
            Kind::Unix => "unix",
            Kind::Vu(Daemon::Ours) => "vu-routerd",
            Kind::Vu(Daemon::Vdv) => "vu-vdv",
        }
    }
}

/// A daemon process with its guest's frontend connection; ended (SIGKILL) when dropped.
struct External {
    child: Child,
    _link: FrontendLink,
}

impl Drop for External {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Host {
    Pair(PairHost),
    Unix {
        socket: PathBuf,
        listeners: HashMap<u32, UnixListener>,
        _dir: tempfile::TempDir,
    },
}

/// A fresh device with its own CID, its guest (on this thread) and its host side.
pub struct Rig {
    pub g: SimGuest,
    pub counters: Arc<Counters>,
    /// Where the device's CPU time is read.
    pub device: cpu::Device,
    /// Whether the device is a daemon of its own, whose counters this process cannot read
    /// (`counters` stay zero).
    pub external: bool,
    // Dropped before the host side: the device thread is joined before the sockets go.
    _dev: Box<dyn Any>,
    host: Host,
}

/// A CID per device, so that each device thread's name is unique in this process.
static NEXT_CID: AtomicU64 = AtomicU64::new(3);

impl Rig {
    /// A device whose connections get `buf_alloc` bytes of receive space on both sides, with a
    /// guest that kicks only when EVENT_IDX asks for it.
    pub fn new(kind: Kind, buf_alloc: u32) -> Result<Rig, String> {
        let cid = NEXT_CID.fetch_add(1, Ordering::Relaxed);
        let mut cfg = DeviceConfig::new(cid);
        cfg.csm.buf_alloc = buf_alloc;
        cfg.busy_poll = crate::busy_poll();
        if let Kind::Vu(daemon) = kind {
            return Rig::vhost_user(daemon, cid, buf_alloc);
        }
        let (mut g, counters, dev, host): (SimGuest, _, Box<dyn Any>, _) = match kind {
            Kind::Pair => {
                let (backend, host) = PairBackend::new();
                let (g, dev) = SimGuest::with_device(cfg, backend);
                (g, dev.counters(), Box::new(dev), Host::Pair(host))
            }
            Kind::Unix => {
                let dir = tempfile::Builder::new()
                    .prefix("vr-bench-")
                    .tempdir()
                    .map_err(|e| format!("tempdir: {e}"))?;
                let socket = dir.path().join("vm.sock");
                let vcfg: VsockConfig =
                    format!("cid={cid},socket={},uplink=none", socket.display())
                        .parse()
                        .map_err(|e| format!("config: {e}"))?;
                let policy = Arc::new(Policy::new(vcfg.g2h_fallback));
                let router = Router::new(&vcfg, policy).map_err(|e| e.to_string())?;
                let (g, dev) = SimGuest::with_device(cfg, router);
                let host = Host::Unix {
                    socket,
                    listeners: HashMap::new(),
                    _dir: dir,
                };
                (g, dev.counters(), Box::new(dev), host)
            }
            Kind::Vu(_) => unreachable!("served above"),
        };
        g.buf_alloc = buf_alloc;
        g.event_idx_kicks = !crate::legacy();
        let dev_tid = cpu::device_tid(cid).ok_or("no device thread found")?;
        if let Some((dev_cpu, rest_cpu)) = crate::pinned() {
            cpu::pin(dev_tid, dev_cpu)?;
            // The guest, and the host threads it spawns from now on.
            cpu::pin(0, rest_cpu)?;
        }
        Ok(Rig {
            g,
            counters,
            device: cpu::Device::Thread(dev_tid),
            external: false,
            _dev: dev,
            host,
        })
    }

    /// A guest of a fresh daemon process: the same command line for both daemons
    /// (vhost-device-vsock's `--vm` spelling, which `vsock-routerd` takes as well), the
    /// connection buffer `buf_alloc` on both sides, two rings (as QEMU sets up).
    fn vhost_user(daemon: Daemon, cid: u64, buf_alloc: u32) -> Result<Rig, String> {
        let bins = DAEMONS.get().ok_or("--vhost-user was not given")?;
        let bin = &bins[daemon as usize];
        let dir = tempfile::Builder::new()
            .prefix("vr-bench-vu-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let socket = dir.path().join("vm.sock");
        let vhost = dir.path().join("vhost.sock");
        let log =
            std::fs::File::create(dir.path().join("daemon.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .arg("--vm")
            .arg(format!(
                "guest-cid={cid},socket={},uds-path={},tx-buffer-size={buf_alloc}",
                vhost.display(),
                socket.display()
            ))
            .env(
                "RUST_LOG",
                std::env::var("VR_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // vsock-routerd's private registry goes in the rig's directory, also when killed.
            .env("TMPDIR", dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let until = Instant::now() + Duration::from_secs(10);
        while !vhost.exists() {
            if Instant::now() > until || child.try_wait().map_err(|e| e.to_string())?.is_some() {
                let _ = child.kill();
                let log =
                    std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
                return Err(format!("{} did not start:\n{log}", bin.display()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if std::env::var_os("VR_BENCH_KEEP").is_some() {
            eprintln!("bench: {} kept in {}", bin.display(), dir.path().display());
        }
        let (mut g, ctx) = SimGuest::new_shared(cid);
        let link = match FrontendLink::connect(&vhost, &g, &ctx, 2, LINUX_FEATURES) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("vhost-user set-up: {e}"));
            }
        };
        g.buf_alloc = buf_alloc;
        g.event_idx_kicks = !crate::legacy();
        // A header descriptor, then the data: what Linux sends for a linear skb. (The bulk
        // workloads set their own layout; vhost-device-vsock refuses a payload split over more
        // descriptors, see docs/performance.md.)
        g.layout = vsock_router::sim::TxLayout::HeaderThenData;
        let pid = child.id();
        if let Some((dev_cpu, rest_cpu)) = crate::pinned() {
            for t in std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| e.to_string())? {
                let tid = t
                    .map_err(|e| e.to_string())?
                    .file_name()
                    .to_string_lossy()
                    .parse();
                cpu::pin(tid.map_err(|_| "a task id")?, dev_cpu)?;
            }
            cpu::pin(0, rest_cpu)?;
        }
        Ok(Rig {
            g,
            counters: Arc::new(Counters::default()),
            device: cpu::Device::Process(pid),
            external: true,
            _dev: Box::new(External { child, _link: link }),
            host: Host::Unix {
                socket,
                listeners: HashMap::new(),
                _dir: if std::env::var_os("VR_BENCH_KEEP").is_some() {
                    let _ = dir.keep();
                    tempfile::tempdir().map_err(|e| e.to_string())?
                } else {
                    dir
                },
            },
        })
    }

    /// Lets a host program connect to guest port `port` as Firecracker's hybrid scheme has it
    /// (`CONNECT <port>` on the device's socket, answered `OK <port>`; for the socket pair, the
    /// backend's own offer); the guest listens and accepts. Returns the guest's port and the
    /// host end, past its `OK` line.
    pub fn connect_from_host(&mut self, port: u32) -> Result<(u32, UnixStream), String> {
        self.g.listen(port);
        let mut s = match &self.host {
            Host::Pair(h) => h.connect(port, b""),
            Host::Unix { socket, .. } => {
                let mut s = UnixStream::connect(socket)
                    .map_err(|e| format!("connect {}: {e}", socket.display()))?;
                s.write_all(format!("CONNECT {port}\n").as_bytes())
                    .map_err(|e| format!("CONNECT: {e}"))?;
                s
            }
        };
        let gport = self
            .g
            .accept(Duration::from_secs(5))
            .ok_or("the guest never saw the host's connection")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 && !line.ends_with(b"\n") {
            // The guest's RESPONSE is in the TX queue: the device answers the host.
            self.g.pump(Duration::ZERO);
            s.read_exact(&mut b)
                .map_err(|e| format!("reading OK: {e}"))?;
            line.push(b[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(format!(
                "host got {:?}, not OK",
                String::from_utf8_lossy(&line)
            ));
        }
        Ok((gport, s))
    }

    /// Connects the guest to host port `port`; returns the guest's port and the host end.
    pub fn connect(&mut self, port: u32) -> Result<(u32, UnixStream), String> {
        if let Host::Unix {
            socket, listeners, ..
        } = &mut self.host
        {
            if let std::collections::hash_map::Entry::Vacant(e) = listeners.entry(port) {
                let path = format!("{}_{port}", socket.display());
                let l = UnixListener::bind(&path).map_err(|e| format!("bind {path}: {e}"))?;
                e.insert(l);
            }
        }
        let gport = self
            .g
            .connect(2, port)
            .map_err(|st| format!("connect to port {port}: {st:?}"))?;
        let s = match &self.host {
            Host::Pair(h) => {
                h.accept(Duration::from_secs(5))
                    .ok_or("host accept timed out")?
                    .1
            }
            // The device's connect completed before the guest got its RESPONSE: the connection
            // waits in the backlog, and accept returns at once.
            Host::Unix { listeners, .. } => {
                listeners[&port]
                    .accept()
                    .map_err(|e| format!("accept: {e}"))?
                    .0
            }
        };
        Ok((gport, s))
    }
}
