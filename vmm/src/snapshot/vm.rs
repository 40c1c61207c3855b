//! The VM-wide state: the in-kernel PIC (master, slave) and IOAPIC, the PIT, the KVM clock,
//! and the COM1 UART's registers.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::SnapshotError;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// `KVM_GET_IRQCHIP` ×3, `KVM_GET_PIT2`, `KVM_GET_CLOCK`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC.
    #[serde(with = "super::pod")]
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    #[serde(with = "super::pod")]
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    #[serde(with = "super::pod")]
    pub ioapic: kvm_irqchip,
    /// The PIT.
    #[serde(with = "super::pod")]
    pub pit: kvm_pit_state2,
    /// The KVM clock (guest time) when the VM was paused.
    #[serde(with = "super::pod")]
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all out of `KVM_RUN`.
    pub fn save(fd: &VmFd) -> Result<VmState, SnapshotError> {
        Ok(VmState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into a fresh VM (irqchip and PIT created, vCPUs not started).
    pub fn restore(&self, fd: &VmFd) -> Result<(), SnapshotError> {
        fd.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK accepts only KVM_CLOCK_REALTIME among the flags KVM_GET_CLOCK reports
        // (`KVM_CLOCK_TSC_STABLE` is a read-only property of the host), and the `realtime`
        // and `host_tsc` fields only with it: restore the guest's clock value alone, so guest
        // time continues from the pause rather than jumping by the time spent on disk.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            flags: self.clock.flags & !(KVM_CLOCK_TSC_STABLE | kvm_bindings::KVM_CLOCK_REALTIME),
            ..Default::default()
        };
        fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}
