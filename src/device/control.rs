//! The way into a running device from other threads ([`Control`]): requests queued behind an
//! eventfd the device thread polls.

use std::collections::VecDeque;
use std::io;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::csm::muxer::ConnInfo;

#[cfg(doc)]
use super::core::Flow;

/// A request to a running device.
pub enum ControlMsg {
    /// Stop and hand back the backend.
    Stop,
    /// Reply with a snapshot of the live connections.
    Connections(Sender<Vec<ConnInfo>>),
    /// Return from the wake-up with [`Flow::Pause`], touching nothing more.
    Pause,
}

/// The way into a running device from other threads: a message queue and an fd that wakes it.
pub struct Control {
    msgs: Mutex<VecDeque<ControlMsg>>,
    pub(super) wake: EventFd,
}

impl Control {
    /// A new control channel.
    pub fn new() -> io::Result<Self> {
        Ok(Control {
            msgs: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Queues a message and wakes the device.
    pub fn send(&self, msg: ControlMsg) -> io::Result<()> {
        self.msgs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(msg);
        self.wake.write(1)
    }

    pub(super) fn take(&self) -> Option<ControlMsg> {
        self.msgs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}
