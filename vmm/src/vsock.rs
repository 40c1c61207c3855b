//! Wiring of the vsock-router device into the VMM: the one place that knows the library's
//! configuration and device types.

use std::collections::BTreeMap;
use std::sync::Arc;

use virtio_queue::Queue;
use vsock_router::backend::accept::DEFAULT_MAX_PENDING;
use vsock_router::backend::local::LocalPeers;
use vsock_router::backend::namespace::NsMode;
use vsock_router::backend::uplink::UplinkSpec;
use vsock_router::config::VsockConfig;
use vsock_router::device::virtio::VirtioDevice;
use vsock_router::device::{DeviceConfig, DeviceHandle, ResetPolicy, VsockDevice, VsockState};
use vsock_router::router::connector::{Router, RouterStats};
use vsock_router::router::{Policy, VsockHandle};
use vsock_router::stats::{RstReason, RstState};

use crate::api::{ConnectionInfo, VsockControl, VsockCounters, VsockInfo};

/// The vsock device, ready to put behind a transport, and the API's handle on it.
pub struct VsockParts {
    /// The virtio device (added to the VM with `Vm::add_virtio`).
    pub device: Box<dyn VirtioDevice>,
    /// The runtime handle the API uses (`GET/PATCH /api/v1/vsock`, connections).
    pub control: Arc<dyn VsockControl>,
}

/// Why `--vsock` was rejected. Reported before KVM is touched, with exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum VsockSetupError {
    /// The configuration string is invalid (the library's option error, naming the key).
    #[error("{0}")]
    Config(#[from] vsock_router::config::ConfigError),
    /// The configuration is valid but the device's sockets could not be set up (a CID in use,
    /// a socket path that cannot be bound, an uplink that cannot be opened).
    #[error("--vsock: {0}")]
    Setup(String),
}

/// Builds the vsock device from the raw `--vsock` value: parses it with the library's
/// [`VsockConfig`], binds the hybrid socket, claims the CID in the registry and opens the uplink
/// listeners (all before KVM is touched), and returns the device with the API's handle on it.
/// The sockets are removed when the device is dropped.
pub fn build_vsock(raw: &str) -> Result<VsockParts, VsockSetupError> {
    // A fresh device is a restored one without saved state: one place builds both.
    restore_vsock(raw, None).map(|(parts, _)| parts)
}

/// Builds the vsock device of a restored VM from the raw `--vsock` value (the saved one, or
/// the restorer's override: another CID, another socket) and the saved device state, if the
/// driver had started the device. Returns the parts and, for a started device, the queues to
/// activate it on ([`crate::transport::MmioTransport::restore_state`]). The device ends the
/// guest's old connections with a transport reset (`docs/snapshot.md`).
pub fn restore_vsock(
    raw: &str,
    state: Option<&VsockState>,
) -> Result<(VsockParts, Option<Vec<Queue>>), VsockSetupError> {
    let parts = RouterParts::new(raw.parse()?)?;
    let (device, queues) = match state {
        Some(state) => {
            let (device, queues) = VsockDevice::restore(
                parts.device,
                parts.router,
                state,
                ResetPolicy::TransportReset,
            )
            .map_err(|e| VsockSetupError::Setup(format!("saved device state: {e}")))?;
            (device, Some(queues))
        }
        None => (VsockDevice::new(parts.device, parts.router), None),
    };
    let control = parts.control.into_control(device.handle());
    Ok((
        VsockParts {
            device: Box::new(device),
            control,
        },
        queues,
    ))
}

/// The vsock device behind a transport, if `device` is one (for pause, resume and save).
pub fn as_vsock<'a>(
    device: &'a mut (dyn VirtioDevice + 'static),
) -> Option<&'a mut VsockDevice<Router>> {
    device.as_any_mut()?.downcast_mut()
}

/// A router built from a `--vsock` configuration, with the device settings that go with it:
/// what any transport of the device (virtio-mmio here, vhost-user in `vsock-routerd`) needs.
pub struct RouterParts {
    /// The router: the device's backend.
    pub router: Router,
    /// The device settings from the configuration (CID, limits, buffer, timeouts).
    pub device: DeviceConfig,
    /// What the API needs once the device exists ([`ControlParts::into_control`]).
    pub control: ControlParts,
}

/// The configuration, fallback policy and router counters, waiting for the device's handle to
/// become the API's [`VsockControl`].
pub struct ControlParts {
    cfg: VsockConfig,
    policy: Arc<Policy>,
    stats: RouterStats,
    ns_mode: NsMode,
}

impl ControlParts {
    /// The API's handle on the device `handle` belongs to.
    pub fn into_control(self, handle: DeviceHandle) -> Arc<dyn VsockControl> {
        Arc::new(LibraryControl {
            handle: VsockHandle::new(self.policy, handle),
            cfg: self.cfg,
            stats: self.stats,
            ns_mode: self.ns_mode,
        })
    }
}

impl RouterParts {
    /// Binds the hybrid socket, claims the CID in the registry and opens the uplink listeners
    /// of `cfg`, and raises the descriptor limit for its connections.
    pub fn new(cfg: VsockConfig) -> Result<Self, VsockSetupError> {
        Self::with_local_peers(cfg, None)
    }

