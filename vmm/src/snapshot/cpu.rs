//! One x86_64 vCPU's KVM state: what `KVM_GET_*` reads and `KVM_SET_*` writes back.
//!
//! Saved: general and special registers, the (legacy, 4 KiB) XSAVE area, XCR0, the LAPIC, every
//! MSR of `KVM_GET_MSR_INDEX_LIST` that the kernel lets this vCPU read, pending events,
//! the MP state and the debug registers. The CPUID is not saved: restore sets the same
//! host-derived CPUID the VMM sets at boot (the snapshot is for the same host and VMM build).
//!
//! Restore order (as Firecracker's): CPUID, MP state, registers, special registers, XSAVE, XCRs,
//! debug registers, LAPIC, MSRs, events last (they may refer to the state set before).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `MSR_IA32_TSC`: written first on restore, so that MSRs derived from the TSC
/// (`MSR_IA32_TSC_DEADLINE`, `MSR_IA32_TSC_ADJUST`) are written relative to the restored TSC.
pub const MSR_IA32_TSC: u32 = 0x10;

/// How many MSRs one `KVM_GET_MSRS` call asks for.
const MSR_CHUNK: usize = 64;

/// One MSR's index and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// The MSR index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (= APIC ID).
    pub id: u8,
    /// `KVM_GET_REGS`.
    #[serde(with = "super::pod")]
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    #[serde(with = "super::pod")]
    pub sregs: kvm_sregs,
    /// `KVM_GET_XSAVE`: the legacy 4 KiB area as 1024 words (see [`check_xsave_size`]).
    pub xsave: Vec<u32>,
    /// `KVM_GET_XCRS`.
    #[serde(with = "super::pod")]
    pub xcrs: kvm_xcrs,
    /// `KVM_GET_LAPIC`.
    #[serde(with = "super::pod")]
    pub lapic: kvm_lapic_state,
    /// `KVM_GET_MSRS`, [`MSR_IA32_TSC`] first.
    pub msrs: Vec<MsrValue>,
    /// `KVM_GET_VCPU_EVENTS`.
    #[serde(with = "super::pod")]
    pub events: kvm_vcpu_events,
    /// `KVM_GET_MP_STATE`.
    #[serde(with = "super::pod")]
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_DEBUGREGS`.
    #[serde(with = "super::pod")]
    pub debugregs: kvm_debugregs,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// Refuses a host whose XSAVE state does not fit the legacy 4 KiB `kvm_xsave` (e.g. with AMX):
/// `KVM_GET_XSAVE` would silently drop the rest, and `KVM_SET_XSAVE` reads only 4 KiB.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), SnapshotError> {
    let size = kvm.check_extension_int(kvm_ioctls::Cap::Xsave2);
    if size > 4096 {
        return Err(SnapshotError::Unsupported(format!(
            "this host's XSAVE state is {size} bytes; snapshots hold the legacy 4096"
        )));
    }
    Ok(())
}

/// The MSRs to save: `KVM_GET_MSR_INDEX_LIST`, [`MSR_IA32_TSC`] first.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(self::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut indices: Vec<u32> = list.as_slice().to_vec();
    indices.sort_by_key(|&i| (i != MSR_IA32_TSC, i));
    indices.dedup();
    Ok(indices)
}

/// Reads those of `indices` that this vCPU can read.
fn readable_msrs(indices: &[u32], fd: &VcpuFd) -> Result<Vec<MsrValue>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(MSR_CHUNK) {
        out.extend(read_msrs(fd, chunk)?);
    }
    Ok(out)
}

/// Reads `indices`; KVM_GET_MSRS stops at the first MSR it cannot read, which is then skipped
/// (each call advances by at least one index, so this ends after at most `indices.len()` calls).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrValue>, SnapshotError> {
    let mut out = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| SnapshotError::Unsupported(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let read = read.min(rest.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of the stopped vCPU `id` (it must not be in `KVM_RUN`), with the MSRs
    /// of `msrs` ([`msr_indices`]) it can read.
    pub fn save(msrs: &[u32], fd: &VcpuFd, id: u8) -> Result<VcpuState, SnapshotError> {
        Ok(VcpuState {
            id,
            // MP state first: reading it completes pending LAPIC events (as Firecracker notes).
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd
                .get_xsave()
                .map_err(kvm("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: readable_msrs(msrs, fd)?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the state into a freshly created vCPU, with `cpuid` (the boot CPUID of this vCPU).
    pub fn restore(&self, fd: &VcpuFd, cpuid: &CpuId) -> Result<(), SnapshotError> {
        fd.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        if self.xsave.len() != xsave.region.len() {
            return Err(SnapshotError::Invalid(format!(
                "vCPU {}: {} XSAVE words, expected {}",
                self.id,
                self.xsave.len(),
                xsave.region.len()
            )));
        }
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `kvm_xsave` is the 4 KiB legacy area the kernel reads for KVM_SET_XSAVE;
        // `check_xsave_size` (called before any restore) refused hosts whose XSAVE state is
        // larger, so the kernel does not read past the struct.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        for chunk in entries.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk)
                .map_err(|e| SnapshotError::Unsupported(format!("MSR list: {e:?}")))?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(SnapshotError::Invalid(format!(
                    "KVM_SET_MSRS wrote {set} of {} MSRs (first refused: {:#x})",
                    chunk.len(),
                    chunk[set].index
                )));
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
