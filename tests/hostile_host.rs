//! Hostile clients of the hybrid `<socket>` (the `CONNECT <port>\n` socket) against a running
//! device: a `VsockDevice` with the production `Router` and its real host Unix backend, a
//! simulated guest, real Unix sockets. While the hostile clients work, a guest ↔ host echo
//! connection keeps moving data, every byte checked, and it must never stall for long; a
//! well-behaved `CONNECT` client must still get its `OK <port>` promptly; afterwards every fd
//! the device held for the hostile clients is closed and memory stayed within a bound.
//!
//! The bounds asserted here are the ones stated in `docs/security.md`; the tests print what
//! they measured (`cargo test --test hostile_host -- --nocapture`).

mod common;

use common::{open_fds, rss_kib, TempDir, GUEST};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::{SimGuest, SockState};

const T: Duration = Duration::from_secs(10);
/// The guest port the echo connection's host side listens on (`<socket>_7000`).
const ECHO_PORT: u32 = 7000;
/// Bytes the guest keeps in flight on the echo connection.
const WINDOW: usize = 96 * 1024;
/// The longest the echo connection may go without progress while hostile clients work.
const MAX_STALL: Duration = Duration::from_secs(2);
/// How much the process' RSS may grow over one hostile phase (documented in security.md).
const RSS_BOUND_KIB: u64 = 16 * 1024;
/// A well-behaved client must have its `OK` within this (the handshake timeouts used here are
/// 2 to 3 s, so "served at the timeout" cannot pass for "served promptly").
const PROMPT: Duration = Duration::from_secs(1);

/// The checks read process-wide figures (fds, RSS): one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Raises the soft fd limit to at least `want` (up to the hard limit); returns the new limit.
fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a valid local.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard limit
        // needs no privilege.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    }
    lim.rlim_cur
}

/// The byte at offset `i` of the echo connection's stream.
fn byte_at(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// A guest ↔ host connection that echoes: the guest sends a known stream, the host side
/// sends every byte back, the guest checks each returned byte against what it sent.
struct Echo {
    port: u32,
    sent: usize,
    verified: usize,
    last_progress: Instant,
    max_stall: Duration,
    host: Option<JoinHandle<std::io::Result<u64>>>,
}

impl Echo {
    fn start(g: &mut SimGuest, listener: &UnixListener) -> Echo {
        let port = g.connect(2, ECHO_PORT).expect("echo connect");
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let host = thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                s.write_all(&buf[..n])?;
                total += n as u64;
            }
        });
        Echo {
            port,
            sent: 0,
            verified: 0,
            last_progress: Instant::now(),
            max_stall: Duration::ZERO,
            host: Some(host),
        }
    }

    /// Sends more if the window allows, checks what came back, pumps the guest once.
    fn step(&mut self, g: &mut SimGuest) {
        if self.sent - self.verified < WINDOW {
            let chunk: Vec<u8> = (self.sent..self.sent + 8192).map(byte_at).collect();
            g.send(self.port, &chunk, T).expect("echo send");
            self.sent += chunk.len();
        }
        let got = g.recv(self.port, 64 * 1024);
        for (k, b) in got.iter().enumerate() {
            assert_eq!(
                *b,
                byte_at(self.verified + k),
                "echo byte {}",
                self.verified + k
            );
        }
        let now = Instant::now();
        if got.is_empty() {
            self.max_stall = self.max_stall.max(now - self.last_progress);
        } else {
            self.verified += got.len();
            self.last_progress = now;
        }
        // Keep the guest's packet log from growing for the whole test.
        g.received.clear();
        g.pump(Duration::from_millis(1));
    }

    /// Steps until `done()` or `timeout`; returns whether `done()` held.
    fn run_until(
        &mut self,
        g: &mut SimGuest,
        timeout: Duration,
        mut done: impl FnMut(&mut SimGuest) -> bool,
    ) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if done(g) {
                return true;
            }
            self.step(g);
        }
        done(g)
    }

    /// Steps for `d`.
    fn step_for(&mut self, g: &mut SimGuest, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.step(g);
        }
    }

    /// Steps while `threads` run (at most `timeout`), then joins them.
    fn run_while<R>(
        &mut self,
        g: &mut SimGuest,
        threads: Vec<JoinHandle<R>>,
        timeout: Duration,
    ) -> Vec<R> {
        let ok = self.run_until(g, timeout, |_| threads.iter().all(|t| t.is_finished()));
        assert!(ok, "hostile clients still running after {timeout:?}");
        threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    }

    /// Checks the connection made progress and never stalled beyond [`MAX_STALL`]; ends it.
    fn finish(mut self, g: &mut SimGuest, min_bytes: usize) {
        // Stop sending; everything sent comes back.
        let (sent, end) = (self.sent, Instant::now() + T);
        while self.verified < sent && Instant::now() < end {
            let got = g.recv(self.port, 64 * 1024);
            for (k, b) in got.iter().enumerate() {
                assert_eq!(
                    *b,
                    byte_at(self.verified + k),
                    "echo byte {}",
                    self.verified + k
                );
            }
            self.verified += got.len();
            g.received.clear();
            g.pump(Duration::from_millis(1));
        }
        assert_eq!(self.verified, sent, "echo drained");
        assert!(
            self.verified >= min_bytes,
            "echo moved only {} bytes",
            self.verified
        );
        assert!(
            self.max_stall < MAX_STALL,
            "echo stalled for {:?}",
            self.max_stall
        );
        eprintln!(
            "  echo: {} KiB checked, longest stall {:?}",
            self.verified / 1024,
            self.max_stall
        );
        assert!(g.close(self.port, T), "echo close answered");
        let echoed = self
            .host
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("echo host");
        assert_eq!(echoed as usize, self.sent);
    }
}

