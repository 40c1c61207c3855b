//! Guard bytes in the simulated guest's memory: the gap after each RX buffer holds a pattern
//! the device must never overwrite, since it may write only into the buffers the driver posted;
//! so do the bytes right after the header descriptor of a split RX chain (`rx`).

use vm_memory::{Bytes, GuestAddress};

use super::{rx_buf_addr, SimGuest, QUEUE_SIZE, RX_BUF_LEN, RX_STRIDE};
use crate::wire::HEADER_LEN;

/// What the guest keeps in the gap after each RX buffer (`RX_STRIDE - RX_BUF_LEN` bytes), and
/// behind the header descriptor of a split chain.
const GUARD: u8 = 0xa5;
/// Guard bytes behind a split chain's 44-byte header descriptor.
const HEADER_GUARD_LEN: usize = 20;

impl SimGuest {
    pub(super) fn write_guards(&self) {
        let gap = [GUARD; (RX_STRIDE - RX_BUF_LEN as u64) as usize];
        for head in 0..QUEUE_SIZE {
            let at = GuestAddress(rx_buf_addr(head).0 + u64::from(RX_BUF_LEN));
            self.mem.write_slice(&gap, at).expect("in guest memory");
        }
    }

    /// Puts guard bytes right after the header descriptor of the split RX chain at `head`.
    pub(super) fn write_header_guard(&self, head: u16) {
        let at = GuestAddress(rx_buf_addr(head).0 + HEADER_LEN as u64);
        let guard = [GUARD; HEADER_GUARD_LEN];
        self.mem.write_slice(&guard, at).expect("in guest memory");
        self.mark_written(at, HEADER_GUARD_LEN);
    }

    /// Whether the guard bytes after the header descriptor of the split chain at `head` are
    /// still there (the device wrote the payload into the data descriptor, not on behind the
    /// header).
    pub(super) fn header_guard_intact(&self, head: u16) -> bool {
        let at = GuestAddress(rx_buf_addr(head).0 + HEADER_LEN as u64);
        let mut guard = [0u8; HEADER_GUARD_LEN];
        self.mem
            .read_slice(&mut guard, at)
            .expect("in guest memory");
        guard.iter().all(|&b| b == GUARD)
    }

    /// Whether the gap after every RX buffer still holds what the guest wrote there: the
    /// device writes only into the buffers the driver posted, never past one. `Err` names the
    /// first gap written.
    pub fn guards_intact(&self) -> Result<(), String> {
        let mut gap = [0u8; (RX_STRIDE - RX_BUF_LEN as u64) as usize];
        for head in 0..QUEUE_SIZE {
            let at = GuestAddress(rx_buf_addr(head).0 + u64::from(RX_BUF_LEN));
            self.mem.read_slice(&mut gap, at).expect("in guest memory");
            if gap.iter().any(|&b| b != GUARD) {
                return Err(format!(
                    "the device wrote past RX buffer {head}: {:#x}..{:#x} holds {gap:02x?}",
                    at.0,
                    at.0 + gap.len() as u64
                ));
            }
        }
        Ok(())
    }
}
