//! Socket and file-descriptor system calls.

use std::io;
use std::mem;
use std::net::Shutdown;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use crate::vq::IoVecs;

/// A system call's `-1` as the thread's `errno`, anything else as a count.
pub fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A new non-blocking, close-on-exec stream socket of `domain` (`AF_UNIX`, `AF_VSOCK`).
pub fn stream_socket(domain: libc::c_int) -> io::Result<OwnedFd> {
    socket(domain, libc::SOCK_STREAM)
}

/// A new non-blocking, close-on-exec socket of `domain` and type `ty` (`SOCK_STREAM`,
/// `SOCK_SEQPACKET`).
pub fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    cvt(fd as isize)?;
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Builds a `sockaddr_un` for a filesystem path.
fn sockaddr_un(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "Unix socket path {} must be 1 to {} bytes without NUL (it has {})",
                path.display(),
                addr.sun_path.len() - 1,
                bytes.len()
            ),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Connects the Unix socket `fd` to `path` (retrying on `EINTR`).
pub fn connect_unix(fd: RawFd, path: &Path) -> io::Result<()> {
    let (addr, len) = sockaddr_un(path)?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
        let r = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
        match cvt(r as isize) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(drop),
        }
    }
}

/// `readv(2)` into the iovecs. `Ok(0)` is end of stream.
pub fn readv(fd: RawFd, iov: &IoVecs<'_>) -> io::Result<usize> {
    let raw = iov.as_raw();
    // SAFETY: `IoVecs` only holds slices of memory that stays valid and writable for its
    // lifetime (guest memory or device-owned buffers); the kernel writes at most their lengths.
    let n = unsafe { libc::readv(fd, raw.as_ptr(), raw.len() as libc::c_int) };
    cvt(n)
}

/// `sendmsg(2)` of the iovecs, non-blocking and without SIGPIPE (a closed peer gives `EPIPE`).
pub fn sendmsg(fd: RawFd, iov: &IoVecs<'_>) -> io::Result<usize> {
    sendmsg_flags(fd, iov, 0)
}

/// [`sendmsg`] with more flags (`MSG_EOR`).
pub fn sendmsg_flags(fd: RawFd, iov: &IoVecs<'_>, flags: libc::c_int) -> io::Result<usize> {
    let raw = iov.as_raw();
    // SAFETY: an all-zero msghdr is valid; the fields set below point to live iovecs.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = raw.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = raw.len() as _;
    let flags = flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    // SAFETY: `msg` describes readable memory borrowed for the duration of the call.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    cvt(n)
}

/// What [`recvmsg`] of one message of a `SOCK_SEQPACKET` socket got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgIn {
    /// The whole message's length: more than the iovecs held when it was cut.
    pub len: usize,
    /// The message was longer than the iovecs (`MSG_TRUNC`): its rest is lost.
    pub truncated: bool,
    /// The message ends a record (`MSG_EOR`; AF_VSOCK reports it, AF_UNIX never does).
    pub eor: bool,
}

/// A non-blocking `recvmsg(2)` of one message into the iovecs, with `MSG_TRUNC` so that the
/// result tells the message's real length.
pub fn recvmsg(fd: RawFd, iov: &IoVecs<'_>) -> io::Result<MsgIn> {
    let raw = iov.as_raw();
    // SAFETY: an all-zero msghdr is valid; the fields set below point to live iovecs.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = raw.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = raw.len() as _;
    // SAFETY: `IoVecs` only holds memory valid for writes of its lengths for its lifetime; the
    // kernel writes at most that, and `msg` lives across the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
    let len = cvt(n)?;
    Ok(MsgIn {
        len,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        eor: msg.msg_flags & libc::MSG_EOR != 0,
    })
}

/// `send(2)` of `buf`, non-blocking and without SIGPIPE.
pub fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length during the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    cvt(n)
}

/// A non-blocking `recv(2)` into `buf` (with `MSG_PEEK` when `peek`).
pub fn recv(fd: RawFd, buf: &mut [u8], peek: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    // SAFETY: `buf` is valid for writes of its length during the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
    cvt(n)
}

/// `shutdown(2)` of one or both directions.
pub fn shutdown(fd: RawFd, how: Shutdown) -> io::Result<()> {
    let how = match how {
        Shutdown::Read => libc::SHUT_RD,
        Shutdown::Write => libc::SHUT_WR,
        Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: plain syscall on a caller's fd.
    cvt(unsafe { libc::shutdown(fd, how) } as isize).map(drop)
}

/// The error pending on a socket (`SO_ERROR`), if any; reading it clears it.
pub fn take_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r as isize)?;
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// Sets an integer socket option.
pub fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r as isize).map(drop)
}

/// Sets a `struct timeval` socket option to `d`.
pub fn set_timeval_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    d: Duration,
) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros() as i32),
    };
    // SAFETY: `tv` is a valid timeval for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    cvt(r as isize).map(drop)
}

