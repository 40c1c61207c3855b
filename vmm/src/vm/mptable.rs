//! The Intel MultiProcessor Specification 1.4 table, so Linux without ACPI finds the vCPUs,
//! the IOAPIC and the ISA interrupt routing.
//!
//! Layout at [`layout::MPTABLE_START`]: the 16-byte floating pointer, then the configuration
//! table (header, one processor entry per vCPU, the ISA bus, the IOAPIC, one I/O interrupt entry
//! per IOAPIC pin, and the two local interrupt entries: ExtINT on LINT0, NMI on LINT1).

use vm_memory::{Bytes, GuestAddress};
use vsock_router::device::virtio::GuestMemory;

use super::layout;

/// Number of IOAPIC pins routed (ISA IRQs 0-23).
pub const IOAPIC_PINS: u8 = 24;
const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table has room for below 640 KiB.
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC ID used in the table (one above the last vCPU's APIC ID).
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus + 1
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs, as placed at `start`.
pub fn build(cpus: u8, start: u64) -> Vec<u8> {
    let table_addr = start + 16;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[2, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type 3, INT, flags 0 (conforms to bus), bus 0, bus irq, dest IOAPIC, dest pin.
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, pin, ioapic, pin]);
        count += 1;
    }
    // type 4: ExtINT to LINT0 of all local APICs; NMI to LINT1 of all local APICs.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"VSOCK-VMM   ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(MPC_SPEC);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table for `cpus` vCPUs at [`layout::MPTABLE_START`].
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MptableError> {
    let bytes = build(cpus, layout::MPTABLE_START);
    if layout::MPTABLE_START + bytes.len() as u64 > 0xa0000 {
        return Err(MptableError::TooManyCpus(cpus));
    }
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(|_| MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 32] {
            let b = build(cpus, layout::MPTABLE_START);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, layout::MPTABLE_START + 16);
            let table = &b[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + u16::from(IOAPIC_PINS) + 2);
            // Processor entries: APIC IDs 0..cpus, BSP flag only on the first.
            for id in 0..cpus as usize {
                let e = &table[44 + id * 20..44 + id * 20 + 20];
                assert_eq!((e[0], e[1] as usize), (0, id));
                assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, id == 0);
            }
            assert!(layout::MPTABLE_START + b.len() as u64 <= 0xa0000);
        }
    }
}
