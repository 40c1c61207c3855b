//! The saved state of a virtio-mmio transport ([`MmioState`]): what a snapshot holds of the
//! register file, and how a fresh transport takes it back.
//!
//! The device's own state (for vsock: `VsockState`, with the queues' ring positions) is saved
//! by the device; the transport saves what the driver wrote into its registers. On restore the
//! two must agree, queue by queue: a snapshot file is as hostile as guest memory.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use super::mmio::{MmioTransport, QueueRegisters};
use super::registers::*;

/// Every Status bit a driver may set.
const STATUS_BITS: u32 = STATUS_ACKNOWLEDGE
    | STATUS_DRIVER
    | STATUS_DRIVER_OK
    | STATUS_FEATURES_OK
    | STATUS_DEVICE_NEEDS_RESET
    | STATUS_FAILED;

/// The register file of one virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmioState {
    /// DeviceID: a restore into a device of another type is refused.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures, all 64 bits.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// Whether the device was running (DRIVER_OK accepted).
    pub activated: bool,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues' registers, by index.
    pub queues: Vec<QueueRegisters>,
}

/// Why a saved transport state was refused.
#[derive(Debug, thiserror::Error)]
#[error("virtio-mmio state: {0}")]
pub struct StateError(String);

fn refuse<T>(message: String) -> Result<T, StateError> {
    Err(StateError(message))
}

impl MmioTransport {
    /// The device behind the transport (`None` after [`MmioTransport::shutdown`]), for a VMM
    /// that pauses and saves it.
    pub fn device_mut(
        &mut self,
    ) -> Option<&mut (dyn vsock_router::device::virtio::VirtioDevice + 'static)> {
        self.device.as_deref_mut()
    }

    /// The register file, for a snapshot (the vCPUs and the device are paused).
    pub fn save_state(&self) -> MmioState {
        MmioState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues: self.queues.clone(),
        }
    }

    /// Takes back a saved register file into this fresh transport, before any vCPU runs.
    ///
    /// A transport that was running is activated again on `queues`, the queues the restored
    /// device built from its own state (with their ring positions); each must match the saved
    /// registers. One that was not is left as the driver left it; if the driver had set
    /// FEATURES_OK, its features are acknowledged to the device again.
    pub fn restore_state(
        &mut self,
        state: &MmioState,
        queues: Option<Vec<Queue>>,
    ) -> Result<(), StateError> {
        if self.activated || self.status != 0 {
            return refuse("the transport is already in use".into());
        }
        if state.device_type != self.device_type {
            return refuse(format!(
                "saved for device type {}, restored into type {}",
                state.device_type, self.device_type
            ));
        }
        if state.queues.len() != self.max_sizes.len() {
            return refuse(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.max_sizes.len()
            ));
        }
        if state.status & !STATUS_BITS != 0 {
            return refuse(format!("unknown Status bits {:#x}", state.status));
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG_CHANGE) != 0 {
            return refuse(format!(
                "unknown InterruptStatus bits {:#x}",
                state.interrupt_status
            ));
        }
        let running =
            state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_DEVICE_NEEDS_RESET == 0;
        if state.activated != running {
            return refuse(format!(
                "activated={} does not fit Status {:#x}",
                state.activated, state.status
            ));
        }
        match (state.activated, &queues) {
            (true, None) => return refuse("a running device was saved without its state".into()),
            (false, Some(_)) => {
                return refuse("device state saved for a device not running".into())
            }
            (true, Some(q)) => check_queues(&state.queues, q)?,
            (false, None) => {}
        }
        if !state.activated && state.status & STATUS_FEATURES_OK != 0 {
            if let Some(device) = &mut self.device {
                device.ack_features(state.driver_features).map_err(|e| {
                    StateError(format!("driver features {:#x}: {e}", state.driver_features))
                })?;
            }
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = state.queues.clone();
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        if let Some(queues) = queues {
            self.activate_with(queues).map_err(StateError)?;
        }
        self.status = state.status;
        Ok(())
    }
}

/// Each restored queue must be the one the driver configured in the saved registers.
fn check_queues(regs: &[QueueRegisters], queues: &[Queue]) -> Result<(), StateError> {
    if regs.len() != queues.len() {
        return refuse(format!(
            "{} queue registers saved, the device restored {} queues",
            regs.len(),
            queues.len()
        ));
    }
    for (i, (r, q)) in regs.iter().zip(queues).enumerate() {
        let same = r.ready == q.ready()
            && (!r.ready
                || (r.size == q.size()
                    && r.desc == q.desc_table()
                    && r.driver == q.avail_ring()
                    && r.device == q.used_ring()));
        if !same {
            return refuse(format!(
                "queue {i}: registers {r:?} differ from the device's saved queue (size {}, \
                 ready {}, desc {:#x}, avail {:#x}, used {:#x})",
                q.size(),
                q.ready(),
                q.desc_table(),
                q.avail_ring(),
                q.used_ring()
            ));
        }
    }
    Ok(())
}
