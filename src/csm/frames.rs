//! The framing of a sibling relay link: each vsock packet as its 44-byte header followed by its
//! payload, both ways over one Unix stream between two devices.
//!
//! [`OutFrames`] writes packets to the link — straight from guest memory when nothing waits —
//! and keeps what the socket did not take, bounded: payload bytes by the credit the receiving
//! guest advertised (capped at the device's buffer size), control frames by [`MAX_QUEUED`] and
//! all frames by [`MAX_QUEUED_FRAMES`], with consecutive data packets merged (never across the
//! end of a SOCK_SEQPACKET message) and credit updates folded into the frame before them, as
//! the receiving kernel reads credit from every packet. [`FrameReader`] reads packets from the link:
//! the header into a small buffer, the payload straight into an RX buffer.

use std::collections::VecDeque;
use std::io;

use super::txbuf::TxBuf;
use crate::stream::VsockStream;
use crate::vq::chain::Chain;
use crate::vq::iovec::IoVecs;
use crate::vq::GuestMemory;
use crate::wire::{op, Header, HEADER_LEN, MAX_PAYLOAD};

/// Most control frames (no payload) waiting for the link at once. An honest guest needs a
/// handful: a credit update (and a repeated credit request) is folded into the frame before it,
/// and Linux sends SHUTDOWN at most twice per connection. A guest that floods the link beyond
/// this is reset.
pub const MAX_QUEUED: usize = 32;

/// Most frames waiting at once, data frames included. A SOCK_SEQPACKET message keeps its own
/// frame (its EOM must reach the sibling), so a guest may queue many small messages behind a
/// slow link; their bytes are bounded by the credit, their number by this.
pub const MAX_QUEUED_FRAMES: usize = 4096;

/// Why a packet could not be written to the link.
#[derive(Debug)]
pub enum SendError {
    /// The link failed (the sibling device closed it, or the socket broke).
    Io(io::Error),
    /// The packet does not fit what may wait for the link: the guest sent beyond credit or
    /// flooded control packets.
    Full,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    hdr: Header,
    /// Payload bytes of the frame (its header's `len` when written).
    len: u32,
}

/// Packets waiting for the link, oldest first.
#[derive(Debug)]
pub struct OutFrames {
    frames: VecDeque<Queued>,
    /// The unsent payload bytes of the queued frames, in order.
    data: TxBuf,
    /// Bytes of the first frame (header and payload) already written.
    sent: usize,
    /// Queued frames without payload.
    control: usize,
}

impl OutFrames {
    /// A queue holding at most `data_cap` payload bytes.
    pub fn new(data_cap: usize) -> Self {
        OutFrames {
            frames: VecDeque::new(),
            data: TxBuf::new(data_cap),
            sent: 0,
            control: 0,
        }
    }

    /// Whether nothing waits for the link.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Drops everything waiting (the link is being closed).
    pub fn clear(&mut self) {
        self.frames.clear();
        self.data.clear();
        self.sent = 0;
        self.control = 0;
    }

    /// The last queued frame if nothing of it was written yet (so it may still change).
    fn unstarted_tail(&mut self) -> Option<&mut Queued> {
        if self.frames.len() == 1 && self.sent > 0 {
            return None;
        }
        self.frames.back_mut()
    }

