//! The simulated guest across a device's pause, save and restore: an activation context for a
//! restored device over the same guest (memory, kick fds, interrupt fd), the event queue as
//! Linux's driver serves it (`virtio_transport_event_work`: read each used event, handle it,
//! post the buffer again, kick), and a digest of guest memory to prove a paused device wrote
//! nothing.

use std::sync::Arc;

use std::hash::{DefaultHasher, Hasher};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::{Buf, SimGuest, MEM_SIZE};
use crate::device::lifecycle::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET;
use crate::device::virtio::{ActivateContext, EventFdInterrupt};

impl SimGuest {
    /// What a transport hands a device restored for this guest: the same memory, kick fds and
    /// interrupt, and `queues` (from [`VsockDevice::restore`](crate::device::VsockDevice::restore)).
    pub fn restore_context(&self, queues: Vec<Queue>) -> ActivateContext {
        ActivateContext {
            mem: self.mem.clone(),
            queues,
            kicks: self
                .kicks
                .iter()
                .map(|k| k.try_clone().expect("dup of a kick eventfd"))
                .collect(),
            interrupt: Arc::new(EventFdInterrupt(
                self.irq.try_clone().expect("dup of the interrupt eventfd"),
            )),
        }
    }

    /// Serves the event queue as Linux does: every used event buffer is read (its id, or `None`
    /// when the used length is not 4, which Linux ignores), handled — TRANSPORT_RESET resets
    /// every socket ([`SimGuest::transport_reset`]) — and posted again, then the queue is
    /// kicked. Returns the events read, oldest first.
    pub fn take_events(&mut self) -> Vec<Option<u32>> {
        let mut events = Vec::new();
        while let Some((head, len)) = self.evq.pop_used(&self.mem) {
            let desc = self.evq.desc.unchecked_add(16 * u64::from(head));
            let addr: u64 = self.mem.read_obj(desc).expect("descriptor in memory");
            let id = (len == 4).then(|| {
                self.mem
                    .read_obj::<u32>(GuestAddress(addr))
                    .expect("event buffer in memory")
            });
            if id == Some(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
                self.transport_reset();
            }
            events.push(id);
            let b = Buf {
                addr: GuestAddress(addr),
                len: 4,
                write: true,
            };
            self.evq.add(&self.mem, &[b]);
        }
        if !events.is_empty() {
            self.kick(2);
        }
        events
    }

    /// What Linux does on TRANSPORT_RESET (`virtio_vsock_reset_sock` for every connected
    /// socket): every socket is reset and forgotten, its port free. Returns how many there
    /// were.
    pub fn transport_reset(&mut self) -> usize {
        let n = self.socks.len();
        self.socks.clear();
        self.accepted.clear();
        n
    }

    /// A digest (SipHash, to tell two states apart, not to resist an adversary) of the whole
    /// guest memory.
    pub fn memory_digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < MEM_SIZE {
            self.mem
                .read_slice(&mut chunk, GuestAddress(at))
                .expect("inside guest memory");
            h.write(&chunk);
            at += chunk.len() as u64;
        }
        h.finish()
    }

    /// Reads away every kick the device has not seen yet, as if they were lost between the
    /// save and the restore (the restored device must look at its queues without them).
    pub fn lose_kicks(&self) {
        for k in &self.kicks {
            let _ = k.read();
        }
    }
}
