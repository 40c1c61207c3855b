//! A stream connection's credit, each direction on its own (virtio-vsock credit: wrapping u32
//! counters, per connection).

use std::num::Wrapping;

/// Guest → host: we are the receiver. We advertise `buf_alloc` and count `fwd_cnt` only for
/// bytes really written into the host stream, so the guest never has more in flight than we
/// hold.
#[derive(Clone, Copy, Debug)]
pub struct Inbound {
    buf_alloc: u32,
    /// Bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of them written into the host stream (or dropped for a peer that left).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    told: Wrapping<u32>,
}

impl Inbound {
    /// Credit of `buf_alloc` bytes, nothing received yet.
    pub fn new(buf_alloc: u32) -> Self {
        Inbound {
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            told: Wrapping(0),
        }
    }

    /// The receive space we advertise.
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes received and not yet forwarded: what the guest has in our buffer.
    pub fn held(&self) -> u32 {
        (self.rx_cnt - self.fwd_cnt).0
    }

    /// Whether bytes were forwarded since the guest last heard `fwd_cnt`.
    pub fn untold(&self) -> bool {
        self.told != self.fwd_cnt
    }

    /// Bytes forwarded so far, as every packet we send says.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// Whether `len` more bytes stay within what we advertised (otherwise the guest overran its
    /// credit).
    pub fn fits(&self, len: u32) -> bool {
        let buffered = (self.rx_cnt - self.fwd_cnt).0;
        u64::from(buffered) + u64::from(len) <= u64::from(self.buf_alloc)
    }

    /// `len` bytes arrived from the guest.
    pub fn received(&mut self, len: u32) {
        self.rx_cnt += Wrapping(len);
    }

    /// `n` bytes reached the host stream. Returns whether the guest should be told: its view
    /// of our free space (`buf_alloc - (rx_cnt - told)`) fell below half, and one-way flows
    /// stall unless it hears of the room freed.
    pub fn forwarded(&mut self, n: usize) -> bool {
        self.fwd_cnt += Wrapping(n as u32);
        (self.rx_cnt - self.told).0 > self.buf_alloc / 2
    }

    /// A packet told the guest `fwd_cnt`. Returns whether its view of our free space is now at
    /// least half (so no separate CREDIT_UPDATE is owed).
    pub fn told(&mut self, fwd_cnt: u32) -> bool {
        self.told = Wrapping(fwd_cnt);
        (self.rx_cnt - self.told).0 <= self.buf_alloc / 2
    }
}

/// Host → guest: the guest is the receiver; we never send beyond its credit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outbound {
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out since the credit was last above zero.
    requested: bool,
}

impl Outbound {
    /// Takes the guest's credit from any of its packets.
    pub fn update(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.credit() > 0 {
            self.requested = false;
        }
    }

    /// The guest's receive buffer, as it last said.
    pub fn peer_buf_alloc(&self) -> u32 {
        self.peer_buf_alloc
    }

    /// Bytes we may still send: `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, never below 0.
    pub fn credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// `n` bytes went to the guest.
    pub fn sent(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// At zero credit: whether to ask the guest for credit (once until it has some again).
    pub fn ask(&mut self) -> bool {
        !std::mem::replace(&mut self.requested, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_counts_what_reached_the_host_and_when_to_tell() {
        let mut c = Inbound::new(100);
        assert!(c.fits(100) && !c.fits(101));
        c.received(80);
        assert!(c.fits(20) && !c.fits(21));
        assert!(
            c.forwarded(30),
            "the guest believes 80 of 100 used: tell it"
        );
        assert!(
            c.told(c.fwd_cnt()),
            "now it believes 50 of 100 used: half free"
        );
        assert!(c.forwarded(50) || c.told(c.fwd_cnt()));
        assert!(c.fits(100));
        assert_eq!(c.fwd_cnt(), 80);
    }

    #[test]
    fn outbound_credit_wraps_and_asks_once() {
        let mut c = Outbound::default();
        c.update(10, u32::MAX - 4);
        c.tx_cnt = Wrapping(u32::MAX - 4);
        c.sent(10);
        assert_eq!(c.credit(), 0, "10 in flight across the wrap");
        assert!(c.ask());
        assert!(!c.ask(), "once");
        c.update(10, 5);
        assert_eq!(c.credit(), 10);
        assert!(c.ask(), "asked again once credit came and went");
    }
}
