//! A connection between our guest and a sibling guest on another device, relayed packet by
//! packet over one Unix stream (the "link") between the two devices.
//!
//! Unlike a [`Connection`](super::connection::Connection), the device does not end the vsock
//! connection: every packet of the connection crosses unchanged — REQUEST, RESPONSE, data,
//! SHUTDOWN flags, credit (`buf_alloc`, `fwd_cnt`) — so the two guests' kernels talk to each
//! other as if they ran on one kernel: a close reaches the peer as SHUTDOWN(RCV|SEND) (its
//! `send()` then fails with `EPIPE`), half-closes each way, the receiver's real credit, and the
//! kernel's own RST and close timeout. The link's end stands for an RST: a device closes it when
//! its guest resets the connection (after the packets before it are written) or when the
//! connection dies, and the other device then resets its guest.
//!
//! The device still guards both sides: a guest that sends beyond any credit its sibling
//! advertised, or a link that carries a packet not of this connection, not in order of the
//! handshake, or beyond any credit our guest advertised, ends the connection with an RST both
//! ways. (Any, not the last: a receiver may shrink its buffer while bytes are in flight; its
//! kernel then drops what does not fit, as Linux does, and nobody is reset.) What may
//! wait for the link is bounded ([`OutFrames`]): the credit we pass to our guest is capped at
//! our buffer size.

use std::num::Wrapping;
use std::time::{Duration, Instant};

use super::frames::{FrameReader, Next, OutFrames, Payload, SendError};
use super::types::{Addr, CsmConfig, Interest, KillReason, Notify, State};
use crate::stream::Readiness;
use crate::stream::VsockStream;
use crate::vq::chain::Chain;
use crate::vq::GuestMemory;
use crate::wire::{op, seq, shutdown, sock_type, Header, SockType, HEADER_LEN, MAX_PAYLOAD};

/// How long a connection that one side closed (SHUTDOWN with both flags) may wait for an RST
/// before the device resets it both ways: longer than the kernel's own close timeout (8 s), so
/// the guests' kernels end it themselves.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Our guest's REQUEST went to the sibling; its answer is awaited.
    Requesting,
    /// The sibling's REQUEST is for our guest (`delivered` once it is in an RX buffer); our
    /// guest's answer is awaited.
    Offering { delivered: bool },
    /// Both guests agreed; packets flow.
    Open,
    /// Over: an RST may still be owed to our guest, packets may still wait for the link.
    Killed,
}

/// A relayed sibling connection over the link `S`.
pub struct Relay<S> {
    link: S,
    addr: Addr,
    type_: u16,
    cfg: CsmConfig,
    phase: Phase,
    deadline: Option<Instant>,
    kill_reason: Option<KillReason>,
    rst_owed: bool,
    /// Whether the relay sent our guest an RST (its own or the sibling's).
    rst_sent: bool,
    /// The link may hold a packet for our guest.
    rx_wanted: bool,
    link_ended: bool,
    input: FrameReader,
    /// The header of the data packet whose payload is being moved to our guest.
    current: Header,
    out: OutFrames,
    guest_shut: u32,
    sibling_shut: u32,
    // Our guest → sibling: the largest buffer the sibling advertised, its newest `fwd_cnt`, and
    // what our guest sent. (The largest, not the last: a receiver may shrink its buffer while
    // bytes are in flight, and its kernel then drops what does not fit; only a sender beyond
    // anything ever advertised is at fault.)
    sibling_buf_alloc: u32,
    sibling_fwd_cnt: Wrapping<u32>,
    guest_sent: Wrapping<u32>,
    // Sibling → our guest: the same for our guest's credit, and what the sibling sent.
    guest_buf_alloc: u32,
    guest_fwd_cnt: Wrapping<u32>,
    sibling_sent: Wrapping<u32>,
    bytes_to_sibling: u64,
    bytes_to_guest: u64,
}

