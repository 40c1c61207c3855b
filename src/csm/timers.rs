//! The connections' deadlines: a heap by time, invalidated lazily (an entry whose connection
//! is gone, or that was re-armed since, is skipped when it comes up).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::table::ConnId;

/// Armed deadlines.
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, ConnId)>>,
}

impl Timers {
    /// Arms a deadline at `t` for `id`.
    pub fn arm(&mut self, id: ConnId, t: Instant) {
        self.heap.push(Reverse((t, id)));
    }

    /// The earliest deadline still `live` (asked of each entry in turn; dead ones are dropped).
    pub fn next(&mut self, mut live: impl FnMut(ConnId, Instant) -> bool) -> Option<Instant> {
        while let Some(Reverse((t, id))) = self.heap.peek().copied() {
            if live(id, t) {
                return Some(t);
            }
            self.heap.pop();
        }
        None
    }

    /// Takes the earliest deadline if it is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, ConnId)> {
        let Reverse((t, id)) = *self.heap.peek()?;
        if t > now {
            return None;
        }
        self.heap.pop();
        Some((t, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_in_order_and_dead_ones_skipped() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let (a, b) = (ConnId::new(0, 0), ConnId::new(1, 0));
        t.arm(b, t0 + Duration::from_secs(2));
        t.arm(a, t0 + Duration::from_secs(1));
        assert_eq!(t.next(|_, _| true), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.next(|id, _| id != a), Some(t0 + Duration::from_secs(2)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(
            t.pop_due(t0 + Duration::from_secs(5)),
            Some((t0 + Duration::from_secs(2), b))
        );
        assert_eq!(t.pop_due(t0 + Duration::from_secs(5)), None);
    }
}
