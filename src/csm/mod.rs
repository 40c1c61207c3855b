//! Per-connection state machine, credit flow control, and the connection table.

pub mod connection;
pub mod muxer;
pub mod stream;
pub mod txbuf;
