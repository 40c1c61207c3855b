//! A backend of real Unix socket pairs, for tests.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{AcceptReply, Backend, ConnectRequest, Framing, Incoming, Outgoing, Refusal};
use crate::seam::{Path, RouteInfo, SockType};

/// A host-initiated connection the test opened, waiting for the device.
struct Offer {
    stream: UnixStream,
    guest_port: u32,
    prefix: Vec<u8>,
    /// For a relay: the sibling guest's CID and port.
    relay_from: Option<(u64, u32)>,
    /// Runs on the device thread right before the device gets the connection.
    before: Option<Box<dyn FnOnce() + Send>>,
    sock_type: SockType,
}

#[derive(Default)]
struct Shared {
    accepted: VecDeque<(ConnectRequest, UnixStream)>,
    incoming: VecDeque<Offer>,
    refuse: bool,
    relay: bool,
    sock_buf: Option<usize>,
    connects: u64,
}

/// The device side: every guest connect gets a fresh socket pair whose other end goes to the
/// test through [`PairHost`].
pub struct PairBackend {
    shared: Arc<Mutex<Shared>>,
    wake: EventFd,
}

/// The test side of a [`PairBackend`].
#[derive(Clone)]
pub struct PairHost {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<EventFd>,
}

/// Sets a Unix stream's send and receive buffers to about `size` bytes (small buffers make
/// short writes and back-pressure happen early).
pub(crate) fn set_buf(s: &UnixStream, size: usize) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        let _ = crate::sys::set_int_option(s.as_raw_fd(), libc::SOL_SOCKET, opt, size as i32);
    }
}

/// A connected pair of Unix sockets of `ty` (a `SOCK_SEQPACKET` pair is wrapped as a
/// `UnixStream` too: `read` and `write` on it take and send one message each).
pub fn socket_pair(ty: SockType) -> std::io::Result<(UnixStream, UnixStream)> {
    if ty == SockType::Stream {
        return UnixStream::pair();
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors the call writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    crate::sys::cvt(r as isize)?;
    // SAFETY: both descriptors are fresh and owned by nothing else.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (
            UnixStream::from_raw_fd(fds[0]),
            UnixStream::from_raw_fd(fds[1]),
        )
    })
}

impl PairBackend {
    /// A backend and its test handle.
    pub fn new() -> (PairBackend, PairHost) {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let host = PairHost {
            shared: shared.clone(),
            wake: Arc::new(wake.try_clone().expect("eventfd")),
        };
        (PairBackend { shared, wake }, host)
    }
}

impl PairHost {
    /// Makes every socket pair use `size`-byte socket buffers (small buffers force credit stalls).
    pub fn set_socket_buffers(&self, size: usize) {
        self.shared.lock().unwrap().sock_buf = Some(size);
    }

    /// Makes guest connects relay links to a sibling (the test plays the sibling device on the
    /// host end: the guest's REQUEST arrives there as the first frame) instead of byte streams.
    pub fn set_relay(&self, relay: bool) {
        self.shared.lock().unwrap().relay = relay;
    }

    /// Refuses (or stops refusing) guest connects.
    pub fn set_refuse(&self, refuse: bool) {
        self.shared.lock().unwrap().refuse = refuse;
    }

    /// Guest connects seen.
    pub fn connects(&self) -> u64 {
        self.shared.lock().unwrap().connects
    }

