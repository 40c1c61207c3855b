//! `SOCK_SEQPACKET` on the host side: where the seqpacket sockets live and how their send
//! buffers are sized (docs/routing.md, "SOCK_SEQPACKET").
//!
//! - Guest → host port `P`: the same `<socket>_P` path as streams, connected with a
//!   `SOCK_SEQPACKET` socket; a listener of the other type refuses at once with `EPROTOTYPE`.
//! - Host → guest: a second hybrid listener at `<socket>_seqpacket` ([`seqpacket_path`]), and in
//!   a CID registry `<dir>/<cid>.sock_seqpacket` beside the stream socket, both served by a
//!   [`HandshakeServer`](super::HandshakeServer) in message mode.
//!
//! AF_UNIX refuses a `SOCK_SEQPACKET` message longer than the sender's `sk_sndbuf - 32` with
//! `EMSGSIZE`, whatever the receiver has room for. The kernel doubles the `SO_SNDBUF` value it
//! is given and caps it at `net.core.wmem_max` (default 212992, so at most 425984), so every
//! socket on which the device sends messages is sized with [`fit_messages`], best effort: when
//! the cap is lower, a larger message later fails with `EMSGSIZE` and the device resets the
//! connection with a logged reason (a message is never cut).

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::sys;

/// The largest message a host-side `SOCK_SEQPACKET` socket is sized for unless told otherwise:
/// the device's default per-connection buffer (`buffer_size`, 256 KiB). A guest cannot send a
/// message larger than the buffer the device advertises.
pub const DEFAULT_MAX_MESSAGE: usize = 256 * 1024;

/// What the name of a seqpacket socket adds to the stream socket's path.
pub const SEQPACKET_SUFFIX: &str = "_seqpacket";

/// What AF_UNIX keeps of `sk_sndbuf` for itself when it checks a message's size.
const UNIX_MSG_OVERHEAD: usize = 32;

/// The seqpacket socket beside the stream socket `socket`: `<socket>_seqpacket`.
pub fn seqpacket_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(SEQPACKET_SUFFIX);
    PathBuf::from(p)
}

/// The largest message AF_UNIX lets the socket `fd` send now (`SO_SNDBUF - 32`).
pub fn max_sendable(fd: RawFd) -> std::io::Result<usize> {
    let buf = sys::get_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    Ok(usize::try_from(buf)
        .unwrap_or(0)
        .saturating_sub(UNIX_MSG_OVERHEAD))
}

/// Raises the `SO_SNDBUF` of the AF_UNIX socket `fd` so that one message of `max_message` bytes
/// fits, if it does not already (it is never lowered). Best effort: returns whether it fits
/// now; when `net.core.wmem_max` keeps it lower (or the option fails) that is logged at debug
/// level, and larger messages will fail with `EMSGSIZE`.
pub fn fit_messages(fd: RawFd, max_message: usize) -> bool {
    if max_sendable(fd).is_ok_and(|n| n >= max_message) {
        return true;
    }
    // The kernel stores twice the value given.
    let want = (max_message + UNIX_MSG_OVERHEAD).div_ceil(2);
    let want = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
    if let Err(e) = sys::set_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want) {
        log::debug!("vsock backend: seqpacket socket: SO_SNDBUF {want}: {e}");
        return false;
    }
    match max_sendable(fd) {
        Ok(n) if n >= max_message => true,
        Ok(n) => {
            log::debug!(
                "vsock backend: seqpacket socket: SO_SNDBUF fits messages of {n} bytes, not \
                 {max_message} (net.core.wmem_max caps it): larger ones fail with EMSGSIZE"
            );
            false
        }
        Err(e) => {
            log::debug!("vsock backend: seqpacket socket: reading SO_SNDBUF: {e}");
            false
        }
    }
}

