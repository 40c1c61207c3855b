//! [`HostBackend`]: host services over Unix sockets, the hybrid-vsock scheme of Firecracker and
//! Cloud Hypervisor.
//!
//! - Guest → host port `P`: [`HostBackend::connect`] connects to the Unix socket `<socket>_P`.
//! - Host → guest port `P`: a host program connects to `<socket>` and writes `CONNECT P\n`; the
//!   connection is offered to the guest from CID 2 and an ephemeral port, and once the guest
//!   accepts the device writes `OK <port>\n` (see [`super::accept`]).
//! - `SOCK_SEQPACKET` (see [`super::seqpacket`]): guest connects go to the same `<socket>_P` with
//!   a seqpacket socket; host programs connect a seqpacket socket to `<socket>_seqpacket` and
//!   send the one message `CONNECT P\n`, answered by the one message `OK <port>\n`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::AsRawFd;

use super::accept::{HandshakeServer, LineKind};
use super::seqpacket;
use super::stream::SockStream;
use super::unix::{self, BoundSocket};
use crate::wire::SockType;

/// The host Unix-socket backend of one device.
#[derive(Debug)]
pub struct HostBackend {
    server: HandshakeServer,
    socket: BoundSocket,
    seq_server: HandshakeServer,
    seq_socket: BoundSocket,
    max_message: usize,
}

impl HostBackend {
    /// Listens on `socket` for hybrid-vsock stream clients and on `<socket>_seqpacket` for
    /// `SOCK_SEQPACKET` ones, which get `handshake_timeout` to send their line. For each path a
    /// stale socket file (nobody listening) is replaced; a live listener is refused with
    /// `AddrInUse`, and a file that is not a socket with `AlreadyExists`; the error names the
    /// path. Seqpacket sockets are sized for messages of `max_message` bytes (the device's
    /// buffer size; [`seqpacket::fit_messages`]).
    pub fn bind(
        socket: &Path,
        handshake_timeout: Duration,
        max_message: usize,
    ) -> io::Result<Self> {
        let bound = BoundSocket::bind(socket)?;
        let server = HandshakeServer::new(
            bound.listener.try_clone()?,
            LineKind::Hybrid,
            handshake_timeout,
        )?;
        let seq_path = seqpacket::seqpacket_path(socket);
        let seq_bound = BoundSocket::bind_typed(&seq_path, SockType::Seqpacket).map_err(|e| {
            let shown = seq_path.display().to_string();
            match e.to_string() {
                msg if msg.contains(&shown) => e,
                msg => io::Error::new(e.kind(), format!("{shown}: {msg}")),
            }
        })?;
        let seq_server = HandshakeServer::new_seqpacket(
            seq_bound.listener.try_clone()?,
            LineKind::Hybrid,
            handshake_timeout,
            max_message,
        )?;
        Ok(HostBackend {
            server,
            socket: bound,
            seq_server,
            seq_socket: seq_bound,
            max_message,
        })
    }

    /// The socket path host programs connect to.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// The `SOCK_SEQPACKET` socket path host programs connect to: `<socket>_seqpacket`.
    pub fn seqpacket_socket_path(&self) -> &Path {
        self.seq_socket.path()
    }

    /// The path a guest connect to `port` goes to, of either type: `<socket>_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.socket.path().as_os_str().to_owned();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }

    /// Opens the host side of a guest connect to host port `port` with a socket of type
    /// `sock_type`, without blocking. Unix connects complete at once, so `connected` is `true`
    /// on success; no listener (or a full backlog) is an immediate error, and so is a listener
    /// of the other type (`EPROTOTYPE`). A seqpacket socket is sized for messages of the
    /// backend's `max_message` bytes, best effort.
    pub fn connect(&self, port: u32, sock_type: SockType) -> io::Result<(SockStream, bool)> {
        let s = unix::connect_typed(&self.port_path(port), sock_type)?;
        if sock_type == SockType::Seqpacket {
            seqpacket::fit_messages(s.as_raw_fd(), self.max_message);
        }
        Ok((s, true))
    }

