//! A device between the simulated guest and one of two host backends: the socket pair of the
//! tests (`PairBackend`) or the production router with its hybrid Unix host backend
//! (`<socket>_<port>` for guest connects), with real Unix listeners in this process.

use std::any::Any;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vsock_router::config::VsockConfig;
use vsock_router::device::DeviceConfig;
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::{PairBackend, PairHost, SimGuest};
use vsock_router::stats::Counters;

use crate::cpu;

/// Which host backend the device gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `sim::PairBackend`: a socket pair per connection.
    Pair,
    /// The router (`uplink=none`) and its hybrid Unix host backend.
    Unix,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pair => "pair",
            Kind::Unix => "unix",
        }
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
    pub dev_tid: u32,
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
            dev_tid,
            _dev: dev,
            host,
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
