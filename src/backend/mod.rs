//! Backends: where connections go once routed, and where host-initiated connections come from.
//!
//! The device's connection table talks to exactly one [`Backend`]. In production that is the
//! router, which decides the path of each new guest connection and hands it to the host Unix
//! backend, the sibling registry or the G2H uplink; tests plug in socket pairs.

pub mod accept;
pub mod handshake;
pub mod host;
pub mod listen;
pub mod registry;
pub mod stream;
mod unix;
pub mod uplink;
pub mod vsock;

pub use accept::{HandshakeServer, HandshakeStats, LineKind};
pub use host::HostBackend;
pub use listen::ListenBackend;
pub use registry::{Registry, RegistryError};
pub use stream::SockStream;
pub use uplink::{Uplink, UplinkSpec, UplinkSpecError};

use std::os::fd::RawFd;
use std::time::Instant;

use crate::csm::stream::VsockStream;
use crate::router::RouteInfo;

/// A guest-initiated connection to open on the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The guest's (source) port.
    pub guest_port: u32,
    /// The CID the guest connects to.
    pub dst_cid: u64,
    /// The port the guest connects to.
    pub dst_port: u32,
}

/// A started host-side connect.
#[derive(Debug)]
pub struct Outgoing<S> {
    /// The non-blocking stream.
    pub stream: S,
    /// Whether the connect already completed (otherwise the device waits for writability and
    /// checks `SO_ERROR`).
    pub connected: bool,
    /// Whether the peer must answer `OK <port>\n` before the guest is told the connection is
    /// up (a sibling VMM answers only once its guest accepted).
    pub await_ok: bool,
    /// How the connection was routed.
    pub route: RouteInfo,
}

/// Why a guest-initiated connection was refused; the guest gets an RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The router found no path (strict mode, reserved CID, no uplink).
    NoRoute,
    /// The path exists but the host-side connect failed at once.
    ConnectFailed,
}

/// What to write to the host client once the guest accepts a host-initiated connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptReply {
    /// Nothing.
    None,
    /// The hybrid-vsock reply `OK <local_port>\n`.
    HybridOk,
}

/// A host-initiated connection, ready to be offered to the guest.
#[derive(Debug)]
pub struct Incoming<S> {
    /// The non-blocking stream.
    pub stream: S,
    /// The guest port to connect to.
    pub guest_port: u32,
    /// The source CID the guest will see.
    pub src_cid: u64,
    /// The source port the guest will see; `None` lets the device pick an ephemeral port.
    pub src_port: Option<u32>,
    /// Bytes the client already sent after its handshake line, delivered to the guest first.
    pub prefix: Vec<u8>,
    /// What to write back once the guest accepts.
    pub reply: AcceptReply,
    /// How the connection was routed.
    pub route: RouteInfo,
}

/// The host side of a vsock device.
pub trait Backend: Send {
    /// The stream type of its connections.
    type Stream: VsockStream + 'static;

    /// Opens the host side of a guest-initiated connection, without blocking.
    fn connect(&mut self, req: &ConnectRequest) -> Result<Outgoing<Self::Stream>, Refusal>;

    /// A file descriptor the device polls for readability; when it is readable, or
    /// [`Backend::next_deadline`] passed, the device calls [`Backend::process`].
    fn poll_fd(&self) -> Option<RawFd>;

    /// Does pending host-side work (accepting clients, reading handshakes, expiring them) and
    /// appends connections that are ready for the guest to `out`.
    fn process(&mut self, now: Instant, out: &mut Vec<Incoming<Self::Stream>>);

    /// When [`Backend::process`] must run again even without readiness.
    fn next_deadline(&self) -> Option<Instant>;
}
