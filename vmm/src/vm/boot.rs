//! Loading the kernel, initramfs and command line, and writing the boot parameters.
//!
//! Two protocols (chosen by the image, not by an option):
//! - **PVH** for an ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note: the vCPU starts at the
//!   note's address in 32-bit protected mode, paging off, `ebx` = [`layout::PVH_INFO_START`]
//!   (`hvm_start_info`: command line, memory map, initramfs as module 0).
//! - **Linux 64-bit boot protocol** for a bzImage (entry = load address + 0x200) or an ELF
//!   without the PVH note (entry = `e_entry`): long mode with identity-mapped page tables,
//!   `rsi` = [`layout::ZERO_PAGE_START`] (`boot_params`: setup header, command line, initramfs,
//!   e820 map).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vsock_router::device::virtio::GuestMemory;

use super::layout;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// e820 / PVH memory type: usable RAM.
pub const E820_RAM: u32 = 1;
/// Boot protocol magic "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XLF_KERNEL_64: u16 = 1;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the kernel or initramfs failed.
    #[error("cannot read {what}: {source}")]
    Io {
        /// Which file.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load the kernel: {0}")]
    Kernel(#[source] linux_loader::loader::Error),
    /// A bzImage without the 64-bit entry (XLF_KERNEL_64).
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)")]
    No64BitEntry,
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit above the kernel.
    #[error("the initramfs ({size} bytes) does not fit in guest RAM above the kernel")]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {detail}")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

/// How the vCPUs enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode at `entry`, `ebx` = `hvm_start_info`.
    Pvh {
        /// Entry address.
        entry: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, `rsi` = zero page.
    Linux64 {
        /// Entry address.
        entry: u64,
    },
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitramfsPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The result of [`load_guest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// The entry point and protocol.
    pub entry: EntryPoint,
    /// End of the loaded kernel image.
    pub kernel_end: u64,
    /// The initramfs, if any.
    pub initramfs: Option<InitramfsPlacement>,
    /// The command line as written to guest memory.
    pub cmdline: String,
}

/// What to boot.
#[derive(Debug)]
pub struct BootSource<'a> {
    /// The kernel image (ELF or bzImage).
    pub kernel: &'a mut File,
    /// The initramfs.
    pub initramfs: Option<&'a mut File>,
    /// The base command line.
    pub cmdline: &'a str,
    /// virtio-mmio devices to announce: (base, irq).
    pub virtio_devices: &'a [(u64, u32)],
}

/// Loads kernel, initramfs and command line into `mem` and writes the boot parameters for the
/// protocol the kernel image supports.
pub fn load_guest(mem: &GuestMemory, source: BootSource<'_>) -> Result<BootInfo, BootError> {
    let cmdline = build_cmdline(source.cmdline, source.virtio_devices)?;
    let is_elf = {
        let mut magic = [0u8; 4];
        source
            .kernel
            .seek(SeekFrom::Start(0))
            .and_then(|_| source.kernel.read_exact(&mut magic))
            .map_err(|e| BootError::Io {
                what: "the kernel",
                source: e,
            })?;
        magic == *b"\x7fELF"
    };
    let highmem = Some(GuestAddress(layout::HIGH_MEMORY_START));
    let loaded: KernelLoaderResult = if is_elf {
        Elf::load(mem, None, source.kernel, highmem)
    } else {
        BzImage::load(mem, None, source.kernel, highmem)
    }
    .map_err(BootError::Kernel)?;

    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_str = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .into_string()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let initrd_max = loaded
        .setup_header
        .map_or(u64::MAX, |h| u64::from(h.initrd_addr_max));
    let initramfs = match source.initramfs {
        Some(file) => Some(load_initramfs(mem, file, loaded.kernel_end, initrd_max)?),
        None => None,
    };

    let entry = match (loaded.setup_header, loaded.pvh_boot_cap) {
        (None, PvhBootCapability::PvhEntryPresent(addr)) => EntryPoint::Pvh {
            entry: addr.raw_value(),
        },
        (Some(hdr), _) => {
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry);
            }
            EntryPoint::Linux64 {
                entry: loaded.kernel_load.raw_value() + 0x200,
            }
        }
        (None, _) => EntryPoint::Linux64 {
            entry: loaded.kernel_load.raw_value(),
        },
    };
    let cmdline_len = cmdline_str.len() as u32 + 1;
    match entry {
        EntryPoint::Pvh { .. } => write_pvh_info(mem, initramfs)?,
        EntryPoint::Linux64 { .. } => {
            write_zero_page(mem, loaded.setup_header, cmdline_len, initramfs)?
        }
    }
    Ok(BootInfo {
        entry,
        kernel_end: loaded.kernel_end,
        initramfs,
        cmdline: cmdline_str,
    })
}

fn build_cmdline(base: &str, devices: &[(u64, u32)]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::try_from(base, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    for &(base, irq) in devices {
        cmdline
            .add_virtio_mmio_device(layout::MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

fn load_initramfs(
    mem: &GuestMemory,
    file: &mut File,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<InitramfsPlacement, BootError> {
    let io = |e| BootError::Io {
        what: "the initramfs",
        source: e,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let top = (mem.last_addr().raw_value() + 1).min(initrd_max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end && a >= layout::HIGH_MEMORY_START)
        .ok_or(BootError::InitramfsTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| BootError::GuestMemory {
            what: "the initramfs",
            detail: e.to_string(),
        })?;
    Ok(InitramfsPlacement { addr, size })
}

/// The guest RAM map shared by e820 and the PVH memory map: base memory below the EBDA, and
/// everything from 1 MiB to the end of RAM.
pub fn ram_map(mem: &GuestMemory) -> [(u64, u64); 2] {
    let end = mem.last_addr().raw_value() + 1;
    [
        (0, layout::EBDA_START),
        (layout::HIGH_MEMORY_START, end - layout::HIGH_MEMORY_START),
    ]
}

fn write_pvh_info(
    mem: &GuestMemory,
    initramfs: Option<InitramfsPlacement>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem)
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initramfs.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    if let Some(initrd) = initramfs {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: initrd.addr,
                size: initrd.size,
                ..Default::default()
            }],
            GuestAddress(layout::PVH_MODLIST_START),
        );
    }
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|e| BootError::GuestMemory {
        what: "hvm_start_info",
        detail: e.to_string(),
    })
}

fn write_zero_page(
    mem: &GuestMemory,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: u32,
    initramfs: Option<InitramfsPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = ram_map(mem);
    for (i, &(addr, size)) in map.iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = E820_RAM;
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(|e| BootError::GuestMemory {
        what: "boot_params",
        detail: e.to_string(),
    })
}

/// Reads a `T` from guest memory (for tests and diagnostics).
pub fn read_obj<T: vm_memory::ByteValued>(mem: &GuestMemory, addr: u64) -> Option<T> {
    mem.read_obj(GuestAddress(addr)).ok()
}
