//! [`Registry`]: the CID registry, a directory shared by the VMMs of one machine so their guests
//! can reach each other (the "H2G owns the CID" step of routing).
//!
//! Each VMM claims its guest's CID by listening on `<dir>/<cid>.sock`. A guest connect to CID `c`
//! that a sibling owns goes to `<dir>/<c>.sock` and starts with the line
//! `CONNECT <port> FROM <src_cid> <src_port>\n` (see [`crate::wire::line`]); the sibling's device
//! offers the connection to its guest from `<src_cid>:<src_port>` and, once the guest accepts,
//! answers `OK <port>\n` (if the guest refuses, the sibling closes the stream).
//!
//! Beside it, `<dir>/<cid>.sock_seqpacket` is a `SOCK_SEQPACKET` socket for programs that open a
//! SEQPACKET connection to the guest (`vsock-connect --seqpacket`): their first message is
//! exactly `CONNECT <port> FROM <src_cid> <src_port>\n`, answered by the one message
//! `OK <port>\n`. Sibling devices relay every connection, SEQPACKET ones included, over the
//! stream socket (a relayed REQUEST carries its type), so `RELAY` is refused there. Ownership is
//! the stream socket's alone.
//!
//! # Permission model
//!
//! The registry directory's permissions decide who may take part: whoever can create files in it
//! can claim any free CID, and whoever can connect to a socket in it can open connections that
//! claim to come from *any* CID (the `FROM` line is not authenticated). [`Registry::claim`]
//! creates a missing directory with mode `0700`, so only the user running the VMMs can claim or
//! impersonate CIDs; share it between users only with a group and mode `0770` you set up
//! yourself, and only between users you trust with every guest on the machine. A live listener
//! is never replaced; a socket file nobody listens on (a crashed VMM) is removed and reclaimed.
//!
//! The socket itself does not rely on the directory alone: right after `bind` it is set to mode
//! `0600`, or `0660` when the directory grants its group access (the shared-group setup above),
//! whatever the umask. Connecting to a Unix socket needs write permission on it, so a user who is
//! neither the owner nor (in a group-shared registry) in its group cannot reach a sibling's
//! socket, and so cannot forge a `FROM` line, even if the directory is reachable. Between `bind`
//! and that `chmod` the umask decides; only a directory others can enter (which
//! [`Registry::claim`] warns about when it is world-writable) leaves that window open to them.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::accept::{HandshakeServer, LineKind};
use super::namespace::{self, NsError, NsMode};
use super::seqpacket;
use super::stream::SockStream;
use super::unix::{self, BoundSocket};
use crate::sys;
use crate::wire::line::Line;
use crate::wire::{Cid, SockType};

/// Why a CID could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The CID cannot belong to a guest (0, 1, 2, `u32::MAX` and above).
    #[error("CID {0} cannot be a guest CID (must be 3 to 4294967294)")]
    BadCid(u64),
    /// A live VMM already listens on the CID's socket.
    #[error("CID {cid} is in use by a live VMM (registry {})", dir.display())]
    CidInUse {
        /// The CID.
        cid: u64,
        /// The registry directory.
        dir: PathBuf,
    },
    /// The registry directory is writable by every user: anyone could claim or impersonate CIDs.
    #[error(
        "CID registry {} is writable by every user, who could then claim or impersonate CIDs; \
         make it 0700 (or 0770 for a trusted group)",
        .0.display()
    )]
    WorldWritable(PathBuf),
    /// The registry's namespace mode is not the one asked for, or cannot be read.
    #[error("{0}")]
    Namespace(#[from] NsError),
    /// A filesystem or socket operation on `path` failed.
    #[error("CID registry {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The mode of a CID's socket in a registry directory of mode `dir_mode`: never accessible to
/// others; to the group only when the directory is shared with a group.
pub fn socket_mode(dir_mode: u32) -> u32 {
    if dir_mode & 0o070 != 0 {
        0o660
    } else {
        0o600
    }
}

fn guest_cid(cid: u64) -> bool {
    Cid(cid).is_guest()
}

/// This VMM's claim on a CID in a registry directory, and the server for siblings' connects.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    cid: u64,
    mode: NsMode,
    server: HandshakeServer,
    socket: BoundSocket,
    seq_server: HandshakeServer,
    seq_socket: BoundSocket,
}

