//! The device thread's epoll set and the meaning of its tokens.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::csm::muxer::Watch;
use crate::csm::table::ConnId;
use crate::csm::types::Interest;
use crate::stream::Readiness;

/// What a ready file descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The kick fd of queue `n`.
    Queue(u16),
    /// The device's control fd (stop, API requests).
    Control,
    /// The backend's poll fd (listeners, handshakes).
    Backend,
    /// The core's own "work is left" eventfd.
    Again,
    /// The core's deadline timerfd.
    Timer,
    /// The host stream of a connection (its id carries the slot's generation, so a stale event
    /// for a reused slot is ignored).
    Conn(ConnId),
}

const CONN_BIT: u64 = 1 << 63;
const CONTROL: u64 = 1 << 16;
const BACKEND: u64 = (1 << 16) + 1;
const AGAIN: u64 = (1 << 16) + 2;
const TIMER: u64 = (1 << 16) + 3;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Queue(n) => u64::from(n),
            Token::Control => CONTROL,
            Token::Backend => BACKEND,
            Token::Again => AGAIN,
            Token::Timer => TIMER,
            Token::Conn(id) => CONN_BIT | (u64::from(id.gen) << 32) | u64::from(id.slot),
        }
    }

    fn decode(v: u64) -> Token {
        if v & CONN_BIT != 0 {
            Token::Conn(ConnId::new(v as u32, (v >> 32) as u32))
        } else if v == CONTROL {
            Token::Control
        } else if v == BACKEND {
            Token::Backend
        } else if v == AGAIN {
            Token::Again
        } else if v == TIMER {
            Token::Timer
        } else {
            Token::Queue(v as u16)
        }
    }
}

/// A ready event.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    /// Whose fd it is.
    pub token: Token,
    /// What it is ready for.
    pub readiness: Readiness,
}

/// Level-triggered epoll with typed tokens.
pub struct Poller {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl Poller {
    /// A new epoll set reporting up to `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Self> {
        Ok(Poller {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); capacity.max(1)],
        })
    }

    fn set(read: bool, write: bool) -> EventSet {
        let mut s = EventSet::empty();
        if read {
            s |= EventSet::IN;
        }
        if write {
            s |= EventSet::OUT;
        }
        s
    }

    /// Adds `fd` with the given interest.
    pub fn add(&self, fd: RawFd, token: Token, read: bool, write: bool) -> io::Result<()> {
        let ev = EpollEvent::new(Self::set(read, write), token.encode());
        self.epoll.ctl(ControlOperation::Add, fd, ev)
    }

    /// Changes the interest of a registered `fd`.
    pub fn modify(&self, fd: RawFd, token: Token, read: bool, write: bool) -> io::Result<()> {
        let ev = EpollEvent::new(Self::set(read, write), token.encode());
        self.epoll.ctl(ControlOperation::Modify, fd, ev)
    }

    /// Removes `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits up to `timeout_ms` (-1: forever) and calls `f` for each ready fd.
    pub fn wait(&mut self, timeout_ms: i32, mut f: impl FnMut(Ready)) -> io::Result<usize> {
        let n = match self.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for ev in &self.events[..n] {
            let set = ev.event_set();
            f(Ready {
                token: Token::decode(ev.data()),
                readiness: Readiness {
                    readable: set
                        .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP),
                    writable: set.contains(EventSet::OUT),
                    hangup: set.contains(EventSet::HANG_UP),
                    error: set.contains(EventSet::ERROR),
                },
            });
        }
        Ok(n)
    }
}

impl Watch for Poller {
    fn watch(&self, fd: RawFd, id: ConnId, old: Option<Interest>, new: Interest) -> io::Result<()> {
        let token = Token::Conn(id);
        match (old, new.is_none()) {
            (Some(_), true) => self.remove(fd),
            (None, true) => Ok(()),
            (None, false) => self.add(fd, token, new.read, new.write),
            (Some(_), false) => self.modify(fd, token, new.read, new.write),
        }
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip() {
        for t in [
            Token::Queue(0),
            Token::Queue(2),
            Token::Control,
            Token::Backend,
            Token::Again,
            Token::Timer,
            Token::Conn(ConnId::new(0, 0)),
            Token::Conn(ConnId::new(u32::MAX, 0x7fff_ffff)),
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
    }
}
