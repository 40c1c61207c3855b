//! The device's lifecycle beyond activate and reset (issue 12): what a save holds
//! ([`VsockState`]), how a restored state is checked before it is used (it comes from a file and
//! is as hostile as guest memory), and the TRANSPORT_RESET event that tells the driver its
//! connections are gone, with the gate that holds RX back until the driver has handled it.
//!
//! `docs/snapshot.md` explains what survives a restore, what is reset and why.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::virtio::Interrupt;
use super::vsock::DeviceConfig;
use crate::csm::muxer::ConnInfo;
use crate::csm::ports::{EPHEMERAL_END, EPHEMERAL_FIRST};
use crate::stats::Counters;
use crate::vq::{Chain, Direction, GuestMemory};
use crate::wire::{op, Cid, Header, SockType};

/// The version of [`VsockState`] this build writes and reads.
pub const STATE_VERSION: u32 = 1;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the id of the one event virtio-vsock defines
/// (`struct virtio_vsock_event { le32 id; }`).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Size of `struct virtio_vsock_event`: Linux handles an event only when the used length is this.
const EVENT_LEN: u32 = 4;

/// Everything a paused device saves ([`super::VsockDevice::save`]); serde makes it a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The guest's CID when saved.
    pub guest_cid: u64,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// The rx, tx and event queues, in that order.
    pub queues: Vec<QueueSnapshot>,
    /// Where the device's port allocator for host-initiated connections searches next.
    pub next_port: u32,
    /// The connections that were live: the guest still believes in them.
    pub connections: Vec<SavedConn>,
    /// Whether a TRANSPORT_RESET was owed or not yet handled by the driver when saved (a
    /// restored device saved again before its driver handled the event): a restore sends it
    /// again, whatever the policy.
    #[serde(default)]
    pub event_owed: bool,
}

/// One queue's configuration and ring positions (virtio-queue's [`QueueState`], with serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The maximum size the device offered.
    pub max_size: u16,
    /// The next avail ring entry the device reads.
    pub next_avail: u16,
    /// The next used ring entry the device writes (the used index it published).
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX was negotiated (the `used_event`/`avail_event` words
    /// themselves live in guest memory, which the VMM saves).
    pub event_idx: bool,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver set the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the avail ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// A connection the guest had when the device was saved: enough to reset it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConn {
    /// The socket type on the wire (1 stream, 2 seqpacket).
    pub sock_type: u16,
    /// The CID the guest talked to.
    pub device_cid: u64,
    /// The port on that side.
    pub device_port: u32,
    /// The guest's port.
    pub guest_port: u32,
}

impl From<&ConnInfo> for SavedConn {
    fn from(c: &ConnInfo) -> Self {
        SavedConn {
            sock_type: c.sock_type.wire(),
            device_cid: c.local_cid,
            device_port: c.local_port,
            guest_port: c.peer_port,
        }
    }
}

/// How a restored device ends the connections the guest still believes in (the host ends of
/// them belonged to the saved device and are gone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetPolicy {
    /// One VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue: the driver resets every socket
    /// and reads the CID again (Firecracker's way). The default.
    #[default]
    TransportReset,
    /// An RST for each saved connection, on the RX queue before anything else; no event unless
    /// the CID changed (which needs one).
    ConnectionRst,
}

/// Why [`super::VsockDevice::save`] or [`super::VsockDevice::resume`] refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    /// Save and resume need a paused device.
    #[error("the device is not paused")]
    NotPaused,
    /// Pause needs a running device.
    #[error("the device is not running")]
    NotRunning,
    /// The device thread failed or panicked while it was told to pause (the device is stopped).
    #[error("the device thread ended while pausing: {0}")]
    Thread(String),
    /// Starting the device again failed.
    #[error("cannot start the device again: {0}")]
    Start(String),
}