impl<S: VsockStream> Relay<S> {
    fn new(link: S, addr: Addr, cfg: CsmConfig, phase: Phase, ahead: Vec<u8>) -> Self {
        Relay {
            link,
            addr,
            type_: sock_type::STREAM,
            cfg,
            phase,
            deadline: None,
            kill_reason: None,
            rst_owed: false,
            rst_sent: false,
            rx_wanted: false,
            link_ended: false,
            input: FrameReader::new(ahead),
            current: Header::default(),
            out: OutFrames::new(cfg.buf_alloc as usize),
            guest_shut: 0,
            sibling_shut: 0,
            sibling_buf_alloc: 0,
            sibling_fwd_cnt: Wrapping(0),
            guest_sent: Wrapping(0),
            guest_buf_alloc: 0,
            guest_fwd_cnt: Wrapping(0),
            sibling_sent: Wrapping(0),
            bytes_to_sibling: 0,
            bytes_to_guest: 0,
        }
    }

    /// The socket type (STREAM until an offered link's REQUEST said otherwise).
    pub fn sock_type(&self) -> SockType {
        SockType::from_wire(self.type_).unwrap_or_default()
    }

    /// Our guest's REQUEST `req` to a sibling, over the `link` just opened: the REQUEST is its
    /// first packet; the sibling's answer is awaited for the connect timeout.
    pub fn requested(link: S, req: &Header, cfg: CsmConfig, now: Instant) -> Self {
        let addr = Addr {
            local_cid: req.dst_cid,
            local_port: req.dst_port,
            peer_cid: req.src_cid,
            peer_port: req.src_port,
        };
        let mut r = Self::new(link, addr, cfg, Phase::Requesting, Vec::new());
        r.type_ = req.type_;
        r.guest_credit(req);
        r.deadline = Some(now + cfg.connect_timeout);
        r.relay(req, None);
        r
    }

    /// A sibling's connection to our guest, over an accepted `link` whose handshake line named
    /// `addr`; `ahead` holds link bytes read after that line (the start of its REQUEST). Our
    /// guest's answer is awaited for the request timeout.
    pub fn offered(link: S, addr: Addr, ahead: Vec<u8>, cfg: CsmConfig, now: Instant) -> Self {
        let mut r = Self::new(link, addr, cfg, Phase::Offering { delivered: false }, ahead);
        r.deadline = Some(now + cfg.request_timeout);
        r.rx_wanted = true;
        r
    }

    /// The connection's addresses (local = the sibling, peer = our guest).
    pub fn addr(&self) -> Addr {
        self.addr
    }

    /// The state, in the terms of a [`Connection`](super::connection::Connection).
    pub fn state(&self) -> State {
        match self.phase {
            Phase::Requesting => State::Connecting,
            Phase::Offering { .. } => State::LocalInit,
            Phase::Open => State::Established,
            Phase::Killed => State::Killed,
        }
    }

    /// Why the connection was killed, once it was.
    pub fn kill_reason(&self) -> Option<KillReason> {
        self.kill_reason
    }

    /// Whether the relay sent our guest an RST.
    pub fn sent_rst(&self) -> bool {
        self.rst_sent
    }

    /// Payload bytes relayed our guest → sibling and sibling → our guest.
    pub fn bytes(&self) -> (u64, u64) {
        (self.bytes_to_sibling, self.bytes_to_guest)
    }

