//! One vsock stream connection between the guest and a host-side stream.
//!
//! The connection reacts to three inputs — a packet from the guest ([`Connection::on_packet`]),
//! readiness of its host stream ([`Connection::on_stream_ready`]) and time
//! ([`Connection::on_deadline`]) — and produces packets for the guest only when the device has an
//! RX buffer for them ([`Connection::fill_rx`]). What it still owes the guest is a small set
//! ([`pending`]), never a queue, so its memory is bounded by its buffer size.
//!
//! States:
//!
//! | state        | entered when                               | left when                                   |
//! |--------------|--------------------------------------------|---------------------------------------------|
//! | `LocalInit`  | a host client connects to a guest port     | guest RESPONSE → `Established`; RST/timeout  |
//! | `Connecting` | the guest sent REQUEST; host connect runs   | connect done → RESPONSE, `Established`; fail → RST |
//! | `Established`| handshake done                             | RST either way, full shutdown, host error   |
//! | `Killed`     | any fatal condition                        | the RST was written to the guest (or none is owed) |
//!
//! Its typed parts: the credit of each direction ([`credit`]), the shutdown flags of both sides
//! and what was done to the host stream (`Shutdowns`), and what a host-initiated handshake
//! still owes (`Handshake`). Shutdown and close are carried as a peer kernel would carry them
//! (`docs/routing.md`, "Shutdown and close on every path").

pub mod credit;
pub mod pending;
mod rx;
mod seq;
mod to_host;

pub(crate) use self::rx::fill_first;

use std::io;
use std::time::Instant;

use self::credit::{Inbound, Outbound};
use self::pending::{PendingRx, PendingSet};
use self::seq::SeqState;
use super::txbuf::TxBuf;
pub use super::types::{
    Addr, CsmConfig, Interest, KillReason, Notify, State, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
};
use crate::stream::{Readiness, VsockStream};
use crate::vq::{Chain, GuestMemory};
use crate::wire::{op, shutdown, Header, SockType};

/// The shutdown flags of both sides, and what was done to the host stream.
#[derive(Clone, Copy, Debug, Default)]
struct Shutdowns {
    /// The flags the guest sent (cumulative).
    guest: u32,
    /// The flags we sent the guest on behalf of the host peer (cumulative).
    told: u32,
    /// We shut the host stream's read side (for the guest's RCV).
    host_read_shut: bool,
    /// We shut the host stream's write side (for the guest's SEND, once flushed).
    host_write_shut: bool,
    /// The host stream reached end of stream.
    host_eof: bool,
}

/// What a host-initiated connection's handshake still owes: bytes the host client sent with
/// its line (delivered to the guest before the stream's own bytes), and the reply owed to the
/// client once the guest accepts.
#[derive(Debug, Default)]
struct Handshake {
    prefix: Vec<u8>,
    pos: usize,
    reply: Option<Vec<u8>>,
    /// Reply bytes still in the TX buffer, in front of guest bytes (they use no guest credit).
    reply_left: usize,
}

impl Handshake {
    fn prefix_left(&self) -> usize {
        self.prefix.len() - self.pos
    }
}

/// A vsock connection backed by a host stream `S`.
pub struct Connection<S> {
    stream: S,
    sock_type: SockType,
    /// The message state of a SOCK_SEQPACKET connection.
    seq: Option<Box<SeqState>>,
    state: State,
    addr: Addr,
    cfg: CsmConfig,
    pending: PendingSet,
    deadline: Option<Instant>,
    kill_reason: Option<KillReason>,
    inbound: Inbound,
    txbuf: TxBuf,
    outbound: Outbound,
    shut: Shutdowns,
    /// Guest-initiated: whether the host-side connect completed.
    connect_done: bool,
    handshake: Handshake,
    bytes_to_host: u64,
    bytes_to_guest: u64,
    /// Whether this connection sent the guest its RST.
    pub(super) rst_sent: bool,
    /// Times host bytes waited for guest credit, not yet taken by the muxer.
    pub(super) credit_stalls: u64,
    /// Guest bytes dropped because the host peer stopped receiving.
    dropped: u64,
}

impl<S: VsockStream> Connection<S> {
    fn new(stream: S, sock_type: SockType, addr: Addr, cfg: CsmConfig, state: State) -> Self {
        Connection {
            stream,
            sock_type,
            seq: (sock_type == SockType::Seqpacket).then(Box::default),
            state,
            addr,
            cfg,
            pending: PendingSet::default(),
            deadline: None,
            kill_reason: None,
            inbound: Inbound::new(cfg.buf_alloc),
            // Room for the handshake reply on top of the advertised buffer.
            txbuf: TxBuf::new(cfg.buf_alloc as usize + 64),
            outbound: Outbound::default(),
            shut: Shutdowns::default(),
            connect_done: false,
            handshake: Handshake::default(),
            bytes_to_host: 0,
            bytes_to_guest: 0,
            rst_sent: false,
            credit_stalls: 0,
            dropped: 0,
        }
    }

