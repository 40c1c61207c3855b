//! How a VMM (or a daemon) stops: the first exit request wins, and SIGTERM and SIGINT are
//! read from a signalfd by the main thread.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use log::error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why and how the VMM stops: the first reason wins.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    first: Mutex<Option<(i32, String)>>,
}

impl ExitSignal {
    /// A new, unsignalled exit.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(EFD_NONBLOCK)?,
            first: Mutex::new(None),
        })
    }

    /// Asks the VMM to exit with `code`; later requests do not change the first one.
    pub fn request(&self, code: i32, reason: impl Into<String>) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some((code, reason.into()));
        }
        drop(first);
        if let Err(e) = self.evt.write(1) {
            error!("cannot signal the VMM exit: {e}");
        }
    }

    /// The first request, if any.
    pub fn get(&self) -> Option<(i32, String)> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// SIGTERM and SIGINT, blocked in every thread and read from a signalfd by the main thread.
pub struct TerminationSignals(OwnedFd);

impl TerminationSignals {
    /// Blocks the signals in the calling thread (threads spawned later inherit the mask) and
    /// opens a signalfd for them.
    pub fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        Ok(TerminationSignals(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The signal read, if one is pending.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

/// Waits until the guest, the API or a signal ends the VM; returns (status, reason).
pub fn wait_for_exit(exit: &ExitSignal, signals: &TerminationSignals) -> (i32, String) {
    loop {
        if let Some(first) = exit.get() {
            return first;
        }
        let mut fds = [
            libc::pollfd {
                fd: exit.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return (1, format!("poll failed: {}", io::Error::last_os_error()));
        }
        if let Some(sig) = signals.read() {
            let name = if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
            exit.request(0, format!("{name} received"));
        }
    }
}
