//! `vsock-vmm`: the reference VMM that embeds the `vsock-router` virtio-vsock device.
//!
//! Layout: [`cli`] (command line and the shared option parser), [`vm`] (KVM VM, memory map,
//! boot protocols, vCPUs), [`transport`] (virtio-mmio with ioeventfd/irqfd), [`devices`]
//! (serial), [`api`] (REST API over a Unix socket), [`vsock`] (wiring of the vsock device),
//! [`vmm`] (lifecycle: start, wait, tear down), [`testkit`] (tiny guests for tests; feature `testkit`).
#![deny(missing_docs)]

pub mod api;
pub mod cli;
pub mod devices;
pub mod exit;
pub mod lifecycle;
pub mod logger;
pub mod snapshot;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod transport;
pub mod vm;
pub mod vmm;
pub mod vsock;
