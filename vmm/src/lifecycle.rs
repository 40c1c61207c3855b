//! Pause, resume and snapshot of the running VM: the [`VmLifecycle`] behind
//! `PUT /api/v1/vm.pause`, `vm.resume` and `vm.snapshot`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::info;

use crate::api::lifecycle::{LifecycleError, VmLifecycle};
use crate::snapshot::{self, Snapshot, SnapshotError, VmState, FORMAT_NAME, FORMAT_VERSION};
use crate::vm::pause::{PauseControl, PauseError};
use crate::vm::Vm;

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The refusal of a snapshot of a VM with a vsock device.
pub const VSOCK_UNSUPPORTED: &str = "snapshot of the vsock device is not supported yet: only a \
                                     VM without --vsock can be snapshotted (the VM stays paused)";

/// The VM's lifecycle control, shared with the API thread.
pub struct VmmLifecycle {
    vm: Arc<Vm>,
    pause: Arc<PauseControl>,
}

impl VmmLifecycle {
    /// Controls `vm`, whose vCPUs park through `pause`.
    pub fn new(vm: Arc<Vm>, pause: Arc<PauseControl>) -> Self {
        VmmLifecycle { vm, pause }
    }

    fn take_snapshot(&self, destination: &std::path::Path) -> Result<(), LifecycleError> {
        let states = match self.pause.states() {
            Ok(Ok(states)) => states,
            Ok(Err(e)) => return Err(failed(format!("cannot read a vCPU's state: {e}"))),
            Err(e) => {
                return Err(LifecycleError {
                    status: 409,
                    message: format!("{e}: PUT /api/v1/vm.pause first"),
                })
            }
        };
        // The hook for the vsock device's state (`Snapshot::vsock`): until the device can
        // save and restore itself, a VM with one is refused, so that no state is lost.
        if !self.vm.virtio_devices().is_empty() {
            return Err(LifecycleError {
                status: 400,
                message: VSOCK_UNSUPPORTED.into(),
            });
        }
        snapshot::cpu::check_xsave_size(self.vm.kvm()).map_err(refused)?;
        let serial = match self.vm.bus().serial() {
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()).state().into(),
            None => return Err(failed("the VM has no serial port".into())),
        };
        let state = Snapshot {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            memory_bytes: self.vm.memory_bytes(),
            vcpus: states,
            vm: VmState::save(self.vm.fd()).map_err(refused)?,
            serial,
            vsock: None,
        };
        state
            .write(destination, self.vm.memory())
            .map_err(refused)?;
        info!("snapshot written to {}", destination.display());
        Ok(())
    }
}

fn failed(message: String) -> LifecycleError {
    LifecycleError {
        status: 500,
        message,
    }
}

fn refused(e: SnapshotError) -> LifecycleError {
    let status = match e {
        SnapshotError::Unsupported(_) | SnapshotError::Io { .. } => 400,
        SnapshotError::Kvm { .. } | SnapshotError::Invalid(_) => 500,
    };
    LifecycleError {
        status,
        message: e.to_string(),
    }
}

fn pause_error(e: PauseError) -> LifecycleError {
    let status = match e {
        PauseError::AlreadyPaused | PauseError::NotPaused | PauseError::Ending => 409,
        PauseError::Timeout(..) => 500,
    };
    LifecycleError {
        status,
        message: e.to_string(),
    }
}

impl VmLifecycle for VmmLifecycle {
    fn pause(&self) -> Result<(), LifecycleError> {
        self.pause.pause(PAUSE_TIMEOUT).map_err(pause_error)?;
        info!("VM paused");
        Ok(())
    }

    fn resume(&self) -> Result<(), LifecycleError> {
        self.pause.resume().map_err(pause_error)?;
        info!("VM resumed");
        Ok(())
    }

    fn snapshot(&self, destination: PathBuf) -> Result<(), LifecycleError> {
        self.take_snapshot(&destination)
    }
}
