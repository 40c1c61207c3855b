//! [`LocalPeers`]: sibling devices of one process (the VMs of one `vsock-routerd` that share a
//! CID namespace), which relay to each other without a trip through the registry's socket
//! files: the relay's link is a socket pair, and its far end goes to the sibling's backend in
//! memory, as the registry's socket would have delivered it after the `RELAY` line.
//!
//! Everything after that is the registry relay's (`csm::relay`): the same link, packets and
//! checks, so sibling semantics are the same whichever way the link was made. A sibling whose
//! device is not running yet keeps what arrives in its inbox, bounded as the registry socket's
//! pending handshakes are ([`MAX_PENDING`]); beyond that, a relay is refused (the guest gets an
//! RST, as it would from a full registry backlog).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::accept::DEFAULT_MAX_PENDING;
use super::stream::SockStream;
use crate::seam::{AcceptReply, Framing, Incoming, Path, RouteInfo};
use crate::wire::{Cid, SockType};

/// Relays that may wait in one sibling's inbox.
pub const MAX_PENDING: usize = DEFAULT_MAX_PENDING;

struct Inbox {
    queue: Mutex<VecDeque<Incoming<SockStream>>>,
    wake: EventFd,
}

type Members = Arc<Mutex<HashMap<u64, Arc<Inbox>>>>;

/// A group of sibling devices in this process (one CID namespace). Cheap to clone.
#[derive(Clone)]
pub struct LocalPeers {
    members: Members,
    max_pending: usize,
}

impl Default for LocalPeers {
    fn default() -> Self {
        LocalPeers {
            members: Members::default(),
            max_pending: MAX_PENDING,
        }
    }
}

impl LocalPeers {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty group whose inboxes hold at most `max` relays each (default [`MAX_PENDING`]).
    pub fn with_max_pending(max: usize) -> Self {
        LocalPeers {
            max_pending: max.max(1),
            ..Self::default()
        }
    }

    /// Joins the group as the device of guest `cid`; it leaves when the [`LocalPeer`] drops.
    pub fn join(&self, cid: u64) -> io::Result<LocalPeer> {
        let inbox = Arc::new(Inbox {
            queue: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        });
        let mut m = lock(&self.members);
        if m.contains_key(&cid) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("CID {cid} is already a member of this group of siblings"),
            ));
        }
        m.insert(cid, inbox.clone());
        Ok(LocalPeer {
            cid,
            members: self.members.clone(),
            max_pending: self.max_pending,
            inbox,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One device's membership of a [`LocalPeers`] group.
pub struct LocalPeer {
    cid: u64,
    members: Members,
    max_pending: usize,
    inbox: Arc<Inbox>,
}

impl LocalPeer {
    /// Whether guest `cid` is another member of the group.
    pub fn owns(&self, cid: u64) -> bool {
        cid != self.cid && lock(&self.members).contains_key(&cid)
    }

    /// Opens a relay to the sibling `dst_cid` of the group: a socket pair, whose far end the
    /// sibling's backend finds as an incoming relay from `src_cid:src_port` to its port
    /// `dst_port`. `None` when `dst_cid` is not in the group.
    pub fn relay(
        &self,
        dst_cid: u64,
        dst_port: u32,
        src_cid: u64,
        src_port: u32,
    ) -> Option<io::Result<SockStream>> {
        let inbox = lock(&self.members).get(&dst_cid).cloned()?;
        Some(self.hand_over(&inbox, dst_port, src_cid, src_port))
    }

    fn hand_over(
        &self,
        inbox: &Inbox,
        dst_port: u32,
        src_cid: u64,
        src_port: u32,
    ) -> io::Result<SockStream> {
        if !Cid(src_cid).is_guest() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source CID {src_cid} is not a guest CID"),
            ));
        }
        let (ours, theirs) = UnixStream::pair()?;
        let incoming = Incoming {
            stream: SockStream::from(theirs),
            guest_port: dst_port,
            src_cid,
            src_port: Some(src_port),
            prefix: Vec::new(),
            reply: AcceptReply::None,
            framing: Framing::Packets,
            route: RouteInfo {
                path: Path::Sibling,
                to_host: false,
            },
            // A relayed REQUEST carries its own type.
            sock_type: SockType::Stream,
        };
        {
            let mut q = lock(&inbox.queue);
            if q.len() >= self.max_pending {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the sibling has too many relays waiting",
                ));
            }
            q.push_back(incoming);
        }
        inbox.wake.write(1)?;
        Ok(SockStream::from(ours))
    }

    /// The fd that is readable while relays wait in this device's inbox.
    pub fn poll_fd(&self) -> RawFd {
        self.inbox.wake.as_raw_fd()
    }

    /// Moves the relays waiting in this device's inbox to `out`.
    pub fn process(&self, out: &mut Vec<Incoming<SockStream>>) {
        let _ = self.inbox.wake.read();
        out.extend(lock(&self.inbox.queue).drain(..));
    }
}

impl Drop for LocalPeer {
    fn drop(&mut self) {
        lock(&self.members).remove(&self.cid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_reaches_the_sibling_and_only_members_are_owned() {
        let g = LocalPeers::new();
        let a = g.join(3).unwrap();
        let b = g.join(4).unwrap();
        assert!(g.join(4).is_err(), "a CID joins once");
        assert!(a.owns(4) && !a.owns(3) && !a.owns(5));
        assert!(a.relay(5, 80, 3, 1000).is_none());
        let _link = a.relay(4, 80, 3, 1000).unwrap().unwrap();
        let mut out = Vec::new();
        b.process(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].guest_port, out[0].src_cid, out[0].src_port),
            (80, 3, Some(1000))
        );
        assert_eq!(out[0].framing, Framing::Packets);
        assert!(
            a.relay(4, 80, 2, 1000).unwrap().is_err(),
            "the host is no guest"
        );
        drop(b);
        assert!(!a.owns(4), "a member that left is no sibling");
    }

    #[test]
    fn the_inbox_is_bounded() {
        let g = LocalPeers::with_max_pending(8);
        let a = g.join(3).unwrap();
        let _b = g.join(4).unwrap();
        let mut links = Vec::new();
        for _ in 0..8 {
            links.push(a.relay(4, 80, 3, 1000).unwrap().unwrap());
        }
        assert!(a.relay(4, 80, 3, 1000).unwrap().is_err());
    }
}
