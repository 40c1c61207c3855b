//! Toward the guest: the next packet a connection owes, written into an RX buffer (control
//! packets first, then host bytes read straight into guest memory within the guest's credit).

use std::io;
use std::time::Instant;

use super::pending::PendingRx;
use super::{Connection, KillReason, Notify, State};
use crate::stream::VsockStream;
use crate::vq::{Chain, GuestMemory, IoVecs};
use crate::wire::{op, shutdown, Header, HEADER_LEN, MAX_PAYLOAD};

impl<S: VsockStream> Connection<S> {
    pub(super) fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.addr.local_cid,
            dst_cid: self.addr.peer_cid,
            src_port: self.addr.local_port,
            dst_port: self.addr.peer_port,
            len,
            type_: self.sock_type.wire(),
            op,
            flags,
            buf_alloc: self.advertised_buf_alloc(),
            fwd_cnt: self.inbound.fwd_cnt(),
        }
    }

    /// Writes the next packet the connection owes the guest into the RX buffer `chain`.
    /// Returns the bytes written (header + payload), or `None` when there was nothing to send
    /// after all (the buffer stays unused).
    pub fn fill_rx(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<u32> {
        let h = self.next_packet(mem, chain, now)?;
        if self.inbound.told(h.fwd_cnt) && h.op != op::CREDIT_UPDATE {
            // This packet told the guest our credit as well.
            self.pending.remove(PendingRx::CreditUpdate);
        }
        chain.write_at(mem, 0, &h.encode());
        self.rst_sent |= h.op == op::RST;
        Some(HEADER_LEN as u32 + h.len)
    }

    fn next_packet(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<Header> {
        if self.pending.take(PendingRx::Rst) {
            return Some(self.header(op::RST, 0, 0));
        }
        if self.pending.take(PendingRx::Response) {
            return Some(self.header(op::RESPONSE, 0, 0));
        }
        if self.pending.take(PendingRx::Request) {
            return Some(self.header(op::REQUEST, 0, 0));
        }
        if self.pending.contains(PendingRx::Rw) {
            if let Some(h) = self.read_data(mem, chain, now) {
                return Some(h);
            }
        }
        if self.pending.take(PendingRx::Shutdown) {
            return Some(self.header(op::SHUTDOWN, 0, self.shut.told));
        }
        if self.pending.take(PendingRx::CreditUpdate) {
            return Some(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        if self.pending.take(PendingRx::CreditRequest) {
            return Some(self.header(op::CREDIT_REQUEST, 0, 0));
        }
        None
    }

    /// Moves host bytes into the RX buffer: first the handshake prefix, then the stream's bytes,
    /// read straight into guest memory. Clears the RW flag when the stream has nothing more.
    fn read_data(&mut self, mem: &GuestMemory, chain: &Chain, now: Instant) -> Option<Header> {
        if self.state != State::Established || self.shut.guest & shutdown::RCV != 0 {
            self.pending.remove(PendingRx::Rw);
            return None;
        }
        let room = chain.len().saturating_sub(HEADER_LEN as u64);
        let credit = self.outbound.credit();
        let max = room.min(u64::from(credit)).min(u64::from(MAX_PAYLOAD)) as usize;
        if max == 0 {
            if credit == 0 {
                // Wait for the guest's credit; ask for it once.
                self.pending.remove(PendingRx::Rw);
                if self.outbound.ask() {
                    self.credit_stalls += 1;
                    self.pending.insert(PendingRx::CreditRequest);
                }
            }
            return None;
        }
        if self.seq.is_some() {
            return self.seq_read(mem, chain, max, now);
        }
        let n = if self.handshake.prefix_left() > 0 {
            let hs = &mut self.handshake;
            let n = hs.prefix_left().min(max);
            chain.write_at(mem, HEADER_LEN as u64, &hs.prefix[hs.pos..hs.pos + n]);
            hs.pos += n;
            if hs.prefix_left() == 0 {
                hs.prefix = Vec::new();
                hs.pos = 0;
            }
            n
        } else {
            let mut iov = IoVecs::new();
            chain.iovecs(mem, HEADER_LEN as u64, max as u64, &mut iov);
            match self.stream.read_iov(&iov) {
                Ok(0) => return Some(self.host_ended(now, false)),
                Ok(n) => n,
                Err(e) => return self.read_failed(&e, now),
            }
        };
        Some(self.data_packet(n, 0))
    }

    /// What a failed read of the host stream (bytes or a message) means for the guest: nothing
    /// more for now (`WouldBlock`, `EINTR`), the peer's close (AF_UNIX `ECONNRESET`: it closed
    /// with bytes of ours unread), or a broken stream (an RST).
    pub(super) fn read_failed(&mut self, e: &io::Error, now: Instant) -> Option<Header> {
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                self.pending.remove(PendingRx::Rw);
                None
            }
            io::ErrorKind::Interrupted => None,
            io::ErrorKind::ConnectionReset => Some(self.host_ended(now, true)),
            _ => {
                self.kill(KillReason::HostError, Notify::Nothing);
                Some(self.header(op::RST, 0, 0))
            }
        }
    }

    /// The header of an RW packet of `n` payload bytes, counted as sent.
    pub(super) fn data_packet(&mut self, n: usize, flags: u32) -> Header {
        self.outbound.sent(n as u32);
        self.bytes_to_guest += n as u64;
        self.header(op::RW, n as u32, flags)
    }

    /// The SHUTDOWN to send now that the host stream ended (`closed`: it reported its peer's
    /// close with ECONNRESET).
    pub(super) fn host_ended(&mut self, now: Instant, closed: bool) -> Header {
        if closed {
            self.host_stopped_receiving(now);
        }
        self.host_finished_sending(now);
        self.pending.remove(PendingRx::Shutdown);
        self.header(op::SHUTDOWN, 0, self.shut.told)
    }
}
