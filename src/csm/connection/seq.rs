//! SOCK_SEQPACKET connections: every message crosses whole, in order, in both directions.
//!
//! Guest → host: the packets of one message — the last one flagged `VIRTIO_VSOCK_SEQ_EOM`, and
//! `SEQ_EOR` for `MSG_EOR` — become one `sendmsg(2)` on the host's `SOCK_SEQPACKET` socket. A
//! message in one packet (every message of up to 64 KiB a Linux guest sends) goes straight from
//! guest memory: one copy. The earlier packets of a longer message wait in the TX buffer until
//! its last packet comes, which then goes out in the same call, from guest memory. A message
//! the host socket cannot take yet waits whole in the TX buffer with its length queued, and
//! the queued messages go out in order. The credit is the stream's: bytes count as forwarded
//! (`fwd_cnt`) once their message is in the host socket, and the first packet of a longer
//! message brings the guest a credit update when bytes were forwarded since it last heard (the
//! device holds that message until its end, so the guest must not wait on stale credit).
//!
//! Host → guest: one `recvmsg(2)` per message, with `MSG_TRUNC` so that a message is never
//! taken for a shorter one. Its first part goes straight into the RX buffer; the rest of a
//! message longer than that buffer or than the guest's credit lands in a staging buffer (the
//! one place a message is copied twice) and follows in the next RX buffers. The last packet
//! carries EOM (and EOR when the host socket reported `MSG_EOR`: AF_VSOCK does, AF_UNIX never).
//!
//! Number: messages cost credit by their bytes only, so a guest could queue a quarter of a
//! million one-byte messages behind a host that does not read. Past [`QUEUE_HIGH`] waiting
//! messages the device advertises no free space (a `buf_alloc` equal to what it holds, sent
//! at once in a CREDIT_UPDATE), which stops an honest guest, and full space again below
//! [`QUEUE_LOW`]; a guest that goes on past [`QUEUE_MAX`] ignored that and is reset as a credit
//! overrun. The queue is 4 bytes a message, at most 64 KiB a connection.
//!
//! Size: a message may be as long as the connection's buffer (`buf_alloc`), as in the kernel,
//! which refuses longer ones with `EMSGSIZE` at the sender (`virtio_transport_seqpacket_enqueue`).
//! What cannot be delivered whole is never cut: a message the host socket refuses
//! (`EMSGSIZE`), one from the host longer than the buffer, or one longer than the guest's own
//! receive buffer ends the connection with an RST and a logged reason.

use std::collections::VecDeque;
use std::io;
use std::time::Instant;

use super::{stopped_receiving, Connection, KillReason, Notify};
use crate::stream::VsockStream;
use crate::vq::{Chain, GuestMemory, IoVecs};
use crate::wire::{op, seq, Header, HEADER_LEN};

/// Waiting messages past which the guest is told there is no free space.
pub const QUEUE_HIGH: usize = 1024;
/// Waiting messages below which it is told the whole buffer is free again.
pub const QUEUE_LOW: usize = QUEUE_HIGH / 2;
/// Waiting messages past which the guest is reset: it ignored the closed window.
pub const QUEUE_MAX: usize = 16 * QUEUE_HIGH;

/// A complete message waiting in the TX buffer: its length, and bit 31 for EOR (a message is
/// at most `buf_alloc` bytes, far below 2^31).
#[derive(Clone, Copy, Debug)]
struct Msg(u32);

const EOR_BIT: u32 = 1 << 31;

impl Msg {
    fn new(len: usize, eor: bool) -> Msg {
        Msg(len as u32 | if eor { EOR_BIT } else { 0 })
    }

    fn len(self) -> usize {
        (self.0 & !EOR_BIT) as usize
    }

    fn eor(self) -> bool {
        self.0 & EOR_BIT != 0
    }
}

/// The message state of a SOCK_SEQPACKET connection.
#[derive(Debug, Default)]
pub(super) struct SeqState {
    /// Guest → host: complete messages in the TX buffer, oldest first (the handshake reply,
    /// when there is one, is the first).
    queued: VecDeque<Msg>,
    /// Guest → host: bytes of the message being assembled, at the TX buffer's tail.
    partial: usize,
    /// Host → guest: the rest of the message being delivered (allocated on the first read).
    staging: Vec<u8>,
    /// Host → guest: delivered part of `staging[..end]`.
    pos: usize,
    end: usize,
    /// Host → guest: the message being delivered ends a record.
    eor: bool,
    /// Guest → host: more than [`QUEUE_HIGH`] messages wait; the guest is told there is no
    /// free space.
    throttled: bool,
    /// Whole messages moved each way.
    pub(super) to_host: u64,
    pub(super) to_guest: u64,
}

