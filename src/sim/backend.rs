//! A backend of real Unix socket pairs, for tests.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{AcceptReply, Backend, ConnectRequest, Incoming, Outgoing, Refusal};
use crate::router::{Path, RouteInfo};

#[derive(Default)]
struct Shared {
    accepted: VecDeque<(ConnectRequest, UnixStream)>,
    incoming: VecDeque<(UnixStream, u32, Vec<u8>)>,
    refuse: bool,
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
    let v = size as libc::c_int;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `v` is a valid c_int for the duration of the call.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
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
        let (dev, host) = UnixStream::pair().expect("socketpair");
        dev.set_nonblocking(true).expect("nonblocking");
        let mut sh = self.shared.lock().unwrap();
        if let Some(size) = sh.sock_buf {
            set_buf(&dev, size);
            set_buf(&host, size);
        }
        sh.incoming.push_back((dev, port, prefix.to_vec()));
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
        let (dev, host) = UnixStream::pair().map_err(|_| Refusal::ConnectFailed)?;
        dev.set_nonblocking(true)
            .map_err(|_| Refusal::ConnectFailed)?;
        if let Some(size) = sh.sock_buf {
            set_buf(&dev, size);
            set_buf(&host, size);
        }
        sh.accepted.push_back((*req, host));
        Ok(Outgoing {
            stream: dev,
            connected: true,
            await_ok: false,
            route: RouteInfo {
                path: Path::Host,
                to_host: false,
            },
        })
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.wake.as_raw_fd())
    }

    fn process(&mut self, _now: Instant, out: &mut Vec<Incoming<UnixStream>>) {
        let _ = self.wake.read();
        let mut sh = self.shared.lock().unwrap();
        while let Some((stream, guest_port, prefix)) = sh.incoming.pop_front() {
            out.push(Incoming {
                stream,
                guest_port,
                src_cid: 2,
                src_port: None,
                prefix,
                reply: AcceptReply::HybridOk,
                route: RouteInfo {
                    path: Path::Host,
                    to_host: false,
                },
            });
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}
