//! The router end to end with real backends: simulated guests, real Unix sockets for the hybrid
//! host socket, the CID registry and the `unix:` uplink stand-in. No AF_VSOCK anywhere.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
mod common;

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Progress, TempDir};
use sha2::{Digest, Sha256};
use vsock_router::backend::local::LocalPeers;
use vsock_router::config::VsockConfig;
use vsock_router::device::{DeviceConfig, VsockDevice};
use vsock_router::router::connector::Router;
use vsock_router::router::{Policy, VsockHandle};
use vsock_router::sim::{SimGuest, SockState};

const T: Duration = Duration::from_secs(20);

struct Vm {
    g: SimGuest,
    dev: VsockDevice<Router>,
    handle: VsockHandle,
}

fn config(dir: &TempDir, cid: u64, extra: &str) -> VsockConfig {
    let s = format!(
        "cid={cid},socket={}{extra}",
        dir.path(&format!("vm{cid}.sock")).display()
    );
    s.parse().unwrap()
}

fn vm(cfg: &VsockConfig) -> Vm {
    let policy = Arc::new(Policy::new(cfg.g2h_fallback));
    let router = Router::new(cfg, policy.clone()).expect("router");
    let (g, dev) = SimGuest::with_device(DeviceConfig::new(cfg.cid), router);
    let handle = VsockHandle::new(policy, dev.handle());
    Vm { g, dev, handle }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
        })
        .collect()
}

/// Counts connection attempts on a stand-in uplink listener.
fn counting_listener(path: &Path) -> (Arc<std::sync::atomic::AtomicU64>, UnixListener) {
    let l = UnixListener::bind(path).unwrap();
    l.set_nonblocking(true).unwrap();
    (Arc::new(std::sync::atomic::AtomicU64::new(0)), l)
}

