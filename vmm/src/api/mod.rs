//! The REST API: HTTP/1.1 with JSON bodies over a Unix socket.
//!
//! [`http`] parses requests (bounded) and formats responses, [`routes`] maps them to handlers
//! (the pure entry point [`routes::handle_request`] is what a fuzz target calls), [`control`]
//! is the trait through which handlers reach the vsock device, [`server`] serves the socket on
//! its own thread (one non-blocking `poll` loop, in `conn.rs`) and [`client`] is the tiny client
//! behind `vsock-vmm remote`.

pub mod client;
mod conn;
pub mod control;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod vms;

pub use control::{ConnectionInfo, VsockControl, VsockCounters, VsockInfo};
pub use routes::{handle_request, route, Action, ApiContext};
