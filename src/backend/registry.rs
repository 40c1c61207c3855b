//! [`Registry`]: the CID registry, a directory shared by the VMMs of one machine so their guests
//! can reach each other (the "H2G owns the CID" step of routing).
//!
//! Each VMM claims its guest's CID by listening on `<dir>/<cid>.sock`. A guest connect to CID `c`
//! that a sibling owns goes to `<dir>/<c>.sock` and starts with the line
//! `CONNECT <port> FROM <src_cid> <src_port>\n` (see [`super::handshake`]); the sibling's device
//! offers the connection to its guest from `<src_cid>:<src_port>` and, once the guest accepts,
//! answers `OK <port>\n` (if the guest refuses, the sibling closes the stream).
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

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::accept::{HandshakeServer, HandshakeStats, LineKind};
use super::handshake::Line;
use super::stream::SockStream;
use super::unix::{self, BoundSocket};
use super::Incoming;

/// Why a CID could not be claimed.
#[derive(Debug)]
pub enum RegistryError {
    /// The CID cannot belong to a guest (0, 1, 2, `u32::MAX` and above).
    BadCid(u64),
    /// A live VMM already listens on the CID's socket.
    CidInUse {
        /// The CID.
        cid: u64,
        /// The registry directory.
        dir: PathBuf,
    },
    /// The registry directory is writable by every user: anyone could claim or impersonate CIDs.
    WorldWritable(PathBuf),
    /// A filesystem or socket operation on `path` failed.
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::BadCid(cid) => write!(
                f,
                "CID {cid} cannot be a guest CID (must be 3 to {})",
                u32::MAX - 1
            ),
            RegistryError::CidInUse { cid, dir } => write!(
                f,
                "CID {cid} is in use by a live VMM (registry {})",
                dir.display()
            ),
            RegistryError::WorldWritable(dir) => write!(
                f,
                "CID registry {} is writable by every user, who could then claim or impersonate \
                 CIDs; make it 0700 (or 0770 for a trusted group)",
                dir.display()
            ),
            RegistryError::Io { path, source } => {
                write!(f, "CID registry {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegistryError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
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
    cid > 2 && cid < u64::from(u32::MAX)
}

/// This VMM's claim on a CID in a registry directory, and the server for siblings' connects.
#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    cid: u64,
    server: HandshakeServer,
    socket: BoundSocket,
}

impl Registry {
    /// Claims `cid` in the registry `dir` (created with mode `0700` if missing). Siblings get
    /// `handshake_timeout` to send their `FROM` line.
    pub fn claim(dir: &Path, cid: u64, handshake_timeout: Duration) -> Result<Self, RegistryError> {
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
        let listener = socket.listener.try_clone().map_err(io_err(&path))?;
        let server = HandshakeServer::new(listener, LineKind::Registry, handshake_timeout)
            .map_err(io_err(&path))?;
        Ok(Registry {
            dir: dir.to_path_buf(),
            cid,
            server,
            socket,
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

    /// The socket siblings connect to, `<dir>/<cid>.sock`.
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// Whether a sibling (not this VMM) owns `cid`: `<dir>/<cid>.sock` exists and is a socket.
    /// A cheap check without I/O on the socket; [`Registry::connect`] confirms liveness.
    pub fn owns(&self, cid: u64) -> bool {
        cid != self.cid && owned_in(&self.dir, cid)
    }

    /// Connects to sibling `dst_cid`, without blocking, and writes
    /// `CONNECT <dst_port> FROM <src_cid> <src_port>\n`. The caller then waits for the sibling's
    /// `OK <port>\n` (or end of stream if its guest refused).
    pub fn connect(
        &self,
        dst_cid: u64,
        dst_port: u32,
        src_cid: u64,
        src_port: u32,
    ) -> io::Result<SockStream> {
        connect_in(&self.dir, dst_cid, dst_port, src_cid, src_port)
    }

    /// Sets how many siblings may be mid-handshake at once.
    pub fn set_max_pending(&mut self, max: usize) {
        self.server.set_max_pending(max);
    }

    /// The fd to poll for readability.
    pub fn poll_fd(&self) -> RawFd {
        self.server.poll_fd()
    }

    /// Accepts and reads sibling connects; appends finished handshakes to `out`.
    pub fn process(&mut self, now: Instant, out: &mut Vec<Incoming<SockStream>>) {
        self.server.process(now, out)
    }

    /// When [`Registry::process`] must run even without readiness.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.server.next_deadline()
    }

    /// Handshake counters.
    pub fn stats(&self) -> HandshakeStats {
        self.server.stats()
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

/// Connects to sibling `dst_cid`, without blocking, and writes
/// `CONNECT <dst_port> FROM <src_cid> <src_port>\n`. The caller then waits for the sibling's
/// `OK <port>\n` (or end of stream if its guest refused). Also used by programs on this
/// machine that do not own a CID (`vsock-connect`): they connect as CID 2, the host.
pub fn connect_in(
    dir: &Path,
    dst_cid: u64,
    dst_port: u32,
    src_cid: u64,
    src_port: u32,
) -> io::Result<SockStream> {
    let bad = |what: &str, cid: u64| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} CID {cid} is not a guest CID"),
        )
    };
    if !guest_cid(dst_cid) {
        return Err(bad("destination", dst_cid));
    }
    if !guest_cid(src_cid) && src_cid != 2 {
        return Err(bad("source", src_cid));
    }
    let stream = unix::connect(&Registry::socket_of(dir, dst_cid))?;
    let line = Line::ConnectFrom {
        port: dst_port,
        cid: src_cid as u32,
        src_port,
    }
    .to_string();
    // SAFETY: `line` is readable for its length during the call; the fd is ours.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != line.len() {
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
    use crate::backend::unix::test_dir::TempDir;
    use crate::backend::AcceptReply;
    use crate::router::Path as RoutePath;
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    const T: Duration = Duration::from_millis(200);

    fn run_until(
        r: &mut Registry,
        out: &mut Vec<Incoming<SockStream>>,
        mut done: impl FnMut(&Registry, &[Incoming<SockStream>]) -> bool,
    ) {
        let end = Instant::now() + Duration::from_secs(2);
        while !done(r, out) {
            assert!(Instant::now() < end, "timed out; stats {:?}", r.stats());
            r.process(Instant::now(), out);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn claim_creates_a_private_directory_and_refuses_a_second_claim() {
        let tmp = TempDir::new();
        let dir = tmp.join("reg");
        let a = Registry::claim(&dir, 5, T).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(a.socket_path(), dir.join("5.sock"));
        let e = Registry::claim(&dir, 5, T).unwrap_err();
        assert!(matches!(e, RegistryError::CidInUse { cid: 5, .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("CID 5 is in use by a live VMM (registry {})", dir.display())
        );
        drop(a);
        assert!(!dir.join("5.sock").exists());
        let _again = Registry::claim(&dir, 5, T).unwrap();
    }

    #[test]
    fn sockets_are_private_or_group_shared_never_open_to_others() {
        let tmp = TempDir::new();
        let private = tmp.join("private");
        let a = Registry::claim(&private, 5, T).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(a.socket_path()), 0o600);
        // A group-shared directory set up by the administrator (and an odd, open one).
        for (dir_mode, want) in [
            (0o770, 0o660),
            (0o750, 0o660),
            (0o755, 0o660),
            (0o701, 0o600),
        ] {
            let shared = tmp.join(&format!("shared{dir_mode:o}"));
            fs::create_dir(&shared).unwrap();
            fs::set_permissions(&shared, fs::Permissions::from_mode(dir_mode)).unwrap();
            let r = Registry::claim(&shared, 6, T).unwrap();
            assert_eq!(mode(r.socket_path()), want, "directory {dir_mode:o}");
        }
        assert_eq!(socket_mode(0o777), 0o660);
        assert_eq!(socket_mode(0o707), 0o600);
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let tmp = TempDir::new();
        for dir_mode in [0o777, 0o1777, 0o703] {
            let open = tmp.join(&format!("open{dir_mode:o}"));
            fs::create_dir(&open).unwrap();
            fs::set_permissions(&open, fs::Permissions::from_mode(dir_mode)).unwrap();
            let e = Registry::claim(&open, 5, T).unwrap_err();
            assert!(matches!(e, RegistryError::WorldWritable(_)), "{e:?}");
            assert!(e.to_string().contains("writable by every user"), "{e}");
            assert!(!open.join("5.sock").exists(), "nothing claimed");
        }
    }

    #[test]
    fn bad_cids_are_refused() {
        let tmp = TempDir::new();
        for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
            let e = Registry::claim(tmp.path(), cid, T).unwrap_err();
            assert!(matches!(e, RegistryError::BadCid(c) if c == cid), "{e:?}");
        }
    }

    #[test]
    fn a_stale_socket_file_is_reclaimed() {
        let tmp = TempDir::new();
        // A VMM that died without unlinking its socket.
        drop(UnixListener::bind(tmp.join("7.sock")).unwrap());
        assert!(tmp.join("7.sock").exists());
        let r = Registry::claim(tmp.path(), 7, T).unwrap();
        assert!(UnixStream::connect(r.socket_path()).is_ok());
    }

    #[test]
    fn owns_sees_live_siblings_only() {
        let tmp = TempDir::new();
        let a = Registry::claim(tmp.path(), 3, T).unwrap();
        assert!(!a.owns(3), "our own CID is not a sibling's");
        assert!(!a.owns(4));
        let b = Registry::claim(tmp.path(), 4, T).unwrap();
        assert!(a.owns(4));
        assert!(b.owns(3));
        fs::write(tmp.join("9.sock"), b"not a socket").unwrap();
        assert!(!a.owns(9));
        assert!(!a.owns(2));
        drop(b);
        assert!(!a.owns(4));
    }

    #[test]
    fn connect_sends_the_from_line_and_the_sibling_yields_incoming() {
        let tmp = TempDir::new();
        let a = Registry::claim(tmp.path(), 3, T).unwrap();
        let mut b = Registry::claim(tmp.path(), 4, T).unwrap();
        let s = a.connect(4, 80, 3, 1234).unwrap();
        let mut out = Vec::new();
        run_until(&mut b, &mut out, |_, o| o.len() == 1);
        let inc = out.pop().unwrap();
        assert_eq!(inc.guest_port, 80);
        assert_eq!(inc.src_cid, 3);
        assert_eq!(inc.src_port, Some(1234));
        assert!(inc.prefix.is_empty());
        assert_eq!(inc.reply, AcceptReply::HybridOk);
        assert_eq!(inc.route.path, RoutePath::Sibling);
        assert!(!inc.route.to_host);
        // The sibling's answer reaches the connecting side.
        let mut theirs = UnixStream::from(OwnedFd::from(inc.stream));
        theirs.write_all(b"OK 80\n").unwrap();
        let mut ours = UnixStream::from(OwnedFd::from(s));
        ours.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 6];
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"OK 80\n");

        // No sibling: fails at once.
        assert!(a.connect(6, 80, 3, 1).is_err());
        assert!(a.connect(2, 80, 3, 1).is_err());
    }

    #[test]
    fn only_valid_from_lines_are_accepted() {
        let tmp = TempDir::new();
        let mut r = Registry::claim(tmp.path(), 4, T).unwrap();
        let mut out = Vec::new();
        for (i, line) in [
            &b"CONNECT 80\n"[..],
            b"CONNECT 80 FROM 1 5\n",
            b"CONNECT 80 FROM 4294967295 5\n",
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = UnixStream::connect(r.socket_path()).unwrap();
            c.write_all(line).unwrap();
            run_until(&mut r, &mut out, |r, _| r.stats().rejected == i as u64 + 1);
        }
        assert!(out.is_empty());
        // CID 2 is a program on this machine (vsock-connect): accepted, shown as the host.
        let mut c = UnixStream::connect(r.socket_path()).unwrap();
        c.write_all(b"CONNECT 80 FROM 2 5\n").unwrap();
        run_until(&mut r, &mut out, |_, out| !out.is_empty());
        assert_eq!((out[0].src_cid, out[0].src_port), (2, Some(5)));
    }
}
