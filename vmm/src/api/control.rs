//! How API handlers reach the vsock device.
//!
//! The vsock library implements [`VsockControl`] over its runtime handle (an `Arc`'d,
//! thread-safe handle with atomics). Every method is called on the API thread and must not
//! block on the device's data path.

use std::collections::BTreeMap;

use serde::Serialize;

/// Routing counters (`GET /api/v1/vsock` → `counters`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VsockCounters {
    /// Connections routed to host Unix sockets.
    pub host: u64,
    /// Connections routed to sibling guests.
    pub sibling: u64,
    /// Connections routed to the G2H uplink.
    pub uplink: u64,
    /// Connections refused (answered with RST).
    pub refused: u64,
    /// Errors by kind (e.g. `"connect_failed"`, `"bad_packet"`).
    pub errors: BTreeMap<String, u64>,
}

/// The device's configuration and state (`GET /api/v1/vsock`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VsockInfo {
    /// The guest CID.
    pub cid: u64,
    /// The host-side Unix socket path prefix.
    pub socket: String,
    /// Whether guest-to-host connections to unknown CIDs fall back to the uplink.
    pub g2h_fallback: bool,
    /// The uplink, as configured (`null` when none).
    pub uplink: Option<String>,
    /// The sibling registry directory (`null` when none).
    pub registry: Option<String>,
    /// The listen specification (`null` when none).
    pub listen: Option<String>,
    /// Counters.
    pub counters: VsockCounters,
}

/// One connection (`GET /api/v1/vsock/connections`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    /// The guest's port.
    pub guest_port: u32,
    /// The peer's CID (2 = host).
    pub peer_cid: u64,
    /// The peer's port.
    pub peer_port: u32,
    /// Where the connection is routed: `host`, `sibling` or `uplink`.
    pub path: String,
    /// The connection state (e.g. `connecting`, `established`, `closing`).
    pub state: String,
    /// Bytes guest → peer.
    pub tx_bytes: u64,
    /// Bytes peer → guest.
    pub rx_bytes: u64,
}

/// The API's view of the vsock device. Implemented by the vsock library's runtime handle.
pub trait VsockControl: Send + Sync {
    /// The configuration, the current `g2h_fallback` and the counters.
    fn info(&self) -> VsockInfo;
    /// Sets `g2h_fallback` at run time; takes effect for new connections.
    fn set_g2h_fallback(&self, enabled: bool);
    /// A snapshot of the open connections.
    fn connections(&self) -> Vec<ConnectionInfo>;
}
