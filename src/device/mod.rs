//! The virtio-vsock device: transport contract, queues, packet codec and the device thread.

pub mod chain;
pub mod iovec;
pub mod packet;
pub mod poller;
pub mod virtio;
pub mod vsock;
pub mod worker;

pub use vsock::{DeviceConfig, DeviceHandle, VsockDevice};
