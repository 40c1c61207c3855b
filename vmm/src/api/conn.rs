//! The API server's event loop: a non-blocking listener and up to [`MAX_CLIENTS`] non-blocking
//! connections in one `poll(2)` set. Each connection reads one request (bounded in size by the
//! parser, in time by [`REQUEST_TIMEOUT`]), is answered, and closed once the answer is written
//! (again within [`REQUEST_TIMEOUT`]).

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::http::{parse_request, Parsed, Response, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use super::lifecycle::VmLifecycle;
use super::routes::{error_response, route, Action, ApiContext};

/// How long a client has to send its whole request, and then to read the whole answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once; when a new one arrives beyond this, the oldest is closed.
pub const MAX_CLIENTS: usize = 32;

/// New connections accepted per loop turn at most.
const ACCEPT_BATCH: usize = 64;

/// Bytes buffered per connection at most: parsing refuses oversized heads and bodies before
/// this, it only bounds memory.
const MAX_BUFFERED: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES + 4096;

enum Phase {
    /// Reading the request into the buffer.
    Reading(Vec<u8>),
    /// Writing the answer from this offset; then doing the action.
    Writing(Vec<u8>, usize, Action),
}

struct Client {
    stream: UnixStream,
    phase: Phase,
    deadline: Instant,
}

/// What became of a client after some I/O.
enum Step {
    /// Keep it.
    Open,
    /// Close it (done, failed or timed out), then do the action.
    Close(Action),
}

/// The API server's state: the listener, its clients (oldest first) and what handlers reach.
pub(super) struct Server {
    listener: UnixListener,
    ctx: ApiContext,
    lifecycle: Option<Arc<dyn VmLifecycle>>,
    on_shutdown: Box<dyn Fn() + Send>,
    clients: VecDeque<Client>,
}

impl Server {
    /// Serves `listener`, which must be non-blocking.
    pub(super) fn new(
        listener: UnixListener,
        ctx: ApiContext,
        lifecycle: Option<Arc<dyn VmLifecycle>>,
        on_shutdown: Box<dyn Fn() + Send>,
    ) -> Self {
        Server {
            listener,
            ctx,
            lifecycle,
            on_shutdown,
            clients: VecDeque::new(),
        }
    }

    /// Waits for readiness or the next deadline (never longer), then serves what is ready.
    pub(super) fn turn(&mut self) {
        let mut fds = Vec::with_capacity(self.clients.len() + 1);
        fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
        for c in &self.clients {
            let events = match c.phase {
                Phase::Reading(_) => libc::POLLIN,
                Phase::Writing(..) => libc::POLLOUT,
            };
            fds.push(pollfd(c.stream.as_raw_fd(), events));
        }
        let timeout = self
            .clients
            .iter()
            .map(|c| c.deadline)
            .min()
            .map_or(-1, |d| {
                let left = d.saturating_duration_since(Instant::now());
                // Round up, so a deadline is never polled for as "not yet" in a busy loop.
                (left.as_millis() + 1).min(60_000) as i32
            });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                warn!("api: poll: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            return;
        }
        let now = Instant::now();
        // Clients first (their indexes match `fds`), then new ones.
        let mut actions = Vec::new();
        let mut keep = VecDeque::with_capacity(self.clients.len());
        for (c, fd) in self.clients.drain(..).zip(&fds[1..]) {
            let mut c = c;
            let step = if fd.revents != 0 {
                c.progress(&self.ctx, self.lifecycle.as_deref(), now)
            } else {
                Step::Open
            };
            let step = match step {
                Step::Open if now >= c.deadline => c.expire(),
                s => s,
            };
            match step {
                Step::Open => keep.push_back(c),
                Step::Close(a) => actions.push(a),
            }
        }
        self.clients = keep;
        if fds[0].revents != 0 {
            self.accept(now);
        }
        for a in actions {
            if a == Action::Shutdown {
                (self.on_shutdown)();
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    warn!("api: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                debug!("api: connection dropped: {e}");
                continue;
            }
            while self.clients.len() >= MAX_CLIENTS {
                // The oldest has had the longest to send its request; a well-behaved one is
                // served within milliseconds, so this only ever closes slow ones.
                if let Some(old) = self.clients.pop_front() {
                    debug!("api: {MAX_CLIENTS} connections open, closing the oldest");
                    drop(old);
                }
            }
            self.clients.push_back(Client {
                stream,
                phase: Phase::Reading(Vec::with_capacity(1024)),
                deadline: now + REQUEST_TIMEOUT,
            });
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl Client {
    /// Reads or writes what the socket allows without blocking.
    fn progress(
        &mut self,
        ctx: &ApiContext,
        lifecycle: Option<&dyn VmLifecycle>,
        now: Instant,
    ) -> Step {
        if let Phase::Reading(buf) = &mut self.phase {
            let answer = match read_some(&mut self.stream, buf) {
                Ok(None) => return Step::Open,
                Ok(Some(answer)) => answer,
                Err(e) => {
                    debug!("api: connection dropped: {e}");
                    return Step::Close(Action::None);
                }
            };
            let (response, action) = match answer {
                Ok(req) => match lifecycle.and_then(|vm| super::lifecycle::route(&req, vm)) {
                    Some(response) => (response, Action::None),
                    None => route(&req, ctx),
                },
                Err(response) => (response, Action::None),
            };
            self.phase = Phase::Writing(response.to_bytes(), 0, action);
            self.deadline = now + REQUEST_TIMEOUT;
        }
        self.write_some()
    }

    /// The deadline passed: a request not received in time gets a 408 if the socket takes it
    /// at once; an answer not read in time is abandoned.
    fn expire(&mut self) -> Step {
        match self.phase {
            Phase::Reading(_) => {
                let r = Response::error(408, "request not received in time").to_bytes();
                let _ = (&self.stream).write(&r);
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                Step::Close(Action::None)
            }
            Phase::Writing(_, _, action) => {
                debug!("api: the client did not read its answer in time");
                // The request was handled; its action stands.
                Step::Close(action)
            }
        }
    }

    fn write_some(&mut self) -> Step {
        let Phase::Writing(out, off, action) = &mut self.phase else {
            return Step::Open;
        };
        while *off < out.len() {
            match (&self.stream).write(&out[*off..]) {
                Ok(0) => return Step::Close(*action),
                Ok(n) => *off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Open,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("api: cannot send the response: {e}");
                    return Step::Close(*action);
                }
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        Step::Close(*action)
    }
}

type Answer = Result<super::http::Request, Response>;

/// Reads what is available into `buf`; `Some` once the request is complete or must be refused.
fn read_some(stream: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<Option<Answer>> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Some(match parse_request(buf) {
                Ok(Parsed::Complete(req)) => Ok(req),
                Ok(Parsed::Partial) => Err(Response::error(
                    400,
                    "connection closed before the request was complete",
                )),
                Err(e) => Err(error_response(&e)),
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(buf) {
            Ok(Parsed::Complete(req)) => return Ok(Some(Ok(req))),
            Ok(Parsed::Partial) => {}
            Err(e) => return Ok(Some(Err(error_response(&e)))),
        }
        if buf.len() > MAX_BUFFERED {
            return Ok(Some(Err(Response::error(413, "request too large"))));
        }
    }
}
