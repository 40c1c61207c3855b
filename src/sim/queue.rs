//! The driver side of a split virtqueue, written the way Linux's virtio_ring does it.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress};

use crate::device::virtio::GuestMemory;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One buffer of a chain, as a driver posts it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A raw descriptor, for hostile tests that write the table themselves.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags (NEXT = 1, WRITE = 2, INDIRECT = 4).
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// Driver-side state of one queue.
pub struct DriverQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: GuestAddress,
    /// Avail ring address.
    pub avail: GuestAddress,
    /// Used ring address.
    pub used: GuestAddress,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at the given addresses, zeroed in `mem`.
    pub fn new(mem: &GuestMemory, size: u16, desc: u64, avail: u64, used: u64) -> Self {
        let zero = vec![0u8; 16 * size as usize];
        mem.write_slice(&zero, GuestAddress(desc)).unwrap();
        mem.write_slice(&zero[..6 + 2 * size as usize], GuestAddress(avail))
            .unwrap();
        mem.write_slice(&zero[..6 + 8 * size as usize], GuestAddress(used))
            .unwrap();
        DriverQueue {
            size,
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); size as usize],
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// The descriptor index the next [`DriverQueue::add`] will use as its head.
    pub fn peek_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Writes descriptor `i`.
    pub fn write_desc(&self, mem: &GuestMemory, i: u16, d: RawDesc) {
        let at = self.desc.unchecked_add(16 * u64::from(i));
        mem.write_obj(d.addr, at).unwrap();
        mem.write_obj(d.len, at.unchecked_add(8)).unwrap();
        mem.write_obj(d.flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(d.next, at.unchecked_add(14)).unwrap();
    }

    /// Posts a chain made of `bufs`; returns its head index, or `None` when descriptors ran out.
    pub fn add(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (k, b) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { F_NEXT } | if b.write { F_WRITE } else { 0 };
            let next = if last { 0 } else { ids[k + 1] };
            self.write_desc(
                mem,
                ids[k],
                RawDesc {
                    addr: b.addr.0,
                    len: b.len,
                    flags,
                    next,
                },
            );
        }
        let head = ids[0];
        self.chains[head as usize] = ids;
        self.publish(mem, head);
        Some(head)
    }

    /// Puts `head` into the avail ring and publishes the new index, with the barrier a driver
    /// needs between the two.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail_idx % self.size;
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.store(
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// Writes an arbitrary avail index (hostile tests).
    pub fn force_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.store(idx, self.avail.unchecked_add(2), Ordering::Release)
            .unwrap();
    }

    /// Takes descriptors out of the free list for a hand-written chain.
    pub fn take_descs(&mut self, n: usize) -> Option<Vec<u16>> {
        if self.free.len() < n {
            return None;
        }
        Some((0..n).map(|_| self.free.pop().unwrap()).collect())
    }

    /// Records that the hand-written chain at `head` holds `ids`, so that its used entry frees
    /// them.
    pub fn track(&mut self, head: u16, ids: &[u16]) {
        self.chains[head as usize] = ids.to_vec();
    }

    /// Asks for an interrupt on the next used buffer (EVENT_IDX `used_event`).
    pub fn want_interrupt(&self, mem: &GuestMemory) {
        let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
        mem.store(self.last_used, at, Ordering::Release).unwrap();
    }

    /// The next used element, if the device returned one: (head, length).
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let idx: u16 = mem
            .load(self.used.unchecked_add(2), Ordering::Acquire)
            .unwrap();
        if idx == self.last_used {
            return None;
        }
        let slot = self.last_used % self.size;
        let at = self.used.unchecked_add(4 + 8 * u64::from(slot));
        let id: u32 = mem.read_obj(at).unwrap();
        let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        self.release(head);
        Some((head, len))
    }

    /// Returns the descriptors of the chain at `head` to the free list.
    fn release(&mut self, head: u16) {
        if let Some(ids) = self.chains.get_mut(head as usize) {
            self.free.append(ids);
        }
    }

    /// Used entries the device produced that the driver has not read.
    pub fn used_pending(&self, mem: &GuestMemory) -> bool {
        let idx: u16 = mem
            .load(self.used.unchecked_add(2), Ordering::Acquire)
            .unwrap();
        idx != self.last_used
    }
}