    /// As [`RouterParts::new`]; with `peers`, the device joins those sibling devices of this
    /// process (`Router::with_local_peers`).
    pub fn with_local_peers(
        cfg: VsockConfig,
        peers: Option<&LocalPeers>,
    ) -> Result<Self, VsockSetupError> {
        raise_fd_limit_for(&cfg);
        let policy = Arc::new(Policy::new(cfg.g2h_fallback));
        let router = match peers {
            Some(p) => Router::with_local_peers(&cfg, policy.clone(), p),
            None => Router::new(&cfg, policy.clone()),
        }
        .map_err(|e| VsockSetupError::Setup(e.to_string()))?;
        let mut device = DeviceConfig::new(cfg.cid);
        device.max_connections = cfg.max_connections;
        device.csm.buf_alloc = cfg.buffer_size;
        device.csm.request_timeout = cfg.request_timeout;
        device.csm.connect_timeout = cfg.connect_timeout;
        device.busy_poll = cfg.busy_poll;
        let stats = router.stats();
        let ns_mode = router.ns_mode();
        Ok(RouterParts {
            router,
            device,
            control: ControlParts {
                cfg,
                policy,
                stats,
                ns_mode,
            },
        })
    }
}

/// Descriptors the VMM needs besides the device's: its own files, the KVM fds, the API's
/// clients.
const VMM_FDS: usize = 256;

/// Raises the soft descriptor limit to what the device may hold at once with `cfg` (one host
/// stream per connection, and the pending handshakes of the host socket and the registry),
/// as far as the hard limit allows; says so in the log, and warns when the hard limit is lower.
fn raise_fd_limit_for(cfg: &VsockConfig) {
    let want = (cfg.max_connections + 2 * DEFAULT_MAX_PENDING + cfg.listen.len() + VMM_FDS) as u64;
    match vsock_router::sys::raise_fd_limit(want) {
        Ok(l) if l.now < want => log::warn!(
            "file-descriptor limit {} (hard limit {}) is below the {want} that max_connections={} \
             may need: connections beyond it fail",
            l.now,
            l.hard,
            cfg.max_connections
        ),
        Ok(l) if l.now > l.before => {
            log::info!(
                "file-descriptor limit raised from {} to {}",
                l.before,
                l.now
            )
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot raise the file-descriptor limit: {e}"),
    }
}

/// [`VsockControl`] over the library's runtime handle.
struct LibraryControl {
    cfg: VsockConfig,
    handle: VsockHandle,
    stats: RouterStats,
    ns_mode: NsMode,
}

impl VsockControl for LibraryControl {
    fn info(&self) -> VsockInfo {
        let snapshot = self.handle.counters().snapshot();
        let a = snapshot.activity;
        let activity = named(a.iter().filter(|(n, _)| !n.starts_with("path_")));
        let errors = named(snapshot.errors.iter());
        let listen = (!self.cfg.listen.is_empty()).then(|| {
            self.cfg
                .listen
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join("+")
        });
        VsockInfo {
            cid: self.cfg.cid,
            socket: self.cfg.socket.display().to_string(),
            g2h_fallback: self.handle.g2h_fallback(),
            uplink: match self.cfg.uplink {
                UplinkSpec::None => None,
                ref u => Some(u.to_string()),
            },
            registry: self.cfg.registry.as_ref().map(|r| r.display().to_string()),
            ns_mode: self.ns_mode.to_string(),
            listen,
            counters: VsockCounters {
                host: a.path_host,
                sibling: a.path_sibling,
                uplink: a.path_uplink,
                refused: a.path_refused,
                activity,
                errors,
                handshakes: handshakes(&self.stats),
                rst_sent: named(
                    RstReason::ALL
                        .iter()
                        .zip(snapshot.rst_sent_by)
                        .map(|(r, n)| (r.name(), n)),
                ),
                rst_received: named(
                    RstState::ALL
                        .iter()
                        .zip(snapshot.rst_received_by)
                        .map(|(s, n)| (s.name(), n)),
                ),
                uplink_attempts: self.stats.uplink_attempts(),
                listen_accept_paused: self.stats.listen_paused(),
            },
        }
    }

    fn set_g2h_fallback(&self, enabled: bool) {
        self.handle.set_g2h_fallback(enabled);
    }

    fn connections(&self) -> Vec<ConnectionInfo> {
        self.handle
            .connections()
            .into_iter()
            .map(|c| ConnectionInfo {
                local_cid: c.local_cid,
                local_port: c.local_port,
                peer_cid: c.peer_cid,
                peer_port: c.peer_port,
                path: c.path.name().to_string(),
                to_host: c.to_host,
                initiator: if c.guest_initiated { "guest" } else { "host" }.to_string(),
                state: c.state.to_string(),
                bytes_to_host: c.bytes_to_host,
                bytes_to_guest: c.bytes_to_guest,
                sock_type: c.sock_type.name().to_string(),
                messages_to_host: c.messages_to_host,
                messages_to_guest: c.messages_to_guest,
            })
            .collect()
    }
}

/// The handshake counters of the hybrid sockets (`host`, `host_seqpacket`) and the registry's
/// (`registry`, `registry_seqpacket`).
fn handshakes(stats: &RouterStats) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let views = [
        ("host", Some(&stats.host)),
        ("host_seqpacket", Some(&stats.host_seqpacket)),
        ("registry", stats.registry.as_ref()),
        ("registry_seqpacket", stats.registry_seqpacket.as_ref()),
    ];
    for (socket, view) in views {
        let Some(s) = view.map(|v| v.stats()) else {
            continue;
        };
        let counts = [
            ("accepted", s.accepted),
            ("completed", s.completed),
            ("rejected", s.rejected),
            ("timed_out", s.timed_out),
            ("over_limit", s.over_limit),
            ("accept_paused", s.accept_paused),
        ];
        out.insert(socket.to_string(), named(counts.into_iter()));
    }
    out
}

/// Counters by name, for the API's maps.
fn named(it: impl Iterator<Item = (&'static str, u64)>) -> BTreeMap<String, u64> {
    it.map(|(n, v)| (n.to_string(), v)).collect()
}