    /// The link's file descriptor.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.link.as_raw_fd()
    }

    /// Whether the sibling's side is gone or going: the link ended, or its peer is hanging up.
    pub fn link_hanging_up(&self) -> bool {
        self.link_ended || self.link.peer_hanging_up()
    }

    /// When [`Relay::on_deadline`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether a packet may be owed to our guest.
    pub fn has_pending_rx(&self) -> bool {
        self.rst_owed || (self.phase != Phase::Killed && self.rx_wanted)
    }

    /// Whether the connection is over and owes nothing to anyone: remove it (which closes the
    /// link, the sibling's RST).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Killed && !self.rst_owed && self.out.is_empty()
    }

    /// The link readiness the connection wants.
    pub fn interest(&self) -> Interest {
        let live = self.phase != Phase::Killed;
        Interest {
            read: live && !self.rx_wanted && !self.link_ended,
            write: !self.out.is_empty(),
            hangup: false,
        }
    }

    /// Ends the connection; `notify` says whether our guest must be told with an RST. Nothing
    /// more goes to the link, which closes when the connection is removed.
    pub fn kill(&mut self, reason: KillReason, notify: Notify) {
        if self.phase == Phase::Killed {
            return;
        }
        self.phase = Phase::Killed;
        self.kill_reason = Some(reason);
        self.rst_owed = notify == Notify::Rst;
        self.deadline = None;
        self.out.clear();
    }

    fn guest_credit(&mut self, h: &Header) {
        self.guest_buf_alloc = self.guest_buf_alloc.max(h.buf_alloc);
        self.guest_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    fn sibling_credit(&mut self, h: &Header) {
        self.sibling_buf_alloc = self.sibling_buf_alloc.max(h.buf_alloc);
        self.sibling_fwd_cnt = Wrapping(h.fwd_cnt);
    }

    /// Writes one of our guest's packets to the link; a failure ends the connection.
    fn relay(&mut self, h: &Header, payload: Option<(&GuestMemory, &Chain)>) {
        match self.out.send(&mut self.link, h, payload) {
            Ok(()) => {}
            Err(SendError::Io(_)) => {
                // The sibling's device closed the link: its guest reset the connection.
                let reason = if self.phase == Phase::Requesting {
                    KillReason::ConnectFailed
                } else {
                    KillReason::Closed
                };
                self.link_ended = true;
                self.kill(reason, Notify::Rst);
            }
            Err(SendError::Full) => self.kill(KillReason::Protocol, Notify::Rst),
        }
    }

    fn arm_close_timer(&mut self, now: Instant) {
        if self.deadline.is_none()
            && (self.guest_shut == shutdown::BOTH || self.sibling_shut == shutdown::BOTH)
        {
            self.deadline = Some(now + CLOSE_TIMEOUT);
        }
    }

    /// Handles a packet from our guest for this connection (`h.len` payload bytes at
    /// [`HEADER_LEN`] of `chain`, already checked to lie inside it).
    pub fn on_packet(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain, now: Instant) {
        if self.phase == Phase::Killed {
            return;
        }
        self.guest_credit(h);
        if self.phase == (Phase::Offering { delivered: false }) {
            // Our guest knows nothing of the connection yet: the RST it gets answers its packet,
            // and mirrors that packet's type, as the kernel's reset of an unknown socket does.
            self.type_ = h.type_;
        }
        if h.type_ != self.type_ {
            self.kill(KillReason::Protocol, Notify::Rst);
            return;
        }
        match (self.phase, h.op) {
            (_, op::RST) => {
                // Packets before the RST still reach the sibling; then the link closes.
                let _ = self.out.flush(&mut self.link);
                self.phase = Phase::Killed;
                self.kill_reason = Some(KillReason::GuestReset);
                self.deadline = (!self.out.is_empty()).then(|| now + self.cfg.linger);
            }
            (Phase::Offering { delivered: true }, op::RESPONSE) => {
                self.phase = Phase::Open;
                self.deadline = None;
                self.relay(h, None);
            }
            (Phase::Open, op::RW) => {
                let in_flight = (self.guest_sent + Wrapping(h.len) - self.sibling_fwd_cnt).0;
                let credit = self.sibling_buf_alloc.min(self.cfg.buf_alloc);
                if self.guest_shut & shutdown::SEND != 0 {
                    self.kill(KillReason::Protocol, Notify::Rst);
                } else if in_flight > credit {
                    self.kill(KillReason::CreditOverrun, Notify::Rst);
                } else if h.len > 0 {
                    self.guest_sent += Wrapping(h.len);
                    self.bytes_to_sibling += u64::from(h.len);
                    self.relay(h, Some((mem, chain)));
                }
            }
            (Phase::Open, op::SHUTDOWN) => {
                // Relayed even without a new flag: every packet carries the sender's credit.
                self.guest_shut |= h.flags & shutdown::BOTH;
                self.relay(h, None);
                self.arm_close_timer(now);
            }
            (Phase::Open, op::CREDIT_UPDATE | op::CREDIT_REQUEST) => self.relay(h, None),
            // Anything else — data before the answer, a second REQUEST, an answer that was not
            // asked for, an unknown op — breaks the protocol.
            _ => self.kill(KillReason::Protocol, Notify::Rst),
        }
    }

    /// Reacts to readiness of the link.
    pub fn on_link_ready(&mut self, ready: Readiness) {
        if (ready.writable || ready.hangup || ready.error) && !self.out.is_empty() {
            if self.out.flush(&mut self.link).is_err() {
                self.out.clear();
                self.link_ended = true;
                self.kill(KillReason::Closed, Notify::Rst);
            }
            if self.phase == Phase::Killed && self.out.is_empty() {
                self.deadline = None;
            }
        }
        if (ready.readable || ready.hangup || ready.error) && self.phase != Phase::Killed {
            self.rx_wanted = true;
        }
    }

    /// Reacts to the deadline having passed.
    pub fn on_deadline(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return,
        }
        self.deadline = None;
        match self.phase {
            Phase::Requesting | Phase::Offering { .. } | Phase::Open => {
                self.kill(KillReason::Timeout, self.guest_notice())
            }
            // The sibling stopped reading the packets before our guest's RST: give up on them.
            Phase::Killed => self.out.clear(),
        }
    }

    fn rst_header(&self) -> Header {
        Header {
            src_cid: self.addr.local_cid,
            dst_cid: self.addr.peer_cid,
            src_port: self.addr.local_port,
            dst_port: self.addr.peer_port,
            len: 0,
            type_: self.type_,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Whether our guest must hear of a kill: not while the sibling's REQUEST has not reached
    /// it (the connection means nothing to it yet).
    fn guest_notice(&self) -> Notify {
        match self.phase {
            Phase::Offering { delivered: false } => Notify::Nothing,
            _ => Notify::Rst,
        }
    }

    /// Writes the next packet owed to our guest into the RX buffer `chain`: an RST if one is
    /// owed, else the next packet (or piece of one) from the link. Returns the bytes written,
    /// or `None` when nothing is ready.
    pub fn fill_rx(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<u32> {
        if !self.rst_owed && self.phase != Phase::Killed && self.rx_wanted {
            if let Some(n) = self.next_from_link(mem, chain, now) {
                return Some(n);
            }
        }
        if self.rst_owed {
            self.rst_owed = false;
            chain.write_at(mem, 0, &self.rst_header().encode());
            self.rst_sent = true;
            return Some(HEADER_LEN as u32);
        }
        None
    }

    /// Checks a packet from the link against the connection and takes its news (state,
    /// credit, shutdown flags). `Err` says why the connection must end.
    fn accept_from_link(&mut self, h: &Header, now: Instant) -> Result<(), KillReason> {
        let a = self.addr;
        let ours = h.src_cid == a.local_cid
            && h.src_port == a.local_port
            && h.dst_cid == a.peer_cid
            && h.dst_port == a.peer_port;
        if !ours || (h.op != op::RW && h.len != 0) || h.len > MAX_PAYLOAD {
            return Err(KillReason::Protocol);
        }
        if let Phase::Offering { delivered: false } = self.phase {
            // The first packet of an offered link is the sibling guest's REQUEST.
            // A SOCK_SEQPACKET request needs our guest's driver to know the type.
            let served = h.type_ == sock_type::STREAM
                || (h.type_ == sock_type::SEQPACKET && self.cfg.seqpacket);
            if h.op != op::REQUEST || !served {
                return Err(KillReason::Protocol);
            }
            self.type_ = h.type_;
            self.phase = Phase::Offering { delivered: true };
            self.sibling_credit(h);
            return Ok(());
        }
        if h.type_ != self.type_ {
            return Err(KillReason::Protocol);
        }
        match (self.phase, h.op) {
            (Phase::Requesting, op::RESPONSE) => {
                self.phase = Phase::Open;
                self.deadline = None;
            }
            (Phase::Open, op::RW) => {
                let in_flight = (self.sibling_sent + Wrapping(h.len) - self.guest_fwd_cnt).0;
                if self.sibling_shut & shutdown::SEND != 0 || h.len == 0 {
                    return Err(KillReason::Protocol);
                }
                if in_flight > self.guest_buf_alloc {
                    return Err(KillReason::CreditOverrun);
                }
            }
            (Phase::Open, op::SHUTDOWN) => {
                self.sibling_shut |= h.flags & shutdown::BOTH;
                self.arm_close_timer(now);
            }
            (Phase::Open, op::CREDIT_UPDATE | op::CREDIT_REQUEST) => {}
            _ => return Err(KillReason::Protocol),
        }
        self.sibling_credit(h);
        Ok(())
    }

    /// Writes `h` (with `payload` bytes already in place after it) into the RX buffer, the
    /// credit it passes on capped at our buffer size; returns the used length. `last`: the
    /// piece ends the sibling's packet (an RW longer than the RX buffer takes several).
    fn deliver(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        h: &Header,
        payload: usize,
        last: bool,
    ) -> u32 {
        let mut out = *h;
        out.len = payload as u32;
        out.buf_alloc = h.buf_alloc.min(self.cfg.buf_alloc);
        // Only the flags that mean something for the op reach the guest: a SOCK_SEQPACKET
        // message's end (EOR only with EOM) on the last piece of its packet, so that the
        // message keeps its boundary whatever the RX buffers' size.
        let seq_end = h.flags & (seq::EOM | seq::EOR);
        out.flags = match h.op {
            op::SHUTDOWN => h.flags & shutdown::BOTH,
            op::RW if h.type_ == sock_type::SEQPACKET && last && seq_end & seq::EOM != 0 => seq_end,
            _ => 0,
        };
        chain.write_at(mem, 0, &out.encode());
        self.rst_sent |= out.op == op::RST;
        (HEADER_LEN + payload) as u32
    }

    /// Moves the next packet (or piece of one) from the link into `chain`, writing `rst_owed`
    /// instead when the link ended or broke the protocol. Returns the bytes written.
    fn next_from_link(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<u32> {
        if self.input.payload_left() == 0 {
            let h = match self.input.next_header(&mut self.link) {
                Next::Header(h) => h,
                Next::Pending => {
                    self.rx_wanted = false;
                    return None;
                }
                Next::Ended => {
                    // The sibling's device closed the link: its guest reset the connection (or
                    // refused it), or the device went away.
                    self.link_ended = true;
                    let reason = match self.phase {
                        Phase::Requesting => KillReason::ConnectFailed,
                        _ => KillReason::Closed,
                    };
                    self.kill(reason, self.guest_notice());
                    return None;
                }
            };
            if let Err(reason) = self.accept_from_link(&h, now) {
                self.kill(reason, self.guest_notice());
                return None;
            }
            if h.op != op::RW {
                return Some(self.deliver(mem, chain, &h, 0, true));
            }
            self.current = h;
        }
        let h = self.current;
        let room = chain.len().saturating_sub(HEADER_LEN as u64) as usize;
        match self
            .input
            .read_payload(&mut self.link, mem, chain, HEADER_LEN as u64, room)
        {
            Payload::Moved(n) => {
                let mut piece = h;
                piece.len = n as u32;
                self.sibling_sent += Wrapping(n as u32);
                self.bytes_to_guest += n as u64;
                let last = self.input.payload_left() == 0;
                Some(self.deliver(mem, chain, &piece, n, last))
            }
            Payload::Pending => {
                self.rx_wanted = false;
                None
            }
            Payload::Ended => {
                self.link_ended = true;
                self.kill(KillReason::Protocol, Notify::Rst);
                None
            }
        }
    }
}
