//! One vsock stream connection between the guest and a host-side stream.
//!
//! The connection reacts to three inputs — a packet from the guest ([`Connection::on_packet`]),
//! readiness of its host stream ([`Connection::on_stream_ready`]) and time
//! ([`Connection::on_deadline`]) — and produces packets for the guest only when the device has an
//! RX buffer for them ([`Connection::fill_rx`]). What it still owes the guest is a small set of
//! pending flags, never a queue, so its memory is bounded by its buffer size.
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
//! Credit (per connection, wrapping u32 as in the virtio spec): we advertise `buf_alloc` bytes of
//! receive space and count `fwd_cnt` only for bytes really written into the host stream, so the
//! guest can never have more bytes in flight than [`TxBuf`] can hold; a guest that sends beyond
//! it is reset. Towards the guest we never send more than `peer_buf_alloc - (tx_cnt -
//! peer_fwd_cnt)`, ask for credit when it is zero and data waits, and tell the guest proactively
//! when our free space as it knows it falls below half.

use std::io;
use std::num::Wrapping;
use std::time::{Duration, Instant};

use super::stream::VsockStream;
use super::txbuf::TxBuf;
use crate::device::chain::Chain;
use crate::device::iovec::IoVecs;
use crate::device::packet::{op, shutdown, sock_type, Header, HEADER_LEN, MAX_PAYLOAD};
use crate::device::poller::Ready;
use crate::device::virtio::GuestMemory;

/// Timing and buffer settings shared by all connections of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsmConfig {
    /// Receive space advertised to the guest, and the capacity of the per-connection buffer.
    pub buf_alloc: u32,
    /// How long a host-initiated REQUEST waits for the guest's answer.
    pub request_timeout: Duration,
    /// How long a host-side connect may take.
    pub connect_timeout: Duration,
    /// How long a connection shut down both ways may linger before it is reset.
    pub linger: Duration,
}

impl Default for CsmConfig {
    fn default() -> Self {
        CsmConfig {
            buf_alloc: 256 * 1024,
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            linger: Duration::from_secs(2),
        }
    }
}

/// Connection state; see the [module documentation](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated, waiting for the host-side connect to complete.
    Connecting,
    /// Data may flow.
    Established,
    /// Dead; an RST may still be owed to the guest.
    Killed,
}

impl State {
    /// A short lowercase name for logs and the API.
    pub fn name(self) -> &'static str {
        match self {
            State::LocalInit => "local_init",
            State::Connecting => "connecting",
            State::Established => "established",
            State::Killed => "killed",
        }
    }
}

/// Why a connection was killed; each kind is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The guest sent RST.
    GuestReset,
    /// The guest sent more than its credit allowed.
    CreditOverrun,
    /// The guest sent a packet that makes no sense in the connection's state.
    Protocol,
    /// The host-side connect failed.
    ConnectFailed,
    /// The guest did not answer a host-initiated REQUEST, or a connect took too long.
    Timeout,
    /// The host stream failed or hung up while bytes were still owed to it.
    HostError,
    /// The connection finished: both sides shut down.
    Closed,
}

/// Pending work towards the guest, one bit each.
mod pending {
    pub const RST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const REQUEST: u8 = 4;
    pub const RW: u8 = 8;
    pub const SHUTDOWN: u8 = 16;
    pub const CREDIT_UPDATE: u8 = 32;
    pub const CREDIT_REQUEST: u8 = 64;
}

/// Which host-stream readiness the connection wants to hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wants to read (EPOLLIN).
    pub read: bool,
    /// Wants to write (EPOLLOUT).
    pub write: bool,
}

impl Interest {
    /// No interest at all: the stream should not be polled.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

/// The addresses of a connection, as the guest sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    /// The CID the guest talks to (2 for the host, a sibling's or an uplink peer's CID).
    pub local_cid: u64,
    /// The port on that side.
    pub local_port: u32,
    /// The guest's CID.
    pub peer_cid: u64,
    /// The guest's port.
    pub peer_port: u32,
}

