//! SOCK_SEQPACKET through the router with its real backends: simulated guests (a Linux driver
//! with VIRTIO_VSOCK_F_SEQPACKET) on one side, real `SOCK_SEQPACKET` Unix sockets on the other:
//! host services at `<socket>_P`, host clients at `<socket>_seqpacket`, a sibling through the CID
//! registry, a program through the registry's seqpacket socket (`vsock-connect --seqpacket`),
//! and the `unix:` uplink stand-in. No AF_VSOCK anywhere.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vsock_router::backend::seqpacket::seqpacket_path;
use vsock_router::backend::vsock::FORBID_ENV;
use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::{Router, RouterStats};
use vsock_router::router::Policy;
use vsock_router::sim::{SimGuest, SockState};
use vsock_router::sys;
use vsock_router::vq::IoVecs;
use vsock_router::wire::sock_type;

const T: Duration = Duration::from_secs(10);

struct Vm {
    g: SimGuest,
    dev: VsockDevice<Router>,
    stats: RouterStats,
}

fn config(dir: &Path, cid: u64, extra: &str) -> VsockConfig {
    format!(
        "cid={cid},socket={}{extra}",
        dir.join(format!("vm{cid}.sock")).display()
    )
    .parse()
    .unwrap()
}

fn vm(cfg: &VsockConfig) -> Vm {
    let policy = Arc::new(Policy::new(cfg.g2h_fallback));
    let router = Router::new(cfg, policy).expect("router");
    let stats = router.stats();
    let (g, dev) = SimGuest::with_device(DeviceConfig::new(cfg.cid), router);
    Vm { g, dev, stats }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(salt))
        .collect()
}

fn seq_listener(path: &Path) -> UnixListener {
    let fd = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET).unwrap();
    sys::bind_listen_unix(fd.as_raw_fd(), path, 8).unwrap();
    UnixListener::from(fd)
}

fn seq_client(path: &Path) -> OwnedFd {
    let fd = sys::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET).unwrap();
    sys::connect_unix(fd.as_raw_fd(), path).unwrap();
    fd
}

/// Accepts one connection within `T` (non-blocking).
fn accept(l: &UnixListener) -> OwnedFd {
    let ms = T.as_millis() as i32;
    assert_ne!(sys::poll_one(l.as_raw_fd(), libc::POLLIN, ms).unwrap(), 0);
    let (s, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    s.into()
}

/// One whole message within `T`.
fn recv(fd: &OwnedFd) -> Vec<u8> {
    let ms = T.as_millis() as i32;
    assert_ne!(
        sys::poll_one(fd.as_raw_fd(), libc::POLLIN, ms).unwrap(),
        0,
        "no message"
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut iov = IoVecs::new();
    iov.push_buf(&mut buf);
    let m = sys::recvmsg(fd.as_raw_fd(), &iov).unwrap();
    assert!(!m.truncated);
    assert!(!m.eor, "AF_UNIX reports no MSG_EOR");
    buf.truncate(m.len);
    buf
}

fn send(fd: &OwnedFd, msg: &[u8]) {
    let mut m = msg.to_vec();
    let mut iov = IoVecs::new();
    iov.push_buf(&mut m);
    assert_eq!(sys::sendmsg(fd.as_raw_fd(), &iov).unwrap(), msg.len());
}

#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "length");
    assert!(got == want, "content");
}

#[test]
fn guest_connects_to_a_seqpacket_host_service_and_a_port_serves_one_type() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 3, ",uplink=none");
    let seq = seq_listener(Path::new(&format!("{}_1234", cfg.socket.display())));
    let _stream = UnixListener::bind(format!("{}_1235", cfg.socket.display())).unwrap();
    let mut v = vm(&cfg);
    let port = v.g.connect_seq(2, 1234).expect("seqpacket connect");
    let s = accept(&seq);
    // A message of the device's whole buffer crosses whole (SO_SNDBUF was raised for it), also
    // after others: the guest then believes in less credit than the message needs, and its
    // first packets (which the device holds until the message ends) bring it a credit update
    // for the messages before, as a Linux receiver's dequeue would.
    let limit = v.g.socks[&port].peer_buf_alloc as usize;
    assert_eq!(limit, 256 * 1024);
    for (i, len) in [1, 5000, 65536 + 1, limit, 3, limit]
        .into_iter()
        .enumerate()
    {
        let m = pattern(len, i as u8);
        v.g.send_msg(port, &m, i % 2 == 0, T).unwrap();
        same(&recv(&s), &m);
    }
    for (i, len) in [3, 70_000].into_iter().enumerate() {
        let m = pattern(len, 40 + i as u8);
        send(&s, &m);
        let (got, _eor) = v.g.recv_msg(port, T).expect("message");
        same(&got, &m);
    }
    // The other type on either port is refused at once: RST, counted connect_failed.
    let before = v.dev.counters().connect_failed.load(Ordering::Relaxed);
    let start = Instant::now();
    assert_eq!(v.g.connect_seq(2, 1235), Err(SockState::Reset));
    assert_eq!(v.g.connect(2, 1234), Err(SockState::Reset));
    assert!(start.elapsed() < Duration::from_secs(1));
    let after = v.dev.counters().connect_failed.load(Ordering::Relaxed);
    assert_eq!(after - before, 2);
}