struct Rig {
    g: SimGuest,
    dev: VsockDevice<Router>,
    socket: PathBuf,
    _echo_listener: UnixListener,
    echo: Option<Echo>,
    next_good_port: u32,
    _dir: TempDir,
}

impl Rig {
    /// A running device whose hybrid socket drops clients after `handshake_ms`, with the echo
    /// connection up and warmed.
    fn new(name: &str, handshake_ms: u64) -> Rig {
        let dir = TempDir::new(name);
        let socket = dir.path("vm.sock");
        let cfg: VsockConfig = format!(
            "cid={GUEST},socket={},uplink=none,handshake_timeout_ms={handshake_ms}",
            socket.display()
        )
        .parse()
        .unwrap();
        let listener = UnixListener::bind(format!("{}_{ECHO_PORT}", socket.display())).unwrap();
        let router = Router::new(&cfg, Arc::new(Policy::new(false))).expect("router");
        let (mut g, dev) = SimGuest::with_device(DeviceConfig::new(GUEST), router);
        let mut echo = Echo::start(&mut g, &listener);
        echo.step_for(&mut g, Duration::from_millis(200));
        assert!(echo.verified > 0, "echo works before the abuse");
        // Stalls during setup do not count.
        echo.max_stall = Duration::ZERO;
        Rig {
            g,
            dev,
            socket,
            _echo_listener: listener,
            echo: Some(echo),
            next_good_port: 5000,
            _dir: dir,
        }
    }

    fn echo(&mut self) -> (&mut Echo, &mut SimGuest) {
        (self.echo.as_mut().unwrap(), &mut self.g)
    }

