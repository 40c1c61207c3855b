//! The device thread's epoll set and the meaning of its tokens.

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What a ready file descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The kick fd of queue `n`.
    Queue(u16),
    /// The device's control fd (stop, API requests).
    Control,
    /// The backend's poll fd (listeners, handshakes).
    Backend,
    /// The host stream of the connection in table slot `slot`, generation `gen`.
    Conn {
        /// Table slot.
        slot: u32,
        /// Generation of the slot, so a stale event for a reused slot is ignored.
        gen: u32,
    },
}

const CONN_BIT: u64 = 1 << 63;
const CONTROL: u64 = 1 << 16;
const BACKEND: u64 = (1 << 16) + 1;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Queue(n) => u64::from(n),
            Token::Control => CONTROL,
            Token::Backend => BACKEND,
            Token::Conn { slot, gen } => {
                CONN_BIT | (u64::from(gen & 0x7fff_ffff) << 32) | u64::from(slot)
            }
        }
    }

    fn decode(v: u64) -> Token {
        if v & CONN_BIT != 0 {
            Token::Conn {
                slot: v as u32,
                gen: ((v >> 32) as u32) & 0x7fff_ffff,
            }
        } else if v == CONTROL {
            Token::Control
        } else if v == BACKEND {
            Token::Backend
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
    /// Readable (or hung up: reading tells how).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// The peer hung up both directions (EPOLLHUP, reported whatever the interest).
    pub hangup: bool,
    /// An error is pending on the fd.
    pub error: bool,
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
                readable: set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP),
                writable: set.contains(EventSet::OUT),
                hangup: set.contains(EventSet::HANG_UP),
                error: set.contains(EventSet::ERROR),
            });
        }
        Ok(n)
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
            Token::Conn { slot: 0, gen: 0 },
            Token::Conn {
                slot: u32::MAX,
                gen: 0x7fff_ffff,
            },
        ] {
            assert_eq!(Token::decode(t.encode()), t);
        }
    }
}