#[test]
fn a_host_client_of_the_seqpacket_socket_reaches_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 3, ",uplink=none");
    let mut v = vm(&cfg);
    v.g.listen(6000);
    let c = seq_client(&seqpacket_path(&cfg.socket));
    send(&c, b"CONNECT 6000\n");
    let port = v.g.accept(T).expect("the guest accepts");
    assert_eq!(v.g.socks[&port].sock_type, sock_type::SEQPACKET);
    assert_eq!(v.g.socks[&port].peer_cid, 2);
    let ok = String::from_utf8(recv(&c)).unwrap();
    assert_eq!(ok, format!("OK {}\n", v.g.socks[&port].peer_port));
    let up = pattern(100_000, 1);
    send(&c, &up);
    same(&v.g.recv_msg(port, T).expect("message").0, &up);
    let down = pattern(200_000, 2);
    v.g.send_msg(port, &down, true, T).unwrap();
    same(&recv(&c), &down);
    let st = v.stats.host_seqpacket.stats();
    assert_eq!((st.accepted, st.completed, st.rejected), (1, 1, 0));
    assert_eq!(v.stats.host.stats().accepted, 0);
    // A bad first message is refused there and counted on its own socket.
    let bad = seq_client(&seqpacket_path(&cfg.socket));
    send(&bad, b"CONNECT 6000\nextra");
    let end = Instant::now() + T;
    while v.stats.host_seqpacket.stats().rejected == 0 {
        assert!(Instant::now() < end);
        v.g.pump(Duration::from_millis(5));
    }
}

#[test]
fn sibling_guests_exchange_messages_with_eor_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry");
    let extra = format!(",uplink=none,registry={}", reg.display());
    let a = vm(&config(dir.path(), 3, &extra));
    let b = vm(&config(dir.path(), 5, &extra));
    let mut bg = b.g;
    bg.listen(9000);
    let b_thread = thread::spawn(move || {
        let p = bg.accept(T).expect("B accepts");
        assert_eq!(bg.socks[&p].sock_type, sock_type::SEQPACKET);
        let peer = (bg.socks[&p].peer_cid, bg.socks[&p].peer_port);
        let first = bg.recv_msg(p, T).expect("first");
        let second = bg.recv_msg(p, T).expect("second");
        bg.send_msg(p, b"back", true, T).unwrap();
        bg.pump(Duration::from_millis(50));
        (peer, first, second, bg)
    });
    let mut ag = a.g;
    let p = ag.connect_seq(5, 9000).expect("A reaches B");
    let big = pattern(200_000, 3);
    ag.send_msg(p, &big, true, T).unwrap();
    ag.send_msg(p, b"no eor", false, T).unwrap();
    let back = ag.recv_msg(p, T).expect("B's answer");
    let (peer, first, second, _bg) = b_thread.join().unwrap();
    assert_eq!(peer, (3, p), "B sees A's true address");
    same(&first.0, &big);
    assert!(first.1, "EOR crosses between siblings");
    assert_eq!(second, (b"no eor".to_vec(), false));
    assert_eq!(back, (b"back".to_vec(), true));
    drop((a.dev, b.dev));
}

#[test]
fn a_program_reaches_a_guest_through_the_registry_seqpacket_socket() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry");
    let cfg = config(
        dir.path(),
        5,
        &format!(",uplink=none,registry={}", reg.display()),
    );
    let b = vm(&cfg);
    let stats = b.stats.clone();
    let mut bg = b.g;
    bg.listen(9000);
    let b_thread = thread::spawn(move || {
        let p = bg.accept(T).expect("B accepts");
        let peer = (bg.socks[&p].peer_cid, bg.socks[&p].peer_port);
        let got = bg.recv_msg(p, T).expect("the program's message");
        bg.send_msg(p, b"first reply", false, T).unwrap();
        bg.send_msg(p, b"second reply", false, T).unwrap();
        bg.close(p, T);
        (peer, got, bg)
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsock-connect"))
        .args(["--registry", reg.to_str().unwrap(), "--uplink", "none"])
        .args(["--seqpacket", "5", "9000"])
        .env(FORBID_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello guest")
        .unwrap();
    let end = Instant::now() + T;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("vsock-connect did not finish");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"first replysecond reply");
    let (peer, got, _bg) = b_thread.join().unwrap();
    assert_eq!(peer.0, 2, "the program is the host");
    assert_eq!(got.0, b"hello guest");
    assert_eq!(stats.registry_seqpacket.unwrap().stats().completed, 1);
    assert_eq!(stats.registry.unwrap().stats().accepted, 0);
    drop(b.dev);
}

#[test]
fn the_unix_uplink_stand_in_carries_seqpacket() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    std::fs::create_dir(&up).unwrap();
    let cfg = config(dir.path(), 3, &format!(",uplink=unix:{}", up.display()));
    let l = seq_listener(&up.join("77_6000"));
    let mut v = vm(&cfg);
    let port = v.g.connect_seq(77, 6000).expect("fallback connect");
    let s = accept(&l);
    let m = pattern(256 * 1024, 9);
    v.g.send_msg(port, &m, false, T).unwrap();
    same(&recv(&s), &m);
    send(&s, b"from the parent");
    assert_eq!(
        v.g.recv_msg(port, T).expect("message").0,
        b"from the parent"
    );
    assert_eq!(v.stats.uplink_attempts(), 1);
    // A stream listener refuses: RST.
    let _sl = UnixListener::bind(up.join("77_6001")).unwrap();
    assert_eq!(v.g.connect_seq(77, 6001), Err(SockState::Reset));
}
