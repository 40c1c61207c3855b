//! [`HandshakeServer`]: a non-blocking Unix listener whose clients must send one handshake line
//! before they become [`Incoming`] connections.
//!
//! Used by the host backend (hybrid line `CONNECT <port>\n`) and by the CID registry (line
//! `CONNECT <port> FROM <cid> <port>\n`); see [`crate::wire::line`] for the grammar. Behaviour,
//! byte-compatible with Firecracker and Cloud Hypervisor:
//!
//! - a line may arrive in any number of pieces; each pending client buffers at most
//!   [`MAX_LINE`] bytes, so memory is bounded by `max_pending * MAX_LINE`;
//! - bytes the client wrote after its line and that arrived in the same read (at most
//!   [`MAX_LINE`] of them) become [`Incoming::prefix`]; later bytes stay in the socket for the
//!   device, so nothing is lost;
//! - a client is closed, and never offered to the guest, if it closes before its `\n`, sends a
//!   line longer than [`MAX_LINE`], sends bytes that cannot start a valid line, sends the other
//!   kind of line, or does not finish its line within the handshake timeout;
//! - at most `max_pending` clients may be mid-handshake; when a new client arrives and the table
//!   is full, the oldest pending client is read one last time and, if its line is still not
//!   complete, closed to make room. Refusing the newcomer instead would let anyone who holds
//!   `max_pending` idle connections lock every other client out for a whole handshake timeout;
//!   with eviction, idle clients only push each other out, and a client that sends its line at
//!   once is only lost if `max_pending` newer clients arrive before the server reads it.
//!
//! A server of `SOCK_SEQPACKET` clients ([`HandshakeServer::new_seqpacket`], the host's
//! `<socket>_seqpacket` and the registry's `<cid>.sock_seqpacket`) runs in *message mode*: the
//! client's first message must be exactly one valid line, its `\n` last. A first message without
//! `\n`, with bytes after it, longer than [`MAX_LINE`] (`MSG_TRUNC`), empty, or end of stream,
//! closes the client; later messages stay in the socket for the device, so the prefix is always
//! empty. Timeouts, the pending limit and eviction are the same as for streams. A registry
//! `RELAY` line is refused there: sibling devices relay packets over the stream socket only.
//!
//! The server owns an epoll set (the listener plus every pending client), so the device polls a
//! single fd ([`HandshakeServer::poll_fd`]) and calls [`HandshakeServer::process`] when it is
//! readable or [`HandshakeServer::next_deadline`] passed.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::backoff::AcceptBackoff;
use super::seqpacket;
use super::stream::SockStream;
use super::{AcceptReply, Framing, Incoming};
use crate::seam::{Path, RouteInfo, SockType};
use crate::stats::Counters;
use crate::sys;
use crate::vq::IoVecs;
use crate::wire::line::{find_line, is_viable_prefix, parse_line, Line, MAX_LINE};
use crate::wire::Cid;

/// How long a client may take to send its handshake line, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many clients may be mid-handshake at once, by default.
pub const DEFAULT_MAX_PENDING: usize = 1024;

/// New clients accepted per [`HandshakeServer::process`] call at most (the epoll set is
/// level-triggered, so the rest are accepted on the next call).
const ACCEPT_BATCH: usize = 256;

/// Epoll events handled per [`HandshakeServer::process`] call at most.
const EVENT_BATCH: usize = 64;

const LISTENER_TOKEN: u64 = u64::MAX;

/// Which handshake line a server accepts, and what the resulting connection looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// The hybrid-vsock host socket: `CONNECT <port>\n` from a host program, offered to the
    /// guest from CID 2 with an ephemeral port, answered `OK <port>\n`, routed [`Path::Host`].
    Hybrid,
    /// The CID registry socket, routed [`Path::Sibling`]: `RELAY <port> FROM <cid> <port>\n`
    /// from a sibling VMM's device (framed packets follow), or `CONNECT <port> FROM <cid>
    /// <port>\n` from a program on this machine (`vsock-connect`, as CID 2; a byte stream,
    /// answered `OK <port>\n`). Either is offered from that CID and port; CIDs 0, 1 and
    /// `u32::MAX` are refused, and a relay must come from a guest CID (3 or more).
    Registry,
}

