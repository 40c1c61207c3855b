//! `vsock-routerd`: vsock-router's device, connection state machine and router as a
//! vhost-user-vsock backend, for QEMU (`vhost-user-vsock-device`, `vhost-user-vsock-pci`),
//! Cloud Hypervisor, crosvm and libkrun. One daemon serves any number of VMs, one vhost-user
//! socket each; see `docs/vhost-user.md`.
//!
//! [`cli`] parses the command line (our `--vsock` keys, or vhost-device-vsock's `--vm` and
//! `--config` spellings, [`compat`]); [`daemon`] builds each VM's router and device, serves
//! their sockets and the REST API, and stops on SIGTERM, SIGINT or the API.

pub mod cli;
pub mod compat;
pub mod daemon;
