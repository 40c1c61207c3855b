//! `vsock-connect CID PORT`: connect a program's stdin/stdout to (CID, PORT) in the same single
//! CID address space the nested guests see — a sibling guest through the CID registry, anything
//! else through the G2H uplink when `g2h_fallback` is on. Like netcat; it builds statically so it
//! can also run inside a guest. With `--seqpacket` the connection is a SOCK_SEQPACKET one: each
//! `read(2)` of stdin is sent as one message, and each message received is written to stdout.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vsock_router::backend::namespace::{self, NsMode};
use vsock_router::backend::registry;
use vsock_router::backend::uplink::{Uplink, UplinkSpec};
use vsock_router::config::parse_switch;
use vsock_router::router::{decide, Decision, RefuseReason, RouteCtx};
use vsock_router::sys;
use vsock_router::vq::IoVecs;
use vsock_router::wire::line::parse_ok_line;
use vsock_router::wire::SockType;

const USAGE: &str = "usage: vsock-connect [--registry DIR] [--uplink none|/dev/vsock|unix:DIR] \
[--fallback 0|1] [--seqpacket] CID PORT

Connects stdin/stdout to (CID, PORT), routed like a nested guest's connection:
  a CID owned by a guest in the registry  -> that guest (it sees this program as CID 2)
  CID 2, or any other CID with fallback=1 -> the G2H uplink (VMADDR_FLAG_TO_HOST)
  otherwise                               -> fails with ENODEV
A registry that is a local CID namespace (its ns_mode file says local) reaches
nothing through the uplink: CIDs none of its guests own fail with ENODEV.
--seqpacket opens a SOCK_SEQPACKET connection on the same routes (the registry's
<cid>.sock_seqpacket, AF_VSOCK SOCK_SEQPACKET, the unix:DIR stand-in): each read of
stdin (at most 64 KiB) is sent as one message, each message received is written to
stdout as it is, with nothing added.
Defaults: --uplink /dev/vsock when it exists, else none; --fallback 1; SOCK_STREAM.
Example: echo hello | vsock-connect --registry /run/vsock 5 9000";

struct Args {
    registry: Option<PathBuf>,
    uplink: UplinkSpec,
    fallback: bool,
    cid: u64,
    port: u32,
    sock_type: SockType,
}

fn parse_args() -> Result<Args, String> {
    let mut registry = None;
    let mut uplink = None;
    let mut fallback = true;
    let mut sock_type = SockType::Stream;
    let mut pos = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--help" | "-h" => return Err(String::new()),
            "--seqpacket" => sock_type = SockType::Seqpacket,
            "--registry" => registry = Some(PathBuf::from(value("--registry")?)),
            "--uplink" => {
                let v = value("--uplink")?;
                uplink = Some(
                    v.parse::<UplinkSpec>()
                        .map_err(|e| format!("--uplink `{v}`: {e}"))?,
                )
            }
            "--fallback" => {
                let v = value("--fallback")?;
                fallback = parse_switch(&v).map_err(|why| format!("--fallback `{v}`: {why}"))?
            }
            _ if a.starts_with('-') => return Err(format!("unknown option `{a}`")),
            _ => pos.push(a),
        }
    }
    let [cid, port] = pos.as_slice() else {
        return Err("expected CID and PORT".into());
    };
    let cid: u64 = cid
        .parse()
        .map_err(|_| format!("CID `{cid}` is not a number"))?;
    let port: u32 = port
        .parse()
        .map_err(|_| format!("PORT `{port}` is not a number"))?;
    let uplink = uplink.unwrap_or_else(|| {
        if std::path::Path::new("/dev/vsock").exists() {
            UplinkSpec::Vsock(PathBuf::from("/dev/vsock"))
        } else {
            UplinkSpec::None
        }
    });
    Ok(Args {
        registry,
        uplink,
        fallback,
        cid,
        port,
        sock_type,
    })
}

/// Waits (bounded) for a non-blocking connect to complete, then makes the socket blocking.
/// How long a connect (through the uplink, or a sibling's answer) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn finish_connect(fd: &OwnedFd, connected: bool) -> io::Result<()> {
    if !connected {
        let ms = CONNECT_TIMEOUT.as_millis() as i32;
        if sys::poll_one(fd.as_raw_fd(), libc::POLLOUT, ms)? == 0 {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        if let Some(e) = sys::take_error(fd.as_raw_fd())? {
            return Err(e);
        }
    }
    sys::set_nonblocking(fd.as_raw_fd(), false)
}

