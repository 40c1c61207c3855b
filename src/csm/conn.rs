//! [`Conn`]: one entry of the connection table, either kind of connection behind one interface.

use std::os::fd::RawFd;
use std::time::Instant;

use super::connection::{fill_first, Connection};
use super::relay::Relay;
use super::types::{Addr, Interest, KillReason, Notify, State};
use crate::stream::Readiness;
use crate::stream::VsockStream;
use crate::vq::chain::Chain;
use crate::vq::GuestMemory;
use crate::wire::{Header, SockType};

/// A connection of the table.
pub enum Conn<S> {
    /// The device ends the vsock connection and maps it onto a byte stream.
    Stream(Connection<S>),
    /// The device relays the connection's packets to a sibling device.
    Relay(Relay<S>),
}

macro_rules! each {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            Conn::Stream($c) => $e,
            Conn::Relay($c) => $e,
        }
    };
}

impl<S: VsockStream> Conn<S> {
    /// The connection's addresses.
    pub fn addr(&self) -> Addr {
        each!(self, c => c.addr())
    }

    /// The socket type.
    pub fn sock_type(&self) -> SockType {
        each!(self, c => c.sock_type())
    }

    /// Whole SOCK_SEQPACKET messages moved from the guest and to the guest (a relay passes
    /// them through uncounted; 0 for streams).
    pub fn messages(&self) -> (u64, u64) {
        match self {
            Conn::Stream(c) => c.messages(),
            Conn::Relay(_) => (0, 0),
        }
    }

    /// Current state.
    pub fn state(&self) -> State {
        each!(self, c => c.state())
    }

    /// Why the connection was killed, once it was.
    pub fn kill_reason(&self) -> Option<KillReason> {
        each!(self, c => c.kill_reason())
    }

    /// Credit stalls since the last call (streams only: a relay passes credit through).
    pub fn take_credit_stalls(&mut self) -> u64 {
        match self {
            Conn::Stream(c) => c.take_credit_stalls(),
            Conn::Relay(_) => 0,
        }
    }

    /// Whether the connection sent the guest an RST.
    pub fn sent_rst(&self) -> bool {
        each!(self, c => c.sent_rst())
    }

    /// Bytes moved from the guest and to the guest.
    pub fn bytes(&self) -> (u64, u64) {
        each!(self, c => c.bytes())
    }

    /// Guest bytes dropped because the host peer stopped receiving before it took them.
    pub fn dropped(&self) -> u64 {
        match self {
            Conn::Stream(c) => c.dropped(),
            Conn::Relay(_) => 0,
        }
    }

    /// The host stream's file descriptor.
    pub fn fd(&self) -> RawFd {
        match self {
            Conn::Stream(c) => c.stream().as_raw_fd(),
            Conn::Relay(r) => r.fd(),
        }
    }

    /// When [`Conn::on_deadline`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        each!(self, c => c.deadline())
    }

    /// The readiness of the host stream the connection wants to hear about.
    pub fn interest(&self) -> Interest {
        each!(self, c => c.interest())
    }

    /// Whether something may be owed to the guest.
    pub fn has_pending_rx(&self) -> bool {
        each!(self, c => c.has_pending_rx())
    }

    /// Whether the connection is over: remove it.
    pub fn is_done(&self) -> bool {
        each!(self, c => c.is_done())
    }

    /// Kills the connection; `notify` says whether the guest must be told with an RST.
    pub fn kill(&mut self, reason: KillReason, notify: Notify) {
        each!(self, c => c.kill(reason, notify))
    }

    /// Handles a guest packet for this connection.
    pub fn on_packet(&mut self, h: &Header, mem: &GuestMemory, chain: &Chain, now: Instant) {
        each!(self, c => c.on_packet(h, mem, chain, now))
    }

    /// Handles readiness of the host stream.
    pub fn on_ready(&mut self, ready: Readiness, now: Instant) {
        match self {
            Conn::Stream(c) => c.on_stream_ready(ready, now),
            Conn::Relay(r) => r.on_link_ready(ready),
        }
    }

    /// Handles the deadline having passed.
    pub fn on_deadline(&mut self, now: Instant) {
        each!(self, c => c.on_deadline(now))
    }

    /// Writes the next packet owed to the guest into `chain`.
    pub fn fill_rx(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<u32> {
        each!(self, c => c.fill_rx(mem, chain, now))
    }

    /// Fills RX buffers from the front of `chains` (`lens[i]` the bytes written into
    /// `chains[i]`); returns how many it used. A stream connection's bytes may fill several
    /// ([`Connection::fill_rx_many`]); a relay fills one.
    pub fn fill_rx_many(
        &mut self,
        mem: &GuestMemory,
        chains: &[Chain],
        lens: &mut [u32],
        now: Instant,
    ) -> usize {
        match self {
            Conn::Stream(c) => c.fill_rx_many(mem, chains, lens, now),
            Conn::Relay(r) => fill_first(chains, lens, |c| r.fill_rx(mem, c, now)),
        }
    }

    /// Whether the host side of the connection is known to be gone or is hanging up now (the
    /// peer closed its stream, or a relay link ended): a newcomer with the same addresses may
    /// be the peer connecting again after its close, whose news has not been read yet.
    pub fn peer_hanging_up(&self) -> bool {
        match self {
            Conn::Stream(c) => c.stream().peer_hanging_up(),
            Conn::Relay(r) => r.link_hanging_up(),
        }
    }
}