    /// A well-behaved client: `CONNECT`, `OK` within [`PROMPT`], a round trip, close. Returns
    /// how long the `OK` took.
    fn good_client(&mut self) -> Duration {
        let port = self.next_good_port;
        self.next_good_port += 1;
        self.g.listen(port);
        let start = Instant::now();
        let mut c = UnixStream::connect(&self.socket).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        c.set_nonblocking(true).unwrap();
        let mut line = Vec::new();
        let (echo, g) = self.echo();
        let got_ok = echo.run_until(g, T, |_| {
            let mut b = [0u8; 1];
            loop {
                match c.read(&mut b) {
                    Ok(1) => {
                        line.push(b[0]);
                        if b[0] == b'\n' {
                            return true;
                        }
                    }
                    Ok(_) => return true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                    Err(_) => return true,
                }
            }
        });
        let took = start.elapsed();
        assert!(got_ok, "no answer to CONNECT {port} within {T:?}");
        let text = String::from_utf8_lossy(&line).into_owned();
        assert!(text.starts_with("OK ") && text.ends_with('\n'), "{text:?}");
        assert!(took < PROMPT, "CONNECT {port} answered after {took:?}");
        let p = self.g.accept(T).expect("guest accepted");
        assert_eq!(p, port);
        c.set_nonblocking(false).unwrap();
        c.write_all(b"ping").unwrap();
        assert_eq!(self.g.recv_exact(p, 4, T), b"ping");
        self.g.send(p, b"pong", T).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong");
        drop(c);
        assert!(self.g.close(p, T));
        took
    }

    /// Waits (bounded, stepping the echo) until the device holds no connection besides the
    /// echo, and the process is back to `fds` open files.
    fn settle(&mut self, fds: usize, timeout: Duration) {
        let dev = &self.dev;
        let (echo, g) = (self.echo.as_mut().unwrap(), &mut self.g);
        let ok = echo.run_until(g, timeout, |_| {
            dev.connections().len() == 1 && open_fds() == fds
        });
        assert!(
            ok,
            "not settled: {} fds (baseline {fds}), connections {:?}",
            open_fds(),
            self.dev.connections()
        );
    }

    /// Waits (moving the echo) until the device holds only the echo connection and the fd
    /// count has not changed for 200 ms, and returns that count: a baseline taken while the
    /// device is still closing the last stream would be one too high.
    fn quiet_fd_count(&mut self, timeout: Duration) -> usize {
        let dev = &self.dev;
        let (echo, g) = (self.echo.as_mut().unwrap(), &mut self.g);
        let mut last = (open_fds(), Instant::now());
        let ok = echo.run_until(g, timeout, |_| {
            let n = open_fds();
            if n != last.0 {
                last = (n, Instant::now());
            }
            dev.connections().len() == 1 && last.1.elapsed() >= Duration::from_millis(200)
        });
        assert!(
            ok,
            "never quiet: {} fds, connections {:?}",
            open_fds(),
            self.dev.connections()
        );
        last.0
    }

    fn finish(mut self, min_bytes: usize) {
        let echo = self.echo.take().unwrap();
        echo.finish(&mut self.g, min_bytes);
        assert!(self.dev.is_active());
        assert!(self.g.violations.is_empty(), "{:?}", self.g.violations);
    }
}

/// Whether the server closed `c` (EOF or reset) within `timeout`; the time it took.
fn closed_within(c: &mut UnixStream, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 64];
    while start.elapsed() < timeout {
        match c.read(&mut b) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => panic!("the server sent data to a hostile client"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(start.elapsed()),
            Err(e) => panic!("read: {e}"),
        }
    }
    None
}

