//! Wiring of the vsock-router device into the VMM: the one place that knows the library's
//! configuration and device types.

use std::sync::Arc;

use vsock_router::device::virtio::VirtioDevice;

use crate::api::VsockControl;

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
    /// The linked vsock-router has no device to build.
    #[error("--vsock `{0}`: this build of vsock-router provides no vsock device yet")]
    Unavailable(String),
}

/// Builds the vsock device from the raw `--vsock` value.
///
/// This is the single wiring point between the VMM and the library: parse `raw` with
/// `vsock_router::config::VsockConfig::from_str`, create the device, and return it with its
/// runtime handle (which implements [`VsockControl`]). It runs before KVM is touched, so a bad
/// configuration exits with status 2. The device may open its host sockets here or in
/// `activate`; on teardown the VMM calls `reset` (if it was activated) and drops it, which must
/// remove them.
pub fn build_vsock(raw: &str) -> Result<VsockParts, VsockSetupError> {
    // The library does not export `config::VsockConfig` or a device type yet (branch `main`
    // has only `device::virtio`); wire them here when it does.
    Err(VsockSetupError::Unavailable(raw.to_string()))
}
