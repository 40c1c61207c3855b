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

use super::stream::SockStream;
use super::unix::BoundSocket;
use super::uplink::UplinkSpec;
use super::{vsock, AcceptReply, Incoming};
use crate::router::{Path, RouteInfo};

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
            let fd = match &listener {
                Listener::Unix(b) => b.listener.as_raw_fd(),
                Listener::Vsock(fd) => fd.as_raw_fd(),
            };
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
            listeners.push(PortListener { port, listener });
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
    pub fn process(&mut self, _now: Instant, out: &mut Vec<Incoming<SockStream>>) {
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
            if let Some(l) = self.listeners.get(idx) {
                Self::accept(l, out);
            }
        }
    }

    fn accept(l: &PortListener, out: &mut Vec<Incoming<SockStream>>) {
        for _ in 0..ACCEPT_BATCH {
            let r = match &l.listener {
                Listener::Unix(b) => b
                    .listener
                    .accept()
                    .map(|(s, _)| (SockStream::from(s), 2, None)),
                Listener::Vsock(fd) => {
                    vsock::accept(fd).map(|(s, cid, port)| (s, u64::from(cid), Some(port)))
                }
            };
            let (stream, src_cid, src_port) = match r {
                Ok(c) => c,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    io::ErrorKind::WouldBlock => return,
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
                route: RouteInfo {
                    path: Path::Uplink,
                    to_host: false,
                },
            });
        }
    }

    /// Always `None`: nothing here expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::unix::test_dir::TempDir;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn unix_stand_in_connections_become_incoming() {
        let dir = TempDir::new();
        let spec = UplinkSpec::Unix(dir.path().to_path_buf());
        let mut l = ListenBackend::new(&spec, &[9000, 9001]).unwrap();
        assert_eq!(l.ports(), vec![9000, 9001]);
        let mut c = UnixStream::connect(dir.join("listen_9000")).unwrap();
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
        assert!(!dir.join("listen_9000").exists());
        assert!(!dir.join("listen_9001").exists());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let dir = TempDir::new();
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
