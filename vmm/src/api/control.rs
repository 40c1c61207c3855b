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
    /// What else the device did, by name (`"tx_packets"`, `"rx_packets"`, `"interrupts"`,
    /// `"incoming"`, `"host_dropped"`, `"ended_bytes_to_host"`, `"credit_stalls"`, `"wakeups"`,
    /// `"busy_ns"`, ...: every activity counter of `vsock_router::stats`).
    pub activity: BTreeMap<String, u64>,
    /// Errors by kind (e.g. `"connect_failed"`, `"bad_len"`), and nothing else.
    pub errors: BTreeMap<String, u64>,
    /// Handshakes of host-side clients by socket (`"host"`: the hybrid socket,
    /// `"host_seqpacket"`: its SOCK_SEQPACKET twin, `"registry"`: siblings and programs,
    /// `"registry_seqpacket"`: programs' SOCK_SEQPACKET connections) and outcome (`"accepted"`, `"completed"`, `"rejected"`, `"timed_out"`,
    /// `"over_limit"`, `"accept_paused"`).
    pub handshakes: BTreeMap<String, BTreeMap<String, u64>>,
    /// RSTs the device sent the guest, by reason (`"refused"`, `"connect_failed"`,
    /// `"unknown_conn"`, `"invalid"`, `"conn_limit"`, `"reset"`, `"close"`).
    pub rst_sent: BTreeMap<String, u64>,
    /// RSTs the guest sent, by the state of the connection they ended (`"handshake"`: a
    /// host-initiated connection the guest refused, `"open"`, `"unknown"`).
    pub rst_received: BTreeMap<String, u64>,
    /// Connect attempts on the uplink (refused ones in strict mode never get here).
    pub uplink_attempts: u64,
    /// Times a `listen=` listener paused for lack of descriptors.
    pub listen_accept_paused: u64,
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
    /// The CID namespace's mode, `global` or `local` (the registry's, else `ns_mode=`).
    pub ns_mode: String,
    /// The listen specification (`null` when none).
    pub listen: Option<String>,
    /// Counters.
    pub counters: VsockCounters,
}

/// One connection (`GET /api/v1/vsock/connections`). "local" is the side the guest talks to
/// (the host, a sibling or an uplink peer), "peer" is the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    /// The CID the guest talks to (2 = host).
    pub local_cid: u64,
    /// The port on that side (device-chosen for host-initiated connections).
    pub local_port: u32,
    /// The guest's CID.
    pub peer_cid: u64,
    /// The guest's port.
    pub peer_port: u32,
    /// Where the connection is routed: `host`, `sibling` or `uplink`.
    pub path: String,
    /// Whether the uplink was taken by fallback (the kernel's `VMADDR_FLAG_TO_HOST`).
    pub to_host: bool,
    /// Who opened it: `guest` or `host`.
    pub initiator: String,
    /// The connection state (`local_init`, `connecting`, `established`, `killed`).
    pub state: String,
    /// Bytes guest → local side.
    pub bytes_to_host: u64,
    /// Bytes local side → guest.
    pub bytes_to_guest: u64,
    /// The socket type: `stream` or `seqpacket`.
    #[serde(rename = "type")]
    pub sock_type: String,
    /// Whole SOCK_SEQPACKET messages guest → local side (0 for streams and for sibling
    /// connections, whose packets the device relays uncounted).
    pub messages_to_host: u64,
    /// Whole SOCK_SEQPACKET messages local side → guest.
    pub messages_to_guest: u64,
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
