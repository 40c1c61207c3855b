//! What the connections' host streams are watched for, applied once per wake-up.
//!
//! [`super::Muxer::after_change`] only notes a connection whose interest may have changed;
//! [`super::Muxer::flush_watch`], at the end of the device's wake-up, compares what each noted
//! connection wants with what its stream is registered for and makes the one `epoll_ctl` that
//! is needed, if any. A change undone within the wake-up costs nothing: a 64-byte round trip
//! used to take two (reading the host's bytes made the connection stop reading until the RX
//! fill sent them, and the fill made it read again, both before the device slept).
//!
//! Only a connection still in the table is touched, so its stream (and fd number) is the one
//! it was registered with: an fd number that a closed connection left and a new one took is
//! only ever registered by the new connection.

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use super::super::connection::{Interest, KillReason, Notify};
use super::super::table::ConnId;
use super::Muxer;
use crate::seam::Backend;

/// What watches the connections' host streams for readiness: the device's epoll set.
pub trait Watch {
    /// `fd` of connection `id` wants `new` instead of `old` (`None`: not watched; a `new` that
    /// [`Interest::is_none`] means "stop watching"). An error kills the connection.
    fn watch(&self, fd: RawFd, id: ConnId, old: Option<Interest>, new: Interest) -> io::Result<()>;
}

impl<B: Backend> Muxer<B> {
    /// Notes that connection `id` (its entry's `noted` flag) may want another interest.
    pub(super) fn note_interest(&mut self, id: ConnId) {
        if let Some(e) = self.table.get_mut(id) {
            if !e.noted {
                e.noted = true;
                self.noted.push(id);
            }
        }
    }

    /// Registers every noted connection's stream for what it wants now (at most one
    /// `epoll_ctl` each). Call before the device waits again. Returns `true` when a connection
    /// had to be reset because its stream could not be watched: it then owes the guest an RST.
    pub fn flush_watch(&mut self, w: &impl Watch, now: Instant) -> bool {
        let mut killed = false;
        // A kill below notes the connection again (it then wants nothing): bounded, because a
        // connection that wants nothing and is not watched needs no call.
        let mut i = 0;
        while i < self.noted.len() {
            let id = self.noted[i];
            i += 1;
            let Some(e) = self.table.get_mut(id) else {
                continue;
            };
            e.noted = false;
            let want = e.conn.interest();
            if e.watched == Some(want) || (e.watched.is_none() && want.is_none()) {
                continue;
            }
            match w.watch(e.conn.fd(), id, e.watched, want) {
                Ok(()) => e.watched = (!want.is_none()).then_some(want),
                Err(_) => {
                    e.conn.kill(KillReason::HostError, Notify::Rst);
                    e.watched = None;
                    killed = true;
                    self.after_change(w, id, now);
                }
            }
        }
        self.noted.clear();
        killed
    }
}