impl Registry {
    /// Claims `cid` in the registry `dir` (created with mode `0700` if missing), a CID namespace
    /// of mode `ns_mode` (`None`: whatever mode the registry has; see [`namespace::settle`]).
    /// Siblings get `handshake_timeout` to send their `FROM` line. The seqpacket socket
    /// `<dir>/<cid>.sock_seqpacket` is bound beside the stream one, with the same mode, and its
    /// clients' sockets are sized for messages of `max_message` bytes (the device's buffer
    /// size; [`seqpacket::fit_messages`]).
    pub fn claim(
        dir: &Path,
        cid: u64,
        ns_mode: Option<NsMode>,
        handshake_timeout: Duration,
        max_message: usize,
    ) -> Result<Self, RegistryError> {
        if !guest_cid(cid) {
            return Err(RegistryError::BadCid(cid));
        }
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        if !dir.exists() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let dir_mode = fs::metadata(dir).map_err(io_err(dir))?.permissions().mode();
        if dir_mode & 0o002 != 0 {
            return Err(RegistryError::WorldWritable(dir.to_path_buf()));
        }
        let path = Self::socket_of(dir, cid);
        let socket = BoundSocket::bind(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                RegistryError::CidInUse {
                    cid,
                    dir: dir.to_path_buf(),
                }
            } else {
                RegistryError::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        fs::set_permissions(&path, fs::Permissions::from_mode(socket_mode(dir_mode)))
            .map_err(io_err(&path))?;
        let seq_path = seqpacket::seqpacket_path(&path);
        let seq_socket =
            BoundSocket::bind_typed(&seq_path, SockType::Seqpacket).map_err(io_err(&seq_path))?;
        fs::set_permissions(&seq_path, fs::Permissions::from_mode(socket_mode(dir_mode)))
            .map_err(io_err(&seq_path))?;
        // After the bind, so that a VMM refused for a taken CID never sets a registry's mode;
        // on a mismatch the socket is unlinked again as `socket` drops.
        let mode = namespace::settle(dir, ns_mode)?;
        let listener = socket.listener.try_clone().map_err(io_err(&path))?;
        let server = HandshakeServer::new(listener, LineKind::Registry, handshake_timeout)
            .map_err(io_err(&path))?;
        let seq_listener = seq_socket.listener.try_clone().map_err(io_err(&seq_path))?;
        let seq_server = HandshakeServer::new_seqpacket(
            seq_listener,
            LineKind::Registry,
            handshake_timeout,
            max_message,
        )
        .map_err(io_err(&seq_path))?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            cid,
            mode,
            server,
            socket,
            seq_server,
            seq_socket,
        })
    }

    fn socket_of(dir: &Path, cid: u64) -> PathBuf {
        dir.join(format!("{cid}.sock"))
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CID this VMM claimed.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The registry's CID namespace mode.
    pub fn mode(&self) -> NsMode {
        self.mode
    }

    /// The socket siblings connect to, `<dir>/<cid>.sock`.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// The `SOCK_SEQPACKET` socket programs connect to, `<dir>/<cid>.sock_seqpacket`.
    pub fn seqpacket_socket_path(&self) -> &Path {
        self.seq_socket.path()
    }

    /// Whether a sibling (not this VMM) owns `cid`: `<dir>/<cid>.sock` exists and is a socket.
    /// A cheap check without I/O on the socket; [`Registry::connect_relay`] confirms liveness.
    pub fn owns(&self, cid: u64) -> bool {
        cid != self.cid && owned_in(&self.dir, cid)
    }

    /// Opens a relay to sibling `dst_cid`, without blocking: connects to its socket and writes
    /// `RELAY <dst_port> FROM <src_cid> <src_port>\n`. The caller then sends the guest's
    /// REQUEST as the first frame and relays packets both ways (`csm::relay`).
    pub fn connect_relay(
        &self,
        dst_cid: u64,
        dst_port: u32,
        src_cid: u64,
        src_port: u32,
    ) -> io::Result<SockStream> {
        if !guest_cid(src_cid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source CID {src_cid} is not a guest CID"),
            ));
        }
        open_line(
            &self.dir,
            dst_cid,
            Line::Relay {
                port: dst_port,
                cid: src_cid as u32,
                src_port,
            },
            SockType::Stream,
        )
    }

    /// The server that accepts siblings and reads their handshake lines: poll its fd, run it,
    /// read its counters.
    pub fn server(&self) -> &HandshakeServer {
        &self.server
    }

    /// The server, to run it ([`HandshakeServer::process`]) or set its limits.
    pub fn server_mut(&mut self) -> &mut HandshakeServer {
        &mut self.server
    }

    /// The server of the seqpacket socket (message mode, programs only): poll its fd, run it,
    /// read its counters.
    pub fn seqpacket_server(&self) -> &HandshakeServer {
        &self.seq_server
    }

    /// The seqpacket server, to run it or set its limits.
    pub fn seqpacket_server_mut(&mut self) -> &mut HandshakeServer {
        &mut self.seq_server
    }
}