/// A vsock connection backed by a host stream `S`.
pub struct Connection<S> {
    stream: S,
    state: State,
    addr: Addr,
    cfg: CsmConfig,
    pending: u8,
    deadline: Option<Instant>,
    kill_reason: Option<KillReason>,
    // Guest → host credit (we are the receiver).
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    txbuf: TxBuf,
    // Host → guest credit (the guest is the receiver).
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    credit_requested: bool,
    // Shutdown bookkeeping.
    peer_shutdown: u32,
    local_shutdown: u32,
    host_write_shut: bool,
    host_eof: bool,
    // Guest-initiated connects: whether the connect completed, and whether the peer's
    // `OK <port>\n` is still awaited.
    connect_done: bool,
    await_ok: bool,
    // Host-initiated handshakes: bytes owed to the guest before the stream's own bytes, and the
    // reply owed to the host client once the guest accepts.
    prefix: Vec<u8>,
    prefix_pos: usize,
    accept_reply: Option<Vec<u8>>,
    reply_left: usize,
    bytes_to_host: u64,
    bytes_to_guest: u64,
}

impl<S: VsockStream> Connection<S> {
    fn new(stream: S, addr: Addr, cfg: CsmConfig, state: State) -> Self {
        Connection {
            stream,
            state,
            addr,
            cfg,
            pending: 0,
            deadline: None,
            kill_reason: None,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            // Room for the handshake reply on top of the advertised buffer.
            txbuf: TxBuf::new(cfg.buf_alloc as usize + 64),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_requested: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            host_write_shut: false,
            host_eof: false,
            connect_done: false,
            await_ok: false,
            prefix: Vec::new(),
            prefix_pos: 0,
            accept_reply: None,
            reply_left: 0,
            bytes_to_host: 0,
            bytes_to_guest: 0,
        }
    }

    /// A guest-initiated connection whose host-side connect was started. `req` is the guest's
    /// REQUEST; `connected` says whether the connect already completed; `await_ok` whether the
    /// peer must answer `OK <port>\n` before the guest gets its RESPONSE.
    pub fn guest_initiated(
        stream: S,
        req: &Header,
        connected: bool,
        await_ok: bool,
        cfg: CsmConfig,
        now: Instant,
    ) -> Self {
        let addr = Addr {
            local_cid: req.dst_cid,
            local_port: req.dst_port,
            peer_cid: req.src_cid,
            peer_port: req.src_port,
        };
        let mut c = Self::new(stream, addr, cfg, State::Connecting);
        c.update_peer_credit(req);
        c.connect_done = connected;
        c.await_ok = await_ok;
        if connected && !await_ok {
            c.established();
        } else {
            c.deadline = Some(now + cfg.connect_timeout);
        }
        c
    }

    /// A host-initiated connection to guest port `addr.peer_port`. `prefix` holds bytes the host
    /// client already sent (delivered first); `accept_reply` is written to the host stream when
    /// the guest accepts, before any guest data.
    pub fn host_initiated(
        stream: S,
        addr: Addr,
        prefix: Vec<u8>,
        accept_reply: Option<Vec<u8>>,
        cfg: CsmConfig,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(stream, addr, cfg, State::LocalInit);
        c.prefix = prefix;
        c.accept_reply = accept_reply;
        c.pending = pending::REQUEST;
        c.deadline = Some(now + cfg.request_timeout);
        c
    }

    fn established(&mut self) {
        self.state = State::Established;
        self.pending |= pending::RESPONSE;
        self.deadline = None;
    }

    /// The connection's addresses.
    pub fn addr(&self) -> Addr {
        self.addr
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
        self.pending != 0
    }

    /// Whether the connection is finished and owes the guest nothing: remove it.
    pub fn is_done(&self) -> bool {
        self.state == State::Killed && self.pending & pending::RST == 0
    }

