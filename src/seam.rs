//! The seam between the connection table and the host side: the [`Backend`] trait the device
//! drives, and the values that cross it. The router implements it in production, socket pairs
//! in tests; backends produce its [`Incoming`] connections. Depends only on [`crate::stream`]
//! and [`crate::wire`].

use std::os::fd::RawFd;
use std::time::Instant;

use crate::stream::VsockStream;
pub use crate::wire::SockType;

/// The path a connection took.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Host services over Unix sockets (guest ↔ CID 2, hybrid vsock).
    Host,
    /// A sibling guest on this machine, through the CID registry.
    Sibling,
    /// The G2H uplink (guest-initiated: the fallback; host-initiated: inbound from the parent).
    Uplink,
}

impl Path {
    /// The lowercase name used by the API.
    pub fn name(self) -> &'static str {
        match self {
            Path::Host => "host",
            Path::Sibling => "sibling",
            Path::Uplink => "uplink",
        }
    }
}

/// How a connection was routed, kept with it for observability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The path taken.
    pub path: Path,
    /// Whether the connection went to the uplink by fallback: our analogue of the kernel setting
    /// `VMADDR_FLAG_TO_HOST` in the remote address.
    pub to_host: bool,
}

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
    /// The socket type the guest asked for: the host side is opened with the same type.
    pub sock_type: SockType,
}

/// What a host-side stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// The connection's bytes: the device ends the vsock connection here and maps it onto the
    /// stream (host services, the uplink, programs on the machine).
    Bytes,
    /// The connection's vsock packets, framed (a sibling VMM's device): the device relays them
    /// unchanged, so the two guests see each other as on one kernel (see `csm::relay`).
    Packets,
}

/// A started host-side connect.
#[derive(Debug)]
pub struct Outgoing<S> {
    /// The non-blocking stream.
    pub stream: S,
    /// Whether the connect already completed (otherwise the device waits for writability and
    /// checks `SO_ERROR`).
    pub connected: bool,
    /// What the stream carries. With [`Framing::Packets`] the device sends the guest's REQUEST
    /// first and the guest gets its answer from the sibling guest.
    pub framing: Framing,
    /// How the connection was routed.
    pub route: RouteInfo,
}

/// Why a guest-initiated connection was refused; the guest gets an RST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The router found no path (strict mode, reserved CID, no uplink, a local CID namespace).
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
    /// Bytes the client already sent after its handshake line, delivered to the guest first
    /// (with [`Framing::Packets`]: the start of the first frame).
    pub prefix: Vec<u8>,
    /// What to write back once the guest accepts ([`Framing::Bytes`] only).
    pub reply: AcceptReply,
    /// What the stream carries.
    pub framing: Framing,
    /// How the connection was routed.
    pub route: RouteInfo,
    /// The socket type the guest will see in the REQUEST ([`Framing::Bytes`] only; a relayed
    /// REQUEST carries its own).
    pub sock_type: SockType,
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