/// Reads the sibling's `OK <port>\n`, one byte at a time so no payload byte is consumed.
fn read_ok(s: &mut UnixStream) -> io::Result<()> {
    s.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 && Instant::now() < deadline {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            s.set_read_timeout(None)?;
            return match parse_ok_line(&line) {
                Some(_) => Ok(()),
                None => Err(io::Error::other(format!(
                    "the sibling answered {:?}, not OK <port>",
                    String::from_utf8_lossy(&line)
                ))),
            };
        }
    }
    Err(io::Error::new(
        io::ErrorKind::ConnectionRefused,
        "the sibling's guest refused the connection",
    ))
}

/// The most a read of stdin takes, so the most one message we send holds.
const MAX_READ: usize = 64 * 1024;

/// The receive buffer to start with: the largest message a Linux AF_VSOCK peer can send us by
/// default (our `SO_VM_SOCKETS_BUFFER_SIZE`). It grows for larger messages.
const RECV_BUF: usize = 256 * 1024;

/// Waits (bounded by `timeout`, or forever) until `fd` is readable or hung up.
fn wait_readable(fd: &UnixStream, timeout: Option<Duration>) -> io::Result<bool> {
    let ms = timeout.map_or(-1, |t| t.as_millis() as i32);
    loop {
        match sys::poll_one(fd.as_raw_fd(), libc::POLLIN, ms) {
            Ok(r) => return Ok(r != 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives the next whole message into `buf` (grown to the message's size when the socket
/// tells it), waiting for it. `Ok(None)`: end of stream. A message that does not fit (the
/// socket could not tell its size) is an error, never cut silently.
fn recv_message(s: &UnixStream, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
    let fd = s.as_raw_fd();
    loop {
        wait_readable(s, None)?;
        match sys::peek_msg_len(fd) {
            Ok(n) if n > buf.len() => buf.resize(n, 0),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Kernels before 6.3 cannot peek at an AF_VSOCK message: `buf` is their limit.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {}
            Err(e) => return Err(e),
        }
        let mut iov = IoVecs::new();
        iov.push_buf(buf);
        let m = match sys::recvmsg(fd, &iov) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if m.truncated {
            return Err(io::Error::other(format!(
                "a message of {} bytes did not fit the {}-byte buffer",
                m.len,
                buf.len()
            )));
        }
        if m.len == 0 {
            // End of stream, or an empty message: AF_UNIX reads both as 0. An empty message
            // leaves the peer's side open.
            if sys::peer_hung_up(fd, true) {
                return Ok(None);
            }
            continue;
        }
        return Ok(Some(m.len));
    }
}

/// Reads the sibling's answer, which on a seqpacket connection is the one message
/// `OK <port>\n`.
fn read_ok_message(s: &UnixStream) -> io::Result<()> {
    let refused = || {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the sibling's guest refused the connection",
        )
    };
    if !wait_readable(s, Some(CONNECT_TIMEOUT))? {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the sibling did not answer within {CONNECT_TIMEOUT:?}"),
        ));
    }
    let mut buf = vec![0u8; 32];
    let mut iov = IoVecs::new();
    iov.push_buf(&mut buf);
    let m = sys::recvmsg(s.as_raw_fd(), &iov)?;
    if m.len == 0 {
        return Err(refused());
    }
    let got = &buf[..m.len.min(buf.len())];
    match parse_ok_line(got) {
        Some(_) if !m.truncated => Ok(()),
        _ => Err(io::Error::other(format!(
            "the sibling answered {:?}{}, not the message OK <port>",
            String::from_utf8_lossy(got),
            if m.truncated { "..." } else { "" }
        ))),
    }
}

/// Sends each read of stdin as one message (then shuts the write side) and writes each message
/// received to stdout.
fn relay_messages(stream: UnixStream) -> io::Result<()> {
    let up = stream.try_clone()?;
    let t = std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_READ];
        let mut stdin = io::stdin().lock();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("vsock-connect: stdin: {e}");
                    break;
                }
            };
            // One write(2) on a SOCK_SEQPACKET socket is one message, sent whole or not at all.
            match (&up).write(&buf[..n]) {
                Ok(w) if w == n => {}
                Ok(w) => {
                    eprintln!("vsock-connect: a message of {n} bytes went out as {w}");
                    break;
                }
                Err(e) => {
                    eprintln!("vsock-connect: sending a message of {n} bytes: {e}");
                    break;
                }
            }
        }
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = io::stdout().lock();
    while let Some(n) = recv_message(&stream, &mut buf)? {
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    drop(t);
    Ok(())
}