    /// Kills the connection; `rst` says whether the guest must be told with an RST.
    pub fn kill(&mut self, reason: KillReason, rst: bool) {
        if self.state == State::Killed {
            return;
        }
        self.state = State::Killed;
        self.kill_reason = Some(reason);
        self.pending = if rst { pending::RST } else { 0 };
        self.deadline = None;
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// The host-stream readiness this connection wants now.
    pub fn interest(&self) -> Interest {
        match self.state {
            State::Connecting => Interest {
                read: self.connect_done,
                write: !self.connect_done,
            },
            State::Established => Interest {
                read: self.pending & pending::RW == 0
                    && !self.host_eof
                    && self.peer_shutdown & shutdown::RCV == 0
                    && self.peer_credit() > 0,
                write: !self.txbuf.is_empty(),
            },
            State::LocalInit | State::Killed => Interest::default(),
        }
    }

    /// Handles a packet from the guest addressed to this connection. `chain` and `mem` give
    /// access to its payload (chain offset [`HEADER_LEN`], `h.len` bytes, already checked to lie
    /// inside the chain).
    pub fn on_packet(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain, now: Instant) {
        if self.state == State::Killed {
            return;
        }
        if h.op == op::RST {
            self.kill(KillReason::GuestReset, false);
            return;
        }
        self.update_peer_credit(h);
        if self.state == State::Established
            && self.prefix_pos < self.prefix.len()
            && self.peer_credit() > 0
        {
            // Handshake bytes wait in the device, not in the stream: no readiness will say so.
            self.pending |= pending::RW;
        }
        match (self.state, h.op) {
            (State::LocalInit, op::RESPONSE) => {
                self.state = State::Established;
                self.deadline = None;
                if let Some(reply) = self.accept_reply.take() {
                    self.reply_left = self.txbuf.push(&reply);
                    self.flush_to_host();
                }
                if !self.prefix.is_empty() {
                    self.pending |= pending::RW;
                }
            }
            (State::Established, op::RW) => self.guest_data(h, mem, chain),
            (State::Established, op::SHUTDOWN) => {
                self.peer_shutdown |= h.flags & shutdown::BOTH;
                self.after_shutdown_change(now);
            }
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.pending |= pending::CREDIT_UPDATE,
            // Anything else — RW before RESPONSE, a RESPONSE without REQUEST, a REQUEST for a
            // live connection, an unknown op — breaks the protocol.
            _ => self.kill(KillReason::Protocol, true),
        }
    }

    fn guest_data(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain) {
        if self.peer_shutdown & shutdown::SEND != 0 {
            self.kill(KillReason::Protocol, true);
            return;
        }
        let len = h.len;
        let buffered = (self.rx_cnt - self.fwd_cnt).0;
        if u64::from(buffered) + u64::from(len) > u64::from(self.cfg.buf_alloc) {
            self.kill(KillReason::CreditOverrun, true);
            return;
        }
        if len == 0 {
            return;
        }
        self.rx_cnt += Wrapping(len);
        let mut written = 0usize;
        if self.txbuf.is_empty() {
            let mut iov = IoVecs::new();
            chain.iovecs(mem, HEADER_LEN as u64, u64::from(len), &mut iov);
            match self.stream.write_iov(&iov) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.kill(KillReason::HostError, true);
                    return;
                }
            }
        }
        self.advance_fwd(written);
        let rest = len as usize - written;
        if rest > 0 {
            let off = HEADER_LEN as u64 + written as u64;
            let taken = self.txbuf.push_from_guest(mem, chain, off, rest);
            debug_assert_eq!(taken, rest, "credit check guarantees room");
        }
    }

    fn advance_fwd(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.fwd_cnt += Wrapping(n as u32);
        self.bytes_to_host += n as u64;
        // The guest believes our free space is buf_alloc - (rx_cnt - last_fwd_cnt_sent). Tell it
        // about freed space before that falls below half, or one-way flows stall.
        let believed_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        if believed_used > self.cfg.buf_alloc / 2 {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    fn flush_to_host(&mut self) {
        let before = self.txbuf.len();
        match self.txbuf.flush(&mut self.stream) {
            Ok(_) => {}
            Err(_) => {
                self.kill(KillReason::HostError, true);
                return;
            }
        }
        let flushed = before - self.txbuf.len();
        // The handshake reply sits in front of guest data but consumed no guest credit.
        let reply_bytes = flushed.min(self.reply_left);
        self.reply_left -= reply_bytes;
        self.advance_fwd(flushed - reply_bytes);
    }

    /// Reacts to shutdown flags: forwards the guest's SEND shutdown once its bytes are flushed,
    /// and ends the connection when nothing can flow any more.
    fn after_shutdown_change(&mut self, now: Instant) {
        if self.state != State::Established {
            return;
        }
        let flushed = self.txbuf.is_empty();
        if self.peer_shutdown & shutdown::SEND != 0 && flushed && !self.host_write_shut {
            self.host_write_shut = true;
            // A peer that already closed makes this fail; the read side reports that.
            let _ = self.stream.shutdown_write();
        }
        if self.peer_shutdown == shutdown::BOTH {
            if flushed {
                // Linux waits for our RST after SHUTDOWN(RCV|SEND).
                self.kill(KillReason::Closed, true);
            } else if self.deadline.is_none() {
                self.deadline = Some(now + self.cfg.linger);
            }
        } else if self.host_write_shut && self.local_shutdown & shutdown::SEND != 0 {
            // Both directions ended; the guest's close() will normally reset us first.
            if self.deadline.is_none() {
                self.deadline = Some(now + self.cfg.linger);
            }
        }
    }

    /// Reacts to readiness of the host stream.
    pub fn on_stream_ready(&mut self, ready: Ready, now: Instant) {
        let Ready {
            readable,
            writable,
            hangup,
            error,
            ..
        } = ready;
        match self.state {
            State::Connecting => {
                if !self.connect_done && (writable || error) {
                    match self.stream.connect_result() {
                        Ok(()) if !error => {
                            self.connect_done = true;
                            if !self.await_ok {
                                self.established();
                            }
                        }
                        _ => self.kill(KillReason::ConnectFailed, true),
                    }
                } else if self.connect_done && (readable || error) {
                    self.read_ok_line();
                }
            }
            State::Established => {
                if writable && !self.txbuf.is_empty() {
                    self.flush_to_host();
                    self.after_shutdown_change(now);
                }
                if hangup && !self.txbuf.is_empty() && self.state == State::Established {
                    // The peer is gone with guest bytes still owed to it.
                    self.kill(KillReason::HostError, true);
                }
                if readable && !self.host_eof && self.state == State::Established {
                    self.pending |= pending::RW;
                }
                if error && self.state == State::Established {
                    self.kill(KillReason::HostError, true);
                }
            }
            State::LocalInit | State::Killed => {}
        }
    }

    /// Reads the peer's `OK <port>\n` without consuming any byte after it. Anything else — a
    /// close, garbage, a line too long — means the peer refused.
    fn read_ok_line(&mut self) {
        const MAX: usize = 32;
        let mut buf = [0u8; MAX];
        let n = match self.stream.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => 0,
        };
        let Some(end) = buf[..n].iter().position(|&b| b == b'\n') else {
            if n == 0 || n == MAX {
                self.kill(KillReason::ConnectFailed, true);
            }
            return;
        };
        let line = &buf[..end];
        let ok = line.len() > 3
            && line.starts_with(b"OK ")
            && line[3..].iter().all(u8::is_ascii_digit)
            && line.len() <= 3 + 10;
        let mut sink = [0u8; MAX];
        if !ok || self.stream.recv_bytes(&mut sink[..=end]).ok() != Some(end + 1) {
            self.kill(KillReason::ConnectFailed, true);
            return;
        }
        self.established();
    }

    /// Reacts to the deadline having passed.
    pub fn on_deadline(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return,
        }
        self.deadline = None;
        match self.state {
            State::LocalInit | State::Connecting => self.kill(KillReason::Timeout, true),
            State::Established => self.kill(KillReason::Closed, true),
            State::Killed => {}
        }
    }

    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.addr.local_cid,
            dst_cid: self.addr.peer_cid,
            src_port: self.addr.local_port,
            dst_port: self.addr.peer_port,
            len,
            type_: sock_type::STREAM,
            op,
            flags,
            buf_alloc: self.cfg.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Writes the next packet the connection owes the guest into the RX buffer `chain`.
    /// Returns the bytes written (header + payload), or `None` when there was nothing to send
    /// after all (the buffer stays unused).
    pub fn fill_rx(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<u32> {
        let h = self.next_packet(mem, chain, now)?;
        self.last_fwd_cnt_sent = Wrapping(h.fwd_cnt);
        if h.op != op::CREDIT_UPDATE
            && (self.rx_cnt - self.last_fwd_cnt_sent).0 <= self.cfg.buf_alloc / 2
        {
            // This packet told the guest our credit as well.
            self.pending &= !pending::CREDIT_UPDATE;
        }
        chain.write_at(mem, 0, &h.encode());
        Some(HEADER_LEN as u32 + h.len)
    }

    fn next_packet(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<Header> {
        let take = |c: &mut Self, bit: u8| {
            let had = c.pending & bit != 0;
            c.pending &= !bit;
            had
        };
        if take(self, pending::RST) {
            return Some(self.header(op::RST, 0, 0));
        }
        if take(self, pending::RESPONSE) {
            return Some(self.header(op::RESPONSE, 0, 0));
        }
        if take(self, pending::REQUEST) {
            return Some(self.header(op::REQUEST, 0, 0));
        }
        if self.pending & pending::RW != 0 {
            if let Some(h) = self.read_data(mem, chain, now) {
                return Some(h);
            }
        }
        if take(self, pending::SHUTDOWN) {
            return Some(self.header(op::SHUTDOWN, 0, shutdown::SEND));
        }
        if take(self, pending::CREDIT_UPDATE) {
            return Some(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        if take(self, pending::CREDIT_REQUEST) {
            return Some(self.header(op::CREDIT_REQUEST, 0, 0));
        }
        None
    }

    /// Moves host bytes into the RX buffer: first the handshake prefix, then the stream's bytes,
    /// read straight into guest memory. Clears the RW flag when the stream has nothing more.
    fn read_data(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<Header> {
        if self.state != State::Established || self.peer_shutdown & shutdown::RCV != 0 {
            self.pending &= !pending::RW;
            return None;
        }
        let room = chain.len().saturating_sub(HEADER_LEN as u64);
        let credit = self.peer_credit();
        let max = room.min(u64::from(credit)).min(u64::from(MAX_PAYLOAD)) as usize;
        if max == 0 {
            if credit == 0 {
                // Wait for the guest's credit; ask for it once.
                self.pending &= !pending::RW;
                if !self.credit_requested {
                    self.credit_requested = true;
                    self.pending |= pending::CREDIT_REQUEST;
                }
            }
            return None;
        }
        let n = if self.prefix_pos < self.prefix.len() {
            let n = (self.prefix.len() - self.prefix_pos).min(max);
            chain.write_at(
                mem,
                HEADER_LEN as u64,
                &self.prefix[self.prefix_pos..self.prefix_pos + n],
            );
            self.prefix_pos += n;
            if self.prefix_pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.prefix_pos = 0;
            }
            n
        } else {
            let mut iov = IoVecs::new();
            chain.iovecs(mem, HEADER_LEN as u64, max as u64, &mut iov);
            match self.stream.read_iov(&iov) {
                Ok(0) => {
                    self.pending &= !pending::RW;
                    self.host_eof = true;
                    self.local_shutdown |= shutdown::SEND;
                    self.after_shutdown_change(now);
                    return Some(self.header(op::SHUTDOWN, 0, shutdown::SEND));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending &= !pending::RW;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return None,
                Err(_) => {
                    self.kill(KillReason::HostError, false);
                    return Some(self.header(op::RST, 0, 0));
                }
            }
        };
        self.tx_cnt += Wrapping(n as u32);
        self.bytes_to_guest += n as u64;
        Some(self.header(op::RW, n as u32, 0))
    }
}
