//! `vsock-router`: a virtio-vsock device for rust-vmm style VMMs whose router mirrors Linux's
//! `net.vsock.g2h_fallback`.
//!
//! Layout, each layer depending only on the ones below it (`tests/layering.rs` checks this):
//!
//! - leaves: [`wire`] (the packet header, CIDs, handshake lines), [`vq`] (guest memory,
//!   descriptor chains, iovecs), [`sys`] (the raw system calls), [`stats`] (counters);
//! - [`stream`] (the host-stream trait) and [`seam`] (the [`seam::Backend`] trait between the
//!   connection table and the host side);
//! - [`csm`] (the connection state machines and the connection table);
//! - [`device`] (the virtio device and its event loop) and [`backend`] (host Unix sockets, the
//!   CID registry, the G2H uplink);
//! - [`router`] (the routing decision and its run-time control), then [`config`].
#![deny(missing_docs)]

pub mod backend;
pub mod config;
pub mod csm;
pub mod device;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzzing;
pub mod router;
pub mod seam;
#[cfg(any(test, feature = "test-utils"))]
pub mod sim;
pub mod stats;
pub mod stream;
pub mod sys;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;
pub mod vq;
pub mod wire;
