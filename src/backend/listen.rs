//! [`ListenBackend`]: connections the parent machine opens to our guest through the uplink.
//!
//! For each configured guest port the backend listens on the uplink (AF_VSOCK on that port, or
//! the Unix stand-in's `DIR/listen_<port>`). Accepted connections go to the guest at once — there
//! is no handshake line — from the peer's CID and port (the Unix stand-in: CID 2 and an
//! ephemeral port), routed [`Path::Uplink`], with no reply.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::backoff::AcceptBackoff;
use super::stream::SockStream;
use super::unix::BoundSocket;
use super::uplink::UplinkSpec;
use super::{vsock, AcceptReply, Framing, Incoming};
use crate::seam::{Path, RouteInfo, SockType};

/// Connections accepted per listener per [`ListenBackend::process`] call at most.
const ACCEPT_BATCH: usize = 64;

#[derive(Debug)]
enum Listener {
    Unix(BoundSocket),
    Vsock(OwnedFd),
}

#[derive(Debug)]
struct PortListener {
    port: u32,
    listener: Listener,
    backoff: AcceptBackoff,
}

impl PortListener {
    fn fd(&self) -> RawFd {
        match &self.listener {
            Listener::Unix(b) => b.listener.as_raw_fd(),
            Listener::Vsock(fd) => fd.as_raw_fd(),
        }
    }
}

/// Listeners for inbound uplink connections, one per guest port.
#[derive(Debug)]
pub struct ListenBackend {
    epoll: Epoll,
    events: Vec<EpollEvent>,
    listeners: Vec<PortListener>,
}

impl ListenBackend {
    /// Listens on the uplink for each of `ports`. Fails with `InvalidInput` for duplicate ports
    /// or ports without an uplink, `AddrInUse` if a Unix stand-in socket has a live listener,
    /// and `PermissionDenied` for AF_VSOCK when it is forbidden ([`vsock::FORBID_ENV`]).
    pub fn new(spec: &UplinkSpec, ports: &[u32]) -> io::Result<Self> {
        let unique: BTreeSet<u32> = ports.iter().copied().collect();
        if unique.len() != ports.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("duplicate uplink listen port in {ports:?}"),
            ));
        }
        let epoll = Epoll::new()?;
        let mut listeners = Vec::with_capacity(ports.len());
        for (i, &port) in ports.iter().enumerate() {
            // Ports without an uplink are refused below.
            let listener = match spec {
                UplinkSpec::None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "uplink listen ports need an uplink",
                    ))
                }
                UplinkSpec::Unix(dir) => {
                    Listener::Unix(BoundSocket::bind(&dir.join(format!("listen_{port}")))?)
                }
                UplinkSpec::Vsock(_) => Listener::Vsock(vsock::listen(port)?),
            };
            let l = PortListener {
                port,
                listener,
                backoff: AcceptBackoff::default(),
            };
            epoll.ctl(
                ControlOperation::Add,
                l.fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
            listeners.push(l);
        }
        Ok(ListenBackend {
            epoll,
            events: vec![EpollEvent::default(); ports.len().clamp(1, 64)],
            listeners,
        })
    }

    /// The guest ports served.
    pub fn ports(&self) -> Vec<u32> {
        self.listeners.iter().map(|l| l.port).collect()
    }

    /// The fd to poll for readability.
    pub fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Accepts inbound connections and appends them to `out`. Never blocks.
    pub fn process(&mut self, now: Instant, out: &mut Vec<Incoming<SockStream>>) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let fd = l.fd();
            l.backoff.resume_due(&self.epoll, fd, i as u64, now);
        }
        let n = match self.epoll.wait(0, &mut self.events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("vsock backend: epoll_wait on uplink listeners: {e}");
                }
                0
            }
        };
        for i in 0..n {
            let idx = self.events[i].data() as usize;
            if let Some(l) = self.listeners.get_mut(idx) {
                Self::accept(&self.epoll, l, now, out);
            }
        }
    }

    fn accept(
        epoll: &Epoll,
        l: &mut PortListener,
        now: Instant,
        out: &mut Vec<Incoming<SockStream>>,
    ) {
        for _ in 0..ACCEPT_BATCH {
            let r = match &l.listener {
                Listener::Unix(b) => b
                    .listener
                    .accept()
                    .map(|(s, _)| (SockStream::from(s), 2, None)),
                Listener::Vsock(fd) => vsock::accept(fd).map(|(s, cid, port)| {
                    (SockStream::from_nonblocking(s), u64::from(cid), Some(port))
                }),
            };
            let (stream, src_cid, src_port) = match r {
                Ok(c) => c,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ if AcceptBackoff::is_exhaustion(&e) => {
                        let (fd, what) = (l.fd(), format!("uplink port {}", l.port));
                        l.backoff.pause(epoll, fd, &what, &e, now);
                        return;
                    }
                    _ => {
                        log::warn!("vsock backend: accept on uplink port {}: {e}", l.port);
                        return;
                    }
                },
            };
            out.push(Incoming {
                stream,
                guest_port: l.port,
                src_cid,
                src_port,
                prefix: Vec::new(),
                reply: AcceptReply::None,
                framing: Framing::Bytes,
                route: RouteInfo {
                    path: Path::Uplink,
                    to_host: false,
                },
                sock_type: SockType::Stream,
            });
        }
    }

    /// When a listener paused by [`AcceptBackoff`] resumes, if one is paused.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.listeners
            .iter()
            .filter_map(|l| l.backoff.deadline())
            .min()
    }

    /// Each listener's pause count (times `accept()` ran out of file descriptors or memory),
    /// readable from other threads.
    pub fn pause_counters(&self) -> Vec<std::sync::Arc<std::sync::atomic::AtomicU64>> {
        self.listeners
            .iter()
            .map(|l| l.backoff.pause_counter())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn unix_stand_in_connections_become_incoming() {
        let dir = tempfile::tempdir().unwrap();
        let spec = UplinkSpec::Unix(dir.path().to_path_buf());
        let mut l = ListenBackend::new(&spec, &[9000, 9001]).unwrap();
        assert_eq!(l.ports(), vec![9000, 9001]);
        let mut c = UnixStream::connect(dir.path().join("listen_9000")).unwrap();
        c.write_all(b"hello").unwrap();
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while out.is_empty() {
            assert!(Instant::now() < end);
            l.process(Instant::now(), &mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.len(), 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 9000);
        assert_eq!(inc.src_cid, 2);
        assert_eq!(inc.src_port, None);
        assert!(inc.prefix.is_empty());
        assert_eq!(inc.reply, AcceptReply::None);
        assert_eq!(inc.route.path, Path::Uplink);
        assert!(!inc.route.to_host);
        assert_eq!(l.next_deadline(), None);
        // The bytes are left for the device.
        let mut s = UnixStream::from(OwnedFd::from(inc.stream));
        s.set_nonblocking(false).unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        drop(l);
        assert!(!dir.path().join("listen_9000").exists());
        assert!(!dir.path().join("listen_9001").exists());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spec = UplinkSpec::Unix(dir.path().to_path_buf());
        let e = ListenBackend::new(&spec, &[1, 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = ListenBackend::new(&UplinkSpec::None, &[1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(ListenBackend::new(&UplinkSpec::None, &[]).is_ok());
        let _a = ListenBackend::new(&spec, &[5]).unwrap();
        let e = ListenBackend::new(&spec, &[5]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let e = ListenBackend::new(&UplinkSpec::Vsock("/dev/vsock".into()), &[5]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(vsock::sockets_created(), 0);
    }
}
