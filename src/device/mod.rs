//! The virtio-vsock device: the transport contract ([`virtio`]), the device ([`vsock`]), its
//! core with the epoll set and one wake-up's work ([`core`], [`poller`]), and the two loops it
//! runs in: its own thread ([`worker`]) or a VMM's event-manager loop ([`subscriber`]).

mod control;
pub mod core;
pub mod guest_warn;
pub mod lifecycle;
pub mod poller;
pub mod subscriber;
pub mod virtio;
pub mod vsock;
pub mod worker;

pub use lifecycle::{
    LifecycleError, ResetPolicy, RestoreError, SavedConn, VsockState, STATE_VERSION,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
};
pub use subscriber::VsockSubscriber;
pub use vsock::{DeviceConfig, DeviceHandle, RunMode, VsockDevice, VIRTIO_VSOCK_F_SEQPACKET};