    /// A guest-initiated connection whose host-side connect was started. `req` is the guest's
    /// REQUEST (its type is the connection's); `connected` says whether the connect already
    /// completed.
    pub fn guest_initiated(
        stream: S,
        req: &Header,
        connected: bool,
        cfg: CsmConfig,
        now: Instant,
    ) -> Self {
        let addr = Addr {
            local_cid: req.dst_cid,
            local_port: req.dst_port,
            peer_cid: req.src_cid,
            peer_port: req.src_port,
        };
        let sock_type = SockType::from_wire(req.type_).unwrap_or_default();
        let mut c = Self::new(stream, sock_type, addr, cfg, State::Connecting);
        c.outbound.update(req.buf_alloc, req.fwd_cnt);
        c.connect_done = connected;
        if connected {
            c.established();
        } else {
            c.deadline = Some(now + cfg.connect_timeout);
        }
        c
    }

    /// A host-initiated connection of type `sock_type` to guest port `addr.peer_port`. `prefix`
    /// holds bytes the host client already sent (delivered first); `accept_reply` is written to
    /// the host stream when the guest accepts, before any guest data (as a message of its own
    /// on a SOCK_SEQPACKET connection).
    pub fn host_initiated(
        stream: S,
        sock_type: SockType,
        addr: Addr,
        prefix: Vec<u8>,
        accept_reply: Option<Vec<u8>>,
        cfg: CsmConfig,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(stream, sock_type, addr, cfg, State::LocalInit);
        c.handshake = Handshake {
            prefix,
            pos: 0,
            reply: accept_reply,
            reply_left: 0,
        };
        c.pending = PendingSet::only(PendingRx::Request);
        c.deadline = Some(now + cfg.request_timeout);
        c
    }

    fn established(&mut self) {
        self.state = State::Established;
        self.pending.insert(PendingRx::Response);
        self.deadline = None;
    }

    /// The connection's addresses.
    pub fn addr(&self) -> Addr {
        self.addr
    }

    /// The socket type.
    pub fn sock_type(&self) -> SockType {
        self.sock_type
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Why the connection was killed, once it was.
    pub fn kill_reason(&self) -> Option<KillReason> {
        self.kill_reason
    }

    /// Bytes moved guest → host and host → guest.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_to_host, self.bytes_to_guest)
    }

    /// Whether the connection sent the guest an RST.
    pub fn sent_rst(&self) -> bool {
        self.rst_sent
    }

    /// The credit stalls since the last call (see `Counters::credit_stalls`).
    pub fn take_credit_stalls(&mut self) -> u64 {
        std::mem::take(&mut self.credit_stalls)
    }