/// Whether some VMM may own `cid` in the registry `dir`: `<dir>/<cid>.sock` exists and is a
/// socket. A cheap check without I/O on the socket; a connect confirms liveness.
pub fn owned_in(dir: &Path, cid: u64) -> bool {
    guest_cid(cid)
        && fs::symlink_metadata(Registry::socket_of(dir, cid))
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
}

/// Connects to the guest `dst_cid` of the registry `dir` without blocking and sends
/// `CONNECT <dst_port> FROM <src_cid> <src_port>\n`: as a byte stream to `<dst_cid>.sock`
/// ([`SockType::Stream`]), or as one message to `<dst_cid>.sock_seqpacket`
/// ([`SockType::Seqpacket`]). The caller then waits for the sibling's `OK <port>\n` (one message
/// on a seqpacket connection), or end of stream if its guest refused. For programs on this
/// machine that do not own a CID (`vsock-connect`): they connect as CID 2, the host.
pub fn connect_in(
    dir: &Path,
    dst_cid: u64,
    dst_port: u32,
    src_cid: u64,
    src_port: u32,
    sock_type: SockType,
) -> io::Result<SockStream> {
    if !guest_cid(src_cid) && Cid(src_cid) != Cid::HOST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source CID {src_cid} is not a guest CID"),
        ));
    }
    open_line(
        dir,
        dst_cid,
        Line::ConnectFrom {
            port: dst_port,
            cid: src_cid as u32,
            src_port,
        },
        sock_type,
    )
}