fn accepted(l: &UnixListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

#[test]
fn guest_reaches_host_service_over_hybrid_socket() {
    let dir = TempDir::new("host");
    let cfg = config(&dir, 3, ",uplink=none");
    let listener = UnixListener::bind(format!("{}_1234", cfg.socket.display())).unwrap();
    let mut v = vm(&cfg);
    let port = v.g.connect(2, 1234).expect("connect");
    let (mut s, _) = listener.accept().unwrap();
    v.g.send(port, b"to host", T).unwrap();
    let mut b = [0u8; 7];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"to host");
    // No listener on another port: refused at once.
    assert_eq!(v.g.connect(2, 1235), Err(SockState::Reset));
    let c = v.handle.counters();
    assert_eq!(c.path_host.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        c.connect_failed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn fallback_takes_the_uplink_strict_refuses_and_a_flip_spares_established_connections() {
    let dir = TempDir::new("uplink");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let cfg = config(&dir, 3, &format!(",uplink=unix:{}", up.display()));
    let held = UnixListener::bind(up.join("77_6000")).unwrap();
    let (_, strict) = counting_listener(&up.join("77_6001"));
    let mut v = vm(&cfg);

    // fallback=1: an unowned CID goes to the uplink, marked to_host.
    let port = v.g.connect(77, 6000).expect("fallback connect");
    let (mut s, _) = held.accept().unwrap();
    let conns = v.handle.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].path.name(), "uplink");
    assert!(conns[0].to_host);
    assert_eq!((conns[0].local_cid, conns[0].local_port), (77, 6000));

    // Flip to strict: the next connect is reset and nothing reaches the uplink.
    v.handle.set_g2h_fallback(false);
    assert_eq!(v.g.connect(77, 6001), Err(SockState::Reset));
    assert_eq!(
        accepted(&strict),
        0,
        "zero connection attempts on the uplink"
    );
    // The established connection keeps flowing both ways.
    v.g.send(port, b"still here", T).unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still here");
    s.write_all(b"and back").unwrap();
    assert_eq!(v.g.recv_exact(port, 8, T), b"and back");
    // Flip back: the next connect takes the uplink again.
    v.handle.set_g2h_fallback(true);
    assert!(v.g.connect(77, 6001).is_ok());
    assert_eq!(accepted(&strict), 1);
    let c = v.handle.counters();
    assert_eq!(c.path_uplink.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(c.path_refused.load(std::sync::atomic::Ordering::Relaxed), 1);
}

/// Connects the guest to port 80 of each of `cids`, each of which must be refused (RST), with
/// a live `unix:` stand-in listener in `up` for each; returns the attempts those listeners saw.
fn refused_with_zero_uplink_attempts(v: &mut Vm, up: &Path, cids: &[u64]) -> usize {
    let listeners: Vec<_> = cids
        .iter()
        .map(|cid| counting_listener(&up.join(format!("{cid}_80"))).1)
        .collect();
    for &cid in cids {
        assert_eq!(v.g.connect(cid, 80), Err(SockState::Reset), "cid {cid}");
    }
    listeners.iter().map(accepted).sum()
}

#[test]
fn strict_mode_hammering_random_cids_makes_no_uplink_attempt() {
    let dir = TempDir::new("strict");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let cfg = config(
        &dir,
        3,
        &format!(",uplink=unix:{},fallback=0", up.display()),
    );
    let mut v = vm(&cfg);
    // A live stand-in listener for every CID hammered: an attempt would be accepted there.
    let cids: Vec<u64> = (10..2000).step_by(37).collect();
    let attempts = refused_with_zero_uplink_attempts(&mut v, &up, &cids);
    assert_eq!(attempts, 0, "strict mode reached the stand-in uplink");
    assert_eq!(
        v.dev
            .counters()
            .path_uplink
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn reserved_and_own_cids_are_refused_even_with_fallback_on() {
    let dir = TempDir::new("reserved");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let cfg = config(&dir, 3, &format!(",uplink=unix:{}", up.display()));
    let mut v = vm(&cfg);
    // 0 (hypervisor), 1 (local), our own CID, and CIDs beyond the 32-bit CID space.
    let cids = [0u64, 1, 3, u64::from(u32::MAX), 1 << 32, u64::MAX];
    let attempts = refused_with_zero_uplink_attempts(&mut v, &up, &cids);
    assert_eq!(attempts, 0, "a reserved CID reached the uplink");
    let c = v.handle.counters();
    assert_eq!(c.path_refused.load(std::sync::atomic::Ordering::Relaxed), 6);
    assert_eq!(c.path_uplink.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The device still routes a normal connection afterwards.
    let (_, l) = counting_listener(&up.join("77_80"));
    assert!(v.g.connect(77, 80).is_ok());
    assert_eq!(accepted(&l), 1);
}

#[test]
fn fifty_concurrent_host_clients_each_move_four_mib() {
    let dir = TempDir::new("connect");
    let cfg = config(&dir, 3, ",uplink=none");
    let mut v = vm(&cfg);
    const N: usize = 50;
    // The simulated guest keys sockets by local port: one listening port per client.
    for i in 0..N as u32 {
        v.g.listen(5000 + i);
    }
    const SIZE: usize = 4 << 20;
    let sock = cfg.socket.clone();
    let clients: Vec<_> = (0..N)
        .map(|i| {
            let sock = sock.clone();
            thread::spawn(move || {
                // The data first: the device gives a client 5 s (handshake_timeout_ms) from
                // its connect to its CONNECT line, and 50 threads making 4 MiB each on a
                // loaded machine can take longer than that.
                let data = pattern(SIZE, i as u8);
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                // The line and the first bytes in one write().
                let mut first = format!("CONNECT {}\n", 5000 + i).into_bytes();
                first.extend_from_slice(&data[..1000]);
                s.write_all(&first).unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while b[0] != b'\n' {
                    s.read_exact(&mut b).unwrap();
                    line.push(b[0]);
                }
                assert!(
                    line.starts_with(b"OK "),
                    "{:?}",
                    String::from_utf8_lossy(&line)
                );
                let mut r = s.try_clone().unwrap();
                let reader = thread::spawn(move || {
                    let mut back = Vec::new();
                    r.read_to_end(&mut back).unwrap();
                    Sha256::digest(&back)
                });
                s.write_all(&data[1000..]).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                (Sha256::digest(&data), reader.join().unwrap())
            })
        })
        .collect();
    // The guest echoes every connection back.
    let mut open: Vec<u32> = Vec::new();
    let mut got: std::collections::HashMap<u32, usize> = Default::default();
    let mut progress = Progress::new();
    let mut done = 0;
    let mut echoed = 0;
    while done < N && progress.going(echoed) {
        while let Some(p) = v.g.accept(Duration::ZERO) {
            open.push(p);
        }
        for &p in &open.clone() {
            let data = v.g.recv(p, 64 * 1024);
            if !data.is_empty() {
                *got.entry(p).or_default() += data.len();
                echoed += data.len();
                v.g.send(p, &data, T).unwrap();
            }
            if got.get(&p) == Some(&SIZE) {
                v.g.shutdown(p, vsock_router::wire::shutdown::SEND);
                open.retain(|&q| q != p);
                got.remove(&p);
                done += 1;
            }
        }
        v.g.pump(Duration::from_millis(1));
    }
    assert_eq!(
        done, N,
        "the echo stopped moving: {done} of {N} connections done, {echoed} bytes echoed"
    );
    for c in clients {
        let (sent, back) = c.join().unwrap();
        assert_eq!(sent, back, "echoed bytes hash-checked");
    }
    assert!(v.g.violations.is_empty(), "{:?}", v.g.violations);
}

/// Runs a sibling guest on its own thread: accepts one connection on `port`, checks its peer
/// address, then sends `send` while receiving `expect_len` bytes. Returns the peer address and
/// the hash of what it received.
fn serve_sibling(
    mut g: SimGuest,
    port: u32,
    send: Vec<u8>,
    expect_len: usize,
) -> thread::JoinHandle<((u64, u32), Vec<u8>, SimGuest)> {
    g.listen(port);
    thread::spawn(move || {
        let p = g.accept(Duration::from_secs(60)).expect("sibling accepts");
        let peer = (g.socks[&p].peer_cid, g.socks[&p].peer_port);
        let mut got = Vec::new();
        let mut off = 0;
        let mut progress = Progress::new();
        while (got.len() < expect_len || off < send.len()) && progress.going(got.len() + off) {
            if off < send.len() {
                let n = (send.len() - off).min(64 * 1024);
                g.send(p, &send[off..off + n], T).unwrap();
                off += n;
            }
            got.extend(g.recv(p, usize::MAX));
            g.pump(Duration::from_millis(1));
        }
        g.close(p, T);
        (peer, Sha256::digest(&got).to_vec(), g)
    })
}

#[test]
fn siblings_exchange_eight_mib_each_way_with_true_cids() {
    let dir = TempDir::new("siblings");
    let reg = dir.path("registry");
    let cfg_a = config(&dir, 3, &format!(",uplink=none,registry={}", reg.display()));
    let cfg_b = config(&dir, 5, &format!(",uplink=none,registry={}", reg.display()));
    let mut a = vm(&cfg_a);
    let b = vm(&cfg_b);
    const SIZE: usize = 8 << 20;
    let up = pattern(SIZE, 1);
    let down = pattern(SIZE, 2);
    let b_thread = serve_sibling(b.g, 9000, down.clone(), SIZE);
    let pa = a.g.connect(5, 9000).expect("A reaches B");
    let sa = &a.g.socks[&pa];
    assert_eq!((sa.peer_cid, sa.peer_port), (5, 9000));
    let conns = a.handle.connections();
    assert_eq!(conns[0].path.name(), "sibling");
    assert!(!conns[0].to_host);
    let mut got = Vec::new();
    let mut off = 0;
    let mut progress = Progress::new();
    while (got.len() < SIZE || off < SIZE) && progress.going(got.len() + off) {
        if off < SIZE {
            let n = (SIZE - off).min(64 * 1024);
            a.g.send(pa, &up[off..off + n], T).unwrap();
            off += n;
        }
        got.extend(a.g.recv(pa, usize::MAX));
        a.g.pump(Duration::from_millis(1));
    }
    let (peer, b_got, gb) = b_thread.join().unwrap();
    assert_eq!(peer, (3, pa), "B sees A's true address");
    assert_eq!(b_got, Sha256::digest(&up).to_vec(), "A → B");
    assert_eq!(Sha256::digest(&got), Sha256::digest(&down), "B → A");
    assert!(a.g.violations.is_empty() && gb.violations.is_empty());
    drop(b.dev);
}

#[test]
fn a_sibling_whose_driver_is_not_up_resets_and_works_once_up() {
    let dir = TempDir::new("late");
    let reg = dir.path("registry");
    let cfg_a = config(&dir, 3, &format!(",uplink=none,registry={}", reg.display()));
    let cfg_b = config(&dir, 6, &format!(",uplink=none,registry={}", reg.display()));
    let mut a = vm(&cfg_a);
    // B's VMM is up (its CID is claimed) but its device is not activated yet.
    let router_b = Router::new(&cfg_b, Arc::new(Policy::new(true))).unwrap();
    let started = Instant::now();
    assert_eq!(a.g.connect(6, 9000), Err(SockState::Reset));
    assert!(started.elapsed() < Duration::from_secs(5));
    // B comes up: A's next connect works.
    let (gb, dev_b) = SimGuest::with_device(DeviceConfig::new(6), router_b);
    let b_thread = serve_sibling(gb, 9000, Vec::new(), 7);
    let pa = a.g.connect(6, 9000).expect("works once B is up");
    a.g.send(pa, b"hello B", T).unwrap();
    let (peer, b_got, _) = b_thread.join().unwrap();
    assert_eq!(peer, (3, pa));
    assert_eq!(b_got, Sha256::digest(b"hello B").to_vec());
    drop(dev_b);
}

#[test]
fn a_cid_claimed_by_a_live_vmm_is_refused() {
    let dir = TempDir::new("claim");
    let reg = dir.path("registry");
    let cfg = config(&dir, 3, &format!(",uplink=none,registry={}", reg.display()));
    let _first = vm(&cfg);
    let mut other = config(&dir, 3, &format!(",uplink=none,registry={}", reg.display()));
    other.socket = dir.path("second.sock");
    let err = Router::new(&other, Arc::new(Policy::new(true)))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("in use"), "{err}");
}

fn vsock_connect(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsock-connect"))
        .args(args)
        .env("VSOCK_ROUTER_FORBID_AF_VSOCK", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refused connect exits before reading its input.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn vsock_connect_strict_fails_with_enodev_and_fallback_takes_the_uplink() {
    let dir = TempDir::new("vc-uplink");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let uplink = format!("unix:{}", up.display());
    let out = vsock_connect(&["--uplink", &uplink, "--fallback", "0", "77", "80"], b"x");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ENODEV"), "{err}");
    assert_eq!(
        std::fs::read_dir(&up).unwrap().count(),
        0,
        "no uplink attempt"
    );

    let l = UnixListener::bind(up.join("77_80")).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"pong").unwrap();
        got
    });
    let out = vsock_connect(&["--uplink", &uplink, "77", "80"], b"ping");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"pong");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fallback") && err.contains("to_host"), "{err}");
    assert_eq!(server.join().unwrap(), b"ping");
    // The real /dev/vsock uplink is refused on this machine.
    let out = vsock_connect(&["--uplink", "/dev/vsock", "77", "80"], b"");
    assert!(!out.status.success());
}

#[test]
fn vsock_connect_reaches_a_sibling_guest_through_the_registry() {
    let dir = TempDir::new("vc-registry");
    let reg = dir.path("registry");
    let cfg = config(&dir, 5, &format!(",uplink=none,registry={}", reg.display()));
    let b = vm(&cfg);
    let b_thread = serve_sibling(b.g, 9000, b"hello program".to_vec(), 10);
    let out = vsock_connect(
        &[
            "--registry",
            reg.to_str().unwrap(),
            "--uplink",
            "none",
            "5",
            "9000",
        ],
        b"hello gues",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello program");
    let (peer, got, _) = b_thread.join().unwrap();
    assert_eq!(peer.0, 2, "the guest sees a program on the host as CID 2");
    assert_eq!(got, Sha256::digest(b"hello gues").to_vec());
    drop(b.dev);
}

#[test]
fn listen_opens_parent_connections_into_the_guest() {
    let dir = TempDir::new("listen");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let cfg = config(
        &dir,
        3,
        &format!(",uplink=unix:{},listen=9000", up.display()),
    );
    let mut v = vm(&cfg);
    v.g.listen(9000);
    let mut s = UnixStream::connect(up.join("listen_9000")).unwrap();
    s.write_all(b"from the parent").unwrap();
    let p = v.g.accept(T).expect("the guest accepts on the same port");
    assert_eq!(v.g.recv_exact(p, 15, T), b"from the parent");
    v.g.send(p, b"ack", T).unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(
        &b, b"ack",
        "no OK line on listen connections: bytes flow at once"
    );
    let conns = v.handle.connections();
    assert_eq!(conns[0].path.name(), "uplink");
    assert!(!conns[0].to_host, "inbound connections are not a fallback");
    drop(s);
    drop(v);
    assert!(!up.join("listen_9000").exists(), "listen socket removed");
}

/// CID namespaces (`ns_mode`, the kernel's `net.vsock.ns_mode`): a local registry's guests
/// reach each other, and nothing through the uplink, whatever `g2h_fallback` says.
#[test]
fn a_local_namespace_reaches_its_siblings_and_never_the_uplink() {
    let dir = TempDir::new("ns-local");
    let reg = dir.path("registry");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let opts = format!(",uplink=unix:{},registry={}", up.display(), reg.display());
    let mut a = vm(&config(&dir, 3, &format!("{opts},ns_mode=local")));
    // B asks for no mode: it joins the registry's.
    let b = vm(&config(&dir, 5, &opts));
    assert_eq!(
        std::fs::read_to_string(reg.join("ns_mode")).unwrap(),
        "local\n"
    );
    let b_thread = serve_sibling(b.g, 9000, b"from B".to_vec(), 6);
    let pa = a.g.connect(5, 9000).expect("A reaches its sibling B");
    a.g.send(pa, b"from A", T).unwrap();
    assert_eq!(a.g.recv_exact(pa, 6, T), b"from B");
    let (peer, got, _) = b_thread.join().unwrap();
    assert_eq!((peer, got), ((3, pa), Sha256::digest(b"from A").to_vec()));
    // Fallback is on (the default) and a live stand-in listener waits for each CID: still no
    // attempt, neither before nor after the fallback is switched at run time.
    let cids: Vec<u64> = (10..400).step_by(29).collect();
    assert_eq!(refused_with_zero_uplink_attempts(&mut a, &up, &cids), 0);
    a.handle.set_g2h_fallback(false);
    a.handle.set_g2h_fallback(true);
    let more = [77u64, 1000];
    assert_eq!(refused_with_zero_uplink_attempts(&mut a, &up, &more), 0);
    let c = a.handle.counters();
    let n = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n(&c.path_uplink), 0);
    assert_eq!(n(&c.path_refused), (cids.len() + more.len()) as u64);
    assert_eq!(n(&c.path_sibling), 1);
    // Host services (CID 2, over Unix sockets) are not the uplink: they stay reachable.
    let host = UnixListener::bind(format!("{}_700", cfg_socket(&dir, 3).display())).unwrap();
    assert!(a.g.connect(2, 700).is_ok());
    host.accept().expect("the host service got the connection");
    drop(b.dev);
}

fn cfg_socket(dir: &TempDir, cid: u64) -> std::path::PathBuf {
    dir.path(&format!("vm{cid}.sock"))
}

#[test]
fn a_namespace_keeps_the_mode_it_was_created_with() {
    let dir = TempDir::new("ns-mode");
    let reg = dir.path("registry");
    let opts = format!(",uplink=none,registry={}", reg.display());
    let _a = vm(&config(&dir, 3, &format!("{opts},ns_mode=local")));
    let policy = || Arc::new(Policy::new(true));
    let err = Router::new(
        &config(&dir, 7, &format!("{opts},ns_mode=global")),
        policy(),
    )
    .err()
    .expect("a global VMM cannot join a local namespace");
    let msg = err.to_string();
    assert!(
        msg.contains("is a local namespace") && msg.contains("ns_mode=global"),
        "{msg}"
    );
    assert!(
        !reg.join("7.sock").exists(),
        "the refused VMM left no socket"
    );
    // listen= accepts on the uplink, which a local namespace has none of.
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let listen = format!(
        ",uplink=unix:{},registry={},listen=9000",
        up.display(),
        reg.display()
    );
    let err = Router::new(&config(&dir, 8, &listen), policy())
        .err()
        .expect("listen= in a local namespace");
    assert!(err.to_string().contains("local namespace"), "{err}");
    // A new registry created global stays global.
    let reg2 = dir.path("registry2");
    let opts2 = format!(",uplink=none,registry={}", reg2.display());
    let _g = vm(&config(&dir, 9, &format!("{opts2},ns_mode=global")));
    assert!(Router::new(
        &config(&dir, 4, &format!("{opts2},ns_mode=local")),
        policy()
    )
    .is_err());
    assert_eq!(
        std::fs::read_to_string(reg2.join("ns_mode")).unwrap(),
        "global\n"
    );
}

#[test]
fn vsock_connect_in_a_local_namespace_never_takes_the_uplink() {
    let dir = TempDir::new("vc-ns");
    let reg = dir.path("registry");
    let up = dir.path("up");
    std::fs::create_dir(&up).unwrap();
    let b = vm(&config(
        &dir,
        5,
        &format!(",uplink=none,registry={},ns_mode=local", reg.display()),
    ));
    let uplink = format!("unix:{}", up.display());
    let (reg_s, up_s) = (reg.to_str().unwrap(), uplink.as_str());
    let listeners: Vec<_> = ["77_80", "2_80"]
        .iter()
        .map(|n| counting_listener(&up.join(n)).1)
        .collect();
    for cid in ["77", "2"] {
        let out = vsock_connect(&["--registry", reg_s, "--uplink", up_s, cid, "80"], b"x");
        assert_eq!(out.status.code(), Some(1), "CID {cid}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("ENODEV") && err.contains("local CID namespace"),
            "{err}"
        );
    }
    assert_eq!(
        listeners.iter().map(accepted).sum::<usize>(),
        0,
        "no uplink attempt"
    );
    // Its own guests are reachable.
    let b_thread = serve_sibling(b.g, 9000, b"ok".to_vec(), 2);
    let out = vsock_connect(&["--registry", reg_s, "--uplink", up_s, "5", "9000"], b"hi");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"ok");
    b_thread.join().unwrap();
    drop(b.dev);
}

