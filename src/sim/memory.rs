//! Guest memory for simulated guests: fresh, or recycled per thread.
//!
//! A fresh [`MEM_SIZE`] mapping costs an mmap, a page fault for every page the guest and the
//! device touch, and an munmap of all of them: more than a short fuzz input costs itself.
//! [`take`] hands out a memory of this thread's pool that nobody holds any more, after zeroing
//! every page its last user marked as written ([`Written`]); or a fresh one when none is free.
//! A recycled memory thus reads as zeros wherever its last guest (or device) wrote, as a fresh
//! one does, provided every writer marked what it wrote: [`SimGuest`](super::SimGuest) marks the
//! TX buffers it writes, the RX and event buffers the device may have written, and rewrites its
//! rings; whoever writes guest memory directly marks it with
//! [`SimGuest::mark_written`](super::SimGuest::mark_written).

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestRegionMmap};

use super::{MEM_SIZE, REGION_SPLIT};
use crate::vq::GuestMemory;

const PAGE: u64 = 4096;
const PAGES: u64 = MEM_SIZE / PAGE;
/// Memories kept per thread (a guest whose device outlives it holds one a while).
const POOL_SIZE: usize = 2;

/// One region of a simulated guest's memory.
type Region = GuestRegionMmap<()>;

/// The pages of one guest memory written since it was last zeroed, one bit per page.
pub struct Written {
    bits: Vec<u64>,
}

impl Default for Written {
    fn default() -> Self {
        Written {
            bits: vec![0; (PAGES / 64) as usize],
        }
    }
}

impl Written {
    /// Marks the pages of `[addr, addr + len)` (the part inside guest memory).
    pub fn mark(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len).min(MEM_SIZE);
        if len == 0 || addr >= end {
            return;
        }
        for page in addr / PAGE..=(end - 1) / PAGE {
            self.bits[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// The marked pages as `(address, length)` runs, lowest first.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, &w) in self.bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let page = i as u64 * 64 + u64::from(w.trailing_zeros());
                w &= w - 1;
                match runs.last_mut() {
                    Some((at, len)) if *at + *len == page * PAGE => *len += PAGE,
                    _ => runs.push((page * PAGE, PAGE)),
                }
            }
        }
        runs
    }

    /// Zeroes every marked page of `mem` and clears the marks.
    fn zero(&mut self, mem: &GuestMemory) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        for (mut at, mut len) in self.runs() {
            while len > 0 {
                let n = len.min(ZEROS.len() as u64);
                mem.write_slice(&ZEROS[..n as usize], GuestAddress(at))
                    .expect("marked pages lie inside guest memory");
                at += n;
                len -= n;
            }
        }
        self.bits.fill(0);
    }
}

/// A guest memory of the pool and the marks of what its users wrote.
struct Slot {
    regions: Vec<Arc<Region>>,
    written: Arc<Mutex<Written>>,
}

impl Slot {
    /// Whether only the pool holds the memory (every guest and device of it is gone).
    fn is_free(&self) -> bool {
        self.regions.iter().all(|r| Arc::strong_count(r) == 1)
    }

    fn memory(&self) -> GuestMemory {
        GuestMemory::from_arc_regions(self.regions.clone()).expect("regions of a guest memory")
    }
}

thread_local! {
    static POOL: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// A guest memory from [`take`].
pub struct Lease {
    /// The memory, zeroed.
    pub mem: GuestMemory,
    /// Where its user marks what it writes.
    pub marks: Marks,
}

/// Where the user of a pooled memory marks the pages written, to be zeroed before the memory's
/// next use.
pub struct Marks {
    written: Arc<Mutex<Written>>,
    /// One region, to tell whether others (a device) still hold the memory.
    probe: Arc<Region>,
}

impl Marks {
    /// Marks `[addr, addr + len)` as written.
    pub fn mark(&self, addr: u64, len: u64) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark(addr, len);
    }

    /// Whether anyone but the pool, these marks and `held` clones of the memory still holds it
    /// (a device that outlives its guest).
    pub fn shared_beyond(&self, held: usize) -> bool {
        Arc::strong_count(&self.probe) > 2 + held
    }
}

/// A fresh memory in the simulated guest's layout: two regions split at [`REGION_SPLIT`].
pub fn fresh() -> GuestMemory {
    GuestMemory::from_arc_regions(fresh_regions()).expect("regions of a guest memory")
}

/// A fresh memory of the simulated guest's size in one region, a memfd, to share with a device
/// in another thread or process (a vhost-user backend maps the same pages). One region, as
/// QEMU hands over a small guest's RAM: vhost-device-vsock cannot read a buffer that spans two
/// regions (`InvalidBackendAddress`), which the two-region layout of [`fresh`] makes some TX
/// buffers do.
pub fn shared() -> GuestMemory {
    let regions = [(0, MEM_SIZE)]
        .iter()
        .map(|&(at, len)| {
            let file = memfd(len).expect("memfd of the guest memory");
            let offset = vm_memory::FileOffset::new(file, 0);
            Arc::new(
                Region::from_range(GuestAddress(at), len as usize, Some(offset))
                    .expect("guest memory"),
            )
        })
        .collect();
    GuestMemory::from_arc_regions(regions).expect("regions of a guest memory")
}

