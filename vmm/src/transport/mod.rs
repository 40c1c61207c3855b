//! The virtio-mmio transport (virtio 1.x register layout) that drives any
//! [`VirtioDevice`](vsock_router::device::virtio::VirtioDevice).

pub mod interrupt;
pub mod mmio;
pub mod registers;
pub mod state;

pub use interrupt::MmioInterrupt;
pub use mmio::{MmioTransport, TransportError};
pub use state::{MmioState, StateError};
