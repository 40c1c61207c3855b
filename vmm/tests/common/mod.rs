//! Shared helpers for the KVM and end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vsock_vmm::vm::vcpu::{install_kick_handler, kick_signal, Vcpu, VcpuError, VcpuStop};

/// Whether /dev/kvm can be used; prints a loud skip line when not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: no /dev/kvm ({e}): {test}");
            false
        }
    }
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vsock-vmm-test-{name}-"))
            .tempdir()
            .expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write scratch file");
        p
    }
}

/// Runs `vcpu` on its own thread; if it has not stopped after `timeout`, kicks it out of
/// KVM_RUN and panics.
pub fn run_vcpu(mut vcpu: Vcpu, timeout: Duration) -> Result<VcpuStop, VcpuError> {
    install_kick_handler();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let r = vcpu.run(&s);
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(timeout).is_ok() {
        return handle.join().expect("vcpu thread panicked");
    }
    stop.store(true, Ordering::SeqCst);
    for _ in 0..500 {
        if handle.is_finished() {
            break;
        }
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread is alive (not finished, not joined), so its pthread_t is valid.
        unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the guest did not finish within {timeout:?}");
}

/// A vCPU on its own thread that stops at every debug exit and waits to be resumed, so a test
/// can check the host side at the guest's checkpoints. Dropping it stops the vCPU (stop flag,
/// then [`kick_signal`] until the thread returns, bounded).
pub struct SteppedVcpu {
    stops: mpsc::Receiver<Result<VcpuStop, VcpuError>>,
    resume: Option<mpsc::Sender<()>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SteppedVcpu {
    /// Starts running `vcpu`.
    pub fn start(mut vcpu: Vcpu) -> Self {
        install_kick_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop_tx, stops) = mpsc::channel();
        let (resume, resume_rx) = mpsc::channel::<()>();
        let s = stop.clone();
        let handle = std::thread::spawn(move || loop {
            let r = vcpu.run(&s);
            let again = matches!(r, Ok(VcpuStop::DebugExit(_)));
            if stop_tx.send(r).is_err() || !again || resume_rx.recv().is_err() {
                break;
            }
        });
        SteppedVcpu {
            stops,
            resume: Some(resume),
            stop,
            handle: Some(handle),
        }
    }

    /// The next stop, or `None` if the vCPU has not stopped within `timeout`.
    pub fn next_stop(&self, timeout: Duration) -> Option<Result<VcpuStop, VcpuError>> {
        self.stops.recv_timeout(timeout).ok()
    }

    /// Lets the vCPU continue after a debug exit.
    pub fn resume(&self) {
        self.resume
            .as_ref()
            .expect("resume channel")
            .send(())
            .expect("the vCPU thread has ended");
    }
}

impl Drop for SteppedVcpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Ends a wait for `resume`.
        self.resume = None;
        let Some(handle) = self.handle.take() else {
            return;
        };
        for _ in 0..500 {
            if handle.is_finished() {
                break;
            }
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread is alive (not finished, not joined), so its pthread_t is valid.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(10));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
    }
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `path` exists (bounded).
pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits (bounded, polling every 20 ms) for the process in `child` to exit; returns its status
/// and its piped stderr, and empties `child`. `None` when it is still running at the deadline
/// (or `child` is empty).
pub fn wait_exit(child: &mut Option<Child>, timeout: Duration) -> Option<(ExitStatus, String)> {
    let deadline = std::time::Instant::now() + timeout;
    let c = child.as_mut()?;
    loop {
        if let Some(status) = c.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            *child = None;
            return Some((status, err));
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
