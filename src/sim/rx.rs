//! The simulated guest's RX buffers: posting them as Linux does, and taking back what the
//! device filled.
//!
//! Two layouts, as the two generations of Linux's virtio-vsock driver post them
//! ([`SimGuest::rx_layout`]): one writable descriptor of 44 + 4096 bytes (Linux ≥ 6.2, the
//! default), or a 44-byte header descriptor chained to a 4096-byte data descriptor (Linux ≤ 6.1,
//! what the kernels of the integration tests' guests post). Every descriptor index owns one
//! 0x1040-byte slot of guest memory; a split chain uses the slots of both its descriptors, and
//! the guest keeps guard bytes right after the header descriptor, which the device must not
//! touch: a device that ran the payload on behind the header instead of into the data
//! descriptor is a violation.

use vm_memory::{Bytes, GuestAddress};

use super::{rx_buf_addr, SimGuest, QUEUE_SIZE, RX_BUF_LEN, RX_BUF_PAYLOAD};
use crate::sim::RawDesc;
use crate::wire::{Header, HEADER_LEN};

/// VIRTQ_DESC_F_NEXT.
const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
const F_WRITE: u16 = 2;

/// How the guest lays out its RX buffers (see the module documentation of `sim::rx`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RxLayout {
    /// One descriptor of 44 + 4096 bytes (Linux ≥ 6.2).
    #[default]
    Whole,
    /// A 44-byte header descriptor, then a 4096-byte data descriptor (Linux ≤ 6.1).
    Split,
}

impl SimGuest {
    /// Posts RX buffers in [`SimGuest::rx_layout`] until the queue is full and kicks the RX
    /// queue if any were added. A new layout applies to the buffers posted from then on.
    pub fn fill_rx(&mut self) {
        let per_chain = match self.rx_layout {
            RxLayout::Whole => 1,
            RxLayout::Split => 2,
        };
        let chains = self.rxq.free_descs() / per_chain;
        if chains == 0 {
            return;
        }
        // Each buffer's place is derived from the descriptor index the queue hands out; the
        // descriptors and avail slots are written in runs, then published at once.
        let ids = self
            .rxq
            .take_descs(chains * per_chain)
            .expect("free descriptors counted");
        let mut descs = Vec::with_capacity(ids.len());
        let mut heads = Vec::with_capacity(chains);
        for pair in ids.chunks_exact(per_chain) {
            let head = pair[0];
            match self.rx_layout {
                RxLayout::Whole => {
                    descs.push((head, desc(head, RX_BUF_LEN, F_WRITE, 0)));
                    self.rxq.track(head, &[head]);
                    self.rx_data[usize::from(head)] = head;
                }
                RxLayout::Split => {
                    let data = pair[1];
                    descs.push((head, desc(head, HEADER_LEN as u32, F_WRITE | F_NEXT, data)));
                    descs.push((data, desc(data, RX_BUF_PAYLOAD, F_WRITE, 0)));
                    self.write_header_guard(head);
                    self.rxq.track(head, &[head, data]);
                    self.rx_data[usize::from(head)] = data;
                }
            }
            heads.push(head);
        }
        let old_idx = self.rxq.avail_idx();
        self.rxq.write_descs(&self.mem, &descs);
        self.rxq.stage_all(&self.mem, &heads);
        self.rx_posted += chains;
        self.rxq.commit(&self.mem);
        self.notify(0, old_idx);
    }

    /// Takes back every RX buffer the device filled and hands its packet to the socket layer.
    /// Returns whether there was any.
    pub(super) fn pop_rx(&mut self) -> bool {
        let mut any = false;
        let mut hdr = [0u8; HEADER_LEN];
        // The guest's own buffer, unless a pump further up (sending a reply can wait for TX
        // descriptors, and so pump) holds it.
        let mut payload = std::mem::take(&mut self.rx_buf);
        payload.resize(SCRATCH_LEN, 0);
        while let Some((head, len)) = self.rxq.pop_used(&self.mem) {
            any = true;
            self.rx_posted -= 1;
            let addr = rx_buf_addr(head);
            let data = self.rx_data[usize::from(head)];
            // Where the payload lies: behind the header, or in the data descriptor's slot.
            let at = if data == head {
                GuestAddress(addr.0 + HEADER_LEN as u64)
            } else {
                if !self.header_guard_intact(head) {
                    self.violations.push(format!(
                        "the device wrote past the 44-byte header descriptor of RX chain {head}"
                    ));
                }
                self.mark_written(rx_buf_addr(data), RX_BUF_PAYLOAD as usize);
                rx_buf_addr(data)
            };
            self.mark_written(addr, RX_BUF_LEN as usize);
            if (len as usize) < HEADER_LEN {
                self.violations
                    .push(format!("RX used length {len} < header"));
                continue;
            }
            self.mem.read_slice(&mut hdr, addr).unwrap();
            let h = Header::decode(&hdr);
            let plen = len as usize - HEADER_LEN;
            if h.len as usize != plen {
                self.violations
                    .push(format!("RX used length {len} but header len {}", h.len));
            }
            let plen = plen.min(RX_BUF_PAYLOAD as usize);
            // Copied at the payload's own page offset, so that the copy never aliases
            // modulo 4 KiB (see `TX_PAYLOAD_PAGE_OFFSET`).
            let from = same_page_offset(&payload, at.0);
            let dst = &mut payload[from..from + plen];
            self.mem.read_slice(dst, at).unwrap();
            self.on_packet(&h, &payload[from..from + plen]);
        }
        self.rx_buf = payload;
        any
    }
}

/// Room for one RX payload at any page offset.
pub(super) const SCRATCH_LEN: usize = 4096 + RX_BUF_PAYLOAD as usize;

/// Where in `buf` a copy of guest address `addr` starts at the same offset within its page.
fn same_page_offset(buf: &[u8], addr: u64) -> usize {
    let at = buf.as_ptr() as usize % 4096;
    let want = (addr % 4096) as usize;
    (want + 4096 - at) % 4096
}

fn desc(id: u16, len: u32, flags: u16, next: u16) -> RawDesc {
    RawDesc {
        addr: rx_buf_addr(id).0,
        len,
        flags,
        next,
    }
}

/// `rx_data` for a fresh guest: every chain's payload is behind its header.
pub(super) fn whole_chains() -> Vec<u16> {
    (0..QUEUE_SIZE).collect()
}
