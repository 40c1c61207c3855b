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
        for (_, h) in packets {
            self.peer_credit(h);
        }
        if total == 0 {
            return 0;
        }
        self.inbound.received(total as u32);
        let payloads = packets.iter().map(|(chain, h)| (chain, h.len));
        if !self.forward(mem, payloads, total, now) {
            return 0;
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
        self.forward(mem, std::iter::once((chain, len)), u64::from(len), now);
    }

    /// Forwards guest payloads, `total` bytes in all, each `(chain, len)` the `len` bytes after
    /// the chain's header, in order: in one `writev` when nothing waits before them, and what
    /// the stream does not take (or what lies past the iovecs one write carries) into `txbuf`.
    /// Returns `false` when the connection took none of it: its host peer stopped receiving
    /// (the bytes are dropped, as the peer kernel would) or its stream failed (reset).
    fn forward<'c>(
        &mut self,
        mem: &GuestMemory,
        payloads: impl Iterator<Item = (&'c Chain, u32)> + Clone,
        total: u64,
        now: Instant,
    ) -> bool {
        let mut written = 0usize;
        if self.txbuf.is_empty() {
            let mut iov = IoVecs::new();
            for (chain, len) in payloads.clone() {
                chain.iovecs(mem, HEADER_LEN as u64, u64::from(len), &mut iov);
            }
            match self.stream.write_iov(&iov) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if stopped_receiving(&e) => {
                    self.dropped += total;
                    self.host_stopped_receiving(now);
                    return false;
                }
                Err(_) => {
                    self.kill(KillReason::HostError, Notify::Rst);
                    return false;
                }
            }
        }
        self.advance_fwd(written);
        let mut skip = written;
        for (chain, len) in payloads {
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let off = HEADER_LEN as u64 + skip as u64;
            let taken = self.txbuf.push_from_guest(mem, chain, off, len - skip);
            debug_assert_eq!(taken, len - skip, "credit check guarantees room");
            skip = 0;
        }
        true
    }
}
