//! Toward the guest: the next packet a connection owes, written into an RX buffer (control
//! packets first, then host bytes read straight into guest memory within the guest's credit).

use std::io;
use std::time::Instant;

use super::pending::PendingRx;
use super::{Connection, KillReason, Notify, State};
use crate::stream::VsockStream;
use crate::vq::{Chain, GuestMemory, IoVecs};
use crate::wire::{op, shutdown, Header, HEADER_LEN, MAX_PAYLOAD};

/// Fills only the first of `chains` with `fill` (a packet per buffer): 1 with its length in
/// `lens[0]`, or 0 when nothing was written.
pub(crate) fn fill_first(
    chains: &[Chain],
    lens: &mut [u32],
    fill: impl FnOnce(&Chain) -> Option<u32>,
) -> usize {
    match chains.first().and_then(fill) {
        Some(len) => {
            lens[0] = len;
            1
        }
        None => 0,
    }
}

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
        Some(self.emit(mem, chain, &h))
    }

    /// Writes the header `h` of a packet whose payload (if any) is in place into `chain`;
    /// returns the packet's length.
    fn emit(&mut self, mem: &GuestMemory, chain: &Chain, h: &Header) -> u32 {
        if self.inbound.told(h.fwd_cnt) && h.op != op::CREDIT_UPDATE {
            // This packet told the guest our credit as well.
            self.pending.remove(PendingRx::CreditUpdate);
        }
        chain.write_at(mem, 0, &h.encode());
        self.rst_sent |= h.op == op::RST;
        HEADER_LEN as u32 + h.len
    }

    /// Fills RX buffers from the front of `chains` with what the connection owes the guest, and
    /// returns how many it used (`lens[i]` the bytes written into `chains[i]`). Host bytes of an
    /// established stream go into the payload areas of as many buffers as its credit allows,
    /// with one `readv` over all of them, each header written after the read; anything else
    /// (control packets, a handshake prefix, SOCK_SEQPACKET messages) takes one buffer, as
    /// [`Connection::fill_rx`]. `lens` must be at least as long as `chains`.
    pub fn fill_rx_many(
        &mut self,
        mem: &GuestMemory,
        chains: &[Chain],
        lens: &mut [u32],
        now: Instant,
    ) -> usize {
        if chains.len() > 1 && self.batch_reads() {
            if let Some(used) = self.read_data_many(mem, chains, lens, now) {
                return used;
            }
        }
        fill_first(chains, lens, |c| self.fill_rx(mem, c, now))
    }

    /// Whether the next packet owed is plain stream data: nothing that goes before it is
    /// pending, and nothing sets its bytes apart (a handshake prefix, message boundaries).
    fn batch_reads(&self) -> bool {
        let before = [PendingRx::Rst, PendingRx::Response, PendingRx::Request];
        self.pending.contains(PendingRx::Rw)
            && !before.iter().any(|p| self.pending.contains(*p))
            && self.state == State::Established
            && self.shut.guest & shutdown::RCV == 0
            && self.seq.is_none()
            && self.handshake.prefix_left() == 0
    }

    /// One `readv` into the payload areas of `chains` (each at most [`MAX_PAYLOAD`], all within
    /// the guest's credit); the bytes read are dealt out to the buffers in order, one RW header
    /// each. `None` when the single-buffer path must decide (no credit: it asks for some).
    fn read_data_many(
        &mut self,
        mem: &GuestMemory,
        chains: &[Chain],
        lens: &mut [u32],
        now: Instant,
    ) -> Option<usize> {
        let credit = u64::from(self.outbound.credit());
        let mut iov = IoVecs::new();
        let mut total = 0u64;
        let mut parts = 0;
        for (chain, len) in chains.iter().zip(lens.iter_mut()) {
            let room = chain.len().saturating_sub(HEADER_LEN as u64);
            let take = room.min(u64::from(MAX_PAYLOAD)).min(credit - total);
            if take == 0 {
                break;
            }
            // Short when the iovec list is full: that buffer then ends the batch.
            let covered = chain.iovecs(mem, HEADER_LEN as u64, take, &mut iov) as u64;
            if covered == 0 {
                break;
            }
            *len = covered as u32;
            total += covered;
            parts += 1;
            if covered < take {
                break;
            }
        }
        if parts == 0 {
            return None;
        }
        let mut left = match self.stream.read_iov(&iov) {
            Ok(n) if n > 0 => {
                self.read_short(n as u64, u64::from(lens[0]));
                n as u32
            }
            // The stream's end or an error: the first buffer says so, if anything is owed.
            other => {
                let h = match other {
                    Ok(_) => Some(self.host_ended(now, false)),
                    Err(e) => self.read_failed(&e, now),
                };
                let Some(h) = h else {
                    return Some(0);
                };
                lens[0] = self.emit(mem, &chains[0], &h);
                return Some(1);
            }
        };
        let mut used = 0;
        for (chain, len) in chains.iter().zip(lens.iter_mut()).take(parts) {
            let n = left.min(*len);
            if n == 0 {
                break;
            }
            left -= n;
            let h = self.data_packet(n as usize, 0);
            *len = self.emit(mem, chain, &h);
            used += 1;
        }
        Some(used)
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
                Ok(n) => {
                    self.read_short(n as u64, max as u64);
                    n
                }
                Err(e) => return self.read_failed(&e, now),
            }
        };
        Some(self.data_packet(n, 0))
    }

    /// After a read of `got` bytes where the first buffer had room for `first`: a stream socket
    /// returns less only when it had no more, and one that did not even fill a buffer is
    /// sending in small pieces (a request, an answer), so the next read waits for the stream to
    /// be readable again (the epoll set, level-triggered, says so at once if bytes came
    /// meanwhile) instead of costing a system call that fails with `EAGAIN`: one per 64-byte
    /// round trip. A stream that filled buffers is read again at once: a writer streaming into
    /// it has most likely written more meanwhile, and going back to the epoll set first would
    /// cost a wake-up and an interrupt more per batch.
    fn read_short(&mut self, got: u64, first: u64) {
        if got < first {
            self.pending.remove(PendingRx::Rw);
        }
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixStream;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::csm::types::CsmConfig;
    use crate::stream::Readiness;
    use crate::vq::Direction;
    use crate::wire::sock_type;

    /// A Unix stream that counts its reads.
    struct Counting(UnixStream, usize);

    impl AsRawFd for Counting {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl VsockStream for Counting {
        fn read_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
            self.1 += 1;
            self.0.read_iov(iov)
        }
    }

    const BUFS: usize = 16;
    const PAYLOAD: u64 = 4096;
    /// Buffer `i` (one descriptor, header + 4 KiB) at 0x10000 + i * 0x2000; the descriptor
    /// table at 0.
    fn rx_chains(mem: &GuestMemory) -> Vec<Chain> {
        (0..BUFS as u16)
            .map(|i| {
                let d = u64::from(i) * 16;
                let addr = 0x10000 + u64::from(i) * 0x2000;
                let len = (HEADER_LEN as u64 + PAYLOAD) as u32;
                mem.write_obj(addr, GuestAddress(d)).unwrap();
                mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                mem.write_obj(2u16, GuestAddress(d + 12)).unwrap();
                Chain::walk(
                    mem,
                    GuestAddress(0),
                    BUFS as u16,
                    i,
                    Direction::DeviceWrites,
                )
                .unwrap()
            })
            .collect()
    }

    fn header_of(mem: &GuestMemory, chain: &Chain) -> Header {
        let mut raw = [0u8; HEADER_LEN];
        chain.read_at(mem, 0, &mut raw);
        Header::decode(&raw)
    }

    /// An established guest-initiated connection (guest `buf_alloc` as given) whose host end,
    /// returned too, has written `data`; its stream reported readable.
    fn connection(
        mem: &GuestMemory,
        buf_alloc: u32,
        data: &[u8],
        now: Instant,
    ) -> (Connection<Counting>, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 80,
            type_: sock_type::STREAM,
            op: op::REQUEST,
            buf_alloc,
            ..Header::default()
        };
        let mut c =
            Connection::guest_initiated(Counting(ours, 0), &req, true, CsmConfig::default(), now);
        let chains = rx_chains(mem);
        assert_eq!(c.fill_rx(mem, &chains[0], now), Some(HEADER_LEN as u32));
        assert_eq!(header_of(mem, &chains[0]).op, op::RESPONSE);
        theirs.write_all(data).unwrap();
        let readable = Readiness {
            readable: true,
            ..Readiness::default()
        };
        c.on_stream_ready(readable, now);
        (c, theirs)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// What the used buffers carry: each one's header, then all payload bytes in order.
    fn delivered(mem: &GuestMemory, chains: &[Chain], lens: &[u32]) -> (Vec<Header>, Vec<u8>) {
        let mut bytes = Vec::new();
        let headers = chains
            .iter()
            .zip(lens)
            .map(|(chain, &len)| {
                let h = header_of(mem, chain);
                assert_eq!(len, HEADER_LEN as u32 + h.len);
                let mut payload = vec![0u8; h.len as usize];
                chain.read_at(mem, HEADER_LEN as u64, &mut payload);
                bytes.extend_from_slice(&payload);
                h
            })
            .collect();
        (headers, bytes)
    }

    #[test]
    fn one_read_fills_as_many_buffers_as_the_bytes_need() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let now = Instant::now();
        let data = pattern(40_000);
        let (mut c, _host) = connection(&mem, 256 * 1024, &data, now);
        let chains = rx_chains(&mem);
        let mut lens = [0u32; BUFS];
        let used = c.fill_rx_many(&mem, &chains, &mut lens, now);
        assert_eq!(used, 10, "40000 bytes in 4 KiB buffers");
        assert_eq!(c.stream().1, 1, "one read for all of them");
        let (headers, bytes) = delivered(&mem, &chains[..used], &lens[..used]);
        assert!(headers.iter().all(|h| h.op == op::RW && h.dst_port == 1234));
        let lens: Vec<u32> = headers.iter().map(|h| h.len).collect();
        assert_eq!(lens[..9], [4096; 9]);
        assert_eq!(lens[9], 40_000 - 9 * 4096);
        assert_eq!(bytes, data);
        // It filled buffers, so it may have more at once: the next fill reads again (EAGAIN
        // here) and uses nothing.
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut [0; BUFS], now), 0);
        assert_eq!(c.stream().1, 2);
    }

    #[test]
    fn a_read_that_does_not_fill_a_buffer_waits_for_the_stream() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let now = Instant::now();
        let (mut c, _host) = connection(&mem, 256 * 1024, &pattern(64), now);
        let chains = rx_chains(&mem);
        let mut lens = [0u32; BUFS];
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut lens, now), 1);
        assert_eq!(header_of(&mem, &chains[0]).len, 64);
        // 64 bytes where 4 KiB fitted: the stream had no more, so the next fill does not read
        // (no `EAGAIN`) until the stream is readable again.
        assert!(!c.has_pending_rx());
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut [0; BUFS], now), 0);
        assert_eq!(c.stream().1, 1);
        c.on_stream_ready(
            crate::stream::Readiness {
                readable: true,
                ..Default::default()
            },
            now,
        );
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut [0; BUFS], now), 0);
        assert_eq!(c.stream().1, 2, "read again once readable (EAGAIN here)");
    }

    #[test]
    fn the_guests_credit_bounds_the_batch() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let now = Instant::now();
        let data = pattern(40_000);
        let (mut c, _host) = connection(&mem, 10_000, &data, now);
        let chains = rx_chains(&mem);
        let mut lens = [0u32; BUFS];
        let used = c.fill_rx_many(&mem, &chains, &mut lens, now);
        let (headers, bytes) = delivered(&mem, &chains[..used], &lens[..used]);
        let lens: Vec<u32> = headers.iter().map(|h| h.len).collect();
        assert_eq!(lens, [4096, 4096, 10_000 - 8192]);
        assert_eq!(bytes, data[..10_000]);
        // No credit left: one CREDIT_REQUEST, in one buffer, and nothing read.
        let used = c.fill_rx_many(&mem, &chains, &mut [0; BUFS], now);
        assert_eq!(used, 1);
        assert_eq!(header_of(&mem, &chains[0]).op, op::CREDIT_REQUEST);
        assert_eq!(c.stream().1, 1);
    }

    #[test]
    fn the_host_streams_end_takes_one_buffer() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let now = Instant::now();
        let (mut c, host) = connection(&mem, 256 * 1024, b"last", now);
        drop(host);
        let chains = rx_chains(&mem);
        let mut lens = [0u32; BUFS];
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut lens, now), 1);
        assert_eq!(header_of(&mem, &chains[0]).len, 4);
        // The end shows as readiness (EPOLLIN with EPOLLHUP), then the read of 0 bytes.
        c.on_stream_ready(
            crate::stream::Readiness {
                readable: true,
                hangup: true,
                ..Default::default()
            },
            now,
        );
        assert_eq!(c.fill_rx_many(&mem, &chains, &mut lens, now), 1);
        // The peer closed: it neither sends nor receives any more, as a kernel peer's close.
        let h = header_of(&mem, &chains[0]);
        assert_eq!(
            (h.op, h.flags),
            (op::SHUTDOWN, shutdown::SEND | shutdown::RCV)
        );
    }
}
