//! The vocabulary both kinds of connection share: settings, states, why a connection ends, what
//! its stream wants, and its addresses.

use std::time::Duration;

use crate::seam::Path;
use crate::wire::SockType;

/// Default time the guest has to answer a host-initiated REQUEST, as Firecracker and Cloud
/// Hypervisor.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Default time a host-side connect (a sibling's answer included) may take: the kernel's own
/// default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Timing and buffer settings shared by all connections of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CsmConfig {
    /// Receive space advertised to the guest, and the capacity of the per-connection buffer.
    pub buf_alloc: u32,
    /// How long a host-initiated REQUEST waits for the guest's answer.
    pub request_timeout: Duration,
    /// How long a host-side connect may take.
    pub connect_timeout: Duration,
    /// How long a connection shut down both ways may linger before it is reset.
    pub linger: Duration,
    /// The driver acknowledged `VIRTIO_VSOCK_F_SEQPACKET`: SOCK_SEQPACKET connections are
    /// served (the device sets it at activation; without it they are reset).
    pub seqpacket: bool,
}

impl Default for CsmConfig {
    fn default() -> Self {
        CsmConfig {
            buf_alloc: 256 * 1024,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            linger: Duration::from_secs(2),
            seqpacket: false,
        }
    }
}

/// Connection state (a relay's phases map onto it too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated, waiting for the host-side connect to complete.
    Connecting,
    /// Data may flow.
    Established,
    /// Dead; an RST may still be owed to the guest.
    Killed,
}

impl State {
    /// A short lowercase name for logs and the API.
    pub fn name(self) -> &'static str {
        match self {
            State::LocalInit => "local_init",
            State::Connecting => "connecting",
            State::Established => "established",
            State::Killed => "killed",
        }
    }
}

/// Why a connection was killed; each kind is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// The guest sent RST.
    GuestReset,
    /// The guest sent more than its credit allowed.
    CreditOverrun,
    /// The guest sent a packet that makes no sense in the connection's state.
    Protocol,
    /// The host-side connect failed.
    ConnectFailed,
    /// The guest did not answer a host-initiated REQUEST, or a connect took too long.
    Timeout,
    /// The host stream failed.
    HostError,
    /// The connection finished: both sides shut down.
    Closed,
}

/// Whether the guest must be told of a kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// An RST is owed to the guest.
    Rst,
    /// The guest knows already (it sent the RST) or never knew of the connection.
    Nothing,
}

/// Which host-stream readiness a connection wants to hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wants to read (EPOLLIN).
    pub read: bool,
    /// Wants to write (EPOLLOUT).
    pub write: bool,
    /// Wants to hear of a hang-up only (EPOLLHUP, which epoll reports whatever the interest):
    /// the stream stays registered with no other event.
    pub hangup: bool,
}

impl Interest {
    /// No interest at all: the stream should not be polled.
    pub fn is_none(self) -> bool {
        !self.read && !self.write && !self.hangup
    }
}

/// The addresses of a connection, as the guest sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addr {
    /// The CID the guest talks to (2 for the host, a sibling's or an uplink peer's CID).
    pub local_cid: u64,
    /// The port on that side.
    pub local_port: u32,
    /// The guest's CID.
    pub peer_cid: u64,
    /// The guest's port.
    pub peer_port: u32,
}

/// A live connection as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// The socket type.
    pub sock_type: SockType,
    /// Device-side port.
    pub local_port: u32,
    /// CID the guest talks to.
    pub local_cid: u64,
    /// The guest's CID.
    pub peer_cid: u64,
    /// The guest's port.
    pub peer_port: u32,
    /// The path taken.
    pub path: Path,
    /// Whether the uplink was taken by fallback (`VMADDR_FLAG_TO_HOST`).
    pub to_host: bool,
    /// Who opened it: `true` for the guest.
    pub guest_initiated: bool,
    /// State name.
    pub state: &'static str,
    /// Bytes guest → host.
    pub bytes_to_host: u64,
    /// Bytes host → guest.
    pub bytes_to_guest: u64,
    /// Whole SOCK_SEQPACKET messages guest → host (0 for streams and relayed connections).
    pub messages_to_host: u64,
    /// Whole SOCK_SEQPACKET messages host → guest (0 for streams and relayed connections).
    pub messages_to_guest: u64,
}
