//! Bounded buffer for guest bytes the host stream could not take yet.
//!
//! Guest data is written straight from guest memory to the host stream; only what the stream
//! refuses (`EAGAIN`, short write) lands here, and it is flushed first when the stream becomes
//! writable again. The capacity is the connection's advertised `buf_alloc` (plus a little room
//! for the handshake reply), so a guest that honours its credit can never overflow it.

use std::io;

use crate::stream::VsockStream;
use crate::vq::chain::Chain;
use crate::vq::iovec::IoVecs;
use crate::vq::GuestMemory;

/// A ring buffer, allocated on first use.
#[derive(Debug, Default)]
pub struct TxBuf {
    data: Vec<u8>,
    cap: usize,
    head: usize,
    len: usize,
}

impl TxBuf {
    /// A buffer that will hold at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        TxBuf {
            data: Vec::new(),
            cap,
            head: 0,
            len: 0,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.cap - self.len
    }

    fn ensure_alloc(&mut self) {
        if self.data.is_empty() {
            self.data = vec![0; self.cap];
        }
    }

    /// Drops every byte waiting (the peer will never take them).
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// Appends `buf`; returns the bytes taken (all of them unless the buffer is full).
    pub fn push(&mut self, buf: &[u8]) -> usize {
        let n = buf.len().min(self.free());
        if n == 0 {
            return 0;
        }
        self.ensure_alloc();
        let tail = (self.head + self.len) % self.cap;
        let first = n.min(self.cap - tail);
        self.data[tail..tail + first].copy_from_slice(&buf[..first]);
        self.data[..n - first].copy_from_slice(&buf[first..n]);
        self.len += n;
        n
    }

    /// Appends `len` bytes of `chain` starting at chain offset `offset`; returns the bytes taken.
    pub fn push_from_guest(
        &mut self,
        mem: &GuestMemory,
        chain: &Chain,
        offset: u64,
        len: usize,
    ) -> usize {
        let n = len.min(self.free());
        if n == 0 {
            return 0;
        }
        self.ensure_alloc();
        let tail = (self.head + self.len) % self.cap;
        let first = n.min(self.cap - tail);
        let a = chain.read_at(mem, offset, &mut self.data[tail..tail + first]);
        let b = if a == first {
            chain.read_at(mem, offset + first as u64, &mut self.data[..n - first])
        } else {
            0
        };
        self.len += a + b;
        a + b
    }

    /// Appends the first `len` waiting bytes to `iov` (at most two slices, as the ring wraps),
    /// for a write that [`TxBuf::consume`] then accounts for.
    pub fn front_iovecs<'a>(&'a mut self, len: usize, iov: &mut IoVecs<'a>) {
        let len = len.min(self.len);
        if len == 0 {
            return;
        }
        let cap = self.cap;
        let head = self.head;
        let first = len.min(cap - head);
        let (low, high) = self.data.split_at_mut(head);
        iov.push_buf(&mut high[..first]);
        iov.push_buf(&mut low[..len - first]);
    }

    /// Drops the last `n` waiting bytes (they will never be written).
    pub fn drop_tail(&mut self, n: usize) {
        self.len -= n.min(self.len);
        if self.len == 0 {
            self.head = 0;
        }
    }

    /// Drops the first `n` waiting bytes (they were written).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.head = (self.head + n) % self.cap.max(1);
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
    }

    /// Writes as much as the stream takes. Returns the bytes written; `WouldBlock` is not an
    /// error (it returns what was written so far).
    pub fn flush<S: VsockStream + ?Sized>(&mut self, stream: &mut S) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            let cap = self.cap;
            let head = self.head;
            let first = self.len.min(cap - head);
            let second = self.len - first;
            let (low, high) = self.data.split_at_mut(head);
            let mut iov = IoVecs::new();
            iov.push_buf(&mut high[..first]);
            iov.push_buf(&mut low[..second]);
            match stream.write_iov(&iov) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    self.head = (self.head + n) % cap;
                    self.len -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.len == 0 {
            self.head = 0;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// A stream that takes at most `.0` bytes in total.
    struct MinWriter<'a>(usize, &'a mut UnixStream);
    impl std::os::fd::AsRawFd for MinWriter<'_> {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.1.as_raw_fd()
        }
    }
    impl VsockStream for MinWriter<'_> {
        fn write_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.1.write_iov(iov)?.min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn wraps_and_flushes_in_order() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut t = TxBuf::new(8);
        assert_eq!(t.push(b"abcdef"), 6);
        assert_eq!(t.push(b"ghijk"), 2, "only the free room is taken");
        let mut s = [0u8; 8];
        assert_eq!(t.flush(&mut a).unwrap(), 8);
        b.read_exact(&mut s).unwrap();
        assert_eq!(&s, b"abcdefgh");
        // Head went back to 0; move it so the next push wraps around the end.
        assert_eq!(t.push(b"xxxxx"), 5);
        let mut skip = [0u8; 5];
        let mut sink = MinWriter(5, &mut a);
        assert_eq!(t.flush(&mut sink).unwrap(), 5);
        b.read_exact(&mut skip).unwrap();
        assert_eq!(
            t.push(b"12345"),
            5,
            "wraps: 3 bytes at the end, 2 at the start"
        );
        assert_eq!(t.flush(&mut a).unwrap(), 5);
        let mut w = [0u8; 5];
        b.read_exact(&mut w).unwrap();
        assert_eq!(&w, b"12345");
    }
}