#[test]
fn slowloris_clients_are_dropped_at_the_timeout_and_others_are_served_meanwhile() {
    let _s = serial();
    const TIMEOUT_MS: u64 = 2500;
    let mut rig = Rig::new("slowloris", TIMEOUT_MS);
    let fds = open_fds();
    let rss = rss_kib();
    // 40 clients send a valid line one byte per second: never finished within the timeout.
    let socket = rig.socket.clone();
    let slow: Vec<JoinHandle<(usize, Option<Duration>)>> = (0..40)
        .map(|i| {
            let socket = socket.clone();
            thread::spawn(move || {
                let line = format!("CONNECT {}\n", 6000 + i);
                let start = Instant::now();
                let mut c = UnixStream::connect(&socket).unwrap();
                for (k, b) in line.bytes().enumerate() {
                    if c.write_all(&[b]).is_err() {
                        return (k, Some(start.elapsed()));
                    }
                    // Wait a second for the next byte, watching for the close.
                    if closed_within(&mut c, Duration::from_secs(1)).is_some() {
                        return (k + 1, Some(start.elapsed()));
                    }
                }
                (line.len(), None)
            })
        })
        .collect();
    // Meanwhile, well-behaved clients every ~300 ms.
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(TIMEOUT_MS) {
        latencies.push(rig.good_client());
        let (echo, g) = rig.echo();
        echo.step_for(g, Duration::from_millis(300));
    }
    let (echo, g) = rig.echo();
    let results = echo.run_while(g, slow, Duration::from_secs(20));
    for (sent, closed) in &results {
        let at = closed.expect("a slowloris client was never dropped");
        assert!(
            *sent < 13,
            "a slowloris client finished its line ({sent} bytes)"
        );
        assert!(
            at >= Duration::from_millis(TIMEOUT_MS - 100)
                && at < Duration::from_millis(TIMEOUT_MS + 1500),
            "dropped after {at:?}, timeout {TIMEOUT_MS} ms"
        );
    }
    let worst = latencies.iter().max().unwrap();
    eprintln!(
        "slowloris: 40 clients dropped after {:?}..{:?}; {} good clients, slowest OK {worst:?}",
        results.iter().map(|r| r.1.unwrap()).min().unwrap(),
        results.iter().map(|r| r.1.unwrap()).max().unwrap(),
        latencies.len()
    );
    assert!(latencies.len() >= 3);
    assert_eq!(
        rig.dev.counters().incoming.load(Ordering::Relaxed),
        latencies.len() as u64,
        "only the good clients reached the guest"
    );
    rig.settle(fds, T);
    let grown = rss_kib().saturating_sub(rss);
    eprintln!("slowloris: RSS grew by {grown} KiB");
    assert!(grown < RSS_BOUND_KIB, "RSS grew by {grown} KiB");
    rig.finish(256 * 1024);
}

#[test]
fn mebibyte_lines_and_binary_garbage_are_dropped_at_once() {
    let _s = serial();
    const TIMEOUT_MS: u64 = 3000;
    let mut rig = Rig::new("garbage", TIMEOUT_MS);
    // Shared, allocated before the baseline: the clients' own buffers are not the device's.
    let mut big = b"CONNECT ".to_vec();
    big.resize(1 << 20, b'1');
    let big = Arc::new(big);
    let mut garbage = vec![0u8; 64 * 1024];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for b in garbage.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 32) as u8;
    }
    garbage[0] = 0xff; // Not the start of `CONNECT`.
    let garbage = Arc::new(garbage);
    let fds = open_fds();
    let rss = rss_kib();
    let socket = rig.socket.clone();
    let mut threads: Vec<JoinHandle<Duration>> = Vec::new();
    for i in 0..64 {
        let socket = socket.clone();
        let payload = if i % 2 == 0 {
            big.clone()
        } else {
            garbage.clone()
        };
        threads.push(thread::spawn(move || {
            let start = Instant::now();
            let mut c = UnixStream::connect(&socket).unwrap();
            c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            // The device closes mid-way: the write fails (EPIPE / ECONNRESET), not times out.
            // (64 KiB of garbage may fit in the socket buffer before the device looks.)
            match c.write_all(&payload) {
                Err(e) => assert!(
                    matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
                    "client {i}: {e}"
                ),
                Ok(()) => assert!(payload.len() < 1 << 20, "client {i}: 1 MiB accepted"),
            }
            closed_within(&mut c, Duration::from_secs(10)).expect("closed");
            start.elapsed()
        }));
    }
    // Interleaved: hostile prefixes that look like a line at first.
    for bad in [
        &b"CONNECT \x00\x01\x02\n"[..],
        b"CONNECT 5000 FROM 3 4\n",
        b"CONNECT 99999999999\n",
        b"\n",
        b"OK 1234\n",
    ] {
        let bad = bad.to_vec();
        let socket = socket.clone();
        threads.push(thread::spawn(move || {
            let start = Instant::now();
            let mut c = UnixStream::connect(&socket).unwrap();
            c.write_all(&bad).unwrap();
            closed_within(&mut c, Duration::from_secs(10)).expect("closed");
            start.elapsed()
        }));
    }
    let good = rig.good_client();
    let (echo, g) = rig.echo();
    let times = echo.run_while(g, threads, Duration::from_secs(30));
    let slowest = *times.iter().max().unwrap();
    eprintln!(
        "garbage: 69 clients dropped, slowest after {slowest:?}; good client OK after {good:?}"
    );
    assert!(
        slowest < Duration::from_millis(TIMEOUT_MS / 2),
        "dropped by size or content, not by the timeout: {slowest:?}"
    );
    assert_eq!(rig.dev.counters().incoming.load(Ordering::Relaxed), 1);
    let good = rig.good_client();
    rig.settle(fds, T);
    let grown = rss_kib().saturating_sub(rss);
    eprintln!("garbage: 34 MiB of hostile input, RSS grew by {grown} KiB; OK after {good:?}");
    assert!(grown < RSS_BOUND_KIB, "RSS grew by {grown} KiB");
    rig.finish(256 * 1024);
}