    /// Writes the packet `hdr` (with `hdr.len` payload bytes at [`HEADER_LEN`] of `payload`'s
    /// chain when it has payload): at once if nothing waits, else behind what waits; what the
    /// socket does not take waits.
    pub fn send<S: VsockStream>(
        &mut self,
        link: &mut S,
        hdr: &Header,
        payload: Option<(&GuestMemory, &Chain)>,
    ) -> Result<(), SendError> {
        let len = if payload.is_some() { hdr.len } else { 0 };
        if self.frames.is_empty() {
            let mut raw = hdr.encode();
            raw[24..28].copy_from_slice(&len.to_le_bytes());
            let mut iov = IoVecs::new();
            iov.push_buf(&mut raw);
            if let Some((mem, chain)) = payload {
                chain.iovecs(mem, HEADER_LEN as u64, u64::from(len), &mut iov);
            }
            let n = match link.write_iov(&iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(SendError::Io(e)),
            };
            let total = HEADER_LEN + len as usize;
            if n == total {
                return Ok(());
            }
            let done_payload = n.saturating_sub(HEADER_LEN);
            self.queue(hdr, len, payload, done_payload)?;
            self.sent = n;
            return Ok(());
        }
        match hdr.op {
            op::CREDIT_UPDATE => {
                if let Some(tail) = self.unstarted_tail() {
                    // Every packet carries the sender's credit: the frame before says it.
                    tail.hdr.buf_alloc = hdr.buf_alloc;
                    tail.hdr.fwd_cnt = hdr.fwd_cnt;
                    return Ok(());
                }
            }
            op::CREDIT_REQUEST => {
                let asked = self
                    .frames
                    .iter()
                    .skip(usize::from(self.sent > 0))
                    .any(|f| f.hdr.op == op::CREDIT_REQUEST);
                if asked {
                    // One request waiting is enough; its credit news must not be lost.
                    if let Some(tail) = self.unstarted_tail() {
                        tail.hdr.buf_alloc = hdr.buf_alloc;
                        tail.hdr.fwd_cnt = hdr.fwd_cnt;
                    }
                    return Ok(());
                }
            }
            op::RW if len > 0 => {
                let free = self.data.free();
                if let Some(tail) = self.unstarted_tail() {
                    if tail.hdr.op == op::RW
                        && tail.hdr.flags == 0
                        && hdr.flags == 0
                        && tail.len + len <= MAX_PAYLOAD
                    {
                        if (len as usize) > free {
                            return Err(SendError::Full);
                        }
                        tail.len += len;
                        tail.hdr.buf_alloc = hdr.buf_alloc;
                        tail.hdr.fwd_cnt = hdr.fwd_cnt;
                        let (mem, chain) = payload.expect("RW with payload");
                        self.data
                            .push_from_guest(mem, chain, HEADER_LEN as u64, len as usize);
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
        self.queue(hdr, len, payload, 0)
    }

    /// Queues a frame whose first `done_payload` payload bytes were already written.
    fn queue(
        &mut self,
        hdr: &Header,
        len: u32,
        payload: Option<(&GuestMemory, &Chain)>,
        done_payload: usize,
    ) -> Result<(), SendError> {
        let rest = len as usize - done_payload;
        let control = len == 0;
        if (control && self.control >= MAX_QUEUED)
            || self.frames.len() >= MAX_QUEUED_FRAMES
            || rest > self.data.free()
        {
            return Err(SendError::Full);
        }
        self.control += usize::from(control);
        if let Some((mem, chain)) = payload {
            let off = (HEADER_LEN + done_payload) as u64;
            let took = self.data.push_from_guest(mem, chain, off, rest);
            debug_assert_eq!(took, rest, "room checked");
        }
        self.frames.push_back(Queued { hdr: *hdr, len });
        Ok(())
    }

    /// Writes waiting frames until the socket takes no more. `WouldBlock` is not an error.
    pub fn flush<S: VsockStream>(&mut self, link: &mut S) -> io::Result<()> {
        while let Some(&f) = self.frames.front() {
            let mut raw = f.hdr.encode();
            raw[24..28].copy_from_slice(&f.len.to_le_bytes());
            let total = HEADER_LEN + f.len as usize;
            let head_left = HEADER_LEN.saturating_sub(self.sent);
            let payload_left = total - self.sent - head_left;
            let mut iov = IoVecs::new();
            iov.push_buf(&mut raw[HEADER_LEN - head_left..]);
            self.data.front_iovecs(payload_left, &mut iov);
            let n = match link.write_iov(&iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.data.consume(n.saturating_sub(head_left));
            self.sent += n;
            if self.sent < total {
                return Ok(());
            }
            self.frames.pop_front();
            self.control -= usize::from(f.len == 0);
            self.sent = 0;
        }
        Ok(())
    }
}

/// What [`FrameReader::next_header`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A whole header; for RW its payload follows ([`FrameReader::payload_left`]).
    Header(Header),
    /// Not all of it has arrived yet.
    Pending,
    /// The link ended (closed, reset, or broke in the middle of a frame).
    Ended,
}

/// What [`FrameReader::read_payload`] moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// This many bytes went into the buffer (never 0).
    Moved(usize),
    /// None has arrived yet.
    Pending,
    /// The link ended in the middle of the payload.
    Ended,
}

/// Reads frames from a link: bytes the handshake server read ahead first, then the socket.
#[derive(Debug)]
pub struct FrameReader {
    ahead: Vec<u8>,
    ahead_pos: usize,
    hdr: [u8; HEADER_LEN],
    have: usize,
    left: u32,
}

impl FrameReader {
    /// A reader that first consumes `ahead`, bytes already read from the link.
    pub fn new(ahead: Vec<u8>) -> Self {
        FrameReader {
            ahead,
            ahead_pos: 0,
            hdr: [0; HEADER_LEN],
            have: 0,
            left: 0,
        }
    }

    /// Payload bytes of the current frame not read yet; `0` between frames.
    pub fn payload_left(&self) -> u32 {
        self.left
    }

    fn take_ahead(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.ahead.len() - self.ahead_pos);
        let start = self.ahead_pos;
        self.ahead_pos += n;
        &self.ahead[start..start + n]
    }

    /// Reads the next frame's header; call only between frames (`payload_left() == 0`).
    pub fn next_header<S: VsockStream>(&mut self, link: &mut S) -> Next {
        debug_assert_eq!(self.left, 0);
        while self.have < HEADER_LEN {
            let want = HEADER_LEN - self.have;
            let from_ahead = self.take_ahead(want).len();
            if from_ahead > 0 {
                let start = self.ahead_pos - from_ahead;
                self.hdr[self.have..self.have + from_ahead]
                    .copy_from_slice(&self.ahead[start..self.ahead_pos]);
                self.have += from_ahead;
                continue;
            }
            match link.recv_bytes(&mut self.hdr[self.have..]) {
                Ok(0) => return Next::Ended,
                Ok(n) => self.have += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Ended,
            }
        }
        self.have = 0;
        let h = Header::decode(&self.hdr);
        self.left = if h.op == op::RW { h.len } else { 0 };
        Next::Header(h)
    }

    /// Moves up to `max` payload bytes of the current frame to `chain` at `offset`.
    pub fn read_payload<S: VsockStream>(
        &mut self,
        link: &mut S,
        mem: &GuestMemory,
        chain: &Chain,
        offset: u64,
        max: usize,
    ) -> Payload {
        let max = max.min(self.left as usize);
        if max == 0 {
            return Payload::Pending;
        }
        let n = {
            let ahead = self.take_ahead(max);
            chain.write_at(mem, offset, ahead)
        };
        if n > 0 {
            self.left -= n as u32;
            return Payload::Moved(n);
        }
        let mut iov = IoVecs::new();
        chain.iovecs(mem, offset, max as u64, &mut iov);
        loop {
            match link.read_iov(&iov) {
                Ok(0) => return Payload::Ended,
                Ok(n) => {
                    self.left -= n as u32;
                    return Payload::Moved(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Payload::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Payload::Ended,
            }
        }
    }
}
