//! The device in a VMM's event-manager loop (Firecracker style), as a [`MutEventSubscriber`].
//!
//! The subscriber registers one fd, the core's own epoll set ([`DeviceCore::poll_fd`]), which
//! holds the queue kicks, the backend, every host stream, and the core's wake eventfd and
//! deadline timerfd. When it is readable, [`DeviceCore::run_once`] handles the whole batch of
//! ready fds and raises at most one interrupt at its end — which event-manager's one call per
//! ready fd could not express if the device registered each fd itself.
//!
//! Pick it when the VMM already runs its devices in one event-manager loop and wants no thread
//! per device; pick the device thread ([`super::worker`], the default) when a busy device must
//! never delay the VMM's own loop (API, serial).

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::core::{DeviceCore, Flow};
use crate::csm::muxer::ConnInfo;
use crate::seam::Backend;

/// The running core, shared by the subscriber (which runs it) and the device (which takes it
/// back on reset).
pub(crate) type SharedCore<B> = Arc<Mutex<Option<DeviceCore<B>>>>;

/// An activated device to add to an `event_manager::EventManager`; see the
/// [module documentation](self). Get it from
/// [`VsockDevice::subscriber`](super::VsockDevice::subscriber).
pub struct VsockSubscriber<B: Backend> {
    core: SharedCore<B>,
}

impl<B: Backend> VsockSubscriber<B> {
    pub(crate) fn new(core: SharedCore<B>) -> Self {
        VsockSubscriber { core }
    }

    /// The fd to wait on for readability before [`VsockSubscriber::run_once`] (`None` once the
    /// device was reset).
    pub fn poll_fd(&self) -> Option<RawFd> {
        self.lock().as_ref().map(DeviceCore::poll_fd)
    }

    /// One wake-up of the device in the calling thread, for a loop that is not an event
    /// manager (a test's, a fuzzer's): see [`DeviceCore::run_once`]. [`Flow::Stop`] once the
    /// device was reset.
    pub fn run_once(&self, timeout_ms: i32) -> io::Result<Flow> {
        match self.lock().as_mut() {
            Some(core) => core.run_once(timeout_ms),
            None => Ok(Flow::Stop),
        }
    }

    /// Puts the device on a manual clock ([`DeviceCore::use_manual_clock`]): for a loop that
    /// simulates time. Nothing once the device was reset.
    pub fn use_manual_clock(&self) -> io::Result<()> {
        match self.lock().as_mut() {
            Some(core) => core.use_manual_clock(),
            None => Ok(()),
        }
    }

    /// Moves the device's manual clock on by `by` ([`DeviceCore::advance_clock`]).
    pub fn advance_clock(&self, by: Duration) {
        if let Some(core) = self.lock().as_mut() {
            core.advance_clock(by);
        }
    }

    /// The device's time ([`DeviceCore::now`]); `None` once the device was reset.
    pub fn now(&self) -> Option<Instant> {
        self.lock().as_ref().map(DeviceCore::now)
    }

    /// The device's earliest deadline ([`DeviceCore::next_deadline`]).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().as_ref().and_then(DeviceCore::next_deadline)
    }

    /// A snapshot of the live connections, taken in the calling thread.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.lock()
            .as_ref()
            .map(DeviceCore::connections)
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<DeviceCore<B>>> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: Backend> MutEventSubscriber for VsockSubscriber<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let guard = self.core.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(core) = guard.as_ref() {
            if let Err(e) = ops.add(Events::new_raw(core.poll_fd(), EventSet::IN)) {
                log::error!("vsock: cannot add the device to the event manager: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut guard = self.core.lock().unwrap_or_else(|p| p.into_inner());
        let stop = match guard.as_mut() {
            // The device was reset: the core is gone.
            None => true,
            Some(core) => match core.run_once(0) {
                Ok(Flow::Continue | Flow::Pause) => false,
                Ok(Flow::Stop) => true,
                Err(e) => {
                    log::error!("vsock device failed: {e}");
                    true
                }
            },
        };
        if stop {
            let _ = ops.remove(events);
        }
    }
}
