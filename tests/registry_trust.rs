//! The CID registry's trust boundary (see `src/backend/registry.rs`, "Permission model"): a
//! client running as the VMM's user may connect to a sibling's `<dir>/<cid>.sock` and claim
//! any source CID in its `FROM` line, and is believed; a client running as another user cannot
//! connect at all, neither through the default `0700` directory nor, in a directory others may
//! enter, through the socket's own `0600` mode.
//!
//! The other-user part needs root (to start a child as `nobody`) and `socat`; without them it
//! prints a loud `SKIPPED` line instead of passing silently.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TempDir;
use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::Router;
use vsock_router::router::Policy;
use vsock_router::sim::SimGuest;

const T: Duration = Duration::from_secs(10);
const NOBODY: u32 = 65534;

/// A running device for guest CID 3 that claimed its CID in `registry`.
fn vm(dir: &Path, registry: &Path) -> (SimGuest, VsockDevice<Router>) {
    let cfg: VsockConfig = format!(
        "cid=3,socket={},uplink=none,registry={}",
        dir.join("vm3.sock").display(),
        registry.display()
    )
    .parse()
    .unwrap();
    let router = Router::new(&cfg, Arc::new(Policy::new(false))).expect("router");
    SimGuest::with_device(DeviceConfig::new(3), router)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Runs `socat` as `nobody`, sending `line` to the Unix socket `path`. Returns whether it
/// connected (exit status 0) and its stderr. Killed (by PID) if it takes longer than 10 s.
fn socat_as_nobody(path: &Path, line: &str) -> (bool, String) {
    let mut child = Command::new("socat")
        .arg("-u")
        .arg("STDIN")
        .arg(format!("UNIX-CONNECT:{}", path.display()))
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn socat");
    let _ = child.stdin.take().unwrap().write_all(line.as_bytes());
    let end = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("socat did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.success(), err)
}

/// Why the other-user part cannot run here, if it cannot.
fn other_user_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not running as root (euid {euid})"));
    }
    match Command::new("socat").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("socat is not installed".into()),
    }
}

#[test]
fn same_user_may_forge_from_other_users_cannot_connect() {
    let tmp = TempDir::new("boundary");
    // Others may enter it, so only the modes under test decide.
    fs::set_permissions(tmp.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let registry = tmp.path("registry");
    let (mut g, dev) = vm(tmp.root(), &registry);
    let sock = registry.join("3.sock");
    assert_eq!(mode(&registry), 0o700, "registry directory created private");
    assert_eq!(mode(&sock), 0o600, "registry socket private");
    g.listen(80);

    // The documented boundary: the VMM's own user is trusted, its FROM line is believed.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"CONNECT 80 FROM 5 1234\n").unwrap();
    let p = g.accept(T).expect("the forged connect reaches the guest");
    let s = &g.socks[&p];
    assert_eq!(
        (s.peer_cid, s.peer_port),
        (5, 1234),
        "guest sees the claimed CID"
    );
    c.set_read_timeout(Some(T)).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' && line.len() < 64 {
        c.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    drop(c);
    assert!(g.close(p, T));
    assert_eq!(dev.counters().incoming.load(Ordering::Relaxed), 1);

    if let Some(why) = other_user_unavailable() {
        eprintln!(
            "SKIPPED: the other-user half of same_user_may_forge_from_other_users_cannot_connect: \
             {why}"
        );
        return;
    }
    // Control: the helper does connect as nobody when permissions allow it.
    let open = tmp.path("open.sock");
    let l = UnixListener::bind(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o666)).unwrap();
    let (connected, err) = socat_as_nobody(&open, "hello\n");
    assert!(connected, "socat as nobody failed on an open socket: {err}");
    let (mut a, _) = l.accept().unwrap();
    let mut got = String::new();
    a.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello\n");

    // Through the default 0700 registry directory: refused.
    let (connected, err) = socat_as_nobody(&sock, "CONNECT 80 FROM 7 1\n");
    assert!(!connected, "nobody connected to {}", sock.display());
    assert!(err.contains("Permission denied"), "{err}");

    // A directory others may enter (mode 0701, made by hand): the socket's 0600 still keeps
    // them out.
    let shared = tmp.path("reg701");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o701)).unwrap();
    let second = tmp.path("second");
    fs::create_dir(&second).unwrap();
    // With umask 0 the socket would be born 0777: only the explicit mode keeps others out.
    // SAFETY: umask only changes the process' file-creation mask; this file's one test is the
    // only code of this process creating files meanwhile, and the old mask is restored below.
    let old_mask = unsafe { libc::umask(0) };
    let second_vm = std::panic::catch_unwind(|| vm(&second, &shared));
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old_mask) };
    let (mut g2, dev2) = second_vm.expect("second VM");
    let sock2 = shared.join("3.sock");
    assert_eq!(mode(&sock2), 0o600);
    g2.listen(80);
    let (connected, err) = socat_as_nobody(&sock2, "CONNECT 80 FROM 7 1\n");
    assert!(!connected, "nobody connected to {}", sock2.display());
    assert!(err.contains("Permission denied"), "{err}");
    // Nothing reached either guest from the other user.
    g.pump(Duration::from_millis(100));
    g2.pump(Duration::from_millis(100));
    assert!(g.accept(Duration::ZERO).is_none() && g2.accept(Duration::ZERO).is_none());
    assert_eq!(dev.counters().incoming.load(Ordering::Relaxed), 1);
    assert_eq!(dev2.counters().incoming.load(Ordering::Relaxed), 0);
    eprintln!("registry trust boundary: nobody refused (Permission denied) in 0700 and 0701 dirs");
}