impl LineKind {
    /// The socket's name in log lines.
    fn socket_name(self, ty: SockType) -> &'static str {
        match (self, ty) {
            (LineKind::Hybrid, SockType::Stream) => "host socket",
            (LineKind::Hybrid, SockType::Seqpacket) => "host seqpacket socket",
            (LineKind::Registry, SockType::Stream) => "registry socket",
            (LineKind::Registry, SockType::Seqpacket) => "registry seqpacket socket",
        }
    }

    /// The connection a valid `line` on a socket of type `ty` opens, or `None` if this kind of
    /// socket refuses it.
    fn incoming(
        self,
        line: Line,
        stream: SockStream,
        prefix: Vec<u8>,
        ty: SockType,
    ) -> Option<Incoming<SockStream>> {
        match (self, line) {
            (LineKind::Hybrid, Line::Connect { port }) => Some(Incoming {
                stream,
                guest_port: port,
                src_cid: 2,
                src_port: None,
                prefix,
                reply: AcceptReply::HybridOk,
                framing: Framing::Bytes,
                route: RouteInfo {
                    path: Path::Host,
                    to_host: false,
                },
                sock_type: ty,
            }),
            (
                LineKind::Registry,
                Line::ConnectFrom {
                    port,
                    cid,
                    src_port,
                }
                | Line::Relay {
                    port,
                    cid,
                    src_port,
                },
            ) if (Cid(u64::from(cid)).is_guest()
                || (Cid(u64::from(cid)) == Cid::HOST && !matches!(line, Line::Relay { .. })))
                && (ty == SockType::Stream || !matches!(line, Line::Relay { .. })) =>
            {
                let (reply, framing) = match line {
                    Line::Relay { .. } => (AcceptReply::None, Framing::Packets),
                    _ => (AcceptReply::HybridOk, Framing::Bytes),
                };
                Some(Incoming {
                    stream,
                    guest_port: port,
                    src_cid: u64::from(cid),
                    src_port: Some(src_port),
                    prefix,
                    reply,
                    framing,
                    route: RouteInfo {
                        path: Path::Sibling,
                        to_host: false,
                    },
                    // A relayed REQUEST carries its own type; the stream socket's relays are
                    // stream-typed here, which the device ignores for packet links.
                    sock_type: ty,
                })
            }
            _ => None,
        }
    }
}

/// What happened to the server's clients so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeStats {
    /// Clients accepted from the listener.
    pub accepted: u64,
    /// Pending clients closed, oldest first, to make room for a new one because `max_pending`
    /// were mid-handshake.
    pub over_limit: u64,
    /// Clients that completed a valid line (handed out as [`Incoming`]).
    pub completed: u64,
    /// Clients closed for a bad, too long or wrong-kind line, or closing before its end.
    pub rejected: u64,
    /// Clients closed because they did not finish within the timeout.
    pub timed_out: u64,
    /// Times `accept()` ran out of file descriptors or memory and the listener paused
    /// ([`AcceptBackoff`]).
    pub accept_paused: u64,
}

/// [`HandshakeStats`] as atomics, bumped on the device thread and read anywhere.
#[derive(Debug, Default)]
struct SharedStats {
    accepted: AtomicU64,
    over_limit: AtomicU64,
    completed: AtomicU64,
    rejected: AtomicU64,
    timed_out: AtomicU64,
}

/// A live, thread-safe view of one [`HandshakeServer`]'s counters (for the API's metrics).
#[derive(Clone, Debug)]
pub struct HandshakeView {
    stats: Arc<SharedStats>,
    paused: Arc<AtomicU64>,
}

impl HandshakeView {
    /// The counters now.
    pub fn stats(&self) -> HandshakeStats {
        let s = &self.stats;
        HandshakeStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            over_limit: s.over_limit.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            timed_out: s.timed_out.load(Ordering::Relaxed),
            accept_paused: self.paused.load(Ordering::Relaxed),
        }
    }
}

struct Pending {
    stream: UnixStream,
    buf: [u8; MAX_LINE],
    len: usize,
    deadline: Instant,
}

/// A Unix listener plus its clients that have not finished their handshake line.
pub struct HandshakeServer {
    listener: UnixListener,
    kind: LineKind,
    /// `SOCK_SEQPACKET`: message mode (see the module docs).
    sock_type: SockType,
    /// Message mode: the largest message the device must be able to send on a client's socket
    /// (its `SO_SNDBUF` is raised for it when the client is handed out).
    max_message: usize,
    epoll: Epoll,
    events: Vec<EpollEvent>,
    /// Keyed by an increasing id, so the first entry has the earliest deadline.
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    timeout: Duration,
    max_pending: usize,
    stats: Arc<SharedStats>,
    backoff: AcceptBackoff,
}

