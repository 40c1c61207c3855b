//! The connection state machines and the connection table, above the leaves ([`crate::wire`],
//! [`crate::vq`]), the host-stream trait ([`crate::stream`]) and the backend seam
//! ([`crate::seam`]), and below the device.
//!
//! - [`types`]: what both kinds of connection share; [`connection`]: a connection the device
//!   ends on a byte stream; [`relay`] and [`frames`]: a sibling connection relayed packet by
//!   packet; [`conn`]: either, behind one interface; [`txbuf`]: guest bytes a stream did not
//!   take yet.
//! - [`muxer`]: the connections of one device, with its pieces [`table`] (slab, typed ids),
//!   [`rxq`] (RX turns, bounded RST queue), [`timers`] and [`ports`]; `conn_log`: the log line of
//!   a connection that ended.

pub mod conn;
mod conn_log;
pub mod connection;
pub mod frames;
pub mod muxer;
pub mod ports;
pub mod relay;
pub mod rxq;
pub mod table;
pub mod timers;
pub mod txbuf;
pub mod types;
