//! The vhost-user-backend library's side of the adapter: what it asks of a backend.

use std::io;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::{VhostUserVsock, CORE_EVENT, NUM_QUEUES};
use crate::seam::Backend;

impl<B: Backend + 'static> VhostUserBackend for VhostUserVsock<B> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.lock().acked = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // MQ: the frontend asks how many queues there are; CONFIG: it reads the CID;
        // RESET_DEVICE: a guest's device reset stops the device (every connection closed).
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        let mut s = self.lock();
        s.stop("the frontend reset the device");
        s.acked = 0;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The device reads EVENT_IDX from the acked features when it starts.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= self.config.len() => self.config[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the vsock config space (the guest CID) is read-only",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let mut s = self.lock();
        let now = (*mem.memory()).clone();
        s.device.with_core(|c| c.set_memory(now));
        s.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let s = self.lock();
        let (consumer, notifier) = s.exit.as_ref()?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.lock()
            .stop(&format!("the frontend stopped ring {queue_index}"));
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut s = self.lock();
        match device_event {
            q if usize::from(q) < NUM_QUEUES => {
                s.try_activate(vrings);
                s.device.with_core(|c| c.kicked(usize::from(q)));
            }
            CORE_EVENT => {}
            other => {
                // Not an error the library should end the worker for.
                log::warn!("vhost-user: event {other} on no fd of ours");
                return Ok(());
            }
        }
        s.run();
        Ok(())
    }
}