impl std::fmt::Debug for HandshakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeServer")
            .field("kind", &self.kind)
            .field("sock_type", &self.sock_type)
            .field("pending", &self.pending.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl HandshakeServer {
    /// Serves `listener` (switched to non-blocking), accepting lines of `kind` within `timeout`.
    pub fn new(listener: UnixListener, kind: LineKind, timeout: Duration) -> io::Result<Self> {
        Self::with_type(listener, kind, timeout, SockType::Stream, 0)
    }

    /// Serves a `SOCK_SEQPACKET` `listener` in message mode (see the module docs): a client's
    /// first message must be exactly one line of `kind`. The socket of each client handed out
    /// is sized so that the device can send it messages of up to `max_message` bytes
    /// ([`seqpacket::fit_messages`], best effort).
    pub fn new_seqpacket(
        listener: UnixListener,
        kind: LineKind,
        timeout: Duration,
        max_message: usize,
    ) -> io::Result<Self> {
        Self::with_type(listener, kind, timeout, SockType::Seqpacket, max_message)
    }

    fn with_type(
        listener: UnixListener,
        kind: LineKind,
        timeout: Duration,
        sock_type: SockType,
        max_message: usize,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        Ok(HandshakeServer {
            listener,
            kind,
            sock_type,
            max_message,
            epoll,
            events: vec![EpollEvent::default(); EVENT_BATCH],
            pending: BTreeMap::new(),
            next_id: 0,
            timeout,
            max_pending: DEFAULT_MAX_PENDING,
            stats: Arc::default(),
            backoff: AcceptBackoff::default(),
        })
    }

    /// The socket type of its clients: [`SockType::Seqpacket`] for a server in message mode.
    pub fn sock_type(&self) -> SockType {
        self.sock_type
    }

    /// Sets how many clients may be mid-handshake at once (at least 1).
    pub fn set_max_pending(&mut self, max: usize) {
        self.max_pending = max.max(1);
    }

    /// The epoll fd to poll for readability.
    pub fn poll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Clients currently mid-handshake.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Counters.
    pub fn stats(&self) -> HandshakeStats {
        self.view().stats()
    }

    /// The counters as other threads see them, live.
    pub fn view(&self) -> HandshakeView {
        HandshakeView {
            stats: Arc::clone(&self.stats),
            paused: self.backoff.pause_counter(),
        }
    }

    /// When the oldest pending client times out, or a paused listener resumes.
    pub fn next_deadline(&self) -> Option<Instant> {
        let oldest = self.pending.first_key_value().map(|(_, p)| p.deadline);
        [oldest, self.backoff.deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Accepts new clients, reads handshake lines, expires clients whose deadline is at or
    /// before `now`, and appends finished handshakes to `out`. Never blocks.
    pub fn process(&mut self, now: Instant, out: &mut Vec<Incoming<SockStream>>) {
        self.backoff
            .resume_due(&self.epoll, self.listener.as_raw_fd(), LISTENER_TOKEN, now);
        let mut events = std::mem::take(&mut self.events);
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("vsock backend: epoll_wait on handshake set: {e}");
                }
                0
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER_TOKEN => self.accept(now, out),
                id => self.read(id, out),
            }
        }
        self.events = events;
        self.expire(now);
    }

    fn accept(&mut self, now: Instant, out: &mut Vec<Incoming<SockStream>>) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ if AcceptBackoff::is_exhaustion(&e) => {
                        let fd = self.listener.as_raw_fd();
                        self.backoff.pause(
                            &self.epoll,
                            fd,
                            self.kind.socket_name(self.sock_type),
                            &e,
                            now,
                        );
                        return;
                    }
                    _ => {
                        log::warn!("vsock backend: accept: {e}");
                        return;
                    }
                },
            };
            Counters::inc(&self.stats.accepted);
            self.make_room(out);
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock backend: handshake client: {e}");
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, id),
            ) {
                log::warn!("vsock backend: epoll add handshake client: {e}");
                continue;
            }
            self.pending.insert(
                id,
                Pending {
                    stream,
                    buf: [0; MAX_LINE],
                    len: 0,
                    deadline: now + self.timeout,
                },
            );
        }
    }

    /// Makes room for one more pending client: while `max_pending` are pending, the oldest gets
    /// a last read (its line may be waiting in the socket) and is closed if still unfinished.
    fn make_room(&mut self, out: &mut Vec<Incoming<SockStream>>) {
        while self.pending.len() >= self.max_pending {
            let Some((&id, _)) = self.pending.first_key_value() else {
                return;
            };
            self.read(id, out);
            if let Some(p) = self.pending.remove(&id) {
                // Closing the fd also takes it out of the epoll set.
                drop(p);
                Counters::inc(&self.stats.over_limit);
            }
        }
    }

    /// Reads what client `id` sent; on a complete line hands it out or closes it.
    fn read(&mut self, id: u64, out: &mut Vec<Incoming<SockStream>>) {
        let Some(p) = self.pending.get_mut(&id) else {
            return;
        };
        let end = match self.sock_type {
            SockType::Stream => read_bytes(p),
            SockType::Seqpacket => read_message(p),
        };
        if let Some(end) = end {
            self.finish(id, end, out);
        }
    }

    /// Takes client `id` out of the table and hands it out if `end` (the length of its line)
    /// is a valid line of our kind, else closes it.
    fn finish(&mut self, id: u64, end: Option<usize>, out: &mut Vec<Incoming<SockStream>>) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        // The stream outlives its place in our epoll set: take it out explicitly.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(end) = end else {
            Counters::inc(&self.stats.rejected);
            log::debug!("vsock backend: handshake client closed before a valid line");
            return;
        };
        if self.peer_gone(&p.stream) {
            // Nobody is left to read our OK: a client that gave up (a sibling device whose
            // connect timed out while this device was not running yet) is not offered.
            Counters::inc(&self.stats.rejected);
            log::debug!("vsock backend: handshake client gone before it was served");
            return;
        }
        let incoming = match parse_line(&p.buf[..end]) {
            Ok(line) => {
                let prefix = p.buf[end..p.len].to_vec();
                let stream = SockStream::from(p.stream);
                self.kind.incoming(line, stream, prefix, self.sock_type)
            }
            Err(e) => {
                log::debug!(
                    "vsock backend: {}: {e}",
                    self.kind.socket_name(self.sock_type)
                );
                None
            }
        };
        match incoming {
            Some(inc) => {
                if self.sock_type == SockType::Seqpacket {
                    seqpacket::fit_messages(inc.stream.as_raw_fd(), self.max_message);
                }
                Counters::inc(&self.stats.completed);
                out.push(inc);
            }
            None => Counters::inc(&self.stats.rejected),
        }
    }

    /// Whether the client hung up: fully (`POLLHUP`), or — on the registry socket, whose
    /// clients never half-close before the answer — its write side (`POLLRDHUP`).
    fn peer_gone(&self, stream: &UnixStream) -> bool {
        sys::peer_hung_up(stream.as_raw_fd(), self.kind == LineKind::Registry)
    }

    fn expire(&mut self, now: Instant) {
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().deadline > now {
                break;
            }
            // Closing the fd also takes it out of the epoll set.
            entry.remove();
            Counters::inc(&self.stats.timed_out);
        }
    }
}