    /// Guest bytes dropped because the host peer stopped receiving before it took them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// When [`Connection::on_deadline`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the connection has something to put in an RX buffer.
    pub fn has_pending_rx(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the connection is finished and owes the guest nothing: remove it.
    pub fn is_done(&self) -> bool {
        self.state == State::Killed && !self.pending.contains(PendingRx::Rst)
    }

    /// Kills the connection; `notify` says whether the guest must be told with an RST.
    pub fn kill(&mut self, reason: KillReason, notify: Notify) {
        if self.state == State::Killed {
            return;
        }
        self.state = State::Killed;
        self.kill_reason = Some(reason);
        self.pending = match notify {
            Notify::Rst => PendingSet::only(PendingRx::Rst),
            Notify::Nothing => PendingSet::default(),
        };
        self.deadline = None;
    }

    /// The host-stream readiness this connection wants now.
    pub fn interest(&self) -> Interest {
        match self.state {
            State::Connecting => Interest {
                write: !self.connect_done,
                ..Interest::default()
            },
            State::Established => Interest {
                read: !self.pending.contains(PendingRx::Rw)
                    && !self.shut.host_eof
                    && self.shut.guest & shutdown::RCV == 0
                    && self.outbound.credit() > 0,
                write: !self.txbuf.is_empty(),
                // The guest no longer receives, or the host peer finished sending, so we no
                // longer read: only a hang-up can still tell us that the host peer is gone
                // (until we shut our own write side, after which a hang-up would be our own
                // doing).
                hangup: (self.shut.host_read_shut || self.shut.host_eof)
                    && !self.shut.host_write_shut
                    && self.shut.told != shutdown::BOTH,
            },
            State::LocalInit | State::Killed => Interest::default(),
        }
    }

    /// Handles a packet from the guest addressed to this connection. `chain` and `mem` give
    /// access to its payload (chain offset [`HEADER_LEN`](crate::wire::HEADER_LEN), `h.len`
    /// bytes, already checked to lie inside the chain).
    pub fn on_packet(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain, now: Instant) {
        if self.state == State::Killed {
            return;
        }
        if h.op == op::RST {
            self.kill(KillReason::GuestReset, Notify::Nothing);
            return;
        }
        if h.type_ != self.sock_type.wire() {
            // The kernel resets a packet whose type is not its socket's.
            self.kill(KillReason::Protocol, Notify::Rst);
            return;
        }
        self.peer_credit(h);
        match (self.state, h.op) {
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                if let Some(reply) = self.handshake.reply.take() {
                    self.handshake.reply_left = self.txbuf.push(&reply);
                    self.seq_queue_reply(self.handshake.reply_left);
                    self.flush_to_host(now);
                }
                if !self.handshake.prefix.is_empty() {
                    self.pending.insert(PendingRx::Rw);
                }
            }
            (State::Established, op::RW) => self.guest_data(h, mem, chain, now),
            (State::Established, op::SHUTDOWN) => {
                self.shut.guest |= h.flags & shutdown::BOTH;
                self.after_shutdown_change(now);
            }
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => {
                self.pending.insert(PendingRx::CreditUpdate)
            }
            // Anything else — RW before RESPONSE, a RESPONSE without REQUEST, a REQUEST for a
            // live connection, an unknown op — breaks the protocol.
            _ => self.kill(KillReason::Protocol, Notify::Rst),
        }
    }

    /// Takes the guest's credit fields from `h`.
    fn peer_credit(&mut self, h: &Header) {
        self.outbound.update(h.buf_alloc, h.fwd_cnt);
        if self.state == State::Established
            && (self.handshake.prefix_left() > 0 || self.seq_staged())
            && self.outbound.credit() > 0
        {
            // Handshake bytes wait in the device, not in the stream: no readiness will say so.
            self.pending.insert(PendingRx::Rw);
        }
    }

    fn advance_fwd(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.bytes_to_host += n as u64;
        if self.inbound.forwarded(n) {
            self.pending.insert(PendingRx::CreditUpdate);
        }
    }

    fn flush_to_host(&mut self, now: Instant) {
        if self.seq.is_some() {
            self.seq_flush(now);
            return;
        }
        let before = self.txbuf.len();
        match self.txbuf.flush(&mut self.stream) {
            Ok(_) => {}
            Err(e) if stopped_receiving(&e) => {
                self.host_stopped_receiving(now);
                return;
            }
            Err(_) => {
                self.kill(KillReason::HostError, Notify::Rst);
                return;
            }
        }
        let flushed = before - self.txbuf.len();
        // The handshake reply sits in front of guest data but consumed no guest credit.
        let reply_bytes = flushed.min(self.handshake.reply_left);
        self.handshake.reply_left -= reply_bytes;
        self.advance_fwd(flushed - reply_bytes);
    }

    /// The host peer no longer receives (AF_UNIX: it shut its read side or closed, so our
    /// writes fail with `EPIPE`; AF_VSOCK: it sent SHUTDOWN(RCV) or RST): the guest is told with
    /// SHUTDOWN(RCV), as the peer kernel would, and bytes still waiting for the peer are dropped.
    fn host_stopped_receiving(&mut self, now: Instant) {
        if self.shut.told & shutdown::RCV != 0 {
            return;
        }
        self.shut.told |= shutdown::RCV;
        self.drop_unsent();
        self.pending.insert(PendingRx::Shutdown);
        self.after_shutdown_change(now);
    }

    /// Drops the guest bytes waiting for a host peer that will never take them.
    fn drop_unsent(&mut self) {
        let guest_bytes = self.txbuf.len().saturating_sub(self.handshake.reply_left);
        self.dropped += guest_bytes as u64;
        self.txbuf.clear();
        self.handshake.reply_left = 0;
        self.seq_clear_tx();
    }

