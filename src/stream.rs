//! The byte stream a connection is backed by: the small host-stream trait the connection state
//! machines and the backends share, and what readiness a stream reports. Depends only on
//! [`crate::sys`] and [`crate::vq`].

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::sys;
use crate::vq::IoVecs;

/// A non-blocking byte stream with a file descriptor: a Unix socket to a host service or a
/// sibling VMM, an AF_VSOCK socket on the uplink. The connection state machine is generic over
/// it; the default methods work for any stream socket.
///
/// Every method must return `WouldBlock` rather than block: they run on the device thread.
pub trait VsockStream: AsRawFd + Send {
    /// Reads into the iovecs (`readv(2)`). `Ok(0)` means end of stream.
    fn read_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
        sys::readv(self.as_raw_fd(), iov)
    }

    /// Writes from the iovecs (`sendmsg(2)` with `MSG_NOSIGNAL`, so a closed peer gives `EPIPE`
    /// instead of killing the VMM with SIGPIPE).
    fn write_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
        sys::sendmsg(self.as_raw_fd(), iov)
    }

    /// Sends one whole message of a `SOCK_SEQPACKET` socket (`sendmsg(2)`, with `MSG_EOR` when
    /// `eor`): it goes whole or not at all (`WouldBlock`; `EMSGSIZE` when the socket can never
    /// take it).
    fn send_msg(&mut self, iov: &IoVecs<'_>, eor: bool) -> io::Result<usize> {
        let flags = if eor { libc::MSG_EOR } else { 0 };
        sys::sendmsg_flags(self.as_raw_fd(), iov, flags)
    }

    /// Receives one message of a `SOCK_SEQPACKET` socket into the iovecs; the result tells its
    /// whole length, so a message longer than the iovecs is seen as cut, never taken for a
    /// shorter one.
    fn recv_msg(&mut self, iov: &IoVecs<'_>) -> io::Result<sys::MsgIn> {
        sys::recvmsg(self.as_raw_fd(), iov)
    }

    /// Consumes up to `buf.len()` bytes into `buf` (`recv(2)`).
    fn recv_bytes(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.as_raw_fd(), buf, false)
    }

    /// Shuts the write side (`shutdown(SHUT_WR)`): the peer reads end of stream.
    fn shutdown_write(&mut self) -> io::Result<()> {
        sys::shutdown(self.as_raw_fd(), Shutdown::Write)
    }

    /// Shuts the read side (`shutdown(SHUT_RD)`): an AF_UNIX peer's writes then fail with
    /// `EPIPE`; over AF_VSOCK the kernel sends the peer SHUTDOWN(RCV).
    fn shutdown_read(&mut self) -> io::Result<()> {
        sys::shutdown(self.as_raw_fd(), Shutdown::Read)
    }

    /// Whether this socket's sending direction is shut: a zero-length `send(2)` fails with
    /// `EPIPE` exactly then (AF_UNIX: we shut our write side, or the peer shut its read side or
    /// closed; AF_VSOCK: we shut our write side, or the peer sent SHUTDOWN(RCV) or RST). Nothing
    /// is sent either way.
    fn send_side_shut(&mut self) -> bool {
        sys::send_nosignal(self.as_raw_fd(), &[])
            .is_err_and(|e| e.raw_os_error() == Some(libc::EPIPE))
    }

    /// Whether the peer is gone both ways (`POLLHUP`: it closed, or shut both directions), or
    /// an error is pending. The probe for a `SOCK_SEQPACKET` socket, where the zero-length send
    /// of [`VsockStream::send_side_shut`] would deliver an empty message.
    fn peer_closed(&self) -> bool {
        sys::peer_hung_up(self.as_raw_fd(), false)
    }

    /// The result of a non-blocking `connect(2)` once the socket is writable (`SO_ERROR`).
    fn connect_result(&mut self) -> io::Result<()> {
        match sys::take_error(self.as_raw_fd())? {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Whether the peer is hanging up: it closed or shut its writing side (`POLLRDHUP`,
    /// `POLLHUP`), or an error is pending.
    fn peer_hanging_up(&self) -> bool {
        sys::peer_hung_up(self.as_raw_fd(), true)
    }
}

impl VsockStream for UnixStream {}

/// What epoll reported for a host stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Readable (or hung up: reading tells how).
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// The peer hung up both directions (EPOLLHUP, reported whatever the interest).
    pub hangup: bool,
    /// An error is pending on the fd.
    pub error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;

    #[test]
    fn the_send_probe_tells_a_peer_that_stopped_receiving() {
        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!a.send_side_shut(), "open both ways");
        b.shutdown(Shutdown::Write).unwrap();
        assert!(
            !a.send_side_shut(),
            "the peer's EOF leaves our sending side open"
        );
        b.shutdown(Shutdown::Read).unwrap();
        assert!(a.send_side_shut(), "the peer stopped receiving");

        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(a.send_side_shut(), "a closed peer receives nothing");

        let (mut a, _b) = UnixStream::pair().unwrap();
        a.shutdown_read().unwrap();
        assert!(
            !a.send_side_shut(),
            "our own read shutdown leaves our sending open"
        );
        a.shutdown_write().unwrap();
        assert!(a.send_side_shut(), "our own write shutdown");
    }

    #[test]
    fn our_read_shutdown_makes_the_unix_peer_fail_with_epipe() {
        use std::io::Write;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.shutdown_read().unwrap();
        let e = b.write(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }
}
