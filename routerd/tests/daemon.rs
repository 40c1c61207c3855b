//! The `vsock-routerd` binary as a VMM sees it: simulated Linux guests on memfd memory connect
//! through real vhost-user frontends (rust-vmm's `vhost` crate), and talk to host services over
//! the hybrid sockets, to each other as siblings, and through the REST API. The daemon is ended
//! by SIGTERM with frontends still connected and must remove every socket it made. No AF_VSOCK:
//! every VM has `uplink=none`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vsock_router::sim::vhost_user::FrontendLink;
use vsock_router::sim::{SimGuest, SockState, LINUX_FEATURES};
use vsock_vmm::api::client::request;

const T: Duration = Duration::from_secs(20);

/// The daemon process, ended (SIGTERM, then SIGKILL after `T`) when dropped.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `dir/tmp` as its `TMPDIR`, where it makes its private registry:
    /// inside the test's directory, so that even a daemon this guard kills leaves nothing in
    /// the machine's /tmp.
    fn start(dir: &Path, args: &[String]) -> Daemon {
        let log = std::fs::File::create(dir.join("routerd.log")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vsock-routerd"))
            .args(args)
            .args(["--log-level", "info"])
            .env("VSOCK_ROUTER_FORBID_AF_VSOCK", "1")
            .env("TMPDIR", dir.join("tmp"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start vsock-routerd");
        Daemon {
            child: Some(child),
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("routerd.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + T;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vsock-routerd ignored SIGTERM:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(path: &Path) {
    let until = Instant::now() + T;
    while !path.exists() {
        assert!(Instant::now() < until, "{} never appeared", path.display());
        thread::sleep(Duration::from_millis(5));
    }
}

fn vm_args(dir: &Path, cid: u64, extra: &str) -> [String; 2] {
    [
        "--vsock".into(),
        format!(
            "cid={cid},socket={},vhost-user={},uplink=none{extra}",
            dir.join(format!("vm{cid}.vsock")).display(),
            dir.join(format!("vm{cid}.vhost")).display()
        ),
    ]
}

fn guest(dir: &Path, cid: u64, rings: usize) -> (SimGuest, FrontendLink) {
    let socket = dir.join(format!("vm{cid}.vhost"));
    wait_for(&socket);
    let (g, ctx) = SimGuest::new_shared(cid);
    let link = FrontendLink::connect(&socket, &g, &ctx, rings, LINUX_FEATURES).unwrap();
    (g, link)
}

#[test]
fn two_vms_host_services_siblings_api_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api = d.join("api.sock");
    let mut args: Vec<String> = Vec::new();
    args.extend(vm_args(d, 21, ""));
    args.extend(vm_args(d, 22, ",fallback=0"));
    args.extend(["--api-socket".to_string(), api.display().to_string()]);
    let mut daemon = Daemon::start(d, &args);
    let (mut a, mut link_a) = guest(d, 21, 2);
    let (mut b, _link_b) = guest(d, 22, 3);
    assert_eq!(link_a.guest_cid().unwrap(), 21);

    // A host service of VM 21.
    let svc = UnixListener::bind(d.join("vm21.vsock_7000")).unwrap();
    let port = a.connect(2, 7000).expect("host service");
    let (mut s, _) = svc.accept().unwrap();
    a.send(port, b"ping", T).unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(a.recv_exact(port, 4, T), b"pong");

    // Siblings: 22 listens (its guest answers on a thread of its own), 21 connects by CID.
    b.listen(9000);
    let accepting = thread::spawn(move || {
        let p = b.accept(T);
        (b, p)
    });
    let a_port = a
        .connect(22, 9000)
        .unwrap_or_else(|e| panic!("sibling connect: {e:?}\n{}", daemon.log()));
    let (mut b, b_port) = accepting.join().unwrap();
    let b_port = b_port.expect("B accepts");
    a.send(a_port, b"to a sibling", T).unwrap();
    assert_eq!(b.recv_exact(b_port, 12, T), b"to a sibling");

    // VM 22 is strict: a CID nobody owns is refused, with a reset.
    assert_eq!(b.connect(77, 1), Err(SockState::Reset));

    // The API: both VMs, the live connections, a fallback toggle.
    let vms = request(&api, "GET", "/api/v1/vms", None)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(vms["21"]["g2h_fallback"], true, "{vms}");
    assert_eq!(vms["22"]["g2h_fallback"], false, "{vms}");
    // The sibling connection was paired in memory: the registry's socket saw no handshake.
    assert_eq!(
        vms["22"]["counters"]["handshakes"]["registry"]["accepted"], 0,
        "{vms}"
    );
    assert_eq!(vms["21"]["counters"]["sibling"], 1, "{vms}");
    let conns = request(&api, "GET", "/api/v1/vms/21/vsock/connections", None)
        .unwrap()
        .json()
        .unwrap();
    let paths: Vec<&str> = conns
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"host") && paths.contains(&"sibling"),
        "{conns}"
    );
    let r = request(
        &api,
        "PATCH",
        "/api/v1/vms/22/vsock",
        Some(r#"{"g2h_fallback": true}"#),
    )
    .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    let info = request(&api, "GET", "/api/v1/vms/22/vsock", None)
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["g2h_fallback"], true);
    assert_eq!(
        request(&api, "GET", "/api/v1/vms/99/vsock", None)
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        request(&api, "GET", "/api/v1/vsock", None).unwrap().status,
        404
    );

    // SIGTERM with both frontends connected: a clean exit, and every socket is gone.
    assert_eq!(daemon.terminate(), 0);
    for f in [
        "vm21.vhost",
        "vm22.vhost",
        "vm21.vsock",
        "vm22.vsock",
        "api.sock",
    ] {
        assert!(!d.join(f).exists(), "{f} left behind");
    }
    // So was the private registry the two VMs shared (made under TMPDIR).
    let left: Vec<_> = std::fs::read_dir(d.join("tmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.is_empty(),
        "the private registry was left behind: {left:?}"
    );
    // The host side of the guest's connection was closed with the device.
    s.set_read_timeout(Some(T)).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "host stream still open"
    );
    drop(link_a);
}

#[test]
fn a_frontend_that_leaves_does_not_disturb_the_other_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut args: Vec<String> = Vec::new();
    args.extend(vm_args(d, 31, ""));
    args.extend(vm_args(d, 32, ""));
    let mut daemon = Daemon::start(d, &args);
    let (mut b, _link_b) = guest(d, 32, 2);
    {
        let (_a, _link_a) = guest(d, 31, 2);
        // A goes away (its VMM ended) without stopping its rings.
    }
    let svc = UnixListener::bind(d.join("vm32.vsock_7000")).unwrap();
    let port = b
        .connect(2, 7000)
        .expect("B still reaches its host service");
    let (mut s, _) = svc.accept().unwrap();
    b.send(port, b"still here", T).unwrap();
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    // And A's VM takes a new frontend.
    let (mut a, _link) = guest(d, 31, 2);
    let svc_a = UnixListener::bind(d.join("vm31.vsock_7000")).unwrap();
    let pa = a.connect(2, 7000).expect("A again");
    let (mut sa, _) = svc_a.accept().unwrap();
    a.send(pa, b"back", T).unwrap();
    let mut got = [0u8; 4];
    sa.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"back");
    assert_eq!(daemon.terminate(), 0);
}