    /// The server that accepts host clients and reads their handshake lines: poll its fd, run it,
    /// read its counters.
    pub fn server(&self) -> &HandshakeServer {
        &self.server
    }

    /// The server, to run it ([`HandshakeServer::process`]) or set its limits.
    pub fn server_mut(&mut self) -> &mut HandshakeServer {
        &mut self.server
    }

    /// The server of `<socket>_seqpacket` (message mode): poll its fd, run it, read its
    /// counters.
    pub fn seqpacket_server(&self) -> &HandshakeServer {
        &self.seq_server
    }

    /// The seqpacket server, to run it or set its limits.
    pub fn seqpacket_server_mut(&mut self) -> &mut HandshakeServer {
        &mut self.seq_server
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::AcceptReply;
    use crate::backend::Incoming;
    use crate::seam::{Path as RoutePath, RouteInfo};
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Instant;
    use tempfile::TempDir;

    const T: Duration = Duration::from_millis(200);

    fn host(dir: &TempDir) -> HostBackend {
        HostBackend::bind(
            &dir.path().join("v.sock"),
            T,
            seqpacket::DEFAULT_MAX_MESSAGE,
        )
        .unwrap()
    }

    /// Processes until `out` has `want` entries or `pred` holds, at most 2 s.
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
                h.server().stats()
            );
            h.server_mut().process(Instant::now(), out);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn into_unix(s: SockStream) -> UnixStream {
        UnixStream::from(OwnedFd::from(s))
    }

