//! Backends: where connections go once routed, and where host-initiated connections come from.
//!
//! The device's connection table talks to exactly one [`Backend`] (see [`crate::seam`]). In
//! production that is the router, which decides the path of each new guest connection and hands
//! it to the host Unix backend, the sibling registry or the G2H uplink; tests plug in socket
//! pairs. Backends depend on the leaves ([`crate::wire`], [`crate::stream`], [`crate::seam`]),
//! never on the router or the connection state machines.

pub mod accept;
pub mod backoff;
pub mod host;
pub mod listen;
pub mod local;
pub mod namespace;
pub mod registry;
pub mod seqpacket;
pub mod stream;
mod unix;
pub mod uplink;

pub use crate::sys::vsock;

pub use accept::{HandshakeServer, HandshakeStats, HandshakeView, LineKind};
pub use host::HostBackend;
pub use listen::ListenBackend;
pub use registry::{Registry, RegistryError};
pub use stream::SockStream;
pub use uplink::{Uplink, UplinkSpec, UplinkSpecError};

pub use crate::seam::{AcceptReply, Backend, ConnectRequest, Framing, Incoming, Outgoing, Refusal};
