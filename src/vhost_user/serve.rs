//! One VM's vhost-user socket: frontends one after another, each on a fresh library daemon.

use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::SharedVsock;
use crate::seam::Backend;

/// Why serving a vhost-user socket stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be bound.
    #[error("cannot listen on the vhost-user socket {path}: {source}")]
    Listen {
        /// The socket's path.
        path: String,
        /// What binding said.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user library could not set up a daemon for the next frontend.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Binds `socket` (replacing a stale file there) and serves frontends on it, one at a time,
/// until [`VhostUserVsock::shutdown`](super::VhostUserVsock::shutdown); the socket is removed
/// then. A frontend that breaks the protocol or goes away ends its connection only: the device
/// stops, and the next frontend finds it as new.
pub fn serve<B: Backend + 'static>(
    vsock: &SharedVsock<B>,
    socket: &Path,
) -> Result<(), ServeError> {
    let (mut listener, _unlink) = listen(socket).map_err(|e| ServeError::Listen {
        path: socket.display().to_string(),
        source: vhost::vhost_user::Error::SocketError(e),
    })?;
    vsock.set_socket(socket);
    while !vsock.is_shut_down() {
        serve_one(vsock, &mut listener)?;
    }
    Ok(())
}

/// Removes the socket's path when serving ends.
struct Unlink<'a>(&'a Path);

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// The listener on `socket`, whose path (a stale one there is replaced, as the vhost library's
/// `Listener::new(path, true)` does) appears only once it listens: a frontend started as soon
/// as the path exists (QEMU) is never refused (`sys::bind_listen_unix`).
fn listen(socket: &Path) -> std::io::Result<(Listener, Unlink<'_>)> {
    use std::os::fd::AsRawFd;
    let _ = std::fs::remove_file(socket);
    let fd = crate::sys::socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
    crate::sys::bind_listen_unix(fd.as_raw_fd(), socket, 128)?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    // The vhost library accepts on a blocking listener, as `Listener::new` makes it.
    listener.set_nonblocking(false)?;
    Ok((Listener::from(listener), Unlink(socket)))
}

/// Accepts one frontend and serves it until it goes away.
fn serve_one<B: Backend + 'static>(
    vsock: &SharedVsock<B>,
    listener: &mut Listener,
) -> Result<(), ServeError> {
    vsock
        .lock()
        .attach()
        .map_err(|e| ServeError::Daemon(format!("exit event: {e}")))?;
    let mut daemon = VhostUserDaemon::new(
        "vsock-router".to_string(),
        vsock.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| ServeError::Daemon(e.to_string()))?;
    if let Some(h) = daemon.get_epoll_handlers().first() {
        vsock.lock().set_handler(Arc::downgrade(h));
    }
    let served = daemon.start(listener).and_then(|()| {
        if vsock.is_shut_down() {
            daemon.request_shutdown();
        } else if let Some(h) = daemon.shutdown_handle() {
            vsock.lock().frontend = Some(h);
        }
        daemon.wait()
    });
    vsock.lock().frontend = None;
    vsock.lock().detach();
    // Dropping the daemon ends its worker thread (the exit event) and joins it.
    drop(daemon);
    match served {
        Ok(()) => Ok(()),
        Err(e) => {
            // The frontend broke the protocol or the connection: that frontend is gone, the
            // socket stays.
            log::warn!("vhost-user: frontend connection ended: {e}");
            Ok(())
        }
    }
}
