//! When the simulated driver kicks the device: after every TX packet and RX refill (the
//! default, which the tests were written against), or only when the device asked for it through
//! EVENT_IDX `avail_event`, as Linux does ([`SimGuest::event_idx_kicks`]): a device still busy
//! with earlier chains is not kicked again.

use super::SimGuest;

impl SimGuest {
    /// Notifies queue `q` (0: RX, 1: TX) of the chains published since its avail index was
    /// `old_idx`, unless [`SimGuest::event_idx_kicks`] is on and the device did not ask.
    pub(super) fn notify(&mut self, q: usize, old_idx: u16) {
        if self.event_idx_kicks {
            let dq = if q == 0 { &self.rxq } else { &self.txq };
            if !dq.kick_needed(&self.mem, old_idx) {
                self.kicks_skipped += 1;
                return;
            }
        }
        self.kicks_sent += 1;
        self.kick(q);
    }
}
