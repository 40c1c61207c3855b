//! Virtqueue access, a leaf under the device and the connection state machines: guest memory,
//! validated descriptor chains of any layout ([`chain`]), iovec lists over them for one-copy
//! I/O ([`iovec`]), and the TX packet view ([`tx`]). Depends only on [`crate::wire`].

pub mod chain;
pub mod iovec;
pub mod tx;

pub use chain::{Chain, ChainError, Direction, Segment, MAX_SEGMENTS};
pub use iovec::{IoVecs, MAX_IOVECS};
pub use tx::{parse_tx, TxError};

/// Guest memory as the device sees it. Cloning it is cheap (the regions are reference-counted).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
