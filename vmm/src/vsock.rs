//! Wiring of the vsock-router device into the VMM: the one place that knows the library's
//! configuration and device types.

use std::collections::BTreeMap;
use std::sync::Arc;

use vsock_router::backend::uplink::UplinkSpec;
use vsock_router::config::VsockConfig;
use vsock_router::device::virtio::VirtioDevice;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::Router;
use vsock_router::router::{Policy, VsockHandle};

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
    /// The configuration string is invalid (the library's `VsockConfig` error, naming the key).
    #[error("--vsock: {0}")]
    Config(String),
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
    let cfg: VsockConfig = raw
        .parse()
        .map_err(|e: vsock_router::config::ConfigError| VsockSetupError::Config(e.to_string()))?;
    let policy = Arc::new(Policy::new(cfg.g2h_fallback));
    let router =
        Router::new(&cfg, policy.clone()).map_err(|e| VsockSetupError::Setup(e.to_string()))?;
    let mut dev_cfg = DeviceConfig::new(cfg.cid);
    dev_cfg.max_connections = cfg.max_connections;
    dev_cfg.csm.buf_alloc = cfg.buffer_size;
    let device = VsockDevice::new(dev_cfg, router);
    let handle = VsockHandle::new(policy, device.handle());
    Ok(VsockParts {
        device: Box::new(device),
        control: Arc::new(LibraryControl { cfg, handle }),
    })
}

/// [`VsockControl`] over the library's runtime handle.
struct LibraryControl {
    cfg: VsockConfig,
    handle: VsockHandle,
}

impl VsockControl for LibraryControl {
    fn info(&self) -> VsockInfo {
        let snapshot = self.handle.counters().snapshot();
        let get = |name: &str| {
            snapshot
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| *v)
        };
        let errors: BTreeMap<String, u64> = snapshot
            .iter()
            .filter(|(n, _)| !n.starts_with("path_"))
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
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
            listen,
            counters: VsockCounters {
                host: get("path_host"),
                sibling: get("path_sibling"),
                uplink: get("path_uplink"),
                refused: get("path_refused"),
                errors,
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
            })
            .collect()
    }
}
