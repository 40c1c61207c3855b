//! The driver side of a split virtqueue, written the way Linux's virtio_ring does it.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress};

use crate::vq::GuestMemory;

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

impl RawDesc {
    /// The descriptor as the 16 bytes of the table.
    pub fn encode(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
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
        mem.write_slice(&d.encode(), at).unwrap();
    }

    /// Writes descriptors, each run of consecutive indices with one memory access.
    pub fn write_descs(&self, mem: &GuestMemory, descs: &[(u16, RawDesc)]) {
        let mut run: Vec<u8> = Vec::with_capacity(16 * descs.len());
        let mut first = 0u16;
        for (k, &(i, d)) in descs.iter().enumerate() {
            if k > 0 && u32::from(i) != u32::from(descs[k - 1].0) + 1 {
                mem.write_slice(&run, self.desc.unchecked_add(16 * u64::from(first)))
                    .unwrap();
                run.clear();
            }
            if run.is_empty() {
                first = i;
            }
            run.extend_from_slice(&d.encode());
        }
        if !run.is_empty() {
            mem.write_slice(&run, self.desc.unchecked_add(16 * u64::from(first)))
                .unwrap();
        }
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
        self.stage(mem, head);
        self.commit(mem);
    }

    /// Puts `head` into the avail ring without publishing it yet (see [`DriverQueue::commit`]).
    pub fn stage(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail_idx % self.size;
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// [`DriverQueue::stage`] for each of `heads` in turn, the ring slots written in at most
    /// two runs (before and after the ring wraps).
    pub fn stage_all(&mut self, mem: &GuestMemory, heads: &[u16]) {
        let mut rest = heads;
        while !rest.is_empty() {
            let slot = self.avail_idx % self.size;
            let n = rest.len().min(usize::from(self.size - slot));
            let raw: Vec<u8> = rest[..n].iter().flat_map(|h| h.to_le_bytes()).collect();
            mem.write_slice(&raw, self.avail.unchecked_add(4 + 2 * u64::from(slot)))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(n as u16);
            rest = &rest[n..];
        }
    }

    /// Publishes every staged head at once, as Linux does for a batch.
    pub fn commit(&mut self, mem: &GuestMemory) {
        fence(Ordering::SeqCst);
        mem.store(
            self.avail_idx,
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// The avail index the driver has published (or staged) so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Whether the device asked to be notified of the chains published since the avail index
    /// was `old` (EVENT_IDX `avail_event`, as Linux's `virtqueue_kick_prepare` decides): the
    /// device wants a kick only if the index it will look at next lies in `[old, new)`. While
    /// it is still busy with earlier chains its `avail_event` lags behind, and no kick is due.
    pub fn kick_needed(&self, mem: &GuestMemory, old: u16) -> bool {
        // The avail index must be visible before the device's `avail_event` is read (Linux's
        // `virtio_mb` in `virtqueue_kick_prepare_split`).
        fence(Ordering::SeqCst);
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        let event: u16 = mem.load(at, Ordering::Acquire).unwrap();
        let new = self.avail_idx;
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
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
        let chain = &mut self.chains[head as usize];
        chain.clear();
        chain.extend_from_slice(ids);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    #[test]
    fn a_kick_is_needed_only_when_avail_event_lies_in_the_new_range() {
        let m = mem();
        let mut q = DriverQueue::new(&m, 8, 0x1000, 0x2000, 0x3000);
        let event_at = q.used.unchecked_add(4 + 8 * 8);
        let set_event = |e: u16| m.store(e, event_at, Ordering::Release).unwrap();
        q.force_avail_idx(&m, 3);
        let old = q.avail_idx();
        q.stage(&m, 0);
        q.stage(&m, 1);
        q.commit(&m);
        set_event(3);
        assert!(q.kick_needed(&m, old), "the device waits for index 3");
        set_event(4);
        assert!(q.kick_needed(&m, old), "index 4 is among the new ones");
        set_event(5);
        assert!(!q.kick_needed(&m, old), "it waits for a later index");
        set_event(1);
        assert!(!q.kick_needed(&m, old), "still busy with earlier chains");
        // Across the wrap of the 16-bit index.
        q.force_avail_idx(&m, u16::MAX);
        let old = q.avail_idx();
        q.stage(&m, 2);
        q.stage(&m, 3);
        q.commit(&m);
        set_event(0);
        assert!(q.kick_needed(&m, old));
        set_event(u16::MAX - 1);
        assert!(!q.kick_needed(&m, old));
    }

    #[test]
    fn batched_writes_are_the_single_writes() {
        let (a, b) = (mem(), mem());
        let mut qa = DriverQueue::new(&a, 8, 0x1000, 0x2000, 0x3000);
        let mut qb = DriverQueue::new(&b, 8, 0x1000, 0x2000, 0x3000);
        // Start near the end of the ring, so the slots wrap.
        qa.force_avail_idx(&a, 5);
        qb.force_avail_idx(&b, 5);
        let heads = [0u16, 1, 2, 6, 4, 5];
        let descs: Vec<(u16, RawDesc)> = heads
            .iter()
            .map(|&i| {
                let d = RawDesc {
                    addr: 0x1_0000_0000 * u64::from(i) + 7,
                    len: 100 + u32::from(i),
                    flags: 2,
                    next: i ^ 3,
                };
                (i, d)
            })
            .collect();
        for &(i, d) in &descs {
            qa.write_desc(&a, i, d);
            qa.stage(&a, i);
        }
        qb.write_descs(&b, &descs);
        qb.stage_all(&b, &heads);
        let read = |m: &GuestMemory| {
            let mut v = vec![0u8; 0x3000];
            m.read_slice(&mut v, GuestAddress(0x1000)).unwrap();
            v
        };
        assert_eq!(read(&a), read(&b));
        assert_eq!(qa.avail_idx, qb.avail_idx);
    }
}
