//! Validated descriptor chains of any layout.
//!
//! The device walks each chain itself instead of using `virtio_queue::DescriptorChain`'s
//! iterator, because that iterator ends silently on a loop or an out-of-range `next` (the device
//! must count and refuse those) and follows indirect tables that this device never offered. So
//! the device pops a chain from `virtio_queue` (which reads only the avail ring) and walks it
//! here from its head index, once.
//! A chain is checked once, when it is popped: every descriptor lies inside guest memory, points
//! the right way (device-readable for TX, device-writable for RX), and the walk ends within the
//! queue size. After that the chain is a list of at most [`MAX_SEGMENTS`] guest ranges, and every
//! access goes through vm-memory's bounds-checked slices.

use std::fmt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::iovec::IoVecs;
use super::GuestMemory;

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

    /// Appends to `out` iovecs over the chain's byte range `[offset, offset + len)`, splitting
    /// buffers that straddle guest memory regions. Returns the bytes covered.
    pub fn iovecs<'m>(
        &self,
        mem: &'m GuestMemory,
        offset: u64,
        len: u64,
        out: &mut IoVecs<'m>,
    ) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = 0x0;
    const QSIZE: u16 = 8;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// Two adjacent regions (0..0x2000, 0x2000..0x4000) and a hole above them.
    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0x2000)])
            .unwrap()
    }

    fn desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(TABLE + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    fn walk(mem: &GuestMemory, head: u16, dir: Direction) -> Result<Chain, ChainError> {
        Chain::walk(mem, GuestAddress(TABLE), QSIZE, head, dir)
    }

    #[test]
    fn a_chain_is_its_non_empty_buffers_in_order() {
        let m = mem();
        desc(&m, 2, 0x1000, 44, F_NEXT, 5);
        desc(&m, 5, 0x1800, 0, F_NEXT, 1); // empty: skipped
        desc(&m, 1, 0x1f00, 0x200, 0, 0); // straddles the two regions
        let c = walk(&m, 2, Direction::DeviceReads).unwrap();
        assert_eq!(c.head(), 2);
        assert_eq!(c.len(), 44 + 0x200);
        assert_eq!(
            c.segments(),
            &[
                Segment {
                    addr: GuestAddress(0x1000),
                    len: 44
                },
                Segment {
                    addr: GuestAddress(0x1f00),
                    len: 0x200
                }
            ]
        );
        assert!(!c.is_empty());
    }

    #[test]
    fn malformed_chains_are_refused_by_kind() {
        let m = mem();
        // A loop: 0 -> 1 -> 0.
        desc(&m, 0, 0x1000, 8, F_NEXT, 1);
        desc(&m, 1, 0x1100, 8, F_NEXT, 0);
        assert_eq!(
            walk(&m, 0, Direction::DeviceReads).unwrap_err(),
            ChainError::Loop
        );
        // `next` beyond the table, and a head beyond it.
        desc(&m, 1, 0x1100, 8, F_NEXT, QSIZE);
        assert_eq!(
            walk(&m, 0, Direction::DeviceReads).unwrap_err(),
            ChainError::IndexOutOfRange
        );
        assert_eq!(
            walk(&m, QSIZE, Direction::DeviceReads).unwrap_err(),
            ChainError::IndexOutOfRange
        );
        // Indirect, never offered.
        desc(&m, 3, 0x1000, 16, 4, 0);
        assert_eq!(
            walk(&m, 3, Direction::DeviceReads).unwrap_err(),
            ChainError::Indirect
        );
        // Direction: a writable descriptor in a TX chain, a readable one in an RX chain.
        desc(&m, 4, 0x1000, 16, F_WRITE, 0);
        assert_eq!(
            walk(&m, 4, Direction::DeviceReads).unwrap_err(),
            ChainError::WrongDirection
        );
        assert!(walk(&m, 4, Direction::DeviceWrites).is_ok());
        desc(&m, 4, 0x1000, 16, 0, 0);
        assert_eq!(
            walk(&m, 4, Direction::DeviceWrites).unwrap_err(),
            ChainError::WrongDirection
        );
        // Outside guest memory, past its end, and wrapping the address space.
        for (addr, len) in [(0x4000, 1), (0x3fff, 2), (u64::MAX, 2)] {
            desc(&m, 6, addr, len, 0, 0);
            assert_eq!(
                walk(&m, 6, Direction::DeviceReads).unwrap_err(),
                ChainError::BadAddress,
                "{addr:#x}+{len}"
            );
        }
        // The table itself outside guest memory.
        assert_eq!(
            Chain::walk(&m, GuestAddress(0x3ff8), QSIZE, 0, Direction::DeviceReads).unwrap_err(),
            ChainError::Table
        );
    }

    #[test]
    fn more_than_max_segments_is_refused() {
        let m = mem();
        let size = (MAX_SEGMENTS + 1) as u16;
        for i in 0..size {
            let last = i == size - 1;
            let at = GuestAddress(TABLE + 16 * u64::from(i));
            m.write_obj(0x3000 + u64::from(i), at).unwrap();
            m.write_obj(1u32, at.unchecked_add(8)).unwrap();
            m.write_obj(if last { 0u16 } else { F_NEXT }, at.unchecked_add(12))
                .unwrap();
            m.write_obj(i + 1, at.unchecked_add(14)).unwrap();
        }
        let walk = |n: u16| {
            Chain::walk(
                &m,
                GuestAddress(TABLE),
                n.max(size),
                0,
                Direction::DeviceReads,
            )
        };
        assert_eq!(walk(size).unwrap_err(), ChainError::TooManySegments);
        // Exactly MAX_SEGMENTS is fine.
        m.write_obj(0u16, GuestAddress(TABLE + 16 * (size as u64 - 2) + 12))
            .unwrap();
        assert_eq!(walk(size).unwrap().segments().len(), MAX_SEGMENTS);
    }

    #[test]
    fn byte_ranges_cross_buffers_and_regions() {
        let m = mem();
        desc(&m, 0, 0x1000, 4, F_WRITE | F_NEXT, 1);
        desc(&m, 1, 0x1ffe, 6, F_WRITE, 0); // 2 bytes in region 0, 4 in region 1
        let c = walk(&m, 0, Direction::DeviceWrites).unwrap();
        assert_eq!(c.write_at(&m, 2, b"abcdefgh"), 8);
        let mut all = [0u8; 10];
        assert_eq!(c.read_at(&m, 0, &mut all), 10);
        assert_eq!(&all[2..], b"abcdefgh");
        let mut first = [0u8; 2];
        m.read_slice(&mut first, GuestAddress(0x1002)).unwrap();
        assert_eq!(&first, b"ab");
        // Past the end: only what the chain holds.
        assert_eq!(c.write_at(&m, 8, b"xyz"), 2);
        let mut tail = [0u8; 4];
        assert_eq!(c.read_at(&m, 8, &mut tail), 2);
        assert_eq!(c.read_at(&m, 10, &mut tail), 0);
        // The iovecs split the buffer that straddles the regions.
        let mut iov = IoVecs::new();
        assert_eq!(c.iovecs(&m, 1, 100, &mut iov), 9);
        let lens: Vec<usize> = iov.as_raw().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, vec![3, 2, 4]);
    }
}