/// An anonymous, sealed-size-free memory file of `len` zero bytes.
fn memfd(len: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vsock-sim-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

fn fresh_regions() -> Vec<Arc<Region>> {
    [(0, REGION_SPLIT), (REGION_SPLIT, MEM_SIZE - REGION_SPLIT)]
        .iter()
        .map(|&(at, len)| {
            Arc::new(
                Region::from_range(GuestAddress(at), len as usize, None).expect("guest memory"),
            )
        })
        .collect()
}

/// A zeroed memory in the simulated guest's layout from this thread's pool (a fresh one when
/// none is free; kept for reuse while the pool has room).
pub fn take() -> Lease {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let slot = match pool.iter().position(Slot::is_free) {
            Some(i) => {
                let slot = &pool[i];
                slot.written
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .zero(&slot.memory());
                i
            }
            None => {
                let slot = Slot {
                    regions: fresh_regions(),
                    written: Arc::default(),
                };
                if pool.len() >= POOL_SIZE {
                    // No room: a memory of its own, dropped with its last user.
                    return Lease {
                        mem: slot.memory(),
                        marks: Marks {
                            probe: slot.regions[0].clone(),
                            written: slot.written,
                        },
                    };
                }
                pool.push(slot);
                pool.len() - 1
            }
        };
        let slot = &pool[slot];
        Lease {
            mem: slot.memory(),
            marks: Marks {
                written: slot.written.clone(),
                probe: slot.regions[0].clone(),
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which mapping a lease holds (without holding it).
    fn identity(l: &Lease) -> usize {
        Arc::as_ptr(&l.marks.probe) as usize
    }

    fn read(mem: &GuestMemory, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn marks_become_page_runs() {
        let mut w = Written::default();
        assert!(w.runs().is_empty());
        w.mark(0, 0);
        w.mark(MEM_SIZE, 100);
        w.mark(u64::MAX - 3, 100);
        assert!(w.runs().is_empty(), "nothing inside guest memory");
        w.mark(10, 1);
        w.mark(PAGE - 1, 2); // pages 0 and 1
        w.mark(5 * PAGE, 3 * PAGE); // pages 5..=7
        w.mark(MEM_SIZE - 1, 1000); // the last page
        assert_eq!(
            w.runs(),
            vec![(0, 2 * PAGE), (5 * PAGE, 3 * PAGE), (MEM_SIZE - PAGE, PAGE)]
        );
    }

    #[test]
    fn a_recycled_memory_is_zero_where_it_was_written() {
        let at = [
            0x1000,
            REGION_SPLIT - 10,
            REGION_SPLIT + 0x5000,
            MEM_SIZE - 8,
        ];
        let first = take();
        for &a in &at {
            first.mem.write_slice(&[0xee; 8], GuestAddress(a)).unwrap();
            first.marks.mark(a, 8);
        }
        let id = identity(&first);
        drop(first);
        let second = take();
        assert_eq!(id, identity(&second), "the same memory comes back");
        for &a in &at {
            assert_eq!(read(&second.mem, a, 8), vec![0; 8], "at {a:#x}");
        }
        assert!(second.marks.written.lock().unwrap().runs().is_empty());
    }

    #[test]
    fn a_memory_still_held_is_not_handed_out() {
        let first = take();
        let device = first.mem.clone();
        // Held: the pool, the marks' probe, `first.mem` and `device`.
        assert!(first.marks.shared_beyond(1), "beyond the lease's own clone");
        assert!(!first.marks.shared_beyond(2));
        device.write_slice(&[1], GuestAddress(0x2000)).unwrap();
        first.marks.mark(0x2000, 1);
        let id = identity(&first);
        drop(first);
        let second = take();
        assert_ne!(id, identity(&second));
        assert_eq!(read(&device, 0x2000, 1), vec![1], "the holder's data stays");
        assert_eq!(read(&second.mem, 0x2000, 1), vec![0]);
        second.mem.write_slice(&[2], GuestAddress(0x2000)).unwrap();
        assert_eq!(read(&device, 0x2000, 1), vec![1], "two distinct memories");
        // With the pool full and both memories held, a third one is fresh and not pooled.
        let third = take();
        assert_eq!(read(&third.mem, 0x2000, 1), vec![0]);
        drop(device);
        let fourth = take();
        assert_eq!(id, identity(&fourth), "released: reused");
        assert_eq!(read(&fourth.mem, 0x2000, 1), vec![0]);
        drop((second, third, fourth));
        POOL.with(|p| assert!(p.borrow().len() <= POOL_SIZE));
    }
}
