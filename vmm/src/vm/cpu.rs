//! Initial vCPU state for the two entry protocols: CPUID, MSRs, FPU, LAPIC, segments, paging.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vsock_router::device::virtio::GuestMemory;

use super::boot::EntryPoint;
use super::layout;

/// Why a vCPU could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some MSRs.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// Accepted.
        set: usize,
        /// Given.
        wanted: usize,
    },
    /// Writing the GDT or page tables failed.
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Builds a GDT entry from flags, base and limit (the layout Linux's `GDT_ENTRY` macro uses).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags);
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The `kvm_segment` for GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if g == 0 {
            raw_limit
        } else {
            (raw_limit << 12) | 0xfff
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// The GDT for `entry`: null, code (selector 0x08), data (0x10), TSS (0x18).
pub fn gdt_for(entry: &EntryPoint) -> [u64; 4] {
    match entry {
        EntryPoint::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        EntryPoint::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xffff_ffff), // data
            gdt_entry(0x008b, 0, 0x67),        // TSS
        ],
    }
}

/// Writes the GDT, an empty IDT and, for the 64-bit entry, identity-mapped page tables
/// covering the first 4 GiB with 2 MiB pages. Done once, before the vCPUs start.
pub fn write_boot_tables(mem: &GuestMemory, entry: &EntryPoint) -> Result<(), CpuError> {
    for (i, e) in gdt_for(entry).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_START + i as u64 * 8))
            .map_err(|_| CpuError::GuestMemory("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|_| CpuError::GuestMemory("the IDT"))?;
    if let EntryPoint::Linux64 { .. } = entry {
        let pt = |_| CpuError::GuestMemory("the page tables");
        mem.write_obj(layout::PDPTE_START | 0x3, GuestAddress(layout::PML4_START))
            .map_err(pt)?;
        for pd in 0..4u64 {
            let pd_addr = layout::PDE_START + pd * 0x1000;
            mem.write_obj(pd_addr | 0x3, GuestAddress(layout::PDPTE_START + pd * 8))
                .map_err(pt)?;
            for i in 0..512u64 {
                let page = ((pd * 512 + i) << 21) | 0x83; // present, writable, 2 MiB
                mem.write_obj(page, GuestAddress(pd_addr + i * 8))
                    .map_err(pt)?;
            }
        }
    }
    Ok(())
}

/// The special registers for `entry`, starting from the vCPU's current ones.
pub fn boot_sregs(mut sregs: kvm_sregs, entry: &EntryPoint) -> kvm_sregs {
    let gdt = gdt_for(entry);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Linux64 { .. } => {
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// The general registers for `entry`.
pub fn boot_regs(entry: &EntryPoint) -> kvm_regs {
    match *entry {
        EntryPoint::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: layout::PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Adapts KVM's supported CPUID for vCPU `id` of `count`: APIC IDs, logical CPU count, the
/// hypervisor bit.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the logical processor count is valid.
                }
                e.ecx |= 1 << 31; // Running under a hypervisor.
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
}

/// The MSRs every vCPU boots with (as Linux expects from a fresh machine).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b: Vec<u8> = regs[offset..offset + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures vCPU `id` of `count` to start at `entry`.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    supported_cpuid: &CpuId,
    entry: &EntryPoint,
) -> Result<(), CpuError> {
    let mut cpuid = supported_cpuid.clone();
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            set,
            wanted: entries.len(),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;

    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&boot_sregs(sregs, entry))
        .map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (
                code64.selector,
                code64.l,
                code64.db,
                code64.type_,
                code64.present,
                code64.s
            ),
            (8, 1, 0, 0xb, 1, 1)
        );
        assert_eq!((code64.base, code64.limit, code64.g), (0, 0xffff_ffff, 1));
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xffff_ffff), 1);
        assert_eq!((code32.l, code32.db, code32.limit), (0, 1, 0xffff_ffff));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.g, tss.selector),
            (0x1234_5678, 0x67, 0, 24)
        );
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn entry_registers() {
        let pvh = EntryPoint::Pvh { entry: 0x100_0000 };
        let r = boot_regs(&pvh);
        assert_eq!(
            (r.rip, r.rbx, r.rflags),
            (0x100_0000, layout::PVH_INFO_START, 2)
        );
        let s = boot_sregs(kvm_sregs::default(), &pvh);
        assert_eq!((s.cr0 & X86_CR0_PG, s.cr0 & X86_CR0_PE, s.efer), (0, 1, 0));
        assert_eq!((s.cs.selector, s.ds.selector, s.cs.db), (0x08, 0x10, 1));

        let lin = EntryPoint::Linux64 { entry: 0x10_0200 };
        let r = boot_regs(&lin);
        assert_eq!(
            (r.rip, r.rsi, r.rsp),
            (0x10_0200, layout::ZERO_PAGE_START, 0x8ff0)
        );
        let s = boot_sregs(kvm_sregs::default(), &lin);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn lapic_delivery_modes() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0x0001_0000);
        let v = delivery_mode(lapic_reg(&regs, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        set_lapic_reg(&mut regs, APIC_LVT0, v);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0x0001_0700);
    }
}
