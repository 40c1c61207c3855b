//! The virtio-mmio [`Interrupt`]: InterruptStatus bits plus a KVM irqfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;
use vsock_router::device::virtio::{Interrupt, InterruptKind};

use super::registers::{INT_CONFIG_CHANGE, INT_USED_RING};

/// Shared between the transport (which reads and acknowledges InterruptStatus on vCPU threads)
/// and the device (which raises interrupts from its own thread).
///
/// `trigger` sets the InterruptStatus bit first and then writes the irqfd, so a driver woken by
/// the interrupt always sees the bit. A configuration change also bumps ConfigGeneration.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// An interrupt that signals `irqfd` (registered with KVM as an irqfd on the device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus and ConfigGeneration to saved values (a restored VM), without
    /// signalling: whether the line was raised is the saved irqchip's state.
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// The irqfd, for registration with KVM.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

impl Interrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::UsedRing => INT_USED_RING,
            InterruptKind::ConfigChange => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                INT_CONFIG_CHANGE
            }
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn trigger_sets_bit_then_signals() {
        let int = MmioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        int.trigger(InterruptKind::UsedRing).unwrap();
        assert_eq!(int.status(), INT_USED_RING);
        assert_eq!(int.irqfd().read().unwrap(), 1);
        assert_eq!(int.config_generation(), 0);
        int.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(int.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(int.config_generation(), 1);
        int.ack(INT_USED_RING);
        assert_eq!(int.status(), INT_CONFIG_CHANGE);
        int.clear();
        assert_eq!(int.status(), 0);
    }
}
