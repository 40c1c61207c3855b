//! The vCPU run loop: exits to devices, and why a vCPU stopped.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error};

use super::bus::{Bus, PioAction};
use super::pause::PauseControl;
use crate::snapshot::VcpuState;

/// Why a vCPU's run loop returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reboot (i8042 reset, or KVM's reset system event).
    Reset,
    /// The guest shut down (KVM's shutdown system event).
    Shutdown,
    /// The vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`): how a kernel booted with `reboot=t`
    /// reboots, otherwise a guest crash too deep for its own fault handlers. The vCPU state
    /// at that moment, for the log.
    TripleFault(CpuState),
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The VMM asked the vCPU to stop (see [`kick_signal`]).
    Stopped,
}

/// A vCPU's state where it stopped: what locates a triple fault in the guest kernel (the
/// instruction, its stack, the last page-fault address, the tables the CPU could not use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuState {
    /// `rip`.
    pub rip: u64,
    /// `rsp`.
    pub rsp: u64,
    /// `rflags`.
    pub rflags: u64,
    /// `cr0`.
    pub cr0: u64,
    /// `cr2`: the last page-fault address.
    pub cr2: u64,
    /// `cr3`: the page-table root.
    pub cr3: u64,
    /// `cr4`.
    pub cr4: u64,
    /// The IDT's base and limit.
    pub idt: (u64, u16),
    /// The code segment's selector.
    pub cs: u16,
}

impl CpuState {
    /// Reads the state of a stopped vCPU; what cannot be read stays 0 (it is only logged).
    pub fn read(fd: &VcpuFd) -> CpuState {
        let mut state = CpuState::default();
        match fd.get_regs() {
            Ok(r) => (state.rip, state.rsp, state.rflags) = (r.rip, r.rsp, r.rflags),
            Err(e) => error!("cannot read the registers of a stopped vCPU: {e}"),
        }
        match fd.get_sregs() {
            Ok(s) => {
                (state.cr0, state.cr2, state.cr3, state.cr4) = (s.cr0, s.cr2, s.cr3, s.cr4);
                state.idt = (s.idt.base, s.idt.limit);
                state.cs = s.cs.selector;
            }
            Err(e) => error!("cannot read the special registers of a stopped vCPU: {e}"),
        }
        state
    }
}

impl CpuState {
    /// True for the state a vCPU has after a reset (`cs:rip` = `0xf000:0xfff0`): what KVM on AMD
    /// leaves at a triple fault, as it reinitializes the vCPU then; the crash's own state is
    /// gone (Intel's KVM keeps it).
    pub fn is_reset_state(&self) -> bool {
        self.rip == 0xfff0 && self.cs == 0xf000
    }
}

impl std::fmt::Display for CpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_reset_state() {
            return write!(
                f,
                "rip={:#x} cs={:#x}: the reset state (KVM reinitializes the vCPU at a triple \
                 fault on AMD; where the guest crashed is not known)",
                self.rip, self.cs
            );
        }
        write!(
            f,
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} \
             idt={:#x}/{:#x}",
            self.rip,
            self.rsp,
            self.rflags,
            self.cs,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.idt.0,
            self.idt.1
        )
    }
}

/// Why a vCPU failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// `KVM_EXIT_INTERNAL_ERROR` (e.g. an instruction KVM cannot emulate).
    #[error("KVM_EXIT_INTERNAL_ERROR, suberror {suberror}")]
    InternalError {
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused the guest state.
    #[error("KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on cpu {cpu}")]
    FailEntry {
        /// Hardware reason.
        reason: u64,
        /// Physical CPU.
        cpu: u32,
    },
    /// The guest reported a crash through KVM's system event.
    #[error("KVM_EXIT_SYSTEM_EVENT crash")]
    Crash,
    /// An exit this VMM does not handle.
    #[error("unhandled exit: {0}")]
    Unhandled(String),
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// A configured vCPU and the devices its exits reach.
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    bus: Bus,
    pause: Option<Pausable>,
}

/// What a vCPU needs to park: the shared control and the MSRs to save.
struct Pausable {
    control: Arc<PauseControl>,
    msrs: Arc<Vec<u32>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

enum Step {
    Continue,
    Done(Result<VcpuStop, VcpuError>),
    InternalError,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(fd: VcpuFd, id: u8, bus: Bus) -> Self {
        Vcpu {
            fd,
            id,
            bus,
            pause: None,
        }
    }

