//! [`AcceptBackoff`]: what a listener does when `accept()` runs out of file descriptors.
//!
//! An `accept()` that fails with `EMFILE`, `ENFILE` (no file descriptor left in the process or
//! the system), `ENOBUFS` or `ENOMEM` leaves the connection in the listener's backlog. The
//! listener's epoll set is level-triggered, so it would report the listener again at once: the
//! device thread would spin on it and log a warning per turn. Instead the listener leaves the
//! epoll set for [`ACCEPT_BACKOFF`] and comes back once that has passed (the caller's next
//! deadline says when); the condition is logged at most once per [`WARN_EVERY`].

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// How long a listener rests after `accept()` ran out of descriptors or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Warnings about one listener's exhaustion come at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The back-off state of one listener in one epoll set.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    until: Option<Instant>,
    last_warn: Option<Instant>,
    /// Shared with other threads (the API's metrics, [`AcceptBackoff::pause_counter`]).
    pauses: Arc<AtomicU64>,
}

impl AcceptBackoff {
    /// Whether `e`, returned by `accept()`, means the process or the system is out of
    /// descriptors or memory (the connection is still waiting in the backlog).
    pub fn is_exhaustion(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    /// Takes the listener `fd` out of `epoll` until `now` + [`ACCEPT_BACKOFF`], after `accept()`
    /// failed with `e` ([`AcceptBackoff::is_exhaustion`]); `what` names it in the log.
    pub fn pause(&mut self, epoll: &Epoll, fd: RawFd, what: &str, e: &io::Error, now: Instant) {
        if self.until.is_some() {
            return;
        }
        if let Err(del) = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()) {
            log::warn!("vsock backend: {what}: cannot pause the listener: {del}");
        }
        self.until = Some(now + ACCEPT_BACKOFF);
        let pauses = self.pauses.fetch_add(1, Ordering::Relaxed) + 1;
        if self
            .last_warn
            .is_none_or(|t| now.saturating_duration_since(t) >= WARN_EVERY)
        {
            self.last_warn = Some(now);
            log::warn!(
                "vsock backend: {what}: accept: {e}; new connections wait in the backlog, \
                 retried every {} ms (paused {} times so far)",
                ACCEPT_BACKOFF.as_millis(),
                pauses
            );
        }
    }

    /// Puts the listener `fd` back into `epoll` (reporting `token`) once its pause is over at
    /// `now`. Returns whether it did.
    pub fn resume_due(&mut self, epoll: &Epoll, fd: RawFd, token: u64, now: Instant) -> bool {
        match self.until {
            Some(t) if t <= now => {
                self.until = None;
                if let Err(e) = epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                ) {
                    log::warn!("vsock backend: cannot resume a paused listener: {e}");
                }
                true
            }
            _ => false,
        }
    }

    /// When the pause ends (the caller must run by then), if the listener is paused.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }

    /// How many times the listener was paused.
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// The pause count, readable from other threads.
    pub fn pause_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.pauses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn readable(epoll: &Epoll) -> usize {
        let mut evs = [EpollEvent::default(); 4];
        epoll.wait(0, &mut evs).unwrap()
    }

    #[test]
    fn a_paused_listener_leaves_the_set_and_comes_back_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("s")).unwrap();
        let _c = UnixStream::connect(dir.path().join("s")).unwrap();
        let epoll = Epoll::new().unwrap();
        let fd = l.as_raw_fd();
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 7))
            .unwrap();
        assert_eq!(
            readable(&epoll),
            1,
            "a waiting connection makes it readable"
        );
        let mut b = AcceptBackoff::default();
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(AcceptBackoff::is_exhaustion(&e));
        assert!(!AcceptBackoff::is_exhaustion(
            &io::Error::from_raw_os_error(libc::EINVAL)
        ));
        let t0 = Instant::now();
        b.pause(&epoll, fd, "test", &e, t0);
        b.pause(&epoll, fd, "test", &e, t0); // already paused: no second pause
        assert_eq!(b.pauses(), 1);
        assert_eq!(b.deadline(), Some(t0 + ACCEPT_BACKOFF));
        assert_eq!(readable(&epoll), 0, "paused: nothing wakes the thread");
        assert!(!b.resume_due(&epoll, fd, 7, t0 + ACCEPT_BACKOFF / 2));
        assert_eq!(readable(&epoll), 0);
        assert!(b.resume_due(&epoll, fd, 7, t0 + ACCEPT_BACKOFF));
        assert_eq!(b.deadline(), None);
        let mut evs = [EpollEvent::default(); 4];
        assert_eq!(epoll.wait(0, &mut evs).unwrap(), 1);
        assert_eq!(evs[0].data(), 7, "back with its token");
    }
}