/// Connects to `<dir>/<dst_cid>.sock` (or its seqpacket socket) without blocking and writes
/// the handshake `line` (one `send`, so on a seqpacket socket one message).
fn open_line(dir: &Path, dst_cid: u64, line: Line, ty: SockType) -> io::Result<SockStream> {
    if !guest_cid(dst_cid) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("destination CID {dst_cid} is not a guest CID"),
        ));
    }
    let path = Registry::socket_of(dir, dst_cid);
    let stream = match ty {
        SockType::Stream => unix::connect(&path)?,
        SockType::Seqpacket => unix::connect_typed(&seqpacket::seqpacket_path(&path), ty)?,
    };
    let line = line.to_string();
    let n = sys::send_nosignal(stream.as_raw_fd(), line.as_bytes())?;
    if n != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "short write of the registry line ({n} of {} bytes)",
                line.len()
            ),
        ));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Incoming;
    use crate::backend::{AcceptReply, Framing};
    use crate::seam::Path as RoutePath;
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Instant;

    const T: Duration = Duration::from_millis(200);
    const M: usize = seqpacket::DEFAULT_MAX_MESSAGE;

    fn run_until(
        r: &mut Registry,
        out: &mut Vec<Incoming<SockStream>>,
        mut done: impl FnMut(&Registry, &[Incoming<SockStream>]) -> bool,
    ) {
        let end = Instant::now() + Duration::from_secs(2);
        while !done(r, out) {
            assert!(
                Instant::now() < end,
                "timed out; stats {:?}",
                r.server().stats()
            );
            r.server_mut().process(Instant::now(), out);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn claim_creates_a_private_directory_and_refuses_a_second_claim() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reg");
        let a = Registry::claim(&dir, 5, None, T, M).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(a.socket_path(), dir.join("5.sock"));
        let e = Registry::claim(&dir, 5, None, T, M).unwrap_err();
        assert!(matches!(e, RegistryError::CidInUse { cid: 5, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("CID 5 is in use by a live VMM (registry {})", dir.display())
        );
        assert!(dir.join("5.sock_seqpacket").exists());
        drop(a);
        assert!(!dir.join("5.sock").exists());
        assert!(!dir.join("5.sock_seqpacket").exists());
        let _again = Registry::claim(&dir, 5, None, T, M).unwrap();
    }

    #[test]
    fn sockets_are_private_or_group_shared_never_open_to_others() {
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("private");
        let a = Registry::claim(&private, 5, None, T, M).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(a.socket_path()), 0o600);
        // A group-shared directory set up by the administrator (and an odd, open one).
        for (dir_mode, want) in [
            (0o770, 0o660),
            (0o750, 0o660),
            (0o755, 0o660),
            (0o701, 0o600),
        ] {
            let shared = tmp.path().join(format!("shared{dir_mode:o}"));
            fs::create_dir(&shared).unwrap();
            fs::set_permissions(&shared, fs::Permissions::from_mode(dir_mode)).unwrap();
            let r = Registry::claim(&shared, 6, None, T, M).unwrap();
            assert_eq!(mode(r.socket_path()), want, "directory {dir_mode:o}");
            assert_eq!(
                mode(r.seqpacket_socket_path()),
                want,
                "directory {dir_mode:o}"
            );
        }
        assert_eq!(socket_mode(0o777), 0o660);
        assert_eq!(socket_mode(0o707), 0o600);
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for dir_mode in [0o777, 0o1777, 0o703] {
            let open = tmp.path().join(format!("open{dir_mode:o}"));
            fs::create_dir(&open).unwrap();
            fs::set_permissions(&open, fs::Permissions::from_mode(dir_mode)).unwrap();
            let e = Registry::claim(&open, 5, None, T, M).unwrap_err();
            assert!(matches!(e, RegistryError::WorldWritable(_)), "{e:?}");
            assert!(e.to_string().contains("writable by every user"), "{e}");
            assert!(!open.join("5.sock").exists(), "nothing claimed");
        }
    }

    #[test]
    fn bad_cids_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let e = Registry::claim(tmp.path(), cid, None, T, M).unwrap_err();
            assert!(matches!(e, RegistryError::BadCid(c) if c == cid), "{e:?}");
        }
    }

    #[test]
    fn a_stale_socket_file_is_reclaimed() {
        let tmp = tempfile::tempdir().unwrap();
        // A VMM that died without unlinking its socket.
        drop(UnixListener::bind(tmp.path().join("7.sock")).unwrap());
        assert!(tmp.path().join("7.sock").exists());
        let r = Registry::claim(tmp.path(), 7, None, T, M).unwrap();
        assert!(UnixStream::connect(r.socket_path()).is_ok());
    }

    #[test]
    fn owns_sees_live_siblings_only() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Registry::claim(tmp.path(), 3, None, T, M).unwrap();
        assert!(!a.owns(3), "our own CID is not a sibling's");
        assert!(!a.owns(4));
        let b = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        assert!(a.owns(4));
        assert!(b.owns(3));
        fs::write(tmp.path().join("9.sock"), b"not a socket").unwrap();
        assert!(!a.owns(9));
        assert!(!a.owns(2));
        drop(b);
        assert!(!a.owns(4));
    }

    #[test]
    fn connect_relay_sends_the_relay_line_and_the_sibling_yields_a_packet_link() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Registry::claim(tmp.path(), 3, None, T, M).unwrap();
        let mut b = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        let s = a.connect_relay(4, 80, 3, 1234).unwrap();
        let mut ours = UnixStream::from(OwnedFd::from(s));
        // The first frame follows the line; the sibling hands it on as the prefix.
        ours.write_all(b"frame").unwrap();
        let mut out = Vec::new();
        run_until(&mut b, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 80);
        assert_eq!(inc.src_cid, 3);
        assert_eq!(inc.src_port, Some(1234));
        assert_eq!(inc.framing, Framing::Packets);
        assert_eq!(inc.reply, AcceptReply::None, "no OK line on a relay");
        assert_eq!(inc.route.path, RoutePath::Sibling);
        assert!(!inc.route.to_host);
        let mut got = inc.prefix.clone();
        let mut theirs = UnixStream::from(OwnedFd::from(inc.stream));
        theirs.set_nonblocking(false).unwrap();
        let mut rest = vec![0u8; 5 - got.len()];
        theirs.read_exact(&mut rest).unwrap();
        got.extend(rest);
        assert_eq!(got, b"frame");
        // Bytes flow back on the same link.
        theirs.write_all(b"back").unwrap();
        ours.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 4];
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"back");

        // No sibling: fails at once; the host and non-guest CIDs are refused.
        assert!(a.connect_relay(6, 80, 3, 1).is_err());
        assert!(a.connect_relay(2, 80, 3, 1).is_err());
        assert!(
            a.connect_relay(4, 80, 2, 1).is_err(),
            "a relay comes from a guest"
        );
    }

    #[test]
    fn a_program_connects_as_the_host_with_a_byte_stream() {
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        let s = connect_in(tmp.path(), 4, 80, 2, 77, SockType::Stream).unwrap();
        let mut out = Vec::new();
        run_until(&mut b, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!((inc.src_cid, inc.src_port), (2, Some(77)));
        assert_eq!(inc.framing, Framing::Bytes);
        assert_eq!(inc.reply, AcceptReply::HybridOk);
        // The sibling's answer reaches the program.
        let mut theirs = UnixStream::from(OwnedFd::from(inc.stream));
        theirs.write_all(b"OK 80\n").unwrap();
        let mut ours = UnixStream::from(OwnedFd::from(s));
        ours.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 6];
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"OK 80\n");
    }

    #[test]
    fn a_program_connects_with_seqpacket_through_the_seqpacket_socket() {
        use crate::backend::seqpacket::tests::{pattern, recv_one, send_one};
        use crate::backend::seqpacket::{max_sendable, seqpacket_path};
        let tmp = tempfile::tempdir().unwrap();
        let mut b = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        assert_eq!(
            b.seqpacket_socket_path(),
            tmp.path().join("4.sock_seqpacket")
        );
        assert_eq!(seqpacket_path(b.socket_path()), b.seqpacket_socket_path());
        let s = connect_in(tmp.path(), 4, 80, 2, 77, SockType::Seqpacket).unwrap();
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(2);
        while out.is_empty() {
            assert!(Instant::now() < end, "{:?}", b.seqpacket_server().stats());
            b.seqpacket_server_mut().process(Instant::now(), &mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 80);
        assert_eq!((inc.src_cid, inc.src_port), (2, Some(77)));
        assert_eq!(inc.sock_type, SockType::Seqpacket);
        assert_eq!(inc.framing, Framing::Bytes);
        assert_eq!(inc.reply, AcceptReply::HybridOk);
        assert_eq!(inc.route.path, RoutePath::Sibling);
        assert!(inc.prefix.is_empty());
        assert_eq!(
            b.server().stats().accepted,
            0,
            "the stream socket saw nothing"
        );
        assert!(max_sendable(inc.stream.as_raw_fd()).unwrap() >= M);
        // The answer and the data are messages, whole.
        send_one(&inc.stream, b"OK 80\n").unwrap();
        let big = pattern(M, 5);
        send_one(&inc.stream, &big).unwrap();
        assert_eq!(recv_one(&s, 64).0, b"OK 80\n");
        let (got, m) = recv_one(&s, M + 1);
        assert!(!m.truncated);
        assert_eq!(got, big);
        send_one(&s, b"up").unwrap();
        assert_eq!(recv_one(&inc.stream, 64).0, b"up");
    }

    #[test]
    fn the_seqpacket_socket_takes_program_lines_only_and_has_the_stream_socket_mode() {
        use crate::backend::seqpacket::tests::{assert_closed, seq_client};
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(r.seqpacket_socket_path()), mode(r.socket_path()));
        let mut out = Vec::new();
        for (i, line) in [
            &b"RELAY 80 FROM 5 1234\n"[..],
            b"CONNECT 80\n",
            b"CONNECT 80 FROM 1 5\n",
            b"CONNECT 80 FROM 5 1234\nextra",
            b"CONNECT 80 FROM 5 1234",
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = seq_client(r.seqpacket_socket_path()).unwrap();
            c.write_all(line).unwrap();
            let end = Instant::now() + Duration::from_secs(2);
            while r.seqpacket_server().stats().rejected != i as u64 + 1 {
                assert!(Instant::now() < end, "{line:?}");
                r.seqpacket_server_mut().process(Instant::now(), &mut out);
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_closed(&c);
        }
        assert!(out.is_empty());
        // A sibling guest's CID is accepted there too, as for the stream socket.
        let mut c = seq_client(r.seqpacket_socket_path()).unwrap();
        c.write_all(b"CONNECT 80 FROM 5 1234\n").unwrap();
        let end = Instant::now() + Duration::from_secs(2);
        while out.is_empty() {
            assert!(Instant::now() < end);
            r.seqpacket_server_mut().process(Instant::now(), &mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!((out[0].src_cid, out[0].src_port), (5, Some(1234)));
        // Ownership stays the stream socket's: without it the CID is not owned.
        let seq = r.seqpacket_socket_path().to_path_buf();
        let other = Registry::claim(tmp.path(), 3, None, T, M).unwrap();
        assert!(other.owns(4));
        fs::remove_file(r.socket_path()).unwrap();
        assert!(seq.exists());
        assert!(!other.owns(4));
        drop(r);
        assert!(!seq.exists(), "removed on drop");
    }

    #[test]
    fn only_valid_from_lines_are_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Registry::claim(tmp.path(), 4, None, T, M).unwrap();
        let mut out = Vec::new();
        for (i, line) in [
            &b"CONNECT 80\n"[..],
            b"CONNECT 80 FROM 1 5\n",
            b"CONNECT 80 FROM 4294967295 5\n",
            b"RELAY 80 FROM 2 5\n",
            b"RELAY 80 FROM 1 5\n",
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = UnixStream::connect(r.socket_path()).unwrap();
            c.write_all(line).unwrap();
            run_until(&mut r, &mut out, |r, _| {
                r.server().stats().rejected == i as u64 + 1
            });
        }
        assert!(out.is_empty());
        // CID 2 is a program on this machine (vsock-connect): accepted, shown as the host.
        let mut c = UnixStream::connect(r.socket_path()).unwrap();
        c.write_all(b"CONNECT 80 FROM 2 5\n").unwrap();
        run_until(&mut r, &mut out, |_, out| !out.is_empty());
        assert_eq!((out[0].src_cid, out[0].src_port), (2, Some(5)));
    }
}