    /// Makes the vCPU park when `control` asks ([`PauseControl::pause`]), saving the MSRs of
    /// `msrs` with its state.
    pub fn set_pause(&mut self, control: Arc<PauseControl>, msrs: Arc<Vec<u32>>) {
        self.pause = Some(Pausable { control, msrs });
    }

    /// The vCPU index (= APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs the guest until it stops, fails, or `stop` is set and the thread is kicked with
    /// [`kick_signal`]. Parks while paused (see [`Vcpu::set_pause`]).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<VcpuStop, VcpuError> {
        let result = self.run_loop(stop);
        if let Some(p) = &self.pause {
            p.control.vcpu_ended(self.id);
        }
        result
    }

    fn run_loop(&mut self, stop: &AtomicBool) -> Result<VcpuStop, VcpuError> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(VcpuStop::Stopped);
            }
            if self.pause.as_ref().is_some_and(|p| p.control.requested()) {
                self.park(stop);
                continue;
            }
            match self.step() {
                Step::Continue => {}
                Step::Done(result) => return result,
                Step::InternalError => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the exit union; it is plain data.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(VcpuError::InternalError { suberror });
                }
            }
        }
    }

    /// Completes the pending exit without entering the guest, saves the state, waits.
    fn park(&mut self, stop: &AtomicBool) {
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(format!("KVM_RUN with immediate_exit failed: {e}")),
            Ok(exit) => Err(format!(
                "KVM_RUN with immediate_exit entered the guest: {exit:?}"
            )),
        };
        self.fd.set_kvm_immediate_exit(0);
        let Some(p) = &self.pause else { return };
        let state = completed
            .and_then(|()| VcpuState::save(&p.msrs, &self.fd, self.id).map_err(|e| e.to_string()));
        p.control
            .park(self.id, state, || !stop.load(Ordering::Acquire));
    }

    fn step(&mut self) -> Step {
        let bus = &self.bus;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => match bus.pio_write(port, data) {
                PioAction::None => Step::Continue,
                PioAction::Reset => Step::Done(Ok(VcpuStop::Reset)),
                PioAction::DebugExit(code) => Step::Done(Ok(VcpuStop::DebugExit(code))),
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(VcpuExit::Shutdown) => {
                Step::Done(Ok(VcpuStop::TripleFault(CpuState::read(&self.fd))))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Step::Done(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuStop::Shutdown),
                KVM_SYSTEM_EVENT_RESET => Ok(VcpuStop::Reset),
                KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::Crash),
                other => Err(VcpuError::Unhandled(format!("system event {other}"))),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Step::Done(Err(VcpuError::FailEntry { reason, cpu }))
            }
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(other) => Step::Done(Err(VcpuError::Unhandled(format!("{other:?}")))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                debug!("vcpu {}: KVM_RUN interrupted", self.id);
                Step::Continue
            }
            Err(e) => Step::Done(Err(VcpuError::Run(e))),
        }
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (a no-op handler is installed by
/// [`install_kick_handler`]). Set the stop flag first, then send it until the thread returns.
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {}

/// Installs the no-op handler for [`kick_signal`] (once per process).
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logged_state_names_the_registers_or_the_reset_state() {
        let crash = CpuState {
            rip: 0xffff_ffff_8101_2345,
            rsp: 0xffff_c900_0000_3f58,
            rflags: 0x10046,
            cr0: 0x8005_0033,
            cr2: 0,
            cr3: 0x2a0_c000,
            cr4: 0x35_06f0,
            idt: (0xffff_fe00_0000_0000, 0xfff),
            cs: 0x10,
        };
        assert!(!crash.is_reset_state());
        assert_eq!(
            crash.to_string(),
            "rip=0xffffffff81012345 rsp=0xffffc90000003f58 rflags=0x10046 cs=0x10 \
             cr0=0x80050033 cr2=0x0 cr3=0x2a0c000 cr4=0x3506f0 idt=0xfffffe0000000000/0xfff"
        );
        let reset = CpuState {
            rip: 0xfff0,
            cs: 0xf000,
            ..CpuState::default()
        };
        assert!(reset.is_reset_state());
        assert!(reset
            .to_string()
            .starts_with("rip=0xfff0 cs=0xf000: the reset state"));
    }
}
