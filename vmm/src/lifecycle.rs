//! Pause, resume and snapshot of the running VM: the [`VmLifecycle`] behind
//! `PUT /api/v1/vm.pause`, `vm.resume` and `vm.snapshot`.
//!
//! Order: a pause parks the vCPUs first (no more MMIO accesses), then pauses the vsock device
//! (no more guest-memory writes or interrupts); a resume runs the device again first, then the
//! vCPUs. A snapshot needs both paused.

use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use log::info;

use crate::api::lifecycle::{LifecycleError, VmLifecycle};
use crate::snapshot::{
    self, Snapshot, SnapshotError, VmState, VsockSnapshot, FORMAT_NAME, FORMAT_VERSION,
};
use crate::transport::MmioTransport;
use crate::vm::pause::{PauseControl, PauseError};
use crate::vm::Vm;
use crate::vsock::as_vsock;

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM's lifecycle control, shared with the API thread.
pub struct VmmLifecycle {
    vm: Arc<Vm>,
    pause: Arc<PauseControl>,
    vsock_config: Option<String>,
}

impl VmmLifecycle {
    /// Controls `vm`, whose vCPUs park through `pause`; `vsock_config` is the `--vsock` value
    /// its vsock device runs with (saved in a snapshot).
    pub fn new(vm: Arc<Vm>, pause: Arc<PauseControl>, vsock_config: Option<String>) -> Self {
        VmmLifecycle {
            vm,
            pause,
            vsock_config,
        }
    }

    fn transports(&self) -> impl Iterator<Item = MutexGuard<'_, MmioTransport>> {
        self.vm
            .bus()
            .mmio_devices()
            .iter()
            .map(|(_, t)| t.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Pauses every running vsock device; on a failure, resumes those already paused.
    fn pause_devices(&self) -> Result<(), LifecycleError> {
        let mut failure = None;
        for mut t in self.transports() {
            let Some(dev) = t.device_mut().and_then(as_vsock) else {
                continue;
            };
            if dev.is_active() {
                if let Err(e) = dev.pause() {
                    failure = Some(failed(format!("cannot pause the vsock device: {e}")));
                    break;
                }
            }
        }
        match failure {
            Some(e) => {
                let _ = self.resume_devices();
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn resume_devices(&self) -> Result<(), LifecycleError> {
        for mut t in self.transports() {
            let Some(dev) = t.device_mut().and_then(as_vsock) else {
                continue;
            };
            if dev.is_paused() {
                dev.resume()
                    .map_err(|e| failed(format!("cannot resume the vsock device: {e}")))?;
            }
        }
        Ok(())
    }

    fn save_vsock(&self) -> Result<Option<VsockSnapshot>, LifecycleError> {
        let mut transports: Vec<_> = self.transports().collect();
        if transports.len() > 1 {
            return Err(refused(SnapshotError::Unsupported(
                "more than one virtio device".into(),
            )));
        }
        let Some(t) = transports.first_mut() else {
            return Ok(None);
        };
        let transport = t.save_state();
        let device = match (t.is_activated(), t.device_mut().and_then(as_vsock)) {
            (_, None) => {
                return Err(refused(SnapshotError::Unsupported(
                    "a virtio device other than vsock".into(),
                )))
            }
            (false, Some(_)) => None,
            (true, Some(dev)) => Some(
                dev.save()
                    .map_err(|e| failed(format!("cannot save the vsock device: {e}")))?,
            ),
        };
        let config = self.vsock_config.clone().ok_or_else(|| {
            failed("the VM has a vsock device but no --vsock configuration".into())
        })?;
        Ok(Some(VsockSnapshot {
            config,
            transport,
            device,
        }))
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
            vsock: self.save_vsock()?,
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
        if let Err(e) = self.pause_devices() {
            let _ = self.pause.resume();
            return Err(e);
        }
        info!("VM paused");
        Ok(())
    }

    fn resume(&self) -> Result<(), LifecycleError> {
        if !self.pause.is_paused() {
            return Err(pause_error(PauseError::NotPaused));
        }
        self.resume_devices()?;
        self.pause.resume().map_err(pause_error)?;
        info!("VM resumed");
        Ok(())
    }

    fn snapshot(&self, destination: PathBuf) -> Result<(), LifecycleError> {
        self.take_snapshot(&destination)
    }
}
