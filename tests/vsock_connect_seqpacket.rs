//! `vsock-connect --seqpacket`, run as a program against real `SOCK_SEQPACKET` Unix sockets: a
//! registry directory whose `<cid>.sock_seqpacket` is served by the test (as a sibling device
//! would), and the `unix:DIR` uplink stand-in with a seqpacket listener. Every message boundary
//! the program can keep is checked: each read of stdin (at most 64 KiB) is one message, each
//! message received reaches stdout whole, an empty message is no end of stream.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use vsock_router::backend::seqpacket::{fit_messages, seqpacket_path};
use vsock_router::backend::vsock::FORBID_ENV;
use vsock_router::sys;
use vsock_router::vq::IoVecs;

const T: Duration = Duration::from_secs(5);

fn seq_listener(path: &Path) -> UnixListener {
    let fd = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET).unwrap();
    sys::bind_listen_unix(fd.as_raw_fd(), path, 8).unwrap();
    UnixListener::from(fd)
}

/// Accepts one client within `T`; its socket stays non-blocking.
fn accept(l: &UnixListener) -> OwnedFd {
    assert_ne!(
        sys::poll_one(l.as_raw_fd(), libc::POLLIN, T.as_millis() as i32).unwrap(),
        0,
        "nobody connected"
    );
    let (s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let fd = OwnedFd::from(s);
    // Room for the largest message `exchange` sends, within the default net.core.wmem_max.
    assert!(fit_messages(fd.as_raw_fd(), 300_000));
    fd
}

/// Receives one whole message within `T`.
fn recv(fd: &OwnedFd) -> Vec<u8> {
    assert_ne!(
        sys::poll_one(fd.as_raw_fd(), libc::POLLIN, T.as_millis() as i32).unwrap(),
        0,
        "no message"
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut iov = IoVecs::new();
    iov.push_buf(&mut buf);
    let m = sys::recvmsg(fd.as_raw_fd(), &iov).unwrap();
    assert!(!m.truncated, "a message of {} bytes", m.len);
    buf.truncate(m.len);
    buf
}

fn send(fd: &OwnedFd, msg: &[u8]) {
    let mut m = msg.to_vec();
    let mut iov = IoVecs::new();
    iov.push_buf(&mut m);
    assert_eq!(sys::sendmsg(fd.as_raw_fd(), &iov).unwrap(), msg.len());
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(salt))
        .collect()
}

struct Program {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl Program {
    fn start(args: &[&str]) -> Program {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vsock-connect"))
            .args(args)
            .env(FORBID_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Program {
            stdin: child.stdin.take(),
            child,
            stdout: rx,
            pending: Vec::new(),
        }
    }

    /// One write to the program's stdin (at most `PIPE_BUF` bytes, so one read of it).
    fn write(&mut self, bytes: &[u8]) {
        assert!(bytes.len() <= libc::PIPE_BUF);
        self.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }

    /// Exactly the next `n` bytes of its stdout, within `T`.
    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let end = Instant::now() + T;
        while self.pending.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(b) => self.pending.extend(b),
                Err(e) => panic!("stdout: {e} after {} of {n} bytes", self.pending.len()),
            }
        }
        let rest = self.pending.split_off(n);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Closes stdin and waits (bounded) for the exit: the code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let end = Instant::now() + T;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("vsock-connect did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code(), err)
    }
}

/// Messages both ways between the program and the test's end `s`, every boundary checked.
fn exchange(p: &mut Program, s: &OwnedFd) {
    // Up: each read of stdin is one message; the next write waits for the message before.
    for (i, len) in [1, 17, 1000, libc::PIPE_BUF].into_iter().enumerate() {
        let msg = pattern(len, i as u8);
        p.write(&msg);
        assert_eq!(recv(s), msg, "message {i} up");
    }
    // A read of stdin is at most 64 KiB: 150 KiB arrive as messages of at most 64 KiB.
    let big = pattern(150 * 1024, 99);
    let mut stdin = p.stdin.take().unwrap();
    let writer = {
        let big = big.clone();
        std::thread::spawn(move || {
            stdin.write_all(&big).unwrap();
            stdin
        })
    };
    let mut got = Vec::new();
    while got.len() < big.len() {
        let m = recv(s);
        assert!(!m.is_empty() && m.len() <= 64 * 1024, "{} bytes", m.len());
        got.extend(m);
    }
    assert_eq!(got, big);
    p.stdin = Some(writer.join().unwrap());
    // Down: each message reaches stdout whole, a large one included (beyond the program's
    // first 256 KiB receive buffer); an empty message is skipped and is no end of stream.
    for (i, len) in [1, 3000, 65536, 300_000].into_iter().enumerate() {
        let msg = pattern(len, 50 + i as u8);
        send(s, &msg);
        assert_eq!(p.read_exact(len), msg, "message {i} down");
    }
    send(s, b"");
    send(s, b"after the empty one");
    assert_eq!(p.read_exact(19), b"after the empty one");
}

fn registry_dir(tmp: &tempfile::TempDir) -> PathBuf {
    let dir = tmp.path().join("reg");
    std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
    dir
}

#[test]
fn through_the_registry_seqpacket_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = registry_dir(&tmp);
    // The stream socket tells ownership; the seqpacket one beside it serves the connection.
    let _owner = UnixListener::bind(dir.join("5.sock")).unwrap();
    let l = seq_listener(&seqpacket_path(&dir.join("5.sock")));
    let reg = dir.to_str().unwrap();
    let mut p = Program::start(&[
        "--registry",
        reg,
        "--uplink",
        "none",
        "--seqpacket",
        "5",
        "9000",
    ]);
    let s = accept(&l);
    // The handshake is one message, exactly one line.
    let line = String::from_utf8(recv(&s)).unwrap();
    let src_port: u32 = line
        .strip_prefix("CONNECT 9000 FROM 2 ")
        .and_then(|r| r.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .unwrap();
    assert!(src_port >= 1 << 31, "outside the devices' ephemeral range");
    // Nothing flows before the OK.
    p.write(b"early");
    send(&s, b"OK 9000\n");
    assert_eq!(recv(&s), b"early");
    exchange(&mut p, &s);
    // The guest's close ends the program, which exits 0.
    drop(s);
    let (code, err) = p.finish();
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn a_refusal_on_the_registry_seqpacket_socket_fails_the_program() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = registry_dir(&tmp);
    let _owner = UnixListener::bind(dir.join("5.sock")).unwrap();
    let l = seq_listener(&seqpacket_path(&dir.join("5.sock")));
    let reg = dir.to_str().unwrap();
    let p = Program::start(&[
        "--registry",
        reg,
        "--uplink",
        "none",
        "--seqpacket",
        "5",
        "80",
    ]);
    let s = accept(&l);
    assert!(recv(&s).starts_with(b"CONNECT 80 FROM 2 "));
    drop(s);
    let (code, err) = p.finish();
    assert_eq!(code, Some(1));
    assert!(err.contains("refused"), "{err}");
    // Without a seqpacket socket (a stream-only sibling) the connect fails at once.
    drop(l);
    std::fs::remove_file(seqpacket_path(&dir.join("5.sock"))).unwrap();
    let p = Program::start(&[
        "--registry",
        reg,
        "--uplink",
        "none",
        "--seqpacket",
        "5",
        "80",
    ]);
    let (code, err) = p.finish();
    assert_eq!(code, Some(1));
    assert!(
        err.contains("CID 5 port 80") && err.contains("serves no SOCK_SEQPACKET socket"),
        "{err}"
    );
}

#[test]
fn through_the_unix_uplink_stand_in() {
    let tmp = tempfile::tempdir().unwrap();
    let up = tmp.path().join("up");
    std::fs::create_dir(&up).unwrap();
    let uplink = format!("unix:{}", up.display());
    // CID 2 (the parent) and, by fallback, a CID nobody here owns.
    for cid in ["2", "77"] {
        let l = seq_listener(&up.join(format!("{cid}_5000")));
        let mut p = Program::start(&["--uplink", &uplink, "--seqpacket", cid, "5000"]);
        let s = accept(&l);
        exchange(&mut p, &s);
        // Our side ends: stdin's end reaches the peer as end of stream, then the peer closes.
        drop(p.stdin.take());
        let end = Instant::now() + T;
        loop {
            assert!(Instant::now() < end, "no end of stream");
            let _ = sys::poll_one(s.as_raw_fd(), libc::POLLIN, 100);
            if sys::peer_hung_up(s.as_raw_fd(), true) {
                break;
            }
        }
        drop(s);
        let (code, err) = p.finish();
        assert_eq!(code, Some(0), "CID {cid}: {err}");
        assert_eq!(
            err.contains("g2h_fallback took the uplink"),
            cid == "77",
            "{err}"
        );
    }
    // A stream listener on the port refuses a seqpacket connect at once (EPROTOTYPE).
    let _l = UnixListener::bind(up.join("2_5001")).unwrap();
    let p = Program::start(&["--uplink", &uplink, "--seqpacket", "2", "5001"]);
    let (code, err) = p.finish();
    assert_eq!(code, Some(1));
    assert!(err.contains("Protocol wrong type"), "{err}");
}

#[test]
fn the_usage_names_seqpacket() {
    let out = Command::new(env!("CARGO_BIN_EXE_vsock-connect"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[--seqpacket]") && text.contains("one message"),
        "{text}"
    );
}
