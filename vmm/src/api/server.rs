//! Serves the API on a Unix socket, one connection at a time, on its own thread.
//!
//! Each connection carries one request (`Connection: close`). Reads are bounded in size by the
//! parser's limits and in time by [`REQUEST_TIMEOUT`], so a slow or hostile client delays other
//! API clients by at most that long and never touches the device's threads.

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::http::{parse_request, Parsed, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::routes::{error_response, route, Action, ApiContext};

/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` on a new thread named `api`. After a request whose action is
/// [`Action::Shutdown`] has been answered, calls `on_shutdown`.
pub fn spawn(
    listener: UnixListener,
    ctx: ApiContext,
    on_shutdown: Box<dyn Fn() + Send>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if serve_connection(stream, &ctx) == Action::Shutdown {
                            on_shutdown();
                        }
                    }
                    Err(e) => {
                        warn!("api: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
}

/// Reads one request from `stream`, answers it and returns the handler's action.
pub fn serve_connection(mut stream: UnixStream, ctx: &ApiContext) -> Action {
    let (response, action) = match read_request(&mut stream) {
        Ok(Ok(req)) => route(&req, ctx),
        Ok(Err(response)) => (response, Action::None),
        Err(e) => {
            debug!("api: connection dropped: {e}");
            return Action::None;
        }
    };
    if let Err(e) = stream.write_all(&response.to_bytes()) {
        debug!("api: cannot send the response: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    action
}

fn read_request(stream: &mut UnixStream) -> io::Result<Result<super::http::Request, Response>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match parse_request(&buf) {
            Ok(Parsed::Complete(req)) => return Ok(Ok(req)),
            Ok(Parsed::Partial) => {}
            Err(e) => return Ok(Err(error_response(&e))),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Err(Response::error(408, "request not received in time")));
        }
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(Err(Response::error(408, "request not received in time")))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Err(Response::error(
                400,
                "connection closed before the request was complete",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096 {
            // Parsing rejects oversized heads and bodies first; this only bounds memory.
            return Ok(Err(Response::error(413, "request too large")));
        }
    }
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
