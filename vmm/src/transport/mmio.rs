//! The virtio-mmio register file.
//!
//! One [`MmioTransport`] per device window. vCPU threads call [`MmioTransport::read`] and
//! [`MmioTransport::write`] on MMIO exits (under a mutex); QueueNotify never gets here when the
//! VM registered [`MmioTransport::kicks`] as ioeventfds, and interrupts go straight from the
//! device thread to KVM through [`MmioInterrupt`].

use std::sync::Arc;

use log::{debug, error, info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vsock_router::device::virtio::{
    ActivateContext, GuestMemory, Interrupt, InterruptKind, VirtioDevice,
};

use super::interrupt::MmioInterrupt;
use super::registers::*;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device declared a queue size virtio-queue rejects (zero, not a power of two, > 32768).
    #[error("queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The size the device declared.
        size: u16,
    },
    /// The device declared no queues.
    #[error("the device has no queues")]
    NoQueues,
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The driver-written registers of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegisters {
    /// QueueNum (a value above `u16::MAX` reads as `u16::MAX`, which is never a valid size).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDescLow/High.
    pub desc: u64,
    /// QueueDriverLow/High (available ring).
    pub driver: u64,
    /// QueueDeviceLow/High (used ring).
    pub device: u64,
}

/// A virtio-mmio transport around one device.
pub struct MmioTransport {
    pub(super) device: Option<Box<dyn VirtioDevice>>,
    pub(super) device_type: u32,
    pub(super) max_sizes: Vec<u16>,
    avail_features: u64,
    mem: GuestMemory,
    pub(super) interrupt: Arc<MmioInterrupt>,
    kicks: Vec<EventFd>,
    pub(super) queues: Vec<QueueRegisters>,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) status: u32,
    pub(super) activated: bool,
    notify_exits: u64,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("queues", &self.queues)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; creates one kick eventfd per queue and an irqfd-backed interrupt.
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>) -> Result<Self, TransportError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() {
            return Err(TransportError::NoQueues);
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(TransportError::QueueSize { index, size });
            }
        }
        let kicks = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        Ok(MmioTransport {
            device_type: device.device_type(),
            avail_features: device.avail_features(),
            queues: vec![QueueRegisters::default(); max_sizes.len()],
            max_sizes,
            device: Some(device),
            mem,
            interrupt: Arc::new(MmioInterrupt::new(irqfd)),
            kicks,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            notify_exits: 0,
        })
    }

    /// One kick eventfd per queue. The VM registers kick `i` as a KVM ioeventfd on
    /// `base + 0x50` (QueueNotify), 4 bytes, datamatch `i`.
    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    /// The interrupt; its [`MmioInterrupt::irqfd`] is registered with KVM on the device GSI.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is running.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The registers of queue `index`.
    pub fn queue_registers(&self, index: usize) -> Option<QueueRegisters> {
        self.queues.get(index).copied()
    }

    /// QueueNotify writes that reached userspace (an MMIO exit) instead of an ioeventfd. With
    /// the ioeventfds registered this stays 0.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits
    }

    /// Handles a driver read of `data.len()` bytes at `offset` in the device window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= REG_CONFIG {
            if let Some(device) = &self.device {
                device.read_config(offset - REG_CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn!(
                "virtio-mmio: ignoring {}-byte read at {offset:#x}",
                data.len()
            );
            return;
        }
        let value = match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .max_sizes
                .get(self.queue_sel as usize)
                .map_or(0, |&s| u32::from(s)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a driver write of `data` at `offset` in the device window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if let Some(device) = &mut self.device {
                device.write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn!(
                "virtio-mmio: ignoring {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                self.update_queue(|q| q.size = u16::try_from(value).unwrap_or(u16::MAX))
            }
            REG_QUEUE_READY => self.update_queue(|q| q.ready = value == 1),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| set_low(&mut q.desc, value)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| set_high(&mut q.desc, value)),
            REG_QUEUE_DRIVER_LOW => self.update_queue(|q| set_low(&mut q.driver, value)),
            REG_QUEUE_DRIVER_HIGH => self.update_queue(|q| set_high(&mut q.driver, value)),
            REG_QUEUE_DEVICE_LOW => self.update_queue(|q| set_low(&mut q.device, value)),
            REG_QUEUE_DEVICE_HIGH => self.update_queue(|q| set_high(&mut q.device, value)),
            REG_QUEUE_NOTIFY => self.notify_from_exit(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    /// Stops the device for VMM teardown: resets it if running, then drops it (a device removes
    /// its host-side resources, e.g. listening sockets, in `reset` or `Drop`). Later register
    /// accesses read zeros.
    pub fn shutdown(&mut self) {
        if let Some(mut device) = self.device.take() {
            if self.activated {
                device.reset();
                self.activated = false;
            }
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(self.queue_sel as usize)
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut QueueRegisters)) {
        // The driver may only set up queues between FEATURES_OK and DRIVER_OK.
        if self.activated || self.status & STATUS_FEATURES_OK == 0 {
            warn!(
                "virtio-mmio: queue register write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.queues.get_mut(self.queue_sel as usize) {
            Some(q) => f(q),
            None => warn!("virtio-mmio: write to nonexistent queue {}", self.queue_sel),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            warn!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            sel => warn!("virtio-mmio: DriverFeatures write with selector {sel} ignored"),
        }
    }

    fn notify_from_exit(&mut self, queue: u32) {
        // Only reached if the ioeventfd is not registered; keep the device working anyway.
        self.notify_exits += 1;
        match self.kicks.get(queue as usize) {
            Some(kick) => {
                if let Err(e) = kick.write(1) {
                    error!("virtio-mmio: cannot signal queue {queue}: {e}");
                }
            }
            None => warn!("virtio-mmio: notify of nonexistent queue {queue}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            warn!(
                "virtio-mmio: status {:#x} -> {value:#x} clears bits without a reset; ignored",
                self.status
            );
            return;
        }
        let added = value & !self.status;
        let mut new = value;
        if added & STATUS_FEATURES_OK != 0 && !self.negotiate_features() {
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 {
                warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
                new &= !STATUS_DRIVER_OK;
            } else if !self.activate() {
                new |= STATUS_DEVICE_NEEDS_RESET;
            }
        }
        self.status = new;
        if new & STATUS_DEVICE_NEEDS_RESET != 0 && added & STATUS_DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(InterruptKind::ConfigChange) {
                error!("virtio-mmio: cannot signal DEVICE_NEEDS_RESET: {e}");
            }
        }
    }

    fn negotiate_features(&mut self) -> bool {
        if self.status & STATUS_DRIVER == 0 {
            warn!("virtio-mmio: FEATURES_OK before DRIVER");
            return false;
        }
        let Some(device) = &mut self.device else {
            return false;
        };
        match device.ack_features(self.driver_features) {
            Ok(()) => true,
            Err(e) => {
                warn!("virtio-mmio: feature negotiation failed: {e}");
                false
            }
        }
    }

    fn activate(&mut self) -> bool {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, (regs, &max)) in self.queues.iter().zip(&self.max_sizes).enumerate() {
            match build_queue(regs, max, event_idx) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    error!("virtio-mmio: queue {index}: {e}");
                    return false;
                }
            }
        }
        match self.activate_with(queues) {
            Ok(()) => true,
            Err(e) => {
                error!("virtio-mmio: {e}");
                false
            }
        }
    }

    /// Starts the device on `queues` (built from the registers, or restored with their ring
    /// positions) with the transport's kicks and interrupt.
    pub(super) fn activate_with(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        let Some(device) = &mut self.device else {
            return Err("the device is gone".into());
        };
        let kicks = self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot clone kick eventfds: {e}"))?;
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            kicks,
            interrupt,
        };
        device
            .activate(ctx)
            .map_err(|e| format!("device activation failed: {e}"))?;
        // Logged: a guest fault after this line may involve the device, one before it cannot.
        info!(
            "virtio-mmio: device type {} activated (driver features {:#x})",
            self.device_type, self.driver_features
        );
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            if let Some(device) = &mut self.device {
                if !device.reset() {
                    warn!("virtio-mmio: device cannot be activated again after reset");
                }
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueRegisters::default();
        }
        for kick in &self.kicks {
            // Drop kicks left over from before the reset; EAGAIN (nothing pending) is fine.
            let _ = kick.read();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

/// Builds the queue the driver configured, or says which register holds a value the queue
/// cannot take. virtio-queue's plain setters would log such a value and keep their default
/// instead (size = maximum, ring addresses = 0), so the device would run on rings the driver
/// never set up and write used elements at guest address 0.
fn build_queue(regs: &QueueRegisters, max: u16, event_idx: bool) -> Result<Queue, String> {
    // `max` was validated in `MmioTransport::new`.
    let mut queue = Queue::new(max).expect("queue size validated at construction");
    if regs.size != 0 {
        queue
            .try_set_size(regs.size)
            .map_err(|e| format!("QueueNum {} (QueueNumMax {max}): {e}", regs.size))?;
    }
    queue
        .try_set_desc_table_address(GuestAddress(regs.desc))
        .map_err(|e| format!("QueueDesc {:#x}: {e}", regs.desc))?;
    queue
        .try_set_avail_ring_address(GuestAddress(regs.driver))
        .map_err(|e| format!("QueueDriver {:#x}: {e}", regs.driver))?;
    queue
        .try_set_used_ring_address(GuestAddress(regs.device))
        .map_err(|e| format!("QueueDevice {:#x}: {e}", regs.device))?;
    queue.set_event_idx(event_idx);
    queue.set_ready(regs.ready);
    Ok(queue)
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::device::{DeviceLog, RecordingDevice};
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport() -> (MmioTransport, Arc<DeviceLog>) {
        let dev = RecordingDevice::new(&[256, 256, 64]);
        let log = dev.log();
        (MmioTransport::new(mem(), Box::new(dev)).unwrap(), log)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queues(t: &mut MmioTransport) {
        for q in 0..3u32 {
            let base = 0x1000 * (q + 1) * 4;
            w(t, REG_QUEUE_SEL, q);
            w(t, REG_QUEUE_NUM, 64);
            w(t, REG_QUEUE_DESC_LOW, base);
            w(t, REG_QUEUE_DESC_HIGH, 0);
            w(t, REG_QUEUE_DRIVER_LOW, base + 0x1000);
            w(t, REG_QUEUE_DEVICE_LOW, base + 0x2000);
            w(t, REG_QUEUE_READY, 1);
        }
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 19);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn device_features_by_selector() {
        let (mut t, _) = transport();
        // RecordingDevice offers VERSION_1 | EVENT_IDX | bit 0.
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (1 << 29) | 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn feature_handshake_passes_all_64_bits() {
        let (mut t, log) = transport();
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, (1 << 29) | 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS), 0xb);
        assert_eq!(log.acked(), Some((1 << 32) | (1 << 29) | 1));
    }

    #[test]
    fn refused_features_leave_features_ok_clear() {
        let (mut t, log) = transport();
        w(&mut t, REG_STATUS, 1);
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_DRIVER_FEATURES, 1); // no VERSION_1
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS), 3);
        assert_eq!(log.acked(), None);
        // DRIVER_OK cannot follow a failed negotiation.
        w(&mut t, REG_STATUS, 7);
        assert_eq!(r(&mut t, REG_STATUS), 3);
        assert_eq!(log.activations(), 0);
    }

    #[test]
    fn driver_features_ignored_before_driver_and_after_features_ok() {
        let (mut t, log) = transport();
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1); // before DRIVER: ignored
        w(&mut t, REG_STATUS, 1);
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_STATUS, 0xb);
        assert_eq!(r(&mut t, REG_STATUS), 3, "VERSION_1 write was ignored");
        negotiate(&mut t);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 29); // after FEATURES_OK: ignored
        assert_eq!(log.acked(), Some(1 << 32));
    }

    #[test]
    fn queue_setup_and_activation() {
        let (mut t, log) = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 64);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        setup_queues(&mut t);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x1);
        assert_eq!(
            t.queue_registers(1).unwrap(),
            QueueRegisters {
                size: 64,
                ready: true,
                desc: 0x1_0000_8000,
                driver: 0x9000,
                device: 0xa000,
            }
        );
        w(&mut t, REG_QUEUE_DESC_HIGH, 0);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);
        assert!(t.is_activated());
        let act = log.last_activation().unwrap();
        assert_eq!(act.queues.len(), 3);
        assert_eq!(act.kicks, 3);
        assert_eq!(act.queues[1], (64, true, 0x8000, 0x9000, 0xa000, false));
        // Queue registers are frozen while the device runs.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.queue_registers(0).unwrap().size, 64);
    }

    #[test]
    fn event_idx_follows_negotiation() {
        let (mut t, log) = transport();
        w(&mut t, REG_STATUS, 1);
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_DRIVER_FEATURES, 1 << 29);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 0xb);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        assert!(log.last_activation().unwrap().queues.iter().all(|q| q.5));
    }

    #[test]
    fn queue_registers_need_features_ok() {
        let (mut t, _) = transport();
        w(&mut t, REG_STATUS, 1);
        w(&mut t, REG_QUEUE_NUM, 16);
        assert_eq!(t.queue_registers(0).unwrap().size, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_config_interrupt() {
        let dev = RecordingDevice::new(&[256, 256, 64]).failing_activation();
        let log = dev.log();
        let mut t = MmioTransport::new(mem(), Box::new(dev)).unwrap();
        negotiate(&mut t);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        assert!(!t.is_activated());
        assert_eq!(log.activations(), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 1);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 1);
    }

    /// Regression: virtio-queue's setters silently kept their defaults for these values, and
    /// the device was activated on a queue at guest address 0 or of the maximum size.
    #[test]
    fn invalid_queue_registers_refuse_activation() {
        let cases = [
            (REG_QUEUE_NUM, 24),            // not a power of two
            (REG_QUEUE_NUM, 512),           // above QueueNumMax
            (REG_QUEUE_NUM, 0x1_0040),      // above u16::MAX (its low bits would be 64)
            (REG_QUEUE_DESC_LOW, 0x8008),   // descriptor table not 16-byte aligned
            (REG_QUEUE_DRIVER_LOW, 0x9001), // avail ring not 2-byte aligned
            (REG_QUEUE_DEVICE_LOW, 0xa002), // used ring not 4-byte aligned
        ];
        for (reg, value) in cases {
            let (mut t, log) = transport();
            negotiate(&mut t);
            setup_queues(&mut t);
            w(&mut t, REG_QUEUE_SEL, 1);
            w(&mut t, reg, value);
            w(&mut t, REG_STATUS, ALL_OK);
            assert_eq!(
                r(&mut t, REG_STATUS),
                ALL_OK | STATUS_DEVICE_NEEDS_RESET,
                "register {reg:#x} = {value:#x}"
            );
            assert!(!t.is_activated());
            assert_eq!(log.activations(), 0, "the device never saw the queue");
            assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        }
    }

    #[test]
    fn status_cannot_clear_bits_without_reset() {
        let (mut t, _) = transport();
        negotiate(&mut t);
        w(&mut t, REG_STATUS, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0xb);
        w(&mut t, REG_STATUS, 0xb | STATUS_FAILED);
        assert_eq!(r(&mut t, REG_STATUS), 0xb | STATUS_FAILED);
    }

    #[test]
    fn config_space_reads_and_writes() {
        let (mut t, log) = transport();
        let mut b4 = [0u8; 4];
        t.read(REG_CONFIG, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 3, "guest_cid low word");
        let mut b8 = [0u8; 8];
        t.read(REG_CONFIG, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 3);
        t.read(REG_CONFIG + 4, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.read(REG_CONFIG + 8, &mut b4);
        assert_eq!(b4, [0; 4], "outside config space reads zero");
        t.write(REG_CONFIG + 2, &[9, 9]);
        assert_eq!(log.config_writes(), vec![(2, vec![9, 9])]);
    }

    #[test]
    fn interrupt_status_ack_and_generation() {
        let (mut t, _) = transport();
        let int = t.interrupt().clone();
        int.trigger(InterruptKind::UsedRing).unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        int.trigger(InterruptKind::ConfigChange).unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 3);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 2);
        w(&mut t, REG_INTERRUPT_ACK, 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(t.interrupt().irqfd().read().unwrap(), 2);
    }

    #[test]
    fn notify_exit_signals_the_kick() {
        let (mut t, _) = transport();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.notify_exits(), 1);
        assert_eq!(t.kicks()[1].read().unwrap(), 1);
        assert!(t.kicks()[0].read().is_err(), "queue 0 not kicked");
        w(&mut t, REG_QUEUE_NOTIFY, 9); // nonexistent queue: ignored
        assert_eq!(t.notify_exits(), 2);
    }

    #[test]
    fn reset_stops_device_and_clears_registers() {
        let (mut t, log) = transport();
        negotiate(&mut t);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        t.interrupt().trigger(InterruptKind::UsedRing).unwrap();
        t.kicks()[0].write(1).unwrap();
        w(&mut t, REG_STATUS, 0);
        assert_eq!(log.resets(), 1);
        assert!(!t.is_activated());
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(t.queue_registers(0).unwrap(), QueueRegisters::default());
        assert!(t.kicks()[0].read().is_err(), "stale kick drained");
        // And it can be brought up again.
        negotiate(&mut t);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(log.activations(), 2);
        assert!(t.is_activated());
    }

    #[test]
    fn reset_before_activation_does_not_reset_device() {
        let (mut t, log) = transport();
        negotiate(&mut t);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(log.resets(), 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn shutdown_resets_running_device_and_drops_it() {
        let (mut t, log) = transport();
        negotiate(&mut t);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        t.shutdown();
        assert_eq!(log.resets(), 1);
        assert!(log.dropped());
        let mut b = [0xffu8; 4];
        t.read(REG_CONFIG, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn odd_sized_register_access_is_ignored() {
        let (mut t, _) = transport();
        let mut b2 = [0xffu8; 2];
        t.read(REG_MAGIC_VALUE, &mut b2);
        assert_eq!(b2, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        let mut b = [0u8; 4];
        t.read(REG_MAGIC_VALUE + 2, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn invalid_queue_sizes_are_rejected() {
        let err =
            MmioTransport::new(mem(), Box::new(RecordingDevice::new(&[256, 100]))).unwrap_err();
        assert!(matches!(
            err,
            TransportError::QueueSize {
                index: 1,
                size: 100
            }
        ));
        let err = MmioTransport::new(mem(), Box::new(RecordingDevice::new(&[]))).unwrap_err();
        assert!(matches!(err, TransportError::NoQueues));
    }

    #[test]
    fn saved_registers_restore_into_a_fresh_transport() {
        let (mut t, _) = transport();
        negotiate(&mut t);
        setup_queues(&mut t);
        w(&mut t, REG_STATUS, ALL_OK);
        t.interrupt().trigger(InterruptKind::ConfigChange).unwrap();
        let saved = t.save_state();
        assert!(saved.activated);
        assert_eq!(saved.interrupt_status, INT_CONFIG_CHANGE);
        assert_eq!(saved.config_generation, 1);
        let queues = || {
            saved
                .queues
                .iter()
                .zip([256, 256, 64])
                .map(|(r, max)| build_queue(r, max, false).unwrap())
                .collect::<Vec<_>>()
        };

        let (mut fresh, log) = transport();
        fresh.restore_state(&saved, Some(queues())).unwrap();
        assert!(fresh.is_activated());
        assert_eq!(r(&mut fresh, REG_STATUS), ALL_OK);
        assert_eq!(r(&mut fresh, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(r(&mut fresh, REG_CONFIG_GENERATION), 1);
        assert_eq!(fresh.save_state(), saved);
        let act = log.last_activation().unwrap();
        assert_eq!(act.queues[1], (64, true, 0x8000, 0x9000, 0xa000, false));
        assert_eq!(
            log.interrupt()
                .unwrap()
                .trigger(InterruptKind::UsedRing)
                .ok(),
            Some(())
        );

        // What does not fit is refused, naming it; the fresh transport stays unused.
        let refused = |state: &super::super::MmioState, queues: Option<Vec<Queue>>| {
            let (mut fresh, log) = transport();
            let e = fresh.restore_state(state, queues).unwrap_err().to_string();
            assert!(!fresh.is_activated() && log.activations() == 0, "{e}");
            e
        };
        assert!(refused(&saved, None).contains("without its state"));
        let mut moved = queues();
        moved[2].set_desc_table_address(Some(0x7000), None);
        assert!(refused(&saved, Some(moved)).contains("queue 2"));
        let mut other = saved.clone();
        other.device_type = 1;
        assert!(refused(&other, Some(queues())).contains("device type 1"));
        let mut other = saved.clone();
        other.status |= 0x100;
        assert!(refused(&other, Some(queues())).contains("Status bits"));
        let mut other = saved.clone();
        other.activated = false;
        assert!(refused(&other, None).contains("does not fit Status"));
        let mut other = saved.clone();
        other.queues.pop();
        assert!(refused(&other, Some(queues())).contains("2 queues saved"));

        // Saved before DRIVER_OK: the registers come back and the features are acked again.
        let (mut t, _) = transport();
        negotiate(&mut t);
        setup_queues(&mut t);
        let saved = t.save_state();
        let (mut fresh, log) = transport();
        fresh.restore_state(&saved, None).unwrap();
        assert!(!fresh.is_activated());
        assert_eq!(log.acked(), Some(1 << 32));
        w(&mut fresh, REG_STATUS, ALL_OK);
        assert!(fresh.is_activated());
        assert_eq!(
            log.last_activation().unwrap().queues[0],
            (64, true, 0x4000, 0x5000, 0x6000, false)
        );
    }
}