impl SeqState {
    fn staged(&self) -> usize {
        self.end - self.pos
    }

    /// The flags of a message's last packet.
    fn end_flags(eor: bool) -> u32 {
        seq::EOM | if eor { seq::EOR } else { 0 }
    }
}

impl<S: VsockStream> Connection<S> {
    /// Whether host bytes of a message wait in the device for RX buffers or credit (no
    /// readiness will say so).
    pub(super) fn seq_staged(&self) -> bool {
        self.seq.as_ref().is_some_and(|s| s.staged() > 0)
    }

    /// The receive space to advertise: the whole buffer, or none while too many messages wait.
    pub(super) fn advertised_buf_alloc(&self) -> u32 {
        if self.seq.as_ref().is_some_and(|s| s.throttled) {
            self.inbound.held()
        } else {
            self.inbound.buf_alloc()
        }
    }

    /// Messages moved guest → host and host → guest (0 for a stream).
    pub fn messages(&self) -> (u64, u64) {
        self.seq
            .as_ref()
            .map_or((0, 0), |s| (s.to_host, s.to_guest))
    }

    /// Queues the handshake reply (`n` bytes just pushed to the TX buffer) as a message of its own.
    pub(super) fn seq_queue_reply(&mut self, n: usize) {
        if let Some(s) = self.seq.as_deref_mut() {
            s.queued.push_back(Msg::new(n, false));
        }
    }

    /// Forgets what waits for the host peer (it will never take it); the bytes are counted by
    /// the caller, with the TX buffer's.
    pub(super) fn seq_clear_tx(&mut self) {
        if let Some(s) = self.seq.as_deref_mut() {
            s.queued.clear();
            s.partial = 0;
            s.throttled = false;
        }
    }

    /// The guest shut its sending side: a message it never finished can never be sent, and
    /// is dropped.
    pub(super) fn seq_drop_partial(&mut self) {
        let Some(s) = self.seq.as_deref_mut() else {
            return;
        };
        let partial = std::mem::take(&mut s.partial);
        self.txbuf.drop_tail(partial);
        self.dropped += partial as u64;
    }

    /// An RW packet of the guest, already checked against its credit and counted as received.
    pub(super) fn seq_guest_data(
        &mut self,
        h: &Header,
        mem: &GuestMemory,
        chain: &Chain,
        now: Instant,
    ) {
        let len = h.len as usize;
        let eom = h.flags & seq::EOM != 0;
        let eor = eom && h.flags & seq::EOR != 0;
        let Some(s) = self.seq.as_deref_mut() else {
            return;
        };
        if !eom {
            let taken = self
                .txbuf
                .push_from_guest(mem, chain, HEADER_LEN as u64, len);
            debug_assert_eq!(taken, len, "credit check guarantees room");
            s.partial += taken;
            if self.inbound.untold() {
                // The device holds this message until its end, so the guest's credit must
                // reach it: tell it what the messages before freed (a Linux receiver sends a
                // credit update with every message it dequeues), or a message longer than
                // the credit it believes in would wait for ever.
                self.pending.insert(super::PendingRx::CreditUpdate);
            }
            return;
        }
        let partial = s.partial;
        let total = partial + len;
        if s.queued.is_empty() {
            // Nothing waits before it: the earlier parts from the TX buffer, this packet's
            // payload straight from guest memory, in one call.
            let res = {
                let mut iov = IoVecs::new();
                self.txbuf.front_iovecs(partial, &mut iov);
                let covered = chain.iovecs(mem, HEADER_LEN as u64, len as u64, &mut iov);
                if covered == len {
                    Some(self.stream.send_msg(&iov, eor))
                } else {
                    None
                }
            };
            match res {
                Some(Ok(_)) => {
                    self.txbuf.consume(partial);
                    if let Some(s) = self.seq.as_deref_mut() {
                        s.partial = 0;
                        s.to_host += 1;
                    }
                    self.advance_fwd(total);
                    return;
                }
                Some(Err(e))
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted =>
                {
                    self.seq_send_failed(&e, len, total, now);
                    return;
                }
                _ => {}
            }
        }
        let taken = self
            .txbuf
            .push_from_guest(mem, chain, HEADER_LEN as u64, len);
        debug_assert_eq!(taken, len, "credit check guarantees room");
        let Some(s) = self.seq.as_deref_mut() else {
            return;
        };
        s.partial = 0;
        s.queued.push_back(Msg::new(total, eor));
        if s.queued.len() > QUEUE_MAX {
            let a = self.addr;
            log::warn!(
                "vsock: {}:{} -> {}:{}: the guest queued more than {QUEUE_MAX} messages after \
                 it was told there is no room: connection reset",
                a.peer_cid,
                a.peer_port,
                a.local_cid,
                a.local_port
            );
            self.kill(KillReason::CreditOverrun, Notify::Rst);
        } else if s.queued.len() > QUEUE_HIGH && !s.throttled {
            s.throttled = true;
            self.pending.insert(super::PendingRx::CreditUpdate);
        }
    }

