//! The boot paths on real KVM: what linux-loader and the VMM put in guest memory, and that
//! each entry protocol starts the vCPU with the documented registers.

mod common;

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{kvm_available, run_vcpu, Scratch};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};
use vsock_vmm::testkit::asm::{Asm, Cond, Mode};
use vsock_vmm::testkit::images::{bzimage, elf_kernel};
use vsock_vmm::vm::boot::{read_obj, EntryPoint, XEN_HVM_START_MAGIC_VALUE};
use vsock_vmm::vm::layout::{self, DEBUG_EXIT_PORT};
use vsock_vmm::vm::vcpu::VcpuStop;
use vsock_vmm::vm::Vm;

const MEM: u64 = 128 << 20;
const OK: u8 = 0x50;
const FAIL: u8 = 0xee;
const CMDLINE: &str = "console=ttyS0 reboot=t panic=1 pci=off";
const VIRTIO_ARG: &str = "virtio_mmio.device=4K@0xd0000000:5";

fn cstring_at(vm: &Vm, addr: u64) -> String {
    let mut buf = vec![0u8; 512];
    vm.memory()
        .read_slice(&mut buf, GuestAddress(addr))
        .unwrap();
    let end = buf.iter().position(|&b| b == 0).expect("NUL-terminated");
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

/// A VM with a (never activated) virtio device so the command line announces it.
fn vm_with_virtio() -> Vm {
    let mut vm = Vm::new(MEM).expect("create VM");
    vm.add_virtio(Box::new(vsock_vmm::testkit::device::RecordingDevice::new(
        &[256, 256, 64],
    )))
    .expect("add device");
    vm
}

fn check_mptable(vm: &Vm, cpus: u8) {
    let mut sig = [0u8; 4];
    vm.memory()
        .read_slice(&mut sig, GuestAddress(layout::MPTABLE_START))
        .unwrap();
    assert_eq!(&sig, b"_MP_");
    let count: u16 = read_obj(vm.memory(), layout::MPTABLE_START + 16 + 34).unwrap();
    assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
}

#[test]
fn pvh_elf_gets_start_info_memmap_module_and_cmdline() {
    if !kvm_available("pvh_elf_gets_start_info_memmap_module_and_cmdline") {
        return;
    }
    let scratch = Scratch::new("pvh");
    // 32-bit code: ebx must point at hvm_start_info, whose magic must be right.
    let mut a = Asm::new(Mode::Protected32);
    let fail = a.label();
    a.cmp_ebx(layout::PVH_INFO_START as u32).jcc(Cond::Ne, fail);
    a.cmp_ebx_mem(0, XEN_HVM_START_MAGIC_VALUE)
        .jcc(Cond::Ne, fail);
    a.outb(DEBUG_EXIT_PORT, OK);
    a.bind(fail).outb(DEBUG_EXIT_PORT, FAIL);
    let kernel = scratch.write("vmlinux", &elf_kernel(&a.finish(), 0x100_0000, true));
    let initrd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let initrd = scratch.write("initrd", &initrd_bytes);

    let mut vm = vm_with_virtio();
    let info = vm
        .load_guest(
            &mut File::open(&kernel).unwrap(),
            Some(&mut File::open(&initrd).unwrap()),
            CMDLINE,
            2,
        )
        .expect("load");
    assert_eq!(info.entry, EntryPoint::Pvh { entry: 0x100_0000 });
    assert_eq!(info.cmdline, format!("{CMDLINE} {VIRTIO_ARG}"));
    assert_eq!(cstring_at(&vm, layout::CMDLINE_START), info.cmdline);

    let mem = vm.memory();
    let start: hvm_start_info = read_obj(mem, layout::PVH_INFO_START).unwrap();
    assert_eq!(start.magic, XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(start.version, 1);
    assert_eq!(start.cmdline_paddr, layout::CMDLINE_START);
    assert_eq!(start.memmap_paddr, layout::PVH_MEMMAP_START);
    assert_eq!(start.memmap_entries, 2);
    assert_eq!(start.nr_modules, 1);
    let e0: hvm_memmap_table_entry = read_obj(mem, layout::PVH_MEMMAP_START).unwrap();
    let e1: hvm_memmap_table_entry = read_obj(mem, layout::PVH_MEMMAP_START + 24).unwrap();
    assert_eq!((e0.addr, e0.size, e0.type_), (0, layout::EBDA_START, 1));
    assert_eq!(
        (e1.addr, e1.size, e1.type_),
        (0x10_0000, MEM - 0x10_0000, 1)
    );
    let module: hvm_modlist_entry = read_obj(mem, start.modlist_paddr).unwrap();
    let placed = info.initramfs.unwrap();
    assert_eq!((module.paddr, module.size), (placed.addr, 10_000));
    assert_eq!(placed.addr % 4096, 0);
    assert!(placed.addr + placed.size <= MEM && placed.addr >= info.kernel_end);
    let mut loaded = vec![0u8; 10_000];
    mem.read_slice(&mut loaded, GuestAddress(placed.addr))
        .unwrap();
    assert_eq!(loaded, initrd_bytes);
    check_mptable(&vm, 2);

    let mut vcpus = vm.create_vcpus(2, &info.entry).expect("vCPUs");
    assert_eq!(vcpus.len(), 2);
    let bsp = vcpus.remove(0);
    assert_eq!(
        run_vcpu(bsp, Duration::from_secs(60)).unwrap(),
        VcpuStop::DebugExit(OK)
    );
}

/// 64-bit code checking rsi = zero page, its `HdrS` magic and `cmd_line_ptr`.
fn linux64_probe() -> Vec<u8> {
    let mut a = Asm::new(Mode::Long64);
    let fail = a.label();
    a.cmp_esi(layout::ZERO_PAGE_START as u32)
        .jcc(Cond::Ne, fail);
    a.cmp_rsi_mem(0x202, 0x5372_6448).jcc(Cond::Ne, fail);
    a.cmp_rsi_mem(0x228, layout::CMDLINE_START as u32)
        .jcc(Cond::Ne, fail);
    a.outb(DEBUG_EXIT_PORT, OK);
    a.bind(fail).outb(DEBUG_EXIT_PORT, FAIL);
    a.finish()
}

fn check_zero_page(vm: &Vm, cmdline: &str, initrd: Option<(u64, u64)>) -> boot_params {
    let bp: boot_params = read_obj(vm.memory(), layout::ZERO_PAGE_START).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
    assert_eq!({ hdr.cmdline_size }, cmdline.len() as u32 + 1);
    let (image, size) = initrd.unwrap_or((0, 0));
    assert_eq!(
        ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
        (image as u32, size as u32)
    );
    assert_eq!(bp.e820_entries, 2);
    let e = bp.e820_table;
    assert_eq!(
        ({ e[0].addr }, { e[0].size }, { e[0].r#type }),
        (0, layout::EBDA_START, 1)
    );
    assert_eq!(
        ({ e[1].addr }, { e[1].size }, { e[1].r#type }),
        (0x10_0000, MEM - 0x10_0000, 1)
    );
    assert_eq!(cstring_at(vm, layout::CMDLINE_START), cmdline);
    bp
}

#[test]
fn bzimage_gets_boot_params_e820_and_the_64_bit_entry() {
    if !kvm_available("bzimage_gets_boot_params_e820_and_the_64_bit_entry") {
        return;
    }
    let scratch = Scratch::new("bzimage");
    let kernel = scratch.write("bzImage", &bzimage(&linux64_probe()));
    let initrd = scratch.write("initrd", &[7u8; 5000]);
    let mut vm = vm_with_virtio();
    let info = vm
        .load_guest(
            &mut File::open(&kernel).unwrap(),
            Some(&mut File::open(&initrd).unwrap()),
            CMDLINE,
            1,
        )
        .expect("load");
    assert_eq!(info.entry, EntryPoint::Linux64 { entry: 0x10_0200 });
    let placed = info.initramfs.unwrap();
    let bp = check_zero_page(&vm, &info.cmdline, Some((placed.addr, 5000)));
    assert_eq!({ bp.hdr.code32_start }, 0x10_0000);
    assert_eq!({ bp.hdr.xloadflags } & 1, 1);
    assert!(info.cmdline.ends_with(VIRTIO_ARG));
    check_mptable(&vm, 1);
    // Identity map: PML4[0] -> PDPT, PDPT[3] -> fourth PD, last 2 MiB page at 4G - 2M.
    let pml4: u64 = read_obj(vm.memory(), layout::PML4_START).unwrap();
    assert_eq!(pml4, layout::PDPTE_START | 3);
    let last: u64 = read_obj(vm.memory(), layout::PDE_START + 3 * 0x1000 + 511 * 8).unwrap();
    assert_eq!(last, (0xffe0_0000) | 0x83);

    let mut vcpus = vm.create_vcpus(1, &info.entry).unwrap();
    assert_eq!(
        run_vcpu(vcpus.remove(0), Duration::from_secs(60)).unwrap(),
        VcpuStop::DebugExit(OK)
    );
}

#[test]
fn elf_without_pvh_note_uses_the_64_bit_entry() {
    if !kvm_available("elf_without_pvh_note_uses_the_64_bit_entry") {
        return;
    }
    let scratch = Scratch::new("elf64");
    let kernel = scratch.write("vmlinux", &elf_kernel(&linux64_probe(), 0x20_0000, false));
    let mut vm = Vm::new(MEM).unwrap();
    let info = vm
        .load_guest(&mut File::open(&kernel).unwrap(), None, CMDLINE, 1)
        .unwrap();
    assert_eq!(info.entry, EntryPoint::Linux64 { entry: 0x20_0000 });
    assert_eq!(
        info.cmdline, CMDLINE,
        "no virtio device, no virtio_mmio.device="
    );
    check_zero_page(&vm, CMDLINE, None);
    let mut vcpus = vm.create_vcpus(1, &info.entry).unwrap();
    assert_eq!(
        run_vcpu(vcpus.remove(0), Duration::from_secs(60)).unwrap(),
        VcpuStop::DebugExit(OK)
    );
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn serial_output_and_i8042_reset() {
    if !kvm_available("serial_output_and_i8042_reset") {
        return;
    }
    let scratch = Scratch::new("serial");
    let mut a = Asm::new(Mode::Protected32);
    for b in b"hi from the guest\n" {
        a.outb(layout::SERIAL_PORT_BASE, *b);
    }
    a.outb(layout::I8042_COMMAND_PORT, 0xfe);
    a.outb(DEBUG_EXIT_PORT, FAIL);
    let kernel = scratch.write("vmlinux", &elf_kernel(&a.finish(), 0x10_0000, true));
    let mut vm = Vm::new(MEM).unwrap();
    let out = Capture::default();
    vm.add_serial(Box::new(out.clone())).unwrap();
    let info = vm
        .load_guest(&mut File::open(&kernel).unwrap(), None, CMDLINE, 1)
        .unwrap();
    let mut vcpus = vm.create_vcpus(1, &info.entry).unwrap();
    assert_eq!(
        run_vcpu(vcpus.remove(0), Duration::from_secs(60)).unwrap(),
        VcpuStop::Reset
    );
    assert_eq!(&*out.0.lock().unwrap(), b"hi from the guest\n");
}

#[test]
fn host_kernel_image_loads_if_present() {
    let Some(image) = std::fs::read_dir("/boot").ok().and_then(|d| {
        d.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
    }) else {
        eprintln!("SKIPPED: no /boot/vmlinuz-* to load: host_kernel_image_loads_if_present");
        return;
    };
    if !kvm_available("host_kernel_image_loads_if_present") {
        return;
    }
    let mut vm = Vm::new(MEM).unwrap();
    let info = vm
        .load_guest(&mut File::open(&image).unwrap(), None, CMDLINE, 1)
        .expect("a distribution bzImage loads");
    assert!(matches!(info.entry, EntryPoint::Linux64 { .. }));
    check_zero_page(&vm, CMDLINE, None);
}