#[test]
fn two_thousand_half_open_clients_time_out_and_others_are_served() {
    let _s = serial();
    const N: usize = 2000;
    const TIMEOUT_MS: u64 = 3000;
    let limit = raise_fd_limit(8192);
    assert!(limit as usize > N + 1200, "RLIMIT_NOFILE {limit} too low");
    let mut rig = Rig::new("halfopen", TIMEOUT_MS);
    let fds = open_fds();
    let rss = rss_kib();
    let socket = rig.socket.clone();
    let opener = thread::spawn(move || -> Vec<UnixStream> {
        (0..N)
            .map(|_| UnixStream::connect(&socket).unwrap())
            .collect()
    });
    let (echo, g) = rig.echo();
    let mut clients = echo
        .run_while(g, vec![opener], Duration::from_secs(60))
        .pop()
        .unwrap();
    let opened = Instant::now();
    // The device holds at most max_pending (1024) of them; the older ones were closed.
    let (echo, g) = rig.echo();
    echo.step_for(g, Duration::from_millis(100));
    let held = open_fds() - fds - N;
    eprintln!("half-open: {N} clients, the device holds {held} of them");
    assert!(
        held <= 1024 + 8,
        "the device holds {held} half-open clients"
    );
    // Other clients are served while they hang around.
    let mut latencies = Vec::new();
    for _ in 0..5 {
        latencies.push(rig.good_client());
    }
    assert!(
        opened.elapsed() < Duration::from_millis(TIMEOUT_MS),
        "test too slow"
    );
    // After the timeout every one of them is closed by the device.
    let (echo, g) = rig.echo();
    let all_closed = echo.run_until(g, Duration::from_millis(TIMEOUT_MS) + T, |_| {
        open_fds() <= fds + N
    });
    assert!(all_closed, "{} fds still open", open_fds() - fds - N);
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(
            closed_within(c, Duration::from_secs(1)).is_some(),
            "client {i} still open"
        );
    }
    drop(clients);
    rig.settle(fds, T);
    let grown = rss_kib().saturating_sub(rss);
    eprintln!(
        "half-open: all closed; good clients served in at most {:?}; RSS grew by {grown} KiB",
        latencies.iter().max().unwrap()
    );
    assert!(grown < RSS_BOUND_KIB, "RSS grew by {grown} KiB");
    rig.finish(256 * 1024);
}

