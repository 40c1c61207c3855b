//! `vsock-router`: a virtio-vsock device for rust-vmm style VMMs whose router mirrors Linux's
//! `net.vsock.g2h_fallback`.
//!
//! Layout: [`device`] (the virtio device, its queues and the packet codec), [`csm`] (the
//! per-connection state machine and credit flow control), [`router`] (the routing decision and its
//! runtime control) and [`backend`] (host Unix sockets, sibling guests, the G2H uplink).
#![deny(missing_docs)]

pub mod backend;
pub mod config;
pub mod csm;
pub mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod router;
#[cfg(any(test, feature = "test-utils"))]
pub mod sim;
pub mod stats;
