//! Unix socket helpers shared by the backends: a non-blocking `connect(2)` by path and a bind that
//! replaces a stale socket file but never a live listener, of either socket type (`SOCK_STREAM`,
//! `SOCK_SEQPACKET`).

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::stream::SockStream;
use crate::sys;
use crate::wire::SockType;

/// The backlog of the `SOCK_SEQPACKET` listeners (std's `UnixListener::bind` uses 128 too).
const BACKLOG: libc::c_int = 128;

/// Starts a non-blocking connect to the Unix stream socket at `path`.
///
/// Unix connects complete or fail at once, so this returns a connected stream or an error:
/// `ENOENT`/`ECONNREFUSED` when nobody listens, and `EAGAIN` (as `WouldBlock`) when the
/// listener's backlog is full. `EAGAIN` is an error and not "in progress": the socket is *not*
/// connecting, and waiting for writability would report success on an unconnected socket.
pub(crate) fn connect(path: &Path) -> io::Result<SockStream> {
    connect_typed(path, SockType::Stream)
}

/// [`connect`] with a socket of type `ty`. A listener of the other type refuses at once with
/// `EPROTOTYPE` (a port serves one type, as in the kernel).
pub(crate) fn connect_typed(path: &Path, ty: SockType) -> io::Result<SockStream> {
    let fd = sys::socket(libc::AF_UNIX, ty.libc())?;
    sys::connect_unix(fd.as_raw_fd(), path)?;
    Ok(SockStream::from_nonblocking(fd))
}

/// The identity of a file, so we only ever unlink the socket file we created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> io::Result<FileId> {
        let m = fs::symlink_metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// A listening Unix socket bound to a path, which it unlinks on drop if the path still names
/// the socket it created.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) listener: UnixListener,
    path: PathBuf,
    id: FileId,
}

impl BoundSocket {
    /// Binds a non-blocking listener at `path`.
    ///
    /// If a file already exists there: a non-socket is refused (`AlreadyExists`, nothing is
    /// deleted); a socket with a live listener is refused (`AddrInUse`); a socket nobody listens
    /// on (`ECONNREFUSED`) is a stale leftover of a dead process and is removed first.
    pub(crate) fn bind(path: &Path) -> io::Result<BoundSocket> {
        Self::bind_typed(path, SockType::Stream)
    }

    /// [`BoundSocket::bind`] for a listener of type `ty`. The liveness probe of an existing
    /// socket file connects with the same type; a live listener of the other type
    /// (`EPROTOTYPE`) is refused too.
    pub(crate) fn bind_typed(path: &Path, ty: SockType) -> io::Result<BoundSocket> {
        match fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Ok(_) => match connect_typed(path, ty) {
                Ok(_) => {
                    return Err(in_use(path));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(in_use(path)),
                Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => return Err(in_use(path)),
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    log::info!("vsock backend: removing stale socket {}", path.display());
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // `UnixListener` only holds the fd: its `accept` (accept4) serves any type.
        let fd = sys::socket(libc::AF_UNIX, ty.libc())?;
        sys::bind_listen_unix(fd.as_raw_fd(), path, BACKLOG)?;
        let listener = UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        let id = FileId::of(path)?;
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            id,
        })
    }

    /// The path it is bound to.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

fn in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("{} has a live listener", path.display()),
    )
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if FileId::of(&self.path).ok() == Some(self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_refuses_live_replaces_stale_keeps_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let a = BoundSocket::bind(&p).unwrap();
        let e = BoundSocket::bind(&p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("live listener"), "{e}");
        // A listener that goes away without unlinking leaves a stale file.
        let stale = dir.path().join("stale");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let b = BoundSocket::bind(&stale).unwrap();
        assert!(connect(&stale).is_ok());
        drop(b);
        assert!(!stale.exists());
        // A regular file is never deleted.
        let f = dir.path().join("file");
        fs::write(&f, b"x").unwrap();
        assert_eq!(
            BoundSocket::bind(&f).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert!(f.exists());
        drop(a);
        assert!(!p.exists());
    }

    #[test]
    fn drop_leaves_a_replaced_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let a = BoundSocket::bind(&p).unwrap();
        fs::remove_file(&p).unwrap();
        fs::write(&p, b"someone else's").unwrap();
        drop(a);
        assert!(p.exists());
    }

    #[test]
    fn connect_fails_fast_without_listener_and_rejects_long_paths() {
        let dir = tempfile::tempdir().unwrap();
        let e = connect(&dir.path().join("nobody")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let long = dir.path().join("x".repeat(200));
        assert_eq!(
            connect(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
