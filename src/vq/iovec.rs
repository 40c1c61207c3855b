//! Fixed-capacity iovec lists over guest memory, for one-copy `readv`/`sendmsg`.

use std::marker::PhantomData;

use vm_memory::VolatileSlice;

/// Most iovecs one I/O call uses: every descriptor of a chain, each split at most once more
/// where it straddles two guest memory regions.
pub const MAX_IOVECS: usize = 2 * super::chain::MAX_SEGMENTS;

/// A list of iovecs that borrow memory for `'m`: guest memory slices or device-owned buffers.
///
/// Built only from [`VolatileSlice`]s, which describe memory that may be both read and written
/// through raw pointers for their lifetime, so passing the list to `readv(2)` or `sendmsg(2)` is
/// sound while the borrow lasts. It lives on the stack: no heap allocation per packet.
pub struct IoVecs<'m> {
    iov: [libc::iovec; MAX_IOVECS],
    count: usize,
    bytes: usize,
    _mem: PhantomData<&'m mut [u8]>,
}

impl Default for IoVecs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m> IoVecs<'m> {
    /// An empty list.
    pub fn new() -> Self {
        IoVecs {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS],
            count: 0,
            bytes: 0,
            _mem: PhantomData,
        }
    }

    /// Empties the list.
    pub fn clear(&mut self) {
        self.count = 0;
        self.bytes = 0;
    }

    /// Appends a slice; returns `false` (and appends nothing) when the list is full.
    /// Empty slices are skipped.
    pub fn push(&mut self, slice: VolatileSlice<'m, ()>) -> bool {
        if slice.is_empty() {
            return true;
        }
        if self.count == MAX_IOVECS {
            return false;
        }
        self.iov[self.count] = libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        };
        self.count += 1;
        self.bytes += slice.len();
        true
    }

    /// Appends a device-owned buffer.
    pub fn push_buf(&mut self, buf: &'m mut [u8]) -> bool {
        self.push(VolatileSlice::from(buf))
    }

    /// Total bytes described.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether the list describes no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The raw iovecs, for a system call.
    pub fn as_raw(&self) -> &[libc::iovec] {
        &self.iov[..self.count]
    }
}