fn vm_in(cfg: &VsockConfig, peers: &LocalPeers) -> Vm {
    let policy = Arc::new(Policy::new(cfg.g2h_fallback));
    let router = Router::with_local_peers(cfg, policy.clone(), peers).expect("router");
    let (g, dev) = SimGuest::with_device(DeviceConfig::new(cfg.cid), router);
    let handle = VsockHandle::new(policy, dev.handle());
    Vm { g, dev, handle }
}

#[test]
fn siblings_of_one_process_relay_in_memory_with_the_registry_semantics() {
    let dir = TempDir::new("local-peers");
    let (group, other) = (LocalPeers::new(), LocalPeers::new());
    let mut a = vm_in(&config(&dir, 3, ",uplink=none,fallback=0"), &group);
    let b = vm_in(&config(&dir, 5, ",uplink=none"), &group);
    // A device of another group (another namespace) is no sibling of A.
    let _c = vm_in(&config(&dir, 7, ",uplink=none"), &other);
    const SIZE: usize = 1 << 20;
    let (up, down) = (pattern(SIZE, 3), pattern(SIZE, 4));
    let b_thread = serve_sibling(b.g, 9000, down.clone(), SIZE);
    let pa = a.g.connect(5, 9000).expect("A reaches B in memory");
    assert_eq!(a.handle.connections()[0].path.name(), "sibling");
    let mut got = Vec::new();
    let mut off = 0;
    let mut progress = Progress::new();
    while (got.len() < SIZE || off < SIZE) && progress.going(got.len() + off) {
        if off < SIZE {
            let n = (SIZE - off).min(64 * 1024);
            a.g.send(pa, &up[off..off + n], T).unwrap();
            off += n;
        }
        got.extend(a.g.recv(pa, usize::MAX));
        a.g.pump(Duration::from_millis(1));
    }
    // B closes: A's guest answers its SHUTDOWN with RST, as Linux does, while B waits.
    let until = Instant::now() + T;
    while !b_thread.is_finished() && Instant::now() < until {
        a.g.pump(Duration::from_millis(1));
    }
    let (peer, b_got, gb) = b_thread.join().unwrap();
    assert_eq!(peer, (3, pa), "B sees A's true address");
    assert_eq!(b_got, Sha256::digest(&up).to_vec(), "A → B");
    assert_eq!(Sha256::digest(&got), Sha256::digest(&down), "B → A");
    // B closed: A's guest saw the peer's SHUTDOWN, as from a sibling of the registry.
    assert!(a.g.socks.get(&pa).is_none_or(|s| s.peer_shutdown != 0));
    assert!(a.g.violations.is_empty() && gb.violations.is_empty());
    // CID 7 is in no group of A's and A is strict: refused.
    assert_eq!(a.g.connect(7, 9000), Err(SockState::Reset));
    // A port nobody listens on at a sibling: the sibling's guest answers RST at once (well
    // before the 2 s connect timeout).
    let pumper = thread::spawn(move || {
        let mut gb = gb;
        gb.pump_until(Duration::from_secs(3), |_| false);
        gb
    });
    let asked = Instant::now();
    assert_eq!(a.g.connect(5, 1), Err(SockState::Reset));
    assert!(
        asked.elapsed() < Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    let gb = pumper.join().unwrap();
    assert!(gb.violations.is_empty());
    drop(b.dev);
}