/// Waits up to `timeout_ms` (0: not at all; -1: forever) for `events` on one fd and returns
/// the events that happened (`POLLHUP`, `POLLERR` and `POLLNVAL` whatever was asked; 0 on
/// timeout).
pub fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match cvt(n as isize) {
            Ok(_) => return Ok(pfd.revents),
            Err(e) if e.kind() == io::ErrorKind::Interrupted && timeout_ms == 0 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Whether the peer of a stream socket hung up, fully (`POLLHUP`) or, with `write_side_too`,
/// also when it only shut its writing side (`POLLRDHUP`); an error pending counts as gone.
pub fn peer_hung_up(fd: RawFd, write_side_too: bool) -> bool {
    let gone = libc::POLLHUP | libc::POLLERR | if write_side_too { libc::POLLRDHUP } else { 0 };
    poll_one(fd, libc::POLLRDHUP, 0).is_ok_and(|r| r & gone != 0)
}

/// Switches `fd` to blocking (`nonblocking == false`) or non-blocking mode.
pub fn set_nonblocking(fd: RawFd, nonblocking: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a caller's fd reads no memory.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) } as isize)? as libc::c_int;
    let fl = if nonblocking {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL with plain flags reads no memory.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl) } as isize).map(drop)
}

/// Whether `fd` is in non-blocking mode.
pub fn is_nonblocking(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_GETFL on a caller's fd reads no memory.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) } as isize)? as libc::c_int;
    Ok(fl & libc::O_NONBLOCK != 0)
}

/// Reads an integer socket option.
pub fn get_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    cvt(r as isize)?;
    Ok(value)
}

/// Binds the Unix socket `fd` to the filesystem `path` and makes it listen with `backlog`, so
/// that `path` appears only once the socket listens.
///
/// A plain `bind` + `listen` (std's `UnixListener::bind`) lets the path exist for a moment in
/// which a connect is refused: a client that waits for the path and connects at once meets
/// `ECONNREFUSED` when the binding process is preempted between the two calls (seen under load,
/// with several VMMs starting at once, in `vmm/tests/api_hostile.rs`). So the socket is bound
/// and listening under a temporary name in the same directory first, then linked to `path`
/// (`link(2)` refuses an existing `path`: `AddrInUse`, as `bind(2)` would) and the temporary
/// name removed. A directory where that name would not fit in `sun_path` binds `path` directly.
pub fn bind_listen_unix(fd: RawFd, path: &Path, backlog: libc::c_int) -> io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    sockaddr_un(path)?;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".vr-bind-{}-{n}", std::process::id()));
    if sockaddr_un(&tmp).is_err() {
        return bind_then_listen(fd, path, backlog);
    }
    if let Err(e) = bind_then_listen(fd, &tmp, backlog) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} already exists", path.display()),
        ),
        _ => e,
    })
}

fn bind_then_listen(fd: RawFd, path: &Path, backlog: libc::c_int) -> io::Result<()> {
    let (addr, len) = sockaddr_un(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes, alive for the call.
    let r = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    cvt(r as isize)?;
    // SAFETY: plain syscall on a caller's socket.
    cvt(unsafe { libc::listen(fd, backlog) } as isize).map(drop)
}

/// The length of the next message waiting on a `SOCK_SEQPACKET` socket, without taking it
/// (`recv(2)` with `MSG_PEEK | MSG_TRUNC`, non-blocking): `WouldBlock` when none waits, `Ok(0)`
/// for an empty message or end of stream.
pub fn peek_msg_len(fd: RawFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    let flags = libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT;
    // SAFETY: `byte` is valid for writes of its length during the call; with MSG_TRUNC the
    // kernel still writes at most that length and only reports the message's real one.
    let n = unsafe { libc::recv(fd, byte.as_mut_ptr().cast(), byte.len(), flags) };
    cvt(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn listen_at(path: &Path) -> io::Result<OwnedFd> {
        let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
        bind_listen_unix(fd.as_raw_fd(), path, 4)?;
        Ok(fd)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_path_appears_listening_and_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = listen_at(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        assert_eq!(names(dir.path()), ["s.sock"], "no temporary name is left");
        // A taken path is refused as bind(2) refuses it, and leaves nothing behind.
        let e = listen_at(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert_eq!(names(dir.path()), ["s.sock"]);
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            listen_at(&file).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        assert_eq!(names(dir.path()), ["f", "s.sock"]);
    }

    #[test]
    fn a_directory_too_deep_for_the_temporary_name_binds_directly() {
        let dir = tempfile::tempdir().unwrap();
        // A directory of 95 bytes: `s` in it fits in sun_path (107 bytes at most), the
        // temporary name (`.vr-bind-<pid>-<n>`) does not.
        let fill = 95 - dir.path().as_os_str().len() - 1;
        let deep = dir.path().join("d".repeat(fill));
        std::fs::create_dir(&deep).unwrap();
        let path = deep.join("s");
        let _l = listen_at(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        assert_eq!(names(&deep), ["s"]);
        let long = deep.join("y".repeat(20));
        assert_eq!(
            listen_at(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
