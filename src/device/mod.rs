//! The virtio-vsock device: transport contract, queues and packet codec.

pub mod virtio;