/// Reads the `OK <port>\n` line byte by byte (nothing after it).
fn read_ok(c: &mut UnixStream, rig: &mut Rig) {
    c.set_nonblocking(true).unwrap();
    let mut line = Vec::new();
    let (echo, g) = rig.echo();
    let ok = echo.run_until(g, T, |_| {
        let mut b = [0u8; 1];
        while let Ok(1) = c.read(&mut b) {
            line.push(b[0]);
            if b[0] == b'\n' {
                return true;
            }
        }
        false
    });
    assert!(
        ok && line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    c.set_nonblocking(false).unwrap();
}

#[test]
fn clients_vanishing_mid_handshake_and_mid_stream_leak_nothing() {
    let _s = serial();
    let mut rig = Rig::new("vanish", 2000);
    let socket = rig.socket.clone();
    let round = |rig: &mut Rig, i: u32| {
        let port = 8000 + i;
        rig.g.listen(port);
        match i % 4 {
            // Mid-line.
            0 => {
                let mut c = UnixStream::connect(&socket).unwrap();
                c.write_all(b"CONNECT 80").unwrap();
                drop(c);
            }
            // The whole line, gone before the guest could answer.
            1 => {
                let mut c = UnixStream::connect(&socket).unwrap();
                c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
                drop(c);
                // If it was offered, the guest sees the end at once.
                let (echo, g) = rig.echo();
                echo.run_until(g, Duration::from_millis(20), |_| false);
                if let Some(p) = rig.g.accept(Duration::ZERO) {
                    let (echo, g) = rig.echo();
                    let ended = echo.run_until(g, T, |g| {
                        g.socks
                            .get(&p)
                            .is_none_or(|s| s.eof() || s.state == SockState::Reset)
                    });
                    assert!(ended, "guest never saw the vanished client");
                    rig.g.close(p, T);
                }
            }
            // After OK, guest → host data in flight, the client closes without reading it.
            2 => {
                let mut c = UnixStream::connect(&socket).unwrap();
                c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
                read_ok(&mut c, rig);
                let p = rig.g.accept(T).unwrap();
                let data = vec![0x5a; 512 * 1024];
                // More than the socket buffers hold: part of it is still in the device.
                let _ = rig.g.send(p, &data[..256 * 1024], T);
                drop(c);
                let _ = rig
                    .g
                    .send(p, &data[256 * 1024..], Duration::from_millis(100));
                let (echo, g) = rig.echo();
                let reset = echo.run_until(g, T, |g| {
                    g.socks.get(&p).is_none_or(|s| s.state == SockState::Reset)
                });
                assert!(reset, "guest not reset after its peer vanished mid-stream");
                rig.g.socks.remove(&p);
            }
            // After OK the client sends data and closes: the guest gets every byte, then EOF.
            _ => {
                let mut c = UnixStream::connect(&socket).unwrap();
                c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
                read_ok(&mut c, rig);
                let sent: Vec<u8> = (0..100_000).map(|k| byte_at(k * 7 + i as usize)).collect();
                c.write_all(&sent).unwrap();
                drop(c);
                let p = rig.g.accept(T).unwrap();
                let got = rig.g.recv_exact(p, sent.len() + 1, T);
                assert_eq!(got, sent, "guest got what the client sent before vanishing");
                assert!(rig.g.socks[&p].eof());
                assert!(rig.g.close(p, T));
            }
        }
    };
    for i in 0..40 {
        round(&mut rig, i);
    }
    let fds = rig.quiet_fd_count(T);
    let rss = rss_kib();
    for i in 40..440 {
        round(&mut rig, i);
    }
    rig.settle(fds, T);
    let grown = rss_kib().saturating_sub(rss);
    eprintln!("vanish: 400 rounds, fds back to {fds}, RSS grew by {grown} KiB");
    assert!(grown < RSS_BOUND_KIB, "RSS grew by {grown} KiB");
    // Mid-stream vanishing (every fourth round) is a close with guest bytes dropped, not a
    // host error: the guest gets SHUTDOWN(RCV|SEND), as from a peer kernel's close().
    assert!(rig.dev.counters().host_dropped.load(Ordering::Relaxed) >= 100);
    let good = rig.good_client();
    eprintln!("vanish: good client OK after {good:?}");
    rig.finish(256 * 1024);
}
