//! Serves the API on a Unix socket, on its own thread.
//!
//! Each connection carries one request (`Connection: close`). The thread never blocks on a
//! client: every socket is non-blocking and one `poll(2)` loop (`conn.rs`) serves up to
//! [`MAX_CLIENTS`] connections at once, so a slow, stalled or hostile client does not delay the
//! others. Each connection is bounded in size by the parser's limits and in time by
//! [`REQUEST_TIMEOUT`] (to send its request, then again to read the answer); when
//! [`MAX_CLIENTS`] are open, the oldest is closed to make room for a new one. Requests are
//! handled one after the other on this thread, so concurrent writes are applied in order.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;

use super::conn::Server;
pub use super::conn::{MAX_CLIENTS, REQUEST_TIMEOUT};
use super::lifecycle::VmLifecycle;
use super::routes::ApiContext;

/// The API listener's backlog (std's `UnixListener::bind` uses 128 too).
const LISTEN_BACKLOG: libc::c_int = 128;

/// Binds the API socket at `path` with mode 0600. A stale socket (nobody listening) left by a
/// crashed VMM is replaced; any other existing file is an error.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            fs::remove_file(path)?;
        } else {
            return Err(io::Error::new(
                ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
    }
    // SAFETY: umask only changes the process file-creation mask; it is called before any other
    // thread of this VMM creates files, and restored right after the bind.
    let old = unsafe { libc::umask(0o177) };
    // Bound so that the path appears only once it listens (a client that waits for it is
    // never refused).
    let listener = vsock_router::sys::socket(libc::AF_UNIX, libc::SOCK_STREAM).and_then(|fd| {
        vsock_router::sys::bind_listen_unix(fd.as_raw_fd(), path, LISTEN_BACKLOG)?;
        Ok(UnixListener::from(fd))
    });
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` on a new thread named `api` (see the [module documentation](self)). After
/// a request whose action is [`Action::Shutdown`](super::routes::Action::Shutdown) has been
/// answered, calls `on_shutdown`.
pub fn spawn(
    listener: UnixListener,
    ctx: ApiContext,
    on_shutdown: Box<dyn Fn() + Send>,
) -> io::Result<JoinHandle<()>> {
    spawn_with_lifecycle(listener, ctx, None, on_shutdown)
}

/// [`spawn`], with the VM lifecycle routes ([`super::lifecycle`]) answered by `lifecycle`
/// before the others.
pub fn spawn_with_lifecycle(
    listener: UnixListener,
    ctx: ApiContext,
    lifecycle: Option<Arc<dyn VmLifecycle>>,
    on_shutdown: Box<dyn Fn() + Send>,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let mut server = Server::new(listener, ctx, lifecycle, on_shutdown);
            loop {
                server.turn();
            }
        })
}

/// Removes the API socket at teardown.
#[derive(Debug)]
pub struct SocketGuard(pub PathBuf);

impl SocketGuard {
    /// Removes the socket file now.
    pub fn remove(&self) {
        if let Err(e) = fs::remove_file(&self.0) {
            if e.kind() != ErrorKind::NotFound {
                warn!("cannot remove {}: {e}", self.0.display());
            }
        }
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.remove();
    }
}
