//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (RAM, unused)
//! 0x0000_0500  GDT (4 entries)
//! 0x0000_0520  IDT (empty, limit 0)
//! 0x0000_6000  PVH hvm_start_info, followed by its memory map (0x6040) and module list (0x6200)
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map 0..4G, 2M pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  MP floating pointer + MP configuration table (top of base memory, the "EBDA")
//! 0x000a_0000  legacy VGA/BIOS hole (not RAM in the e820 map)
//! 0x0010_0000  high memory: kernels load here or at their own physical address
//! ...          initramfs: at the top of RAM, page aligned
//! 0xd000_0000  virtio-mmio devices, 4 KiB each (first at 0xd000_0000, IRQ 5)
//! 0xfec0_0000  IOAPIC            0xfee0_0000  LAPIC
//! ```
//!
//! RAM is one KVM memory slot from 0 to `--memory size`, which must end below
//! [`MMIO_START`], so there is never RAM above 4 GiB.

/// GDT address.
pub const GDT_START: u64 = 0x500;
/// IDT address.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` address.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table address (right after `hvm_start_info`).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Maximum number of PVH memory map entries.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 16;
/// PVH module list address (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6200;
/// Linux zero page (`boot_params`) address.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 address.
pub const PML4_START: u64 = 0x9000;
/// PDPT address.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line address.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line size, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the MP table (the last KiB of base memory, where Linux scans for it).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of usable base memory (start of the 640K-1M hole).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB; RAM must end at or below it.
pub const MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Largest supported RAM size (3 GiB keeps well clear of the MMIO gap).
pub const MAX_RAM_SIZE: u64 = 3 << 30;
/// IOAPIC MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// The serial port's I/O base (COM1).
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// The serial port's IRQ (GSI).
pub const SERIAL_IRQ: u32 = 4;
/// The first virtio-mmio device's IRQ (GSI); device `n` uses `VIRTIO_IRQ_BASE + n`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The i8042 command port; writing 0xfe resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The debug-exit port: a guest byte write `V` makes the VMM exit with status `V`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// The MMIO window of virtio device `index`.
pub fn virtio_mmio_base(index: u64) -> u64 {
    MMIO_START + index * MMIO_DEVICE_SIZE
}

/// The IRQ of virtio device `index`.
pub fn virtio_irq(index: u32) -> u32 {
    VIRTIO_IRQ_BASE + index
}