/// Why a saved state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state was written by another version.
    #[error("state version {found}, this device reads version {STATE_VERSION}")]
    Version {
        /// The state's version.
        found: u32,
    },
    /// A CID no guest can have.
    #[error("CID {0} cannot be a guest's")]
    Cid(u64),
    /// Feature bits the device does not offer.
    #[error("acked features {0:#x} were never offered")]
    Features(u64),
    /// VIRTIO_F_VERSION_1 is not among the acked features.
    #[error("acked features lack VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// Not three queues.
    #[error("{0} queues, a vsock device has 3")]
    QueueCount(usize),
    /// A queue's maximum size is not the one this device offers.
    #[error("queue {queue}: max size {found}, the device offers {offered}")]
    MaxSize {
        /// The queue index.
        queue: usize,
        /// The state's maximum size.
        found: u16,
        /// The device's.
        offered: u16,
    },
    /// A queue size that is zero, beyond the maximum, or not a power of two.
    #[error("queue {queue}: size {size} is not a power of two in 1..={max}")]
    Size {
        /// The queue index.
        queue: usize,
        /// The state's size.
        size: u16,
        /// The maximum size.
        max: u16,
    },
    /// Ring positions that a paused device cannot have left (it never holds a chain between two
    /// wake-ups, so every chain it took is in the used ring).
    #[error("queue {queue}: next_avail {next_avail} and next_used {next_used} differ")]
    Positions {
        /// The queue index.
        queue: usize,
        /// The state's next avail entry.
        next_avail: u16,
        /// The state's next used entry.
        next_used: u16,
    },
    /// The queue's EVENT_IDX flag disagrees with the acked features.
    #[error("queue {0}: EVENT_IDX flag disagrees with the acked features")]
    EventIdx(usize),
    /// The data queues must have been ready: the device was running.
    #[error("queue {0} was not ready")]
    NotReady(usize),
    /// virtio-queue refused the queue's configuration (alignment of its addresses).
    #[error("queue {queue}: {source}")]
    Queue {
        /// The queue index.
        queue: usize,
        /// What virtio-queue said.
        #[source]
        source: virtio_queue::Error,
    },
    /// More connections than the device may hold.
    #[error("{found} connections, the device holds at most {max}")]
    Connections {
        /// Connections in the state.
        found: usize,
        /// The device's limit.
        max: usize,
    },
    /// A connection of an unknown socket type.
    #[error("connection of unknown socket type {0}")]
    SockType(u16),
    /// The port allocator's cursor lies outside the device-side port range.
    #[error("next port {0} is outside [2^30, 2^31)")]
    NextPort(u32),
}

/// Checks `state` for a device configured by `cfg` that offers `offered` features (`legacy_ok`:
/// it accepts a driver without VERSION_1), and builds its queues.
pub(crate) fn check(
    state: &VsockState,
    cfg: &DeviceConfig,
    offered: u64,
    legacy_ok: bool,
) -> Result<Vec<Queue>, RestoreError> {
    if state.version != STATE_VERSION {
        return Err(RestoreError::Version {
            found: state.version,
        });
    }
    for cid in [state.guest_cid, cfg.guest_cid] {
        if !Cid(cid).is_guest() {
            return Err(RestoreError::Cid(cid));
        }
    }
    let unoffered = state.acked_features & !offered;
    if unoffered != 0 {
        return Err(RestoreError::Features(unoffered));
    }
    if !legacy_ok && state.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(RestoreError::NoVersion1);
    }
    if state.queues.len() != 3 {
        return Err(RestoreError::QueueCount(state.queues.len()));
    }
    if state.connections.len() > cfg.max_connections {
        return Err(RestoreError::Connections {
            found: state.connections.len(),
            max: cfg.max_connections,
        });
    }
    if let Some(c) = state
        .connections
        .iter()
        .find(|c| SockType::from_wire(c.sock_type).is_none())
    {
        return Err(RestoreError::SockType(c.sock_type));
    }
    if !(EPHEMERAL_FIRST..EPHEMERAL_END).contains(&state.next_port) {
        return Err(RestoreError::NextPort(state.next_port));
    }
    let event_idx = state.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    let mut queues = Vec::with_capacity(3);
    for (queue, s) in state.queues.iter().enumerate() {
        queues.push(check_queue(queue, s, cfg.queue_size, event_idx)?);
    }
    Ok(queues)
}

fn check_queue(
    queue: usize,
    s: &QueueSnapshot,
    offered: u16,
    event_idx: bool,
) -> Result<Queue, RestoreError> {
    if s.max_size != offered {
        return Err(RestoreError::MaxSize {
            queue,
            found: s.max_size,
            offered,
        });
    }
    if !s.ready {
        // Only the event queue may have been left unset (a vhost-user frontend keeps it); the
        // device never touches it, so nothing of it is used.
        if queue != super::core::EVT {
            return Err(RestoreError::NotReady(queue));
        }
        return Queue::new(offered).map_err(|source| RestoreError::Queue { queue, source });
    }
    if s.size == 0 || s.size > s.max_size || !s.size.is_power_of_two() {
        return Err(RestoreError::Size {
            queue,
            size: s.size,
            max: s.max_size,
        });
    }
    if s.next_avail != s.next_used {
        return Err(RestoreError::Positions {
            queue,
            next_avail: s.next_avail,
            next_used: s.next_used,
        });
    }
    if s.event_idx != event_idx {
        return Err(RestoreError::EventIdx(queue));
    }
    Queue::try_from(QueueState::from(*s)).map_err(|source| RestoreError::Queue { queue, source })
}

