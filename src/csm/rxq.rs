//! Who fills the next RX buffer: connections with something for the guest take turns (round
//! robin), after the RSTs for packets of unknown connections, which wait in a bounded queue.

use std::collections::VecDeque;

use super::table::ConnId;
use crate::wire::Header;

/// Most RSTs for unknown connections waiting for an RX buffer; more are dropped and counted
/// (the connections they answer are gone anyway).
pub const RST_QUEUE_CAP: usize = 256;

/// The RX schedule of a device.
#[derive(Default)]
pub struct RxQueue {
    turns: VecDeque<ConnId>,
    rsts: VecDeque<Header>,
}

impl RxQueue {
    /// Whether anything waits for an RX buffer.
    pub fn is_empty(&self) -> bool {
        self.turns.is_empty() && self.rsts.is_empty()
    }

    /// Queues an RST; returns `false` (and drops it) when [`RST_QUEUE_CAP`] are waiting.
    pub fn push_rst(&mut self, h: Header) -> bool {
        if self.rsts.len() >= RST_QUEUE_CAP {
            return false;
        }
        self.rsts.push_back(h);
        true
    }

    /// Queues an RST past [`RST_QUEUE_CAP`]: for the RSTs a restored device owes the saved
    /// connections, which the caller bounds (at most the device's connection limit).
    pub fn push_reset(&mut self, h: Header) {
        self.rsts.push_back(h);
    }

    /// The next RST owed, oldest first.
    pub fn pop_rst(&mut self) -> Option<Header> {
        self.rsts.pop_front()
    }

    /// Gives connection `id` a turn at the back.
    pub fn push(&mut self, id: ConnId) {
        self.turns.push_back(id);
    }

    /// The next connection's turn.
    pub fn pop(&mut self) -> Option<ConnId> {
        self.turns.pop_front()
    }

    /// Turns queued (some may belong to connections gone since).
    pub fn turns(&self) -> usize {
        self.turns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rst_queue_is_bounded() {
        let mut q = RxQueue::default();
        for _ in 0..RST_QUEUE_CAP {
            assert!(q.push_rst(Header::default()));
        }
        assert!(!q.push_rst(Header::default()), "dropped beyond the cap");
        assert!(!q.is_empty());
        let mut n = 0;
        while q.pop_rst().is_some() {
            n += 1;
        }
        assert_eq!(n, RST_QUEUE_CAP);
        assert!(q.is_empty());
    }

    #[test]
    fn turns_are_first_come_first_served() {
        let mut q = RxQueue::default();
        q.push(ConnId::new(1, 0));
        q.push(ConnId::new(2, 0));
        assert_eq!(q.pop(), Some(ConnId::new(1, 0)));
        q.push(ConnId::new(1, 0));
        assert_eq!(q.pop(), Some(ConnId::new(2, 0)));
        assert_eq!(q.pop(), Some(ConnId::new(1, 0)));
        assert_eq!(q.pop(), None);
    }
}