    /// The host stream reached end of stream (or, on AF_UNIX, reported that its peer closed
    /// with unread bytes): the guest is told SHUTDOWN(SEND) — with RCV as well when the peer
    /// also stopped receiving, which is what a peer's close() looks like — in one packet, after
    /// every byte that came before.
    fn host_finished_sending(&mut self, now: Instant) {
        self.pending.remove(PendingRx::Rw);
        self.shut.host_eof = true;
        let mut flags = shutdown::SEND;
        // Once we shut our own write side the probe cannot tell who did; say only what we know.
        // A zero-length send probes a stream; on SOCK_SEQPACKET it would be an empty message.
        let stopped = if self.seq.is_some() {
            self.stream.peer_closed()
        } else {
            self.stream.send_side_shut()
        };
        if !self.shut.host_write_shut && stopped {
            flags |= shutdown::RCV;
            self.drop_unsent();
        }
        self.shut.told |= flags;
        self.after_shutdown_change(now);
    }

    /// Reacts to shutdown flags: forwards the guest's RCV shutdown at once and its SEND
    /// shutdown once its bytes are flushed, and ends the connection when nothing can flow any
    /// more.
    fn after_shutdown_change(&mut self, now: Instant) {
        if self.state != State::Established {
            return;
        }
        if self.shut.guest & shutdown::RCV != 0 && !self.shut.host_read_shut {
            self.shut.host_read_shut = true;
            // AF_UNIX: the peer's writes now fail with EPIPE; AF_VSOCK: the peer gets RCV.
            let _ = self.stream.shutdown_read();
        }
        if self.shut.guest & shutdown::SEND != 0 {
            self.seq_drop_partial();
        }
        let flushed = self.txbuf.is_empty();
        if self.shut.guest & shutdown::SEND != 0 && flushed && !self.shut.host_write_shut {
            self.shut.host_write_shut = true;
            // A peer that already closed makes this fail; the read side reports that.
            let _ = self.stream.shutdown_write();
        }
        if self.shut.guest == shutdown::BOTH {
            if flushed {
                // Linux waits for our RST after SHUTDOWN(RCV|SEND).
                self.kill(KillReason::Closed, Notify::Rst);
            } else if self.deadline.is_none() {
                self.deadline = Some(now + self.cfg.linger);
            }
        } else if self.shut.told == shutdown::BOTH
            || (self.shut.host_write_shut && self.shut.told & shutdown::SEND != 0)
        {
            // The host side is gone both ways, or both directions ended: the guest's RST (a
            // Linux guest answers SHUTDOWN(RCV|SEND) with one) or its close() normally ends the
            // connection first.
            if self.deadline.is_none() {
                self.deadline = Some(now + self.cfg.linger);
            }
        }
    }

    /// Reacts to readiness of the host stream.
    pub fn on_stream_ready(&mut self, ready: Readiness, now: Instant) {
        let Readiness {
            readable,
            writable,
            hangup,
            error,
        } = ready;
        match self.state {
            State::Connecting => {
                if !self.connect_done && (writable || error) {
                    match self.stream.connect_result() {
                        Ok(()) if !error => {
                            self.connect_done = true;
                            self.established();
                        }
                        _ => self.kill(KillReason::ConnectFailed, Notify::Rst),
                    }
                }
            }
            State::Established => {
                // An error pending on the stream is reported by the next read or write, after
                // the bytes that came before it (AF_UNIX: ECONNRESET once the peer closed with
                // our bytes unread).
                if (writable || hangup || error) && !self.txbuf.is_empty() {
                    self.flush_to_host(now);
                    self.after_shutdown_change(now);
                }
                if hangup
                    && self.shut.host_eof
                    && !self.shut.host_read_shut
                    && !self.shut.host_write_shut
                    && self.state == State::Established
                {
                    // The peer finished sending earlier and now closed: it no longer receives,
                    // as its kernel's SHUTDOWN(RCV) would say.
                    self.host_stopped_receiving(now);
                } else if hangup
                    && self.shut.host_read_shut
                    && !self.shut.host_write_shut
                    && self.state == State::Established
                {
                    // We read no more (the guest shut its receiving side), so the hang-up is
                    // all we learn: the peer shut its read side or closed; nothing it sends
                    // will be delivered again.
                    self.host_stopped_receiving(now);
                    self.host_finished_sending(now);
                    // Either may have ended the connection (both sides shut): a killed
                    // connection owes the guest nothing but its RST.
                    if self.state == State::Established {
                        self.pending.insert(PendingRx::Shutdown);
                    }
                }
                if (readable || error) && !self.shut.host_eof && self.state == State::Established {
                    self.pending.insert(PendingRx::Rw);
                }
            }
            State::LocalInit | State::Killed => {}
        }
    }

    /// Reacts to the deadline having passed.
    pub fn on_deadline(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return,
        }
        self.deadline = None;
        match self.state {
            State::LocalInit | State::Connecting => self.kill(KillReason::Timeout, Notify::Rst),
            State::Established => self.kill(KillReason::Closed, Notify::Rst),
            State::Killed => {}
        }
    }
}

