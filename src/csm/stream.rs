//! The byte stream a connection is backed by.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::device::iovec::IoVecs;

/// A non-blocking byte stream with a file descriptor: a Unix socket to a host service or a
/// sibling VMM, an AF_VSOCK socket on the uplink. The connection state machine is generic over
/// it; the default methods work for any stream socket.
///
/// Every method must return `WouldBlock` rather than block: they run on the device thread.
pub trait VsockStream: AsRawFd + Send {
    /// Reads into the iovecs (`readv(2)`). `Ok(0)` means end of stream.
    fn read_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
        let raw = iov.as_raw();
        // SAFETY: `IoVecs` only holds slices of memory that stays valid and writable for its
        // lifetime (guest memory or device-owned buffers); the kernel writes at most their lengths.
        let n = unsafe { libc::readv(self.as_raw_fd(), raw.as_ptr(), raw.len() as libc::c_int) };
        cvt(n)
    }

    /// Writes from the iovecs (`sendmsg(2)` with `MSG_NOSIGNAL`, so a closed peer gives `EPIPE`
    /// instead of killing the VMM with SIGPIPE).
    fn write_iov(&mut self, iov: &IoVecs<'_>) -> io::Result<usize> {
        let raw = iov.as_raw();
        // SAFETY: an all-zero msghdr is valid; the fields set below point to live iovecs.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = raw.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = raw.len() as _;
        // SAFETY: `msg` describes readable memory borrowed for the duration of the call.
        let n = unsafe {
            libc::sendmsg(
                self.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        cvt(n)
    }

    /// Copies up to `buf.len()` waiting bytes without consuming them (`MSG_PEEK`).
    fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        cvt(n)
    }

    /// Consumes up to `buf.len()` bytes into `buf` (`recv(2)`).
    fn recv_bytes(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        cvt(n)
    }

    /// Shuts the write side (`shutdown(SHUT_WR)`): the peer reads end of stream.
    fn shutdown_write(&mut self) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        let r = unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
        cvt(r as isize).map(drop)
    }

    /// The result of a non-blocking `connect(2)` once the socket is writable (`SO_ERROR`).
    fn connect_result(&mut self) -> io::Result<()> {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `err` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        cvt(r as isize)?;
        if err == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(err))
        }
    }
}

impl VsockStream for UnixStream {}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
