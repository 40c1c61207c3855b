//! A [`VirtioDevice`] that records every call, for transport tests.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;
use vsock_router::device::virtio::{
    ActivateContext, ActivateError, FeatureError, Interrupt, VirtioDevice,
};

/// The feature bits a [`RecordingDevice`] offers: VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
/// and bit 0 (VIRTIO_VSOCK_F_STREAM).
pub const RECORDING_FEATURES: u64 = (1 << 32) | (1 << 29) | 1;

/// A queue as handed over on activation: (size, ready, desc, avail, used, event_idx).
pub type QueueSummary = (u16, bool, u64, u64, u64, bool);

/// What one `activate` call received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The queues.
    pub queues: Vec<QueueSummary>,
    /// How many kick fds.
    pub kicks: usize,
}

/// Called on `activate` with the full context (to keep kicks or the interrupt for a test).
pub type ActivateHook = Box<dyn FnMut(&ActivateContext) + Send>;

#[derive(Default)]
struct Inner {
    acked: Option<u64>,
    activations: Vec<Activation>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    dropped: bool,
    kicks: Vec<EventFd>,
    interrupt: Option<Arc<dyn Interrupt>>,
}

/// The record a [`RecordingDevice`] keeps; shared with the test.
#[derive(Default)]
pub struct DeviceLog(Mutex<Inner>);

impl DeviceLog {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The features passed to the last successful `ack_features`.
    pub fn acked(&self) -> Option<u64> {
        self.lock().acked
    }

    /// How many times `activate` was called.
    pub fn activations(&self) -> usize {
        self.lock().activations.len()
    }

    /// The last `activate` call.
    pub fn last_activation(&self) -> Option<Activation> {
        self.lock().activations.last().cloned()
    }

    /// How many times `reset` was called.
    pub fn resets(&self) -> usize {
        self.lock().resets
    }

    /// Every config space write: (offset, bytes).
    pub fn config_writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.lock().config_writes.clone()
    }

    /// Whether the device was dropped.
    pub fn dropped(&self) -> bool {
        self.lock().dropped
    }

    /// Clones of the kick fds of the running activation.
    pub fn kicks(&self) -> Vec<EventFd> {
        self.lock()
            .kicks
            .iter()
            .map(|k| k.try_clone().expect("clone kick eventfd"))
            .collect()
    }

    /// The interrupt of the running activation.
    pub fn interrupt(&self) -> Option<Arc<dyn Interrupt>> {
        self.lock().interrupt.clone()
    }
}

/// A virtio device (type 19, vsock) whose config space is an 8-byte guest CID of 3 and that
/// records what the transport does to it.
pub struct RecordingDevice {
    max_sizes: Vec<u16>,
    acked: u64,
    active: bool,
    fail_activation: bool,
    hook: Option<ActivateHook>,
    log: Arc<DeviceLog>,
}

impl RecordingDevice {
    /// A device with the given queue sizes.
    pub fn new(max_sizes: &[u16]) -> Self {
        RecordingDevice {
            max_sizes: max_sizes.to_vec(),
            acked: 0,
            active: false,
            fail_activation: false,
            hook: None,
            log: Arc::default(),
        }
    }

    /// Makes every `activate` fail (after recording it).
    pub fn failing_activation(mut self) -> Self {
        self.fail_activation = true;
        self
    }

    /// Calls `hook` on every `activate`.
    pub fn with_activate_hook(mut self, hook: ActivateHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The shared record.
    pub fn log(&self) -> Arc<DeviceLog> {
        self.log.clone()
    }
}

impl Drop for RecordingDevice {
    fn drop(&mut self) {
        self.log.lock().dropped = true;
    }
}

impl VirtioDevice for RecordingDevice {
    fn device_type(&self) -> u32 {
        19
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn avail_features(&self) -> u64 {
        RECORDING_FEATURES
    }

    fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        let unoffered = features & !RECORDING_FEATURES;
        if unoffered != 0 {
            return Err(FeatureError::Unoffered(unoffered));
        }
        if features & (1 << 32) == 0 {
            return Err(FeatureError::NoVersion1);
        }
        self.acked = features;
        self.log.lock().acked = Some(features);
        Ok(())
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = 3u64.to_le_bytes();
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = start
            .checked_add(data.len())
            .and_then(|end| config.get(start..end))
        {
            data.copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.lock().config_writes.push((offset, data.to_vec()));
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active {
            return Err(ActivateError::AlreadyActive);
        }
        let activation = Activation {
            queues: ctx
                .queues
                .iter()
                .map(|q| {
                    (
                        q.size(),
                        q.ready(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                        q.event_idx_enabled(),
                    )
                })
                .collect(),
            kicks: ctx.kicks.len(),
        };
        self.log.lock().activations.push(activation);
        if self.fail_activation {
            return Err(ActivateError::Worker(std::io::Error::other(
                "activation refused by the test device",
            )));
        }
        if let Some(hook) = &mut self.hook {
            hook(&ctx);
        }
        let mut log = self.log.lock();
        log.kicks = ctx.kicks;
        log.interrupt = Some(ctx.interrupt);
        drop(log);
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let mut log = self.log.lock();
        log.resets += 1;
        log.kicks.clear();
        log.interrupt = None;
        self.active = false;
        true
    }
}