/// Whether a write error means the host peer no longer receives (rather than a failure).
fn stopped_receiving(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    use crate::vq::{Direction, IoVecs};
    use crate::wire::{sock_type, HEADER_LEN};

    const GUEST_CID: u64 = 3;

    /// A stream whose writes fail with `errno` (reads and the rest go to a real socket).
    struct Failing(UnixStream, i32);

    impl AsRawFd for Failing {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl VsockStream for Failing {
        fn write_iov(&mut self, _iov: &IoVecs<'_>) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(self.1))
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A one-descriptor chain at 0x1000 holding `h` and `payload`.
    fn packet(mem: &GuestMemory, h: &Header, payload: &[u8], dir: Direction) -> Chain {
        mem.write_slice(&h.encode(), GuestAddress(0x1000)).unwrap();
        mem.write_slice(payload, GuestAddress(0x1000 + HEADER_LEN as u64))
            .unwrap();
        mem.write_obj(0x1000u64, GuestAddress(0)).unwrap();
        mem.write_obj(
            (HEADER_LEN + payload.len().max(4096)) as u32,
            GuestAddress(8),
        )
        .unwrap();
        let flags: u16 = if dir == Direction::DeviceWrites { 2 } else { 0 };
        mem.write_obj(flags, GuestAddress(12)).unwrap();
        mem.write_obj(0u16, GuestAddress(14)).unwrap();
        Chain::walk(mem, GuestAddress(0), 16, 0, dir).unwrap()
    }

    fn guest(op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 80,
            len,
            type_: sock_type::STREAM,
            op,
            flags,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    /// An established guest-initiated connection over `stream`, its RESPONSE consumed.
    fn established<S: VsockStream>(mem: &GuestMemory, stream: S, now: Instant) -> Connection<S> {
        let req = guest(op::REQUEST, 0, 0);
        let mut c = Connection::guest_initiated(stream, &req, true, CsmConfig::default(), now);
        let rx = packet(mem, &Header::default(), &[], Direction::DeviceWrites);
        assert!(c.fill_rx(mem, &rx, now).is_some());
        let mut raw = [0u8; HEADER_LEN];
        rx.read_at(mem, 0, &mut raw);
        assert_eq!(Header::decode(&raw).op, op::RESPONSE);
        c
    }

    /// The next packet the connection owes the guest.
    fn next(c: &mut Connection<impl VsockStream>, mem: &GuestMemory, now: Instant) -> Header {
        let rx = packet(mem, &Header::default(), &[], Direction::DeviceWrites);
        c.fill_rx(mem, &rx, now).expect("a packet is owed");
        let mut raw = [0u8; HEADER_LEN];
        rx.read_at(mem, 0, &mut raw);
        Header::decode(&raw)
    }

    #[test]
    fn a_host_stream_error_resets_the_guest() {
        let (a, _b) = UnixStream::pair().unwrap();
        let m = mem();
        let now = Instant::now();
        let mut c = established(&m, Failing(a, libc::EIO), now);
        let tx = packet(&m, &guest(op::RW, 3, 0), b"abc", Direction::DeviceReads);
        c.on_packet(&guest(op::RW, 3, 0), &m, &tx, now);
        assert_eq!(c.state(), State::Killed);
        assert_eq!(c.kill_reason(), Some(KillReason::HostError));
        assert_eq!(next(&mut c, &m, now).op, op::RST);
        assert!(c.is_done());
    }

    #[test]
    fn a_peer_that_stopped_receiving_is_shutdown_rcv_not_a_reset() {
        for errno in [libc::EPIPE, libc::ECONNRESET] {
            let (a, _b) = UnixStream::pair().unwrap();
            let m = mem();
            let now = Instant::now();
            let mut c = established(&m, Failing(a, errno), now);
            let tx = packet(&m, &guest(op::RW, 3, 0), b"abc", Direction::DeviceReads);
            c.on_packet(&guest(op::RW, 3, 0), &m, &tx, now);
            assert_eq!(c.state(), State::Established, "errno {errno}");
            let h = next(&mut c, &m, now);
            assert_eq!(
                (h.op, h.flags),
                (op::SHUTDOWN, shutdown::RCV),
                "errno {errno}"
            );
            assert_eq!(c.dropped(), 3);
            // Later bytes are dropped too, and still count against the guest's credit.
            c.on_packet(&guest(op::RW, 3, 0), &m, &tx, now);
            assert_eq!(c.dropped(), 6);
        }
    }
}
