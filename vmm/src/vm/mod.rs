//! The KVM virtual machine: creation, memory, devices, boot, vCPUs.
//!
//! Creation order (the one that works with KVM's in-kernel devices): create VM → TSS address →
//! in-kernel irqchip (PIC + IOAPIC + LAPICs) → PIT2 → guest memory → devices (irqfds,
//! ioeventfds) → kernel → vCPUs.

pub mod boot;
pub mod bus;
pub mod cpu;
pub mod layout;
pub mod mptable;
pub mod pause;
pub mod vcpu;

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vsock_router::device::virtio::{GuestMemory, VirtioDevice};

use crate::devices::serial::{new_serial, IrqfdTrigger, SerialDevice};
use crate::transport::registers::REG_QUEUE_NOTIFY;
use crate::transport::{MmioTransport, TransportError};
use boot::{BootError, BootInfo, BootSource};
use bus::Bus;
use cpu::CpuError;
use vcpu::Vcpu;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

/// The TSS address KVM needs on Intel (three pages just below the BIOS area at 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Allocating guest memory failed.
    #[error("cannot allocate {size} bytes of guest memory: {detail}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Why.
        detail: String,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The virtio transport refused the device.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Configuring a vCPU failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The saved UART state was refused.
    #[error("cannot restore the serial port: {0}")]
    Serial(String),
    /// Restoring a vCPU or the VM's in-kernel state failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A KVM VM with its memory and devices.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemory,
    bus: Bus,
    virtio: Vec<(u64, u32)>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("bus", &self.bus)
            .field("virtio", &self.virtio)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM with `memory_bytes` of RAM from guest address 0.
    pub fn new(memory_bytes: u64) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem_err = |detail: String| VmError::Memory {
            size: memory_bytes,
            detail,
        };
        if memory_bytes > layout::MMIO_START {
            return Err(mem_err("RAM would overlap the MMIO gap".into()));
        }
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), memory_bytes as usize)])
            .map_err(|e| mem_err(e.to_string()))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| mem_err(e.to_string()))?;
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which this `Vm` keeps alive
            // at least as long as the VM fd; the guest range does not overlap another slot.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm {
            kvm,
            fd,
            mem,
            bus: Bus::default(),
            virtio: Vec::new(),
        })
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The device bus the vCPUs use.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The virtio-mmio devices as (base, irq), in the order added.
    pub fn virtio_devices(&self) -> &[(u64, u32)] {
        &self.virtio
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Adds the COM1 UART writing to `out`; its interrupt is an irqfd on GSI 4.
    pub fn add_serial(
        &mut self,
        out: Box<dyn Write + Send>,
    ) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
        self.add_serial_from(out, None)
    }

    /// [`Vm::add_serial`], with the registers and FIFO of `state` (a restored UART) if given.
    pub fn add_serial_from(
        &mut self,
        out: Box<dyn Write + Send>,
        state: Option<&SerialState>,
    ) -> Result<Arc<Mutex<SerialDevice>>, VmError> {
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&irqfd, layout::SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = match state {
            None => new_serial(irqfd, out),
            Some(state) => Serial::from_state(state, IrqfdTrigger(irqfd), NoEvents, out)
                .map_err(|e| VmError::Serial(format!("{e:?}")))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.bus.set_serial(serial.clone());
        Ok(serial)
    }

    /// Adds a virtio device behind a virtio-mmio transport at the next 4 KiB window from
    /// [`layout::MMIO_START`] with the next IRQ from [`layout::VIRTIO_IRQ_BASE`].
    ///
    /// Registers one ioeventfd per queue on QueueNotify (4 bytes, datamatch = queue index)
    /// and the interrupt's irqfd on the device's GSI.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let index = self.virtio.len();
        let base = layout::virtio_mmio_base(index as u64);
        let irq = layout::virtio_irq(index as u32);
        let transport = MmioTransport::new(self.mem.clone(), device)?;
        for (queue, kick) in transport.kicks().iter().enumerate() {
            self.fd
                .register_ioevent(
                    kick,
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD (QueueNotify)"))?;
        }
        self.fd
            .register_irqfd(transport.interrupt().irqfd(), irq)
            .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        let transport = Arc::new(Mutex::new(transport));
        self.bus.add_mmio(base, transport.clone());
        self.virtio.push((base, irq));
        Ok(transport)
    }

    /// Loads the guest (announcing every virtio device added so far on the command line),
    /// writes the MP table for `cpus` vCPUs and the boot-time GDT and page tables.
    pub fn load_guest(
        &mut self,
        kernel: &mut File,
        initramfs: Option<&mut File>,
        cmdline: &str,
        cpus: u8,
    ) -> Result<BootInfo, VmError> {
        let info = boot::load_guest(
            &self.mem,
            BootSource {
                kernel,
                initramfs,
                cmdline,
                virtio_devices: &self.virtio,
            },
        )?;
        mptable::write(&self.mem, cpus)?;
        cpu::write_boot_tables(&self.mem, &info.entry)?;
        Ok(info)
    }

    /// KVM's supported CPUID.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Creates one vCPU per saved state, sets the boot CPUID and the saved state, and the
    /// VM-wide state `vm` (irqchip, PIT, clock) once the vCPUs exist.
    pub fn restore_vcpus(
        &self,
        states: &[crate::snapshot::VcpuState],
        vm: &crate::snapshot::VmState,
    ) -> Result<Vec<Vcpu>, VmError> {
        crate::snapshot::cpu::check_xsave_size(&self.kvm)?;
        let supported = self.supported_cpuid()?;
        let count = u8::try_from(states.len()).map_err(|_| {
            crate::snapshot::SnapshotError::Invalid(format!("{} vCPUs", states.len()))
        })?;
        let mut out = Vec::with_capacity(states.len());
        for state in states {
            let fd = self
                .fd
                .create_vcpu(u64::from(state.id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            out.push((fd, state));
        }
        vm.restore(&self.fd)?;
        out.into_iter()
            .map(|(fd, state)| {
                let mut cpuid = supported.clone();
                cpu::patch_cpuid(&mut cpuid, state.id, count);
                state.restore(&fd, &cpuid)?;
                Ok(Vcpu::new(fd, state.id, self.bus.clone()))
            })
            .collect()
    }

    /// Creates and configures `count` vCPUs starting at `entry` (APs wait for INIT/SIPI in
    /// the in-kernel LAPIC, as on real hardware).
    pub fn create_vcpus(&self, count: u8, entry: &boot::EntryPoint) -> Result<Vec<Vcpu>, VmError> {
        let cpuid = self.supported_cpuid()?;
        (0..count)
            .map(|id| {
                let fd = self
                    .fd
                    .create_vcpu(u64::from(id))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                cpu::configure_vcpu(&fd, id, count, &cpuid, entry)?;
                Ok(Vcpu::new(fd, id, self.bus.clone()))
            })
            .collect()
    }
}
