//! The vCPU run loop: exits to devices, and why a vCPU stopped.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error};

use super::bus::{Bus, PioAction};

/// Why a vCPU's run loop returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reboot (i8042 reset, or KVM's reset system event).
    Reset,
    /// The guest shut down (triple fault, which `reboot=t` uses, or KVM's shutdown event).
    Shutdown,
    /// The guest wrote this byte to the debug-exit port.
    DebugExit(u8),
    /// The VMM asked the vCPU to stop (see [`kick_signal`]).
    Stopped,
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
        Vcpu { fd, id, bus }
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
    /// [`kick_signal`].
    pub fn run(&mut self, stop: &AtomicBool) -> Result<VcpuStop, VcpuError> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(VcpuStop::Stopped);
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
            Ok(VcpuExit::Shutdown) => Step::Done(Ok(VcpuStop::Shutdown)),
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
