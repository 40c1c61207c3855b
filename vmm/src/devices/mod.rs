//! Legacy devices on the I/O port bus.

pub mod serial;