    /// Waits for the host end of the next guest-initiated connection.
    pub fn accept(&self, timeout: Duration) -> Option<(ConnectRequest, UnixStream)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.shared.lock().unwrap().accepted.pop_front() {
                return Some(c);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Opens a host-initiated connection to guest `port`; `prefix` plays bytes the client sent
    /// with its handshake. Returns the host end.
    pub fn connect(&self, port: u32, prefix: &[u8]) -> UnixStream {
        self.offer(port, prefix, None, None, SockType::Stream)
    }

    /// Opens a host-initiated SOCK_SEQPACKET connection to guest `port` (a socket pair of that
    /// type). Returns the host end.
    pub fn connect_seq(&self, port: u32) -> UnixStream {
        self.offer(port, &[], None, None, SockType::Seqpacket)
    }

    /// Opens a relay link as a sibling device would: the sibling guest `src_cid`, port
    /// `src_port`, connects to guest `port`; `prefix` plays link bytes that arrived with the
    /// handshake line (the start of the REQUEST frame). `before` runs on the device thread right
    /// before the device gets the link (to make two events coincide). Returns the sibling's end
    /// of the link, on which the test plays the sibling device.
    pub fn connect_relay(
        &self,
        port: u32,
        src_cid: u64,
        src_port: u32,
        prefix: &[u8],
        before: Option<Box<dyn FnOnce() + Send>>,
    ) -> UnixStream {
        self.offer(
            port,
            prefix,
            Some((src_cid, src_port)),
            before,
            SockType::Stream,
        )
    }

    fn offer(
        &self,
        guest_port: u32,
        prefix: &[u8],
        relay_from: Option<(u64, u32)>,
        before: Option<Box<dyn FnOnce() + Send>>,
        sock_type: SockType,
    ) -> UnixStream {
        let (dev, host) = socket_pair(sock_type).expect("socketpair");
        dev.set_nonblocking(true).expect("nonblocking");
        let mut sh = self.shared.lock().unwrap();
        if let Some(size) = sh.sock_buf {
            set_buf(&dev, size);
            set_buf(&host, size);
        }
        sh.incoming.push_back(Offer {
            stream: dev,
            guest_port,
            prefix: prefix.to_vec(),
            relay_from,
            before,
            sock_type,
        });
        drop(sh);
        self.wake.write(1).expect("wake");
        host
    }
}

impl Backend for PairBackend {
    type Stream = UnixStream;

    fn connect(&mut self, req: &ConnectRequest) -> Result<Outgoing<UnixStream>, Refusal> {
        let mut sh = self.shared.lock().unwrap();
        sh.connects += 1;
        if sh.refuse {
            return Err(Refusal::ConnectFailed);
        }
        // Relay links carry frames over a byte stream, whatever the connection's type.
        let ty = if sh.relay {
            SockType::Stream
        } else {
            req.sock_type
        };
        let (dev, host) = socket_pair(ty).map_err(|_| Refusal::ConnectFailed)?;
        dev.set_nonblocking(true)
            .map_err(|_| Refusal::ConnectFailed)?;
        if let Some(size) = sh.sock_buf {
            set_buf(&dev, size);
            set_buf(&host, size);
        }
        sh.accepted.push_back((*req, host));
        let (framing, path) = if sh.relay {
            (Framing::Packets, Path::Sibling)
        } else {
            (Framing::Bytes, Path::Host)
        };
        Ok(Outgoing {
            stream: dev,
            connected: true,
            framing,
            route: RouteInfo {
                path,
                to_host: false,
            },
        })
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }

    fn process(&mut self, _now: Instant, out: &mut Vec<Incoming<UnixStream>>) {
        let _ = self.wake.read();
        let offers: Vec<Offer> = self.shared.lock().unwrap().incoming.drain(..).collect();
        for o in offers {
            if let Some(f) = o.before {
                f();
            }
            let (src_cid, src_port, reply, framing, path) = match o.relay_from {
                None => (2, None, AcceptReply::HybridOk, Framing::Bytes, Path::Host),
                Some((cid, port)) => (
                    cid,
                    Some(port),
                    AcceptReply::None,
                    Framing::Packets,
                    Path::Sibling,
                ),
            };
            out.push(Incoming {
                stream: o.stream,
                guest_port: o.guest_port,
                src_cid,
                src_port,
                prefix: o.prefix,
                reply,
                framing,
                route: RouteInfo {
                    path,
                    to_host: false,
                },
                sock_type: o.sock_type,
            });
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}
