//! Guest data to the host stream: one RW packet ([`Connection::guest_data`]), or a run of
//! them from one TX batch in one `writev` ([`Connection::on_data_run`], TX coalescing, issue
//! 14). Bytes the stream does not take wait in `txbuf`, in order, within the credit the
//! guest was given.

use std::io;
use std::time::Instant;

use super::{stopped_receiving, Connection, KillReason, Notify, State};
use crate::stream::VsockStream;
use crate::vq::{Chain, GuestMemory, IoVecs};
use crate::wire::{op, shutdown, Header, HEADER_LEN};

impl<S: VsockStream> Connection<S> {
    /// Handles `packets`, RW packets of this connection that came one after the other in one
    /// TX batch, as [`Connection::on_packet`] would one by one, with their payloads written to
    /// the host stream in one `writev`. Where the connection is not a plain established stream
    /// with an empty `txbuf`, or the packets together exceed the credit, they go one by one
    /// (and the one that overruns the credit is reset as such). Returns how many packets
    /// shared a write with the one before them.
    pub fn on_data_run(
        &mut self,
        packets: &[(Chain, Header)],
        mem: &GuestMemory,
        now: Instant,
    ) -> usize {
        let total: u64 = packets.iter().map(|(_, h)| u64::from(h.len)).sum();
        let plain = self.state == State::Established
            && self.seq.is_none()
            && self.txbuf.is_empty()
            && self.shut.guest & shutdown::SEND == 0
            && self.shut.told & shutdown::RCV == 0
            && packets
                .iter()
                .all(|(_, h)| h.op == op::RW && h.type_ == self.sock_type.wire())
            && u32::try_from(total).is_ok_and(|t| self.inbound.fits(t));
        if !plain {
            for (chain, h) in packets {
                self.on_packet(h, mem, chain, now);
            }
            return 0;
        }
        let mut iov = IoVecs::new();
        for (chain, h) in packets {
            self.peer_credit(h);
            // Past the iovec limit the rest is not covered: it waits in txbuf like any
            // unwritten byte.
            chain.iovecs(mem, HEADER_LEN as u64, u64::from(h.len), &mut iov);
        }
        if total == 0 {
            return 0;
        }
        self.inbound.received(total as u32);
        let Some(written) = self.write_guest_bytes(&iov, total, now) else {
            return 0;
        };
        self.advance_fwd(written);
        let mut skip = written;
        for (chain, h) in packets {
            let len = h.len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let off = HEADER_LEN as u64 + skip as u64;
            let taken = self.txbuf.push_from_guest(mem, chain, off, len - skip);
            debug_assert_eq!(taken, len - skip, "credit check guarantees room");
            skip = 0;
        }
        packets.len() - 1
    }

    /// An RW packet of the guest (`h`, its payload in `chain`) on an established connection.
    pub(super) fn guest_data(
        &mut self,
        h: &Header,
        mem: &GuestMemory,
        chain: &Chain,
        now: Instant,
    ) {
        if self.shut.guest & shutdown::SEND != 0 {
            self.kill(KillReason::Protocol, Notify::Rst);
            return;
        }
        let len = h.len;
        if !self.inbound.fits(len) {
            self.kill(KillReason::CreditOverrun, Notify::Rst);
            return;
        }
        if len == 0 && self.seq.is_none() {
            return;
        }
        self.inbound.received(len);
        if self.shut.told & shutdown::RCV != 0 {
            // The host peer stopped receiving and the guest was told so; bytes it sent before
            // it knew are dropped, as the peer kernel would, and consume its credit.
            self.dropped += u64::from(len);
            return;
        }
        if self.seq.is_some() {
            self.seq_guest_data(h, mem, chain, now);
            return;
        }
        let mut written = 0usize;
        if self.txbuf.is_empty() {
            let mut iov = IoVecs::new();
            chain.iovecs(mem, HEADER_LEN as u64, u64::from(len), &mut iov);
            match self.write_guest_bytes(&iov, u64::from(len), now) {
                Some(n) => written = n,
                None => return,
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

    /// Writes guest payload (`len` bytes in all, `iov` as much of it as it covers) to the host
    /// stream: the bytes taken, or `None` when the connection can take no more (the host peer
    /// stopped receiving, or its stream failed).
    fn write_guest_bytes(&mut self, iov: &IoVecs<'_>, len: u64, now: Instant) -> Option<usize> {
        match self.stream.write_iov(iov) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
            Err(e) if stopped_receiving(&e) => {
                self.dropped += len;
                self.host_stopped_receiving(now);
                None
            }
            Err(_) => {
                self.kill(KillReason::HostError, Notify::Rst);
                None
            }
        }
    }
}
