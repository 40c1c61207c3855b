//! Routing of new connections: which path a connection takes, and the runtime control of that
//! policy.

pub mod connector;
pub mod control;
pub mod decide;

pub use control::{Policy, VsockHandle};
pub use decide::{decide, Decision, RefuseReason, RouteCtx};

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
