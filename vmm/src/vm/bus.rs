//! Dispatch of vCPU I/O exits to devices.

use std::sync::{Arc, Mutex};

use log::debug;

use crate::devices::serial::SerialDevice;
use crate::transport::MmioTransport;

use super::layout;

/// What a guest port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing; keep running.
    None,
    /// The i8042 reset line was pulsed (port 0x64, value 0xfe).
    Reset,
    /// The guest wrote `code` to the debug-exit port.
    DebugExit(u8),
}

/// The devices a vCPU can reach by exits. Cloned into every vCPU thread.
#[derive(Clone, Default)]
pub struct Bus {
    serial: Option<Arc<Mutex<SerialDevice>>>,
    mmio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("serial", &self.serial.is_some())
            .field(
                "mmio",
                &self.mmio.iter().map(|(b, _)| *b).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    /// Attaches the UART at COM1.
    pub fn set_serial(&mut self, serial: Arc<Mutex<SerialDevice>>) {
        self.serial = Some(serial);
    }

    /// The UART at COM1, if attached.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    /// Attaches a virtio-mmio transport at `base`.
    pub fn add_mmio(&mut self, base: u64, transport: Arc<Mutex<MmioTransport>>) {
        self.mmio.push((base, transport));
    }

    /// The transports, by base address.
    pub fn mmio_devices(&self) -> &[(u64, Arc<Mutex<MmioTransport>>)] {
        &self.mmio
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.mmio
            .iter()
            .find(|(base, _)| addr >= *base && addr < base + layout::MMIO_DEVICE_SIZE)
            .map(|(base, t)| (addr - base, t))
    }

    /// A guest port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let serial_ports = layout::SERIAL_PORT_BASE..layout::SERIAL_PORT_BASE + 8;
        match (&self.serial, port) {
            (Some(serial), p) if serial_ports.contains(&p) && data.len() == 1 => {
                data[0] = lock(serial).read((p - layout::SERIAL_PORT_BASE) as u8);
            }
            // i8042 status: output buffer empty, input buffer empty.
            (_, layout::I8042_COMMAND_PORT) => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// A guest port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let serial_ports = layout::SERIAL_PORT_BASE..layout::SERIAL_PORT_BASE + 8;
        match (&self.serial, port) {
            (Some(serial), p) if serial_ports.contains(&p) && data.len() == 1 => {
                if let Err(e) = lock(serial).write((p - layout::SERIAL_PORT_BASE) as u8, data[0]) {
                    debug!("serial write failed: {e:?}");
                }
                PioAction::None
            }
            (_, layout::I8042_COMMAND_PORT) if data.first() == Some(&0xfe) => PioAction::Reset,
            (_, layout::DEBUG_EXIT_PORT) if !data.is_empty() => PioAction::DebugExit(data[0]),
            _ => PioAction::None,
        }
    }

    /// A guest MMIO read; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find_mmio(addr) {
            Some((offset, t)) => lock(t).read(offset, data),
            None => {
                debug!("MMIO read of unclaimed address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// A guest MMIO write; unclaimed addresses ignore it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.find_mmio(addr) {
            Some((offset, t)) => lock(t).write(offset, data),
            None => debug!("MMIO write of unclaimed address {addr:#x}"),
        }
    }
}
