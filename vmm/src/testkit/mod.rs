//! Tools for testing this VMM (and VMM integrations of the vsock device) with tiny guests:
//! a hand-rolled x86 code emitter, builders for minimal bootable kernel images (an ELF with a PVH
//! note, a bzImage with a 64-bit entry), and a [`device::RecordingDevice`] that records how a
//! transport drives it.
//!
//! None of this is used by the VMM itself.

pub mod asm;
pub mod device;
pub mod images;
