//! [`SockStream`]: the host end of a connection, a non-blocking stream socket (Unix or AF_VSOCK).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::stream::VsockStream;

/// A non-blocking stream socket owned by a connection: a Unix socket to a host service or a
/// sibling VMM, or an AF_VSOCK socket on the uplink.
///
/// Every constructor makes sure the socket is non-blocking, so the [`VsockStream`] defaults
/// (`readv`, `sendmsg`, `shutdown`, `SO_ERROR`) never stall the device thread.
#[derive(Debug)]
pub struct SockStream {
    fd: OwnedFd,
}

impl SockStream {
    /// Wraps a stream socket that the caller already made non-blocking (created with
    /// `SOCK_NONBLOCK`, or accepted and switched with `O_NONBLOCK`).
    pub(crate) fn from_nonblocking(fd: OwnedFd) -> Self {
        SockStream { fd }
    }
}

impl From<UnixStream> for SockStream {
    /// Takes over a Unix stream and makes it non-blocking.
    ///
    /// If switching to non-blocking mode fails (it only can for an fd that is not a socket), the
    /// stream is kept as is and a warning logged; every later call still reports errors.
    fn from(s: UnixStream) -> Self {
        if let Err(e) = s.set_nonblocking(true) {
            log::warn!("vsock backend: cannot make a Unix stream non-blocking: {e}");
        }
        SockStream { fd: s.into() }
    }
}

impl From<SockStream> for OwnedFd {
    fn from(s: SockStream) -> OwnedFd {
        s.fd
    }
}

impl AsRawFd for SockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for SockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl VsockStream for SockStream {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vq::iovec::IoVecs;
    use std::io::{Read, Write};

    #[test]
    fn unix_stream_becomes_non_blocking_and_moves_bytes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = SockStream::from(a);
        assert!(crate::sys::is_nonblocking(s.as_raw_fd()).unwrap());

        let mut buf = [0u8; 8];
        let mut iov = IoVecs::new();
        iov.push_buf(&mut buf);
        let err = s.read_iov(&iov).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);

        b.write_all(b"ping").unwrap();
        let n = s.read_iov(&iov).unwrap();
        assert_eq!(&buf[..n], b"ping");
        s.shutdown_write().unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}