/// Copies stdin to the stream (then shuts its write side) and the stream to stdout.
fn relay(stream: UnixStream) -> io::Result<()> {
    let mut up = stream.try_clone()?;
    let t = std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = stream;
    io::copy(&mut down, &mut io::stdout().lock())?;
    io::stdout().flush()?;
    drop(t);
    Ok(())
}

fn run(a: Args) -> Result<(), String> {
    // This program is in the registry's CID namespace, whatever its mode.
    let ns_mode = match &a.registry {
        Some(d) => namespace::read_mode(d).map_err(|e| e.to_string())?,
        None => NsMode::Global,
    };
    let ctx = RouteCtx {
        own_cid: None,
        g2h_fallback: a.fallback,
        uplink: a.uplink != UplinkSpec::None,
        ns_mode,
    };
    let dir = a.registry.clone();
    let mut decision = decide(a.cid, &ctx, |c| {
        dir.as_ref().is_some_and(|d| registry::owned_in(d, c))
    });
    // From here CID 2 is the parent, through the uplink: out of reach of a local namespace too.
    if decision == Decision::Host && !ns_mode.reaches_parent() {
        decision = Decision::Refuse(RefuseReason::LocalNamespace);
    }
    let stream: UnixStream = match decision {
        Decision::Refuse(RefuseReason::LocalNamespace) => {
            return Err(format!(
                "CID {}: no such device (ENODEV): no guest of the registry owns it, and the \
                 registry is a local CID namespace, from which nothing goes to the uplink",
                a.cid
            ))
        }
        Decision::Refuse(RefuseReason::ReservedCid) => {
            return Err(format!("CID {}: reserved CID (EINVAL)", a.cid))
        }
        Decision::Refuse(RefuseReason::NoRoute) => {
            return Err(format!(
                "CID {}: no such device (ENODEV): no guest on this machine owns it{}",
                a.cid,
                if ctx.uplink {
                    " and g2h_fallback is off"
                } else {
                    " and there is no uplink"
                }
            ))
        }
        Decision::Sibling => {
            let d = a.registry.as_ref().expect("owned implies a registry");
            // Outside the devices' ephemeral range [2^30, 2^31), so it never collides with them.
            let src_port = (1 << 31) | (std::process::id() & 0x3fff_ffff);
            let s = registry::connect_in(d, a.cid, a.port, 2, src_port, a.sock_type).map_err(
                |e| match (a.sock_type, e.kind()) {
                    (SockType::Seqpacket, io::ErrorKind::NotFound) => format!(
                        "CID {} port {}: {e}: its VMM serves no SOCK_SEQPACKET socket in the \
                         registry",
                        a.cid, a.port
                    ),
                    _ => format!("CID {} port {}: {e}", a.cid, a.port),
                },
            )?;
            let fd: OwnedFd = s.into();
            finish_connect(&fd, true).map_err(|e| e.to_string())?;
            let mut s = UnixStream::from(fd);
            match a.sock_type {
                SockType::Stream => read_ok(&mut s),
                SockType::Seqpacket => read_ok_message(&s),
            }
            .map_err(|e| format!("CID {} port {}: {e}", a.cid, a.port))?;
            s
        }
        Decision::Host | Decision::Uplink => {
            if decision == Decision::Uplink {
                eprintln!(
                    "vsock-connect: CID {} is not on this machine: g2h_fallback took the uplink \
                     ({}, to_host)",
                    a.cid, a.uplink
                );
            }
            let up = Uplink::new(a.uplink.clone()).with_max_message(MAX_READ);
            let (s, connected) = up
                .connect(a.cid, a.port, CONNECT_TIMEOUT, a.sock_type)
                .map_err(|e| format!("CID {} port {} via {}: {e}", a.cid, a.port, a.uplink))?;
            let fd: OwnedFd = s.into();
            finish_connect(&fd, connected)
                .map_err(|e| format!("CID {} port {} via {}: {e}", a.cid, a.port, a.uplink))?;
            // UnixStream only uses read/write/shutdown, which work on any stream or seqpacket
            // socket (AF_VSOCK included).
            UnixStream::from(fd)
        }
    };
    match a.sock_type {
        SockType::Stream => relay(stream),
        SockType::Seqpacket => relay_messages(stream),
    }
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("vsock-connect: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock-connect: {e}");
            ExitCode::from(1)
        }
    }
}
