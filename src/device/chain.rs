//! Validated descriptor chains of any layout.
//!
//! The device walks each chain itself instead of using `virtio_queue::DescriptorChain`'s
//! iterator, because that iterator ends silently on a loop or an out-of-range `next` (the device
//! must count and refuse those) and follows indirect tables that this device never offered.
//! A chain is checked once, when it is popped: every descriptor lies inside guest memory, points
//! the right way (device-readable for TX, device-writable for RX), and the walk ends within the
//! queue size. After that the chain is a list of at most [`MAX_SEGMENTS`] guest ranges, and every
//! access goes through vm-memory's bounds-checked slices.

use std::fmt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::iovec::IoVecs;
use super::virtio::GuestMemory;

/// Most descriptors one chain may have. Linux sends at most 18 (header + 17 fragments) and posts
/// RX buffers as one descriptor; anything longer is refused as malformed.
pub const MAX_SEGMENTS: usize = 64;

const DESC_SIZE: u64 = 16;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Which way the device uses a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads it (TX queue): every descriptor must be device-readable.
    DeviceReads,
    /// The device writes it (RX and event queues): every descriptor must be device-writable.
    DeviceWrites,
}

/// Why a chain was refused. Each kind is counted by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The chain is longer than the queue (a loop).
    Loop,
    /// A `next` index or the head index is outside the descriptor table.
    IndexOutOfRange,
    /// An indirect descriptor, which this device does not offer.
    Indirect,
    /// A buffer is outside guest memory or wraps the address space.
    BadAddress,
    /// More than [`MAX_SEGMENTS`] non-empty descriptors.
    TooManySegments,
    /// A descriptor points the wrong way (write-only on TX, read-only on RX).
    WrongDirection,
    /// The chain is too short for what it must hold.
    TooShort,
    /// The descriptor table itself cannot be read.
    Table,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ChainError::Loop => "descriptor chain loops or exceeds the queue size",
            ChainError::IndexOutOfRange => "descriptor index out of range",
            ChainError::Indirect => "indirect descriptor not negotiated",
            ChainError::BadAddress => "descriptor buffer outside guest memory",
            ChainError::TooManySegments => "too many descriptors in one chain",
            ChainError::WrongDirection => "descriptor has the wrong direction",
            ChainError::TooShort => "chain too short",
            ChainError::Table => "descriptor table unreadable",
        };
        f.write_str(s)
    }
}

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// A checked descriptor chain: its head index and its non-empty buffers, in order.
#[derive(Clone, Debug)]
pub struct Chain {
    head: u16,
    segs: [Segment; MAX_SEGMENTS],
    count: usize,
    total: u64,
}

impl Chain {
    /// Walks and checks the chain starting at `head` in the descriptor table at `table` of a queue
    /// of `queue_size` entries.
    pub fn walk(
        mem: &GuestMemory,
        table: GuestAddress,
        queue_size: u16,
        head: u16,
        dir: Direction,
    ) -> Result<Chain, ChainError> {
        let mut chain = Chain {
            head,
            segs: [Segment::default(); MAX_SEGMENTS],
            count: 0,
            total: 0,
        };
        let mut index = head;
        for _ in 0..queue_size {
            if index >= queue_size {
                return Err(ChainError::IndexOutOfRange);
            }
            let at = table
                .checked_add(u64::from(index) * DESC_SIZE)
                .ok_or(ChainError::Table)?;
            let desc: Descriptor = mem.read_obj(at).map_err(|_| ChainError::Table)?;
            if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let writable = desc.is_write_only();
            if writable != (dir == Direction::DeviceWrites) {
                return Err(ChainError::WrongDirection);
            }
            if desc.len() > 0 {
                let ok = desc.addr().checked_add(u64::from(desc.len())).is_some()
                    && GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize);
                if !ok {
                    return Err(ChainError::BadAddress);
                }
                if chain.count == MAX_SEGMENTS {
                    return Err(ChainError::TooManySegments);
                }
                chain.segs[chain.count] = Segment {
                    addr: desc.addr(),
                    len: desc.len(),
                };
                chain.count += 1;
                chain.total += u64::from(desc.len());
            }
            if !desc.has_next() {
                return Ok(chain);
            }
            index = desc.next();
        }
        Err(ChainError::Loop)
    }

    /// The head index, to be returned in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Total bytes of all buffers.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the chain holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The chain's buffers.
    pub fn segments(&self) -> &[Segment] {
        &self.segs[..self.count]
    }

    /// Calls `f(guest_addr, len)` for each piece of the byte range `[offset, offset + len)` of the
    /// chain, in order. Stops early when `f` returns an error.
    fn for_range<E>(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut skip = offset;
        let mut left = len;
        let mut done = 0usize;
        for seg in self.segments() {
            if left == 0 {
                break;
            }
            let seg_len = u64::from(seg.len);
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(left);
            // `seg.addr + skip` cannot overflow: walk() checked `seg.addr + seg.len`.
            f(seg.addr.unchecked_add(skip), n as usize, done)?;
            done += n as usize;
            left -= n;
            skip = 0;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at chain offset `offset` out of guest memory. Returns the number
    /// of bytes copied (less than asked when the chain is shorter).
    pub fn read_at(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> usize {
        let mut copied = 0;
        let _ = self.for_range(offset, buf.len() as u64, |addr, n, done| {
            mem.read_slice(&mut buf[done..done + n], addr)?;
            copied = done + n;
            Ok::<(), vm_memory::GuestMemoryError>(())
        });
        copied
    }

    /// Copies `buf` into guest memory at chain offset `offset`. Returns the bytes written.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> usize {
        let mut copied = 0;
        let _ = self.for_range(offset, buf.len() as u64, |addr, n, done| {
            mem.write_slice(&buf[done..done + n], addr)?;
            copied = done + n;
            Ok::<(), vm_memory::GuestMemoryError>(())
        });
        copied
    }

    /// Fills `out` with iovecs over the chain's byte range `[offset, offset + len)`, splitting
    /// buffers that straddle guest memory regions. Returns the bytes covered.
    pub fn iovecs<'m>(
        &self,
        mem: &'m GuestMemory,
        offset: u64,
        len: u64,
        out: &mut IoVecs<'m>,
    ) -> usize {
        out.clear();
        let mut covered = 0;
        let _ = self.for_range(offset, len, |addr, n, _| {
            let mut at = addr;
            let mut left = n;
            while left > 0 {
                let (region, raddr) = mem.to_region_addr(at).ok_or(())?;
                let in_region = (region.len() - raddr.raw_value()) as usize;
                let take = left.min(in_region);
                let vs = region.get_slice(raddr, take).map_err(|_| ())?;
                if !out.push(vs) {
                    return Err(());
                }
                covered += take;
                left -= take;
                at = at.unchecked_add(take as u64);
            }
            Ok(())
        });
        covered
    }
}