    /// The client was closed by the server: reads see EOF or a reset.
    fn assert_closed(c: &mut UnixStream) {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        match c.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("client not closed: {other:?}"),
        }
    }

    #[test]
    fn connect_line_yields_incoming() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 5000\n").unwrap();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 5000);
        assert_eq!(inc.src_cid, 2);
        assert_eq!(inc.src_port, None);
        assert!(inc.prefix.is_empty());
        assert_eq!(inc.reply, AcceptReply::HybridOk);
        assert_eq!(
            inc.route,
            RouteInfo {
                path: RoutePath::Host,
                to_host: false
            }
        );
        assert_eq!(h.server().pending(), 0);
        assert_eq!(h.server().next_deadline(), None);
        // The stream is the client's connection.
        let mut s = into_unix(inc.stream);
        s.write_all(b"OK 1073741824\n").unwrap();
        let mut b = [0u8; 14];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"OK 1073741824\n");
    }

    #[test]
    fn line_split_over_three_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        let mut out = Vec::new();
        for part in [&b"CONN"[..], b"ECT 12", b"34\n"] {
            c.write_all(part).unwrap();
            h.server_mut().process(Instant::now(), &mut out);
            std::thread::sleep(Duration::from_millis(5));
        }
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        assert_eq!(out[0].guest_port, 1234);
    }

    #[test]
    fn data_in_the_same_write_becomes_prefix_and_the_rest_stays_in_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut msg = b"CONNECT 7\n".to_vec();
        msg.extend_from_slice(&data);
        c.write_all(&msg).unwrap();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 7);
        assert!(!inc.prefix.is_empty());
        let mut got = inc.prefix.clone();
        let mut s = into_unix(inc.stream);
        s.set_nonblocking(false).unwrap();
        let mut rest = vec![0u8; data.len() - got.len()];
        s.read_exact(&mut rest).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, data);
    }

    #[test]
    fn line_without_newline_then_close_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 5000").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |h, _| h.server().stats().rejected == 1);
        assert!(out.is_empty());
        assert_eq!(h.server().pending(), 0);
        assert_closed(&mut c);
    }

    #[test]
    fn a_mebibyte_without_newline_is_closed_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        let writer = std::thread::spawn(move || {
            let big = vec![b'1'; 1 << 20];
            let mut head = b"CONNECT ".to_vec();
            head.extend_from_slice(&big);
            // The server closes mid-way: the write fails (EPIPE / ECONNRESET).
            let r = c.write_all(&head);
            (r, c)
        });
        let start = Instant::now();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |h, _| h.server().stats().rejected == 1);
        assert!(start.elapsed() < T, "closed by size, not by timeout");
        let (r, _c) = writer.join().unwrap();
        assert!(r.is_err());
        assert!(out.is_empty());
        assert_eq!(h.server().pending(), 0);
    }

    #[test]
    fn binary_garbage_is_closed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"\x16\x03\x01\x02\x00").unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        run_until(&mut h, &mut out, |h, _| h.server().stats().rejected == 1);
        assert!(start.elapsed() < T);
        assert_closed(&mut c);
        // A complete but invalid line too.
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 99999999999\n").unwrap();
        run_until(&mut h, &mut out, |h, _| h.server().stats().rejected == 2);
        assert!(out.is_empty());
        assert_closed(&mut c);
    }

    #[test]
    fn idle_client_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 5").unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |h, _| h.server().pending() == 1);
        let deadline = h.server().next_deadline().unwrap();
        assert!(deadline <= start + T + Duration::from_millis(100));
        run_until(&mut h, &mut out, |h, _| h.server().stats().timed_out == 1);
        assert!(start.elapsed() >= T);
        assert_eq!(h.server().pending(), 0);
        assert_eq!(h.server().next_deadline(), None);
        assert!(out.is_empty());
        assert_closed(&mut c);
    }

    #[test]
    fn many_half_open_clients_and_the_pending_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut out = Vec::new();
        let mut clients = Vec::new();
        for i in 0..200u32 {
            let mut c = UnixStream::connect(h.socket_path()).unwrap();
            c.write_all(format!("CONNECT {i}").as_bytes()).unwrap();
            clients.push(c);
            h.server_mut().process(Instant::now(), &mut out);
        }
        run_until(&mut h, &mut out, |h, _| h.server().pending() == 200);
        // Every one finishes its line.
        for c in &mut clients {
            c.write_all(b"\n").unwrap();
        }
        run_until(&mut h, &mut out, |_, o| o.len() == 200);
        let mut ports: Vec<u32> = out.iter().map(|i| i.guest_port).collect();
        ports.sort_unstable();
        assert_eq!(ports, (0..200).collect::<Vec<_>>());

        // Beyond the limit the oldest unfinished client makes room for the newcomer.
        h.server_mut().set_max_pending(2);
        out.clear();
        let mut a = UnixStream::connect(h.socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.server().pending() == 1);
        let _b = UnixStream::connect(h.socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.server().pending() == 2);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.server().stats().over_limit == 1);
        assert_eq!(h.server().pending(), 2);
        assert_closed(&mut a);
        // The newcomer is served.
        c.write_all(b"CONNECT 9\n").unwrap();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        assert_eq!(out[0].guest_port, 9);
    }

    #[test]
    fn idle_clients_at_the_limit_do_not_lock_out_a_new_client() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        h.server_mut().set_max_pending(8);
        let mut out = Vec::new();
        let idle: Vec<UnixStream> = (0..20)
            .map(|_| UnixStream::connect(h.socket_path()).unwrap())
            .collect();
        run_until(&mut h, &mut out, |h, _| h.server().stats().accepted == 20);
        assert_eq!(h.server().pending(), 8);
        assert_eq!(h.server().stats().over_limit, 12);
        // A client that sends its line at once is served long before the idle ones time out.
        let start = Instant::now();
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 77\n").unwrap();
        run_until(&mut h, &mut out, |_, o| o.len() == 1);
        assert!(start.elapsed() < T, "served before the handshake timeout");
        assert_eq!(out[0].guest_port, 77);
        drop(idle);
    }

    #[test]
    fn the_oldest_client_is_read_before_it_is_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        h.server_mut().set_max_pending(1);
        let mut out = Vec::new();
        let mut a = UnixStream::connect(h.socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, _| h.server().pending() == 1);
        // Its line arrives, and a newcomer too, before the server looks again.
        a.write_all(b"CONNECT 5\n").unwrap();
        let _b = UnixStream::connect(h.socket_path()).unwrap();
        run_until(&mut h, &mut out, |h, o| {
            h.server().stats().accepted == 2 && !o.is_empty()
        });
        assert_eq!(out[0].guest_port, 5);
        assert_eq!(h.server().stats().over_limit, 0);
        assert_eq!(h.server().pending(), 1);
    }

    #[test]
    fn registry_line_is_refused_on_the_host_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = host(&dir);
        let mut c = UnixStream::connect(h.socket_path()).unwrap();
        c.write_all(b"CONNECT 80 FROM 5 1234\n").unwrap();
        let mut out = Vec::new();
        run_until(&mut h, &mut out, |h, _| h.server().stats().rejected == 1);
        assert!(out.is_empty());
        assert_closed(&mut c);
    }

    #[test]
    fn connect_reaches_port_socket_and_fails_fast_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(&dir);
        assert_eq!(h.port_path(52), dir.path().join("v.sock_52"));
        let l = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let (s, connected) = h.connect(52, SockType::Stream).unwrap();
        assert!(connected);
        let (mut peer, _) = l.accept().unwrap();
        let mut s = into_unix(s);
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        peer.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");

        let start = Instant::now();
        let e = h.connect(53, SockType::Stream).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        drop(l);
        let e = h.connect(52, SockType::Stream).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
        assert!(start.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn a_seqpacket_connect_moves_whole_messages_and_a_port_serves_one_type() {
        use crate::backend::seqpacket::tests::{pattern, recv_one, send_one, seq_listener};
        use crate::backend::seqpacket::{max_sendable, DEFAULT_MAX_MESSAGE};
        let dir = tempfile::tempdir().unwrap();
        let h = host(&dir);
        let l = seq_listener(&h.port_path(60));
        let (s, connected) = h.connect(60, SockType::Seqpacket).unwrap();
        assert!(connected);
        let (peer, _) = l.accept().unwrap();
        // Sized for a message of the device's whole buffer.
        assert!(max_sendable(s.as_raw_fd()).unwrap() >= DEFAULT_MAX_MESSAGE);
        for (i, len) in [1, 3000, 65536, DEFAULT_MAX_MESSAGE]
            .into_iter()
            .enumerate()
        {
            let msg = pattern(len, i as u8);
            assert_eq!(send_one(&s, &msg).unwrap(), len);
            let (got, m) = recv_one(&peer, len + 1);
            assert_eq!((m.len, m.truncated), (len, false));
            assert_eq!(got, msg, "message {i} whole");
        }
        // And back, each message on its own.
        let (a, b) = (pattern(100, 9), pattern(200, 10));
        send_one(&peer, &a).unwrap();
        send_one(&peer, &b).unwrap();
        assert_eq!(recv_one(&s, 1000).0, a);
        assert_eq!(recv_one(&s, 1000).0, b);

        // A port serves one type: the other type fails at once with EPROTOTYPE.
        let start = Instant::now();
        let _stream_listener = UnixListener::bind(h.port_path(61)).unwrap();
        let e = h.connect(61, SockType::Seqpacket).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE), "{e}");
        let e = h.connect(60, SockType::Stream).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE), "{e}");
        let e = h.connect(62, SockType::Seqpacket).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(start.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn bind_refuses_a_live_listener_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let h = host(&dir);
        let e = HostBackend::bind(&dir.path().join("v.sock"), T, 1 << 16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        drop(h);
        assert!(!dir.path().join("v.sock").exists());
        assert!(!dir.path().join("v.sock_seqpacket").exists());
        // A stale file left by a crashed VMM is replaced.
        drop(UnixListener::bind(dir.path().join("v.sock")).unwrap());
        let _h = host(&dir);
    }
}
