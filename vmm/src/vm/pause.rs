//! Pausing the vCPUs: each leaves `KVM_RUN`, completes the exit it was in, saves its state and
//! parks until resumed.
//!
//! [`PauseControl::pause`] sets the request and kicks every running vCPU thread with
//! [`kick_signal`] (repeatedly: a kick that lands outside `KVM_RUN` is lost) until all are
//! parked. A vCPU that sees the request runs `KVM_RUN` once with `immediate_exit` set, so that
//! KVM completes a pending I/O or MMIO read (the value the VMM gave it goes into the guest's
//! register) without entering the guest, then saves its [`VcpuState`] and waits. Once `pause`
//! returns, no vCPU changes guest memory or its registers until [`PauseControl::resume`].

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::vcpu::kick_signal;
use crate::snapshot::VcpuState;

/// How often `pause` kicks the vCPUs that have not parked yet.
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// Why a pause, resume or state request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// `pause` while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// `resume` or a state request while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU has ended (the VM is shutting down).
    #[error("the VM is shutting down")]
    Ending,
    /// Some vCPUs did not park in time; the pause was undone.
    #[error("{0} vCPU(s) did not stop within {1:?}; the VM keeps running")]
    Timeout(usize, Duration),
}

#[derive(Debug, Default)]
struct Inner {
    requested: bool,
    /// Per vCPU: its state once parked (or why it could not be read).
    parked: Vec<Option<Result<VcpuState, String>>>,
    /// Per vCPU: its thread, while it runs.
    threads: Vec<Option<libc::pthread_t>>,
    /// Per vCPU: its run loop has returned.
    ended: Vec<bool>,
    /// Teardown has begun: no more kicks (the threads are about to be joined).
    closed: bool,
}

/// The pause state shared by the vCPU threads and the API.
#[derive(Debug)]
pub struct PauseControl {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl PauseControl {
    /// For `vcpus` vCPUs, running.
    pub fn new(vcpus: usize) -> Self {
        PauseControl {
            inner: Mutex::new(Inner {
                parked: vec![None; vcpus],
                threads: vec![None; vcpus],
                ended: vec![false; vcpus],
                ..Inner::default()
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the thread that runs vCPU `id`, for the kicks.
    pub fn register_thread(&self, id: u8, thread: libc::pthread_t) {
        if let Some(slot) = self.lock().threads.get_mut(usize::from(id)) {
            *slot = Some(thread);
        }
    }

    /// Called by vCPU `id`'s thread when its run loop has returned.
    pub fn vcpu_ended(&self, id: u8) {
        let mut inner = self.lock();
        if let Some(e) = inner.ended.get_mut(usize::from(id)) {
            *e = true;
        }
        self.changed.notify_all();
    }

    /// Stops kicking for good (before the vCPU threads are joined) and releases parked vCPUs.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.requested = false;
        self.changed.notify_all();
    }

    /// Whether vCPUs should park now (read by the run loop).
    pub fn requested(&self) -> bool {
        self.lock().requested
    }

    /// Whether the VM is paused: requested, and every vCPU parked.
    pub fn is_paused(&self) -> bool {
        let inner = self.lock();
        inner.requested && inner.parked.iter().all(Option::is_some)
    }

    /// Pauses every vCPU; returns when all are parked, or fails after `timeout` (then resumes).
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        if inner.closed || inner.ended.iter().any(|&e| e) {
            return Err(PauseError::Ending);
        }
        if inner.requested {
            return Err(PauseError::AlreadyPaused);
        }
        inner.requested = true;
        inner.parked.iter_mut().for_each(|p| *p = None);
        loop {
            if inner.closed || inner.ended.iter().any(|&e| e) {
                inner.requested = false;
                self.changed.notify_all();
                return Err(PauseError::Ending);
            }
            let waiting: Vec<usize> = (0..inner.parked.len())
                .filter(|&i| inner.parked[i].is_none())
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                inner.requested = false;
                inner.parked.iter_mut().for_each(|p| *p = None);
                self.changed.notify_all();
                return Err(PauseError::Timeout(waiting.len(), timeout));
            }
            for i in waiting {
                if let Some(t) = inner.threads[i] {
                    // SAFETY: the thread is registered and has not ended its run loop (checked
                    // above under this lock), and teardown joins the threads only after
                    // `close`, which takes this lock: the pthread_t is valid. The kick signal
                    // has a no-op handler.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
            let wait = KICK_INTERVAL.min(deadline - now);
            inner = self
                .changed
                .wait_timeout(inner, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut inner = self.lock();
        if !inner.requested || inner.parked.iter().any(Option::is_none) {
            return Err(PauseError::NotPaused);
        }
        inner.requested = false;
        inner.parked.iter_mut().for_each(|p| *p = None);
        self.changed.notify_all();
        Ok(())
    }

    /// The saved state of every vCPU, while paused; a vCPU whose state could not be read
    /// gives its error.
    pub fn states(&self) -> Result<Result<Vec<VcpuState>, String>, PauseError> {
        let inner = self.lock();
        if !inner.requested || inner.parked.iter().any(Option::is_none) {
            return Err(PauseError::NotPaused);
        }
        Ok(inner.parked.iter().flatten().cloned().collect())
    }

    /// Called by vCPU `id`'s thread: records its state and waits until resumed, closed, or
    /// `still_running()` turns false (checked every 10 ms).
    pub fn park(&self, id: u8, state: Result<VcpuState, String>, still_running: impl Fn() -> bool) {
        let mut inner = self.lock();
        if !inner.requested {
            return;
        }
        if let Some(slot) = inner.parked.get_mut(usize::from(id)) {
            *slot = Some(state);
        }
        self.changed.notify_all();
        while inner.requested && !inner.closed && still_running() {
            inner = self
                .changed
                .wait_timeout(inner, KICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
