//! The harness's error type: every failure that involved a VM carries its
//! full console log, so a failing test shows what the guest printed.

use std::fmt;
use std::time::Duration;

/// Everything that can go wrong while preparing or running a guest.
#[derive(Clone)]
pub enum HarnessError {
    /// The platform cannot run here (e.g. no `qemu-system-x86_64` and it
    /// cannot be installed). Tests print `SKIPPED: ...` for this one.
    Unavailable(String),
    /// An image script failed; `log` holds its stderr.
    Build {
        /// What was being built.
        what: String,
        /// The script's output.
        log: String,
    },
    /// Preparing a run failed (bad arguments, I/O, initramfs assembly).
    Setup(String),
    /// The guest printed no `VRTEST-DONE` within the time limit.
    Timeout {
        /// Name of the run.
        name: String,
        /// The limit that expired.
        after: Duration,
        /// Full serial console.
        console: String,
        /// QEMU's own stdout/stderr.
        qemu_log: String,
    },
    /// QEMU exited before the guest printed `VRTEST-DONE`.
    QemuExited {
        /// Name of the run.
        name: String,
        /// QEMU's exit status.
        status: String,
        /// Full serial console.
        console: String,
        /// QEMU's own stdout/stderr.
        qemu_log: String,
    },
    /// A fault of the emulated platform, not of the code under test: the kernel that QEMU boots
    /// (the KVM host's, or the inner guest's in a direct run) printed an oops, a BUG (soft
    /// lockups too) or a panic on the serial console, and the run was ended as soon as it was
    /// seen; or an inner guest under `vsock-vmm` triple-faulted before its vsock device was
    /// activated (see [`crate::InnerTripleFault`]). An inner guest's kernel that faults later is
    /// a failure of the code under test. [`crate::rerun_on_platform_fault`] reruns the scenario
    /// once.
    PlatformFault {
        /// Name of the run.
        name: String,
        /// The console lines that show the fault.
        lines: Vec<String>,
        /// Seconds from the start of the run to the fault.
        after: Duration,
        /// Full serial console.
        console: String,
        /// QEMU's own stdout/stderr.
        qemu_log: String,
    },
    /// The run finished but a check failed, a required check is missing, or
    /// the scenario's exit code was not 0.
    ChecksFailed {
        /// Name of the run.
        name: String,
        /// One line per problem.
        problems: Vec<String>,
        /// Full serial console.
        console: String,
        /// QEMU's own stdout/stderr.
        qemu_log: String,
    },
}

impl HarnessError {
    /// True for a [`HarnessError::PlatformFault`].
    pub fn is_platform_fault(&self) -> bool {
        matches!(self, HarnessError::PlatformFault { .. })
    }

    /// The serial console captured for this error, if a VM was involved.
    pub fn console(&self) -> Option<&str> {
        match self {
            HarnessError::Timeout { console, .. }
            | HarnessError::QemuExited { console, .. }
            | HarnessError::PlatformFault { console, .. }
            | HarnessError::ChecksFailed { console, .. } => Some(console),
            _ => None,
        }
    }
}

fn write_logs(f: &mut fmt::Formatter<'_>, console: &str, qemu_log: &str) -> fmt::Result {
    writeln!(f, "\n---- serial console ----")?;
    f.write_str(console)?;
    if !console.ends_with('\n') {
        writeln!(f)?;
    }
    writeln!(f, "---- end of serial console ----")?;
    if !qemu_log.trim().is_empty() {
        writeln!(f, "---- qemu stdout/stderr ----\n{}", qemu_log.trim_end())?;
        writeln!(f, "---- end of qemu output ----")?;
    }
    Ok(())
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::Unavailable(why) => write!(f, "integration platform unavailable: {why}"),
            HarnessError::Build { what, log } => {
                write!(
                    f,
                    "building {what} failed\n---- output ----\n{log}\n---- end ----"
                )
            }
            HarnessError::Setup(why) => write!(f, "test setup failed: {why}"),
            HarnessError::Timeout {
                name,
                after,
                console,
                qemu_log,
            } => {
                write!(f, "{name}: no VRTEST-DONE within {} s", after.as_secs())?;
                write_logs(f, console, qemu_log)
            }
            HarnessError::QemuExited {
                name,
                status,
                console,
                qemu_log,
            } => {
                write!(f, "{name}: QEMU exited ({status}) before VRTEST-DONE")?;
                write_logs(f, console, qemu_log)
            }
            HarnessError::PlatformFault {
                name,
                lines,
                after,
                console,
                qemu_log,
            } => {
                write!(
                    f,
                    "{name}: PLATFORM FAULT after {:.1} s: the emulated platform faulted (the \
                     kernel that QEMU boots, or an inner guest's virtual CPU: before the vsock \
                     device ran, or without a word from the inner kernel), not the code under \
                     test:",
                    after.as_secs_f64()
                )?;
                for l in lines.iter().take(8) {
                    write!(f, "\n  {l}")?;
                }
                write_logs(f, console, qemu_log)
            }
            HarnessError::ChecksFailed {
                name,
                problems,
                console,
                qemu_log,
            } => {
                write!(f, "{name}: {} problem(s):", problems.len())?;
                for p in problems {
                    write!(f, "\n  - {p}")?;
                }
                write_logs(f, console, qemu_log)
            }
        }
    }
}

// Debug shows the same text, so `fn test() -> Result<(), HarnessError>` and
// `unwrap()` print the console log readably.
impl fmt::Debug for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for HarnessError {}

impl From<std::io::Error> for HarnessError {
    fn from(e: std::io::Error) -> Self {
        HarnessError::Setup(e.to_string())
    }
}