/// Helpers for the tests of the seqpacket paths, and the tests of the host's
/// `<socket>_seqpacket` server.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::host::HostBackend;
    use crate::backend::stream::SockStream;
    use crate::backend::{AcceptReply, Framing, Incoming};
    use crate::seam::{Path as RoutePath, RouteInfo, SockType};
    use crate::sys::MsgIn;
    use crate::vq::IoVecs;
    use std::io::{ErrorKind, Write};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    const T: Duration = Duration::from_millis(200);

    /// A blocking `SOCK_SEQPACKET` client connected to `path` (a `UnixStream` holds the fd:
    /// each `write` is one message).
    pub(crate) fn seq_client(path: &Path) -> std::io::Result<UnixStream> {
        let fd = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET)?;
        sys::connect_unix(fd.as_raw_fd(), path)?;
        let s = UnixStream::from(fd);
        s.set_nonblocking(false)?;
        Ok(s)
    }

    /// A blocking `SOCK_SEQPACKET` listener bound at `path`.
    pub(crate) fn seq_listener(path: &Path) -> UnixListener {
        let fd = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET).unwrap();
        sys::bind_listen_unix(fd.as_raw_fd(), path, 16).unwrap();
        let l = UnixListener::from(fd);
        l.set_nonblocking(false).unwrap();
        l
    }

    /// Receives one message (waiting at most 2 s) into a buffer of `cap` bytes.
    pub(crate) fn recv_one(fd: &impl AsRawFd, cap: usize) -> (Vec<u8>, MsgIn) {
        let end = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; cap];
        loop {
            assert!(
                sys::poll_one(fd.as_raw_fd(), libc::POLLIN, 2000).unwrap() != 0,
                "no message"
            );
            let mut iov = IoVecs::new();
            iov.push_buf(&mut buf);
            match sys::recvmsg(fd.as_raw_fd(), &iov) {
                Ok(m) => {
                    buf.truncate(m.len.min(cap));
                    return (buf, m);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {}
                Err(e) => panic!("recvmsg: {e}"),
            }
        }
    }

    /// Sends `msg` as one message on a non-blocking socket, waiting (at most 2 s) for room.
    pub(crate) fn send_one(fd: &impl AsRawFd, msg: &[u8]) -> std::io::Result<usize> {
        let mut m = msg.to_vec();
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            let mut iov = IoVecs::new();
            iov.push_buf(&mut m);
            match sys::sendmsg(fd.as_raw_fd(), &iov) {
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                    sys::poll_one(fd.as_raw_fd(), libc::POLLOUT, 100)?;
                }
                r => return r,
            }
        }
    }

    /// The client was closed by the server: a read sees end of stream (0) or a reset.
    pub(crate) fn assert_closed(c: &UnixStream) {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        match (&*c).read_vectored(&mut [std::io::IoSliceMut::new(&mut b)]) {
            Ok(0) => assert!(sys::peer_hung_up(c.as_raw_fd(), true), "an empty message"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("client not closed: {other:?}"),
        }
    }

    use std::io::Read;

    /// A message of `len` bytes with a pattern that tells a cut or a shift.
    pub(crate) fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    fn host(dir: &tempfile::TempDir) -> HostBackend {
        HostBackend::bind(&dir.path().join("v.sock"), T, DEFAULT_MAX_MESSAGE).unwrap()
    }

    fn run_until(
        h: &mut HostBackend,
        out: &mut Vec<Incoming<SockStream>>,
        mut done: impl FnMut(&HostBackend, &[Incoming<SockStream>]) -> bool,
    ) {
        let end = Instant::now() + Duration::from_secs(2);
        while !done(h, out) {
            assert!(
                Instant::now() < end,
                "timed out; stats {:?}",
                h.seqpacket_server().stats()
            );
            h.seqpacket_server_mut().process(Instant::now(), out);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn rejected(h: &HostBackend) -> u64 {
        h.seqpacket_server().stats().rejected
    }

    #[test]
    fn the_path_is_beside_the_stream_socket() {
        assert_eq!(
            seqpacket_path(Path::new("/run/vm/v.sock")),
            Path::new("/run/vm/v.sock_seqpacket")
        );
        let dir = tempfile::tempdir().unwrap();
        let h = host(&dir);
        assert_eq!(
            h.seqpacket_socket_path(),
            dir.path().join("v.sock_seqpacket")
        );
        assert_eq!(h.seqpacket_server().sock_type(), SockType::Seqpacket);
        assert_eq!(h.server().sock_type(), SockType::Stream);
        // Each socket takes its own type only.
        let e = UnixStream::connect(h.seqpacket_socket_path()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE));
        let e = seq_client(h.socket_path()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE));
    }

    #[test]
    fn a_connect_message_yields_a_seqpacket_incoming_and_later_messages_stay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = seq_client(h.seqpacket_socket_path()).unwrap();
        c.write_all(b"CONNECT 5000\n").unwrap();
        // A message sent before the answer is the device's to read, whole.
        let early = pattern(3000, 1);
        c.write_all(&early).unwrap();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 5000);
        assert_eq!((inc.src_cid, inc.src_port), (2, None));
        assert!(inc.prefix.is_empty());
        assert_eq!(inc.reply, AcceptReply::HybridOk);
        assert_eq!(inc.framing, Framing::Bytes);
        assert_eq!(inc.sock_type, SockType::Seqpacket);
        assert_eq!(
            inc.route,
            RouteInfo {
                path: RoutePath::Host,
                to_host: false
            }
        );
        let st = h.seqpacket_server().stats();
        assert_eq!((st.accepted, st.completed, st.rejected), (1, 1, 0));
        assert_eq!(
            h.server().stats().accepted,
            0,
            "the stream server saw nothing"
        );
        assert_eq!(h.seqpacket_server().pending(), 0);
        // The device can send it messages of the device's buffer size.
        assert!(max_sendable(inc.stream.as_raw_fd()).unwrap() >= DEFAULT_MAX_MESSAGE);
        let (got, m) = recv_one(&inc.stream, 8192);
        assert!(!m.truncated);
        assert_eq!(got, early);
        // The OK goes back as one message, and so does a large one.
        assert_eq!(send_one(&inc.stream, b"OK 1073741824\n").unwrap(), 14);
        let big = pattern(DEFAULT_MAX_MESSAGE, 7);
        assert_eq!(send_one(&inc.stream, &big).unwrap(), big.len());
        let (got, m) = recv_one(&c, 64);
        assert_eq!(
            (got.as_slice(), m.truncated),
            (&b"OK 1073741824\n"[..], false)
        );
        let (got, m) = recv_one(&c, big.len() + 1);
        assert!(!m.truncated);
        assert_eq!(got, big);
    }

    #[test]
    fn a_first_message_that_is_not_exactly_one_hybrid_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut out = Vec::new();
        let mut oversize = b"CONNECT ".to_vec();
        oversize.extend_from_slice(&[b'1'; 100]);
        oversize.push(b'\n');
        let bad: [&[u8]; 8] = [
            b"CONNECT 5000",             // no newline
            b"CONNECT 5000\nhello",      // bytes after the newline
            b"CONNECT 5000\n\n",         // a second line
            b"CONNECT 80 FROM 5 1234\n", // a registry line
            b"RELAY 80 FROM 5 1234\n",   // a relay line
            b"\x16\x03\x01\x02\x00",     // garbage
            b"CONNECT 99999999999\n",    // a port beyond 32 bits
            &oversize,                   // cut at MAX_LINE (MSG_TRUNC)
        ];
        for (i, msg) in bad.iter().enumerate() {
            let mut c = seq_client(h.seqpacket_socket_path()).unwrap();
            c.write_all(msg).unwrap();
            let start = Instant::now();
            run_until(&mut h, &mut out, |h, _| rejected(h) == i as u64 + 1);
            assert!(
                start.elapsed() < T,
                "{msg:?} refused at once, not by timeout"
            );
            assert_closed(&c);
        }
        assert!(out.is_empty());
        assert_eq!(h.seqpacket_server().pending(), 0);
        // A complete line split over two messages is two bad messages, not one line.
        let mut c = seq_client(h.seqpacket_socket_path()).unwrap();
        c.write_all(b"CONNECT ").unwrap();
        c.write_all(b"5000\n").unwrap();
        run_until(&mut h, &mut out, |h, _| rejected(h) == bad.len() as u64 + 1);
        assert!(out.is_empty());
    }

    #[test]
    fn an_empty_first_message_or_end_of_stream_closes_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut out = Vec::new();
        let c = seq_client(h.seqpacket_socket_path()).unwrap();
        assert_eq!((&c).write(b"").unwrap(), 0);
        run_until(&mut h, &mut out, |h, _| rejected(h) == 1);
        assert_closed(&c);
        let c = seq_client(h.seqpacket_socket_path()).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        run_until(&mut h, &mut out, |h, _| rejected(h) == 2);
        assert_closed(&c);
        drop(seq_client(h.seqpacket_socket_path()).unwrap());
        run_until(&mut h, &mut out, |h, _| rejected(h) == 3);
        assert!(out.is_empty());
        assert_eq!(h.seqpacket_server().pending(), 0);
    }

    #[test]
    fn a_silent_client_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let c = seq_client(h.seqpacket_socket_path()).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |h, _| h.seqpacket_server().pending() == 1);
        let deadline = h.seqpacket_server().next_deadline().unwrap();
        assert!(deadline <= start + T + Duration::from_millis(100));
        run_until(&mut h, &mut out, |h, _| {
            h.seqpacket_server().stats().timed_out == 1
        });
        assert!(start.elapsed() >= T);
        assert_eq!(h.seqpacket_server().pending(), 0);
        assert_eq!(h.seqpacket_server().next_deadline(), None);
        assert!(out.is_empty());
        assert_closed(&c);
    }

    #[test]
    fn the_pending_limit_evicts_the_oldest_after_a_last_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        h.seqpacket_server_mut().set_max_pending(2);
        let mut out = Vec::new();
        let a = seq_client(h.seqpacket_socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.seqpacket_server().pending() == 1);
        let _b = seq_client(h.seqpacket_socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.seqpacket_server().pending() == 2);
        let mut c = seq_client(h.seqpacket_socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| {
            h.seqpacket_server().stats().over_limit == 1
        });
        assert_eq!(h.seqpacket_server().pending(), 2);
        assert_closed(&a);
        c.write_all(b"CONNECT 9\n").unwrap();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        assert_eq!(out[0].guest_port, 9);

        // The oldest client's message, waiting in its socket, is read before it is evicted.
        h.seqpacket_server_mut().set_max_pending(1);
        out.clear();
        let dir2 = tempfile::tempdir().unwrap();
        let mut h = host(&dir2);
        h.seqpacket_server_mut().set_max_pending(1);
        let mut a = seq_client(h.seqpacket_socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.seqpacket_server().pending() == 1);
        a.write_all(b"CONNECT 5\n").unwrap();
        let _b = seq_client(h.seqpacket_socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, o| {
            h.seqpacket_server().stats().accepted == 2 && !o.is_empty()
        });
        assert_eq!(out[0].guest_port, 5);
        assert_eq!(h.seqpacket_server().stats().over_limit, 0);
    }

    #[test]
    fn the_socket_file_is_replaced_when_stale_refused_when_live_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let seq = dir.path().join("v.sock_seqpacket");
        // A seqpacket listener that died without unlinking its file.
        drop(seq_listener(&seq));
        assert!(seq.exists());
        let h = HostBackend::bind(&sock, T, DEFAULT_MAX_MESSAGE).unwrap();
        assert!(seq_client(&seq).is_ok(), "the new listener serves the path");
        // A second backend on the same path is refused, and leaves the first one's files.
        let e = HostBackend::bind(&sock, T, DEFAULT_MAX_MESSAGE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        drop(h);
        assert!(
            !sock.exists() && !seq.exists(),
            "both files removed on drop"
        );

        // A live listener of either type at the seqpacket path is never replaced, and the
        // stream socket bound just before is removed again.
        let seqpacket = |p: &Path| OwnedFd::from(seq_listener(p));
        let stream = |p: &Path| OwnedFd::from(UnixListener::bind(p).unwrap());
        for listen in [seqpacket, stream] {
            let live = listen(&seq);
            let e = HostBackend::bind(&sock, T, DEFAULT_MAX_MESSAGE).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
            assert!(e.to_string().contains("v.sock_seqpacket"), "{e}");
            assert!(!sock.exists());
            assert!(seq.exists());
            drop(live);
            std::fs::remove_file(&seq).unwrap();
        }
        // A regular file there is kept.
        std::fs::write(&seq, b"x").unwrap();
        let e = HostBackend::bind(&sock, T, DEFAULT_MAX_MESSAGE).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(seq.exists());
    }

    #[test]
    fn send_buffers_are_raised_never_lowered_and_capped_by_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let before = max_sendable(fd).unwrap();
        assert!(fit_messages(fd, 1000), "the default already fits");
        assert_eq!(max_sendable(fd).unwrap(), before, "never lowered");
        assert!(fit_messages(fd, DEFAULT_MAX_MESSAGE));
        assert!(max_sendable(fd).unwrap() >= DEFAULT_MAX_MESSAGE);
        // Beyond twice net.core.wmem_max the kernel caps it: reported, not an error.
        let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!fit_messages(fd, 2 * wmem_max));
        assert!(max_sendable(fd).unwrap() < 2 * wmem_max);
    }
}