/// Stream mode: reads what the client sent so far. `None`: nothing more to read now (the client
/// stays pending); `Some(Some(end))`: a line of `end` bytes is complete; `Some(None)`: the
/// client must be closed (end of stream, an error, a line too long or that cannot be valid).
fn read_bytes(p: &mut Pending) -> Option<Option<usize>> {
    let start = p.len;
    loop {
        if p.len == MAX_LINE {
            return Some(None);
        }
        match (&p.stream).read(&mut p.buf[p.len..]) {
            Ok(0) => return Some(None),
            Ok(n) => {
                p.len += n;
                if let Some(end) = find_line(&p.buf[start..p.len]) {
                    return Some(Some(start + end));
                }
                if !is_viable_prefix(&p.buf[..p.len]) {
                    return Some(None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(None),
        }
    }
}

/// Message mode: receives the client's first message, which must be exactly one line (its
/// `\n` last). Results as for [`read_bytes`]; an empty message or end of stream, a message cut
/// at [`MAX_LINE`] (`MSG_TRUNC`) or one that is not exactly one line closes the client.
fn read_message(p: &mut Pending) -> Option<Option<usize>> {
    let fd = p.stream.as_raw_fd();
    loop {
        let mut iov = IoVecs::new();
        iov.push_buf(&mut p.buf);
        match sys::recvmsg(fd, &iov) {
            Ok(m) if m.truncated || m.len == 0 || m.len > MAX_LINE => return Some(None),
            Ok(m) => {
                p.len = m.len;
                let whole = find_line(&p.buf[..m.len]) == Some(m.len);
                return Some(whole.then_some(m.len));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(None),
        }
    }
}
