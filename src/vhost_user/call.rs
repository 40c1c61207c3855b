//! Interrupts of a vhost-user device: each queue's call fd, as the frontend set it last.

use std::io;

use vhost_user_backend::{VringRwLock, VringT};

use crate::device::virtio::{Interrupt, InterruptKind};

/// Signals the call fd of each queue named; the fds are looked up at every signal, because a
/// frontend may replace them while the device runs (QEMU does when it masks a vector).
pub(super) struct CallFds {
    pub(super) vrings: Vec<VringRwLock>,
}

impl Interrupt for CallFds {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::UsedRing => self.signal_used(0b11),
            // The config space (the CID) never changes while a frontend is connected.
            InterruptKind::ConfigChange => Ok(()),
        }
    }

    fn signal_used(&self, queues: u32) -> io::Result<()> {
        for (i, vring) in self.vrings.iter().enumerate() {
            if queues & (1 << i) != 0 {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}
