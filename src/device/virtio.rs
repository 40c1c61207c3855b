//! The transport-facing contract of a virtio device.
//!
//! A VMM's transport (virtio-mmio in `vsock-vmm`, virtio-pci elsewhere) owns the register file
//! and drives a [`VirtioDevice`] through these calls, in this order:
//!
//! 1. Discovery: [`VirtioDevice::device_type`], [`VirtioDevice::queue_max_sizes`] and
//!    [`VirtioDevice::avail_features`] fill the DeviceID, QueueNumMax and DeviceFeatures registers.
//! 2. Feature negotiation: when the driver sets FEATURES_OK, the transport passes the full 64-bit
//!    DriverFeatures value to [`VirtioDevice::ack_features`]. It returns an error when the driver
//!    asked for a feature that was not offered or left out a required one (VIRTIO_F_VERSION_1);
//!    the transport must then leave FEATURES_OK clear so the driver sees the failure.
//! 3. Config space: reads and writes of the device-specific configuration (offset 0x100 in
//!    virtio-mmio) go to [`VirtioDevice::read_config`] / [`VirtioDevice::write_config`].
//! 4. Activation: when the driver sets DRIVER_OK, the transport builds one
//!    [`virtio_queue::Queue`] per queue from the QueueDesc/QueueAvail/QueueUsed/QueueNum/QueueReady
//!    registers, one kick [`EventFd`] per queue (a KVM ioeventfd on QueueNotify with
//!    datamatch = queue index, or written by the transport itself) and an [`Interrupt`]
//!    signaller, and calls [`VirtioDevice::activate`]. From then on the device runs on its own
//!    and touches the transport only through the interrupt signaller.
//!    A transport whose driver leaves the event queue unset (QEMU's vhost-user-vsock keeps the
//!    event queue for itself) passes it not ready; the device then never writes events.
//! 5. Reset: when the driver writes 0 to Status, the transport calls [`VirtioDevice::reset`] and
//!    forgets its queue registers. A device that returns `true` can be activated again.

use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use crate::vq::GuestMemory;

/// Why an interrupt is raised; selects the bit the transport sets in InterruptStatus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device placed buffers in a used ring (virtio-mmio InterruptStatus bit 0).
    UsedRing,
    /// The configuration space changed (virtio-mmio InterruptStatus bit 1).
    ConfigChange,
}

/// How the device signals the driver. Implemented by the transport.
///
/// The production implementation in `vsock-vmm` sets the InterruptStatus bit and writes an
/// [`EventFd`] registered with KVM as an irqfd, so raising an interrupt costs one `write(2)` on
/// the device thread and no exit to the VMM. The device calls it at most once per batch of work
/// and only when the driver asked for it (EVENT_IDX / `VRING_AVAIL_F_NO_INTERRUPT`).
pub trait Interrupt: Send + Sync {
    /// Raises an interrupt of the given kind.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;

    /// Tells the driver that the queues whose bits are set in `queues` (bit `i`: queue `i`) have
    /// new used buffers. A transport with one interrupt line for all queues (virtio-mmio, the
    /// default) raises one [`InterruptKind::UsedRing`]; one with a notifier per queue
    /// (vhost-user's call fds, MSI-X vectors) signals each queue named.
    fn signal_used(&self, queues: u32) -> io::Result<()> {
        let _ = queues;
        self.trigger(InterruptKind::UsedRing)
    }
}

/// An [`Interrupt`] that writes an [`EventFd`]; with KVM the fd is registered as an irqfd.
///
/// It does not track InterruptStatus; a transport that needs the status register wraps it.
#[derive(Debug)]
pub struct EventFdInterrupt(pub EventFd);

impl Interrupt for EventFdInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Everything a device needs to start running, handed over by the transport on DRIVER_OK.
pub struct ActivateContext {
    /// The guest's memory.
    pub mem: GuestMemory,
    /// One configured queue per queue index, in order (for vsock: rx, tx, event).
    pub queues: Vec<Queue>,
    /// One kick fd per queue, in the same order, signalled when the driver notifies that queue.
    /// Empty when the transport watches the kicks itself and hands them on by calling
    /// [`crate::device::core::DeviceCore::kicked`] (vhost-user, whose library reads the kick fds).
    pub kicks: Vec<EventFd>,
    /// How the device raises interrupts.
    pub interrupt: Arc<dyn Interrupt>,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The number of queues or kick fds does not match [`VirtioDevice::queue_max_sizes`].
    #[error("expected {expected} queues and kick fds, got {queues} queues and {kicks} kick fds")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues given.
        queues: usize,
        /// Kick fds given.
        kicks: usize,
    },
    /// A queue is not ready or does not fit in guest memory.
    #[error("queue {0} is not ready or does not fit in guest memory")]
    InvalidQueue(usize),
    /// The device is already running.
    #[error("device is already active")]
    AlreadyActive,
    /// The driver never completed feature negotiation.
    #[error("features were not negotiated (VIRTIO_F_VERSION_1 missing)")]
    FeaturesNotNegotiated,
    /// Starting the device's worker failed.
    #[error("cannot start the device worker: {0}")]
    Worker(#[source] io::Error),
}

/// Why the device refused the driver's features.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeatureError {
    /// The driver acknowledged features the device did not offer.
    #[error("driver acknowledged unoffered features {0:#x}")]
    Unoffered(u64),
    /// The driver did not acknowledge VIRTIO_F_VERSION_1; legacy drivers are not supported.
    #[error("driver did not acknowledge VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// A virtio device as seen by a transport. See the [module documentation](self) for the call order.
pub trait VirtioDevice: Send {
    /// The virtio device ID (19 for vsock).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// Records the driver's feature bits (all 64 of them).
    fn ack_features(&mut self, features: u64) -> Result<(), FeatureError>;

    /// The feature bits the driver acknowledged (0 before [`VirtioDevice::ack_features`]).
    fn acked_features(&self) -> u64;

    /// Reads `data.len()` bytes of the device config space at `offset`. Reads outside the
    /// config space, or of a size the device does not allow, leave `data` zeroed.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to the config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device on the given queues; see [`ActivateContext`].
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops the device and returns it to its pre-activation state. Returns `true` when the
    /// device can be activated again.
    fn reset(&mut self) -> bool;

    /// The device as [`Any`](std::any::Any), for a VMM that pauses, saves and restores the
    /// devices it knows (it downcasts to the concrete type, e.g.
    /// [`VsockDevice`](crate::device::VsockDevice)). `None` (the default): a device that
    /// cannot be paused or saved.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}
