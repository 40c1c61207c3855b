//! What a stream connection still owes the guest: a small set, never a queue, served in a fixed
//! priority (as Firecracker's `PendingRxSet`).

/// One kind of packet owed to the guest, in the order they are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingRx {
    /// The connection was reset.
    Rst = 1,
    /// The host-side connect completed.
    Response = 2,
    /// A host client connects to a guest port.
    Request = 4,
    /// Bytes of the host stream (or of the handshake prefix) may be waiting.
    Rw = 8,
    /// Our shutdown flags changed.
    Shutdown = 16,
    /// Our credit as the guest knows it is low, or it asked.
    CreditUpdate = 32,
    /// We wait for the guest's credit.
    CreditRequest = 64,
}

/// A set of [`PendingRx`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSet(u8);

impl PendingSet {
    /// The set holding only `p`.
    pub fn only(p: PendingRx) -> Self {
        PendingSet(p as u8)
    }

    /// Adds `p`.
    pub fn insert(&mut self, p: PendingRx) {
        self.0 |= p as u8;
    }

    /// Removes `p`.
    pub fn remove(&mut self, p: PendingRx) {
        self.0 &= !(p as u8);
    }

    /// Whether `p` is owed.
    pub fn contains(self, p: PendingRx) -> bool {
        self.0 & p as u8 != 0
    }

    /// Removes `p` and says whether it was owed.
    pub fn take(&mut self, p: PendingRx) -> bool {
        let had = self.contains(p);
        self.remove(p);
        had
    }

    /// Whether nothing is owed.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_take_and_only() {
        let mut s = PendingSet::default();
        assert!(s.is_empty());
        s.insert(PendingRx::Rw);
        s.insert(PendingRx::CreditUpdate);
        assert!(s.contains(PendingRx::Rw) && !s.contains(PendingRx::Rst));
        assert!(s.take(PendingRx::Rw));
        assert!(!s.take(PendingRx::Rw));
        assert_eq!(s, PendingSet::only(PendingRx::CreditUpdate));
        s.remove(PendingRx::CreditUpdate);
        assert!(s.is_empty());
    }
}