    /// Sends the queued messages, oldest first, as long as the host socket takes them.
    pub(super) fn seq_flush(&mut self, now: Instant) {
        loop {
            let Some(m) = self.seq.as_ref().and_then(|s| s.queued.front().copied()) else {
                return;
            };
            let (len, eor) = (m.len(), m.eor());
            let res = {
                let mut iov = IoVecs::new();
                self.txbuf.front_iovecs(len, &mut iov);
                self.stream.send_msg(&iov, eor)
            };
            match res {
                Ok(_) => {
                    self.txbuf.consume(len);
                    let reply = len.min(self.handshake.reply_left);
                    self.handshake.reply_left -= reply;
                    if let Some(s) = self.seq.as_deref_mut() {
                        s.queued.pop_front();
                        if reply == 0 {
                            s.to_host += 1;
                        }
                        if s.throttled && s.queued.len() < QUEUE_LOW {
                            s.throttled = false;
                            self.pending.insert(super::PendingRx::CreditUpdate);
                        }
                    }
                    // The handshake reply used no guest credit.
                    self.advance_fwd(len - reply);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.seq_send_failed(&e, 0, len, now);
                    return;
                }
            }
        }
    }

    /// A message of `len` bytes could not be sent; `unbuffered` of them were never copied to
    /// the TX buffer.
    fn seq_send_failed(&mut self, e: &io::Error, unbuffered: usize, len: usize, now: Instant) {
        if stopped_receiving(e) {
            self.dropped += unbuffered as u64;
            self.host_stopped_receiving(now);
            return;
        }
        let a = self.addr;
        if e.raw_os_error() == Some(libc::EMSGSIZE) {
            log::warn!(
                "vsock: {}:{} -> {}:{}: the host socket cannot take a message of {len} bytes \
                 (EMSGSIZE): connection reset",
                a.peer_cid,
                a.peer_port,
                a.local_cid,
                a.local_port
            );
        }
        self.kill(KillReason::HostError, Notify::Rst);
    }

    /// The next data packet toward the guest, of at most `max` payload bytes (`max > 0`): the
    /// rest of the message being delivered, or the first part of the next one.
    pub(super) fn seq_read(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        max: usize,
        now: Instant,
    ) -> Option<Header> {
        let limit = self.cfg.buf_alloc as usize;
        let s = self.seq.as_deref_mut()?;
        if s.staged() > 0 {
            let n = s.staged().min(max);
            chain.write_at(mem, HEADER_LEN as u64, &s.staging[s.pos..s.pos + n]);
            s.pos += n;
            let flags = if s.staged() == 0 {
                s.to_guest += 1;
                SeqState::end_flags(s.eor)
            } else {
                0
            };
            return Some(self.data_packet(n, flags));
        }
        if s.staging.is_empty() {
            // Untouched pages cost nothing until a long message arrives.
            s.staging = vec![0; limit];
        }
        let (res, covered) = {
            let mut iov = IoVecs::new();
            let covered = chain.iovecs(mem, HEADER_LEN as u64, max as u64, &mut iov);
            iov.push_buf(&mut s.staging[..]);
            (self.stream.recv_msg(&iov), covered)
        };
        let m = match res {
            Ok(m) => m,
            Err(e) => return self.read_failed(&e, now),
        };
        if m.len == 0 && !m.truncated && self.stream.peer_hanging_up() {
            return Some(self.host_ended(now, false));
        }
        let guest_room = self.outbound.peer_buf_alloc() as usize;
        if m.truncated || m.len > guest_room {
            let a = self.addr;
            log::warn!(
                "vsock: {}:{} -> {}:{}: the host sent a message of {} bytes, more than {} \
                 ({}): connection reset",
                a.local_cid,
                a.local_port,
                a.peer_cid,
                a.peer_port,
                m.len,
                if m.truncated {
                    covered + limit
                } else {
                    guest_room
                },
                if m.truncated {
                    "the connection's buffer"
                } else {
                    "the guest's receive buffer"
                }
            );
            self.kill(KillReason::HostError, Notify::Nothing);
            return Some(self.header(op::RST, 0, 0));
        }
        let first = m.len.min(covered);
        let s = self.seq.as_deref_mut()?;
        s.pos = 0;
        s.end = m.len - first;
        s.eor = m.eor;
        let flags = if s.end == 0 {
            s.to_guest += 1;
            SeqState::end_flags(m.eor)
        } else {
            0
        };
        Some(self.data_packet(first, flags))
    }
}