/// The RST that ends saved connection `c` of the guest `guest_cid`.
pub(crate) fn rst_for(c: &SavedConn, guest_cid: u64) -> Header {
    Header {
        src_cid: c.device_cid,
        dst_cid: guest_cid,
        src_port: c.device_port,
        dst_port: c.guest_port,
        type_: c.sock_type,
        op: op::RST,
        ..Header::default()
    }
}

/// Where the TRANSPORT_RESET event of a restored device stands. While it is not
/// [`EventGate::Open`], RX is held back: no RX buffer is used.
///
/// The gate opens when the driver made the event queue's avail index move past where it stood
/// when the event was written: Linux re-posts an event buffer only after it handled the event
/// in it (`virtio_transport_event_work`: `virtio_vsock_event_handle`, which resets every socket
/// and reads the CID again, then `virtio_vsock_event_fill_one` and a kick). Firecracker clears
/// its gate on that kick; the avail index is the same signal, also seen without a kick fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum EventGate {
    /// No event owed: RX flows.
    #[default]
    Open,
    /// The event is owed and not written yet (no event buffer so far).
    Owed,
    /// The event is in the used ring and signalled; the driver's avail index stood at this.
    Sent(u16),
}

impl EventGate {
    /// Moves the gate on; returns whether RX may flow in this wake-up. Delivering the event
    /// itself holds RX for the rest of the wake-up.
    pub(crate) fn step(
        &mut self,
        mem: &GuestMemory,
        q: &mut Queue,
        interrupt: &dyn Interrupt,
        counters: &Counters,
    ) -> bool {
        match *self {
            EventGate::Open => true,
            EventGate::Sent(at) => {
                if q.avail_idx(mem, Ordering::Acquire).ok().map(|w| w.0) != Some(at) {
                    *self = EventGate::Open;
                    true
                } else {
                    false
                }
            }
            EventGate::Owed => {
                if let Some(at) = send_reset_event(mem, q, counters) {
                    *self = EventGate::Sent(at);
                    if let Ok(true) = q.needs_notification(mem) {
                        Counters::inc(&counters.interrupts);
                        let _ = interrupt.signal_used(1 << super::core::EVT);
                    }
                }
                false
            }
        }
    }
}

/// Writes TRANSPORT_RESET into the next event buffer and puts it in the used ring. Returns the
/// driver's avail index as it stood before the buffer was used, or `None` when there is no
/// usable buffer yet (the device then asks for a kick). Buffers too short or not writable are
/// returned with length 0 and counted, within one pass over the ring.
fn send_reset_event(mem: &GuestMemory, q: &mut Queue, counters: &Counters) -> Option<u16> {
    let table = GuestAddress(q.desc_table());
    for _ in 0..=q.size() {
        let avail = q.avail_idx(mem, Ordering::Acquire).ok()?.0;
        let head = match q.iter(mem) {
            Ok(mut it) => it.next().map(|c| c.head_index()),
            Err(_) => {
                Counters::inc(&counters.bad_avail_idx);
                return None;
            }
        };
        let Some(head) = head else {
            // Ask for a kick when the driver posts one; look again in case it just did.
            match q.enable_notification(mem) {
                Ok(true) => continue,
                _ => return None,
            }
        };
        match Chain::walk(mem, table, q.size(), head, Direction::DeviceWrites) {
            Ok(c) if c.len() >= u64::from(EVENT_LEN) => {
                c.write_at(mem, 0, &VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes());
                let _ = q.add_used(mem, head, EVENT_LEN);
                // With EVENT_IDX, ask for the kick of the driver's refill (the gate's signal).
                let _ = q.enable_notification(mem);
                return Some(avail);
            }
            _ => {
                Counters::inc(&counters.malformed_chains);
                let _ = q.add_used(mem, head, 0);
            }
        }
    }
    None
}
