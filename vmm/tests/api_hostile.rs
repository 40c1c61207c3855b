//! Hostile clients of the running `vsock-vmm` API server (a parked guest, `--vsock` with
//! `uplink=none`): malformed and oversized requests, wrong JSON types, slow and idle clients
//! that must not block others, concurrent PATCHes, and another user. `api_e2e.rs` covers the
//! basic error codes and the socket's 0600 mode; this file adds what a hostile client does.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{kvm_available, wait_for_path, Scratch};
use vsock_vmm::api::client::{self, Reply};
use vsock_vmm::api::server::{MAX_CLIENTS, REQUEST_TIMEOUT};
use vsock_vmm::testkit::asm::{Asm, Mode};
use vsock_vmm::testkit::images::elf_kernel;

const BIN: &str = env!("CARGO_BIN_EXE_vsock-vmm");
/// A well-behaved request must be answered within this while hostile clients hang around.
const PROMPT: Duration = Duration::from_millis(500);

/// A running `vsock-vmm` with a parked guest and a vsock device; killed (by PID) on drop.
struct Vmm {
    child: Child,
    api: PathBuf,
}

impl Vmm {
    fn start(scratch: &Scratch) -> Vmm {
        let mut a = Asm::new(Mode::Protected32);
        a.cli().park();
        let kernel = scratch.write("vmlinux", &elf_kernel(&a.finish(), 0x10_0000, true));
        let api = scratch.path("api.sock");
        let vsock = format!(
            "cid=3,socket={},uplink=none",
            scratch.path("v.sock").display()
        );
        let child = Command::new(BIN)
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "size=64M", "--serial", "off", "--vsock", &vsock])
            .arg("--api-socket")
            .arg(&api)
            .env("VSOCK_ROUTER_FORBID_AF_VSOCK", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vsock-vmm");
        let vmm = Vmm { child, api };
        assert!(
            wait_for_path(&vmm.api, Duration::from_secs(20)),
            "the API socket never appeared"
        );
        vmm
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        client::request(&self.api, method, path, body).expect("API request")
    }

    /// A ping, which must be answered 200 within [`PROMPT`]; returns how long it took.
    fn prompt_ping(&self) -> Duration {
        let start = Instant::now();
        let r = self.call("GET", "/api/v1/vmm.ping", None);
        let took = start.elapsed();
        assert_eq!(r.status, 200);
        assert!(took < PROMPT, "ping answered after {took:?}");
        took
    }

    /// Shuts the VMM down through the API and waits (bounded) for it to exit 0.
    fn shutdown(mut self) {
        assert_eq!(self.call("PUT", "/api/v1/vm.shutdown", None).status, 204);
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                assert_eq!(s.code(), Some(0));
                return;
            }
            assert!(Instant::now() < end, "vsock-vmm did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends `raw`, reads until the server closes; returns the raw response. Panics if the server
/// does not close within 10 s (the connection must be closed after any answer).
fn exchange(api: &Path, raw: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before reading everything (413, 431).
    let _ = s.write_all(raw);
    let mut resp = Vec::new();
    loop {
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) => return resp,
            Ok(n) => resp.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !resp.is_empty() => return resp,
            Err(e) => panic!("no close after {} bytes of answer: {e}", resp.len()),
        }
        assert!(resp.len() < 1 << 20, "answer too long");
    }
}

/// The status, the `{"error": ...}` message, and whether the head says `Connection: close`.
fn error_of(resp: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    let status: u16 = head[9..12].parse().unwrap();
    let v: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    let msg = v["error"].as_str().expect("an error message").to_string();
    assert!(!msg.is_empty());
    (status, msg)
}

#[test]
fn malformed_oversized_and_wrong_typed_requests_get_a_clear_4xx_and_a_close() {
    if !kvm_available("malformed_oversized_and_wrong_typed_requests_get_a_clear_4xx_and_a_close") {
        return;
    }
    let scratch = Scratch::new("hostile-4xx");
    let vmm = Vmm::start(&scratch);
    let mut many_headers = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many_headers.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many_headers.extend_from_slice(b"\r\n");
    let mut long_path = b"GET /".to_vec();
    long_path.extend(std::iter::repeat_n(b'a', 9000));
    long_path.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let no_crlf = vec![b'G'; 1 << 20];
    let mut sent_body = b"PATCH /api/v1/vsock HTTP/1.1\r\nContent-Length: 20000\r\n\r\n".to_vec();
    sent_body.extend(std::iter::repeat_n(b' ', 20_000));
    let garbage: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("binary garbage", garbage, 400, "malformed"),
        ("1 MiB without a line end", no_crlf, 431, "too large"),
        ("40 headers", many_headers, 431, "too large"),
        ("9000-byte path", long_path, 431, "too large"),
        ("20 KB body sent", sent_body, 413, "body too large"),
        (
            "chunked",
            b"PATCH /api/v1/vsock HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
            "Transfer-Encoding",
        ),
        (
            "two lengths",
            b"PATCH /api/v1/vsock HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
                .to_vec(),
            400,
            "Content-Length",
        ),
        (
            "signed length",
            b"PATCH /api/v1/vsock HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}".to_vec(),
            400,
            "Content-Length",
        ),
        (
            "absolute URI",
            b"GET http://x/api/v1/vmm.ping HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "not a path",
        ),
        (
            "closed mid-body",
            b"PATCH /api/v1/vsock HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"g2h".to_vec(),
            400,
            "closed before",
        ),
    ];
    for (what, raw, want, needle) in cases {
        let start = Instant::now();
        let resp = if what == "closed mid-body" {
            let mut s = UnixStream::connect(&vmm.api).unwrap();
            s.write_all(&raw).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = Vec::new();
            s.read_to_end(&mut r).unwrap();
            r
        } else {
            exchange(&vmm.api, &raw)
        };
        let (status, msg) = error_of(&resp);
        assert_eq!(status, want, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{what}: answered after {:?}, not at once",
            start.elapsed()
        );
    }
    // Wrong JSON types and shapes: 400 naming the expected body; nothing changes.
    let before = vmm.call("GET", "/api/v1/vsock", None).json().unwrap()["g2h_fallback"].clone();
    for body in [
        r#"{"g2h_fallback": null}"#,
        r#"{"g2h_fallback": "true"}"#,
        r#"{"g2h_fallback": 0}"#,
        r#"{"g2h_fallback": {}}"#,
        r#"{"g2h_fallback": [true]}"#,
        r#"{"g2h_fallback": 1e999}"#,
        r#"{"g2h_fallback": true, "g2h_fallback": false}"#,
        r#"{"G2H_FALLBACK": true}"#,
        "true",
        "null",
        "\u{feff}{\"g2h_fallback\": true}",
        "{\"g2h_fallback\": tr\u{fffd}e}",
    ] {
        let r = vmm.call("PATCH", "/api/v1/vsock", Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let msg = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(msg.contains("g2h_fallback"), "{body}: {msg}");
    }
    let after = vmm.call("GET", "/api/v1/vsock", None).json().unwrap()["g2h_fallback"].clone();
    assert_eq!(before, after, "refused PATCHes changed nothing");
    // A second request on the same connection is not served: one answer, then the close.
    let two = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/vsock HTTP/1.1\r\n\r\n";
    let resp = String::from_utf8(exchange(&vmm.api, two)).unwrap();
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    other_user_is_refused(&vmm.api);
    vmm.prompt_ping();
    vmm.shutdown();
}

/// Another user cannot connect to the API socket (mode 0600 in a directory others may enter).
fn other_user_is_refused(api: &Path) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 || Command::new("socat").arg("-V").output().is_err() {
        eprintln!("SKIPPED: the other-user check of the API socket needs root and socat");
        return;
    }
    let dir = api.parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().permissions();
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o001 != 0,
        "others can enter {}",
        dir.display()
    );
    let out = Command::new("socat")
        .arg("-u")
        .arg("STDIN")
        .arg(format!("UNIX-CONNECT:{}", api.display()))
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody connected to the API socket");
    assert!(err.contains("Permission denied"), "{err}");
}

/// Reads whatever the server sends until it closes, at most `limit`; returns it and when the
/// close came.
fn wait_close(s: &mut UnixStream, limit: Duration) -> (Vec<u8>, Option<Instant>) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    while Instant::now() < end {
        let mut b = [0u8; 1024];
        match s.read(&mut b) {
            Ok(0) => return (got, Some(Instant::now())),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (got, Some(Instant::now())),
        }
    }
    (got, None)
}

#[test]
fn slow_and_idle_clients_do_not_block_other_clients() {
    if !kvm_available("slow_and_idle_clients_do_not_block_other_clients") {
        return;
    }
    let scratch = Scratch::new("hostile-slow");
    let vmm = Vmm::start(&scratch);
    vmm.prompt_ping();
    let start = Instant::now();
    // Idle clients that connect and send nothing, and one that sends half a head.
    let mut idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&vmm.api).unwrap())
        .collect();
    let mut half = UnixStream::connect(&vmm.api).unwrap();
    half.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Slowloris clients: a valid request, one byte per second.
    let api = vmm.api.clone();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let api = api.clone();
            thread::spawn(move || {
                let req = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n";
                let mut s = UnixStream::connect(&api).unwrap();
                let t0 = Instant::now();
                for b in req {
                    if s.write_all(&[*b]).is_err() {
                        break;
                    }
                    let (got, closed) = wait_close(&mut s, Duration::from_secs(1));
                    if closed.is_some() || !got.is_empty() {
                        return (got, t0.elapsed());
                    }
                }
                let (got, _) = wait_close(&mut s, Duration::from_secs(10));
                (got, t0.elapsed())
            })
        })
        .collect();
    // Meanwhile other clients are answered at once, again and again.
    let mut worst = Duration::ZERO;
    while start.elapsed() < REQUEST_TIMEOUT - Duration::from_millis(1000) {
        worst = worst.max(vmm.prompt_ping());
        let r = vmm.call("GET", "/api/v1/vsock/connections", None);
        assert_eq!(r.status, 200);
        thread::sleep(Duration::from_millis(100));
    }
    // At the timeout the idle, half and slow clients get a 408 and the close.
    for (i, c) in idle
        .iter_mut()
        .chain(std::iter::once(&mut half))
        .enumerate()
    {
        let (got, closed) = wait_close(c, REQUEST_TIMEOUT + Duration::from_secs(3));
        let at = closed.unwrap_or_else(|| panic!("idle client {i} never closed")) - start;
        assert!(
            at >= REQUEST_TIMEOUT - Duration::from_millis(200),
            "closed after {at:?}"
        );
        assert_eq!(error_of(&got).0, 408, "idle client {i}");
    }
    for t in slow {
        let (got, took) = t.join().unwrap();
        let (status, msg) = error_of(&got);
        assert_eq!(status, 408, "{msg}");
        assert!(
            took < REQUEST_TIMEOUT + Duration::from_secs(2),
            "slowloris held on for {took:?}"
        );
    }
    eprintln!("slow clients: pings answered in at most {worst:?} meanwhile");

    // More idle clients than the server keeps: the oldest are closed at once, others served.
    let t0 = Instant::now();
    let mut flood: Vec<UnixStream> = (0..MAX_CLIENTS + 8)
        .map(|_| UnixStream::connect(&vmm.api).unwrap())
        .collect();
    vmm.prompt_ping();
    let (_, closed) = wait_close(&mut flood[0], Duration::from_secs(2));
    assert!(
        closed.is_some(),
        "the oldest idle client was kept beyond {MAX_CLIENTS}"
    );
    assert!(
        closed.unwrap() - t0 < REQUEST_TIMEOUT,
        "closed to make room, not by the timeout"
    );
    drop(flood);
    idle.clear();
    vmm.prompt_ping();
    vmm.shutdown();
}

#[test]
fn concurrent_patches_stay_consistent() {
    if !kvm_available("concurrent_patches_stay_consistent") {
        return;
    }
    let scratch = Scratch::new("hostile-patch");
    let vmm = Vmm::start(&scratch);
    const THREADS: usize = 6;
    const EACH: usize = 40;
    let api = Arc::new(vmm.api.clone());
    // The last PATCH of each thread is taken in turn under this lock, so which write was
    // acknowledged last is known.
    let last = Arc::new(Mutex::new(None::<bool>));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (api, last) = (api.clone(), last.clone());
            thread::spawn(move || {
                for i in 0..EACH {
                    let on = (t + i) % 2 == 0;
                    let body = format!(r#"{{"g2h_fallback": {on}}}"#);
                    if i + 1 == EACH {
                        let mut guard = last.lock().unwrap();
                        let r = client::request(&api, "PATCH", "/api/v1/vsock", Some(&body))
                            .expect("PATCH");
                        assert_eq!(r.status, 204, "{}", r.body);
                        *guard = Some(on);
                    } else {
                        let r = client::request(&api, "PATCH", "/api/v1/vsock", Some(&body))
                            .expect("PATCH");
                        assert_eq!(r.status, 204, "{}", r.body);
                    }
                    // Interleaved reads always see a whole, valid document.
                    let r = client::request(&api, "GET", "/api/v1/vsock", None).expect("GET");
                    assert_eq!(r.status, 200);
                    let v = r.json().unwrap();
                    assert!(v["g2h_fallback"].is_boolean(), "{v}");
                    assert_eq!(v["cid"], 3);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("PATCH thread");
    }
    let want = last.lock().unwrap().expect("a last write");
    let got = vmm.call("GET", "/api/v1/vsock", None).json().unwrap();
    assert_eq!(
        got["g2h_fallback"], want,
        "final GET reflects the last acknowledged write"
    );
    // And the flag is the device's real policy: a flip is seen at once.
    for on in [!want, want] {
        let body = format!(r#"{{"g2h_fallback": {on}}}"#);
        assert_eq!(vmm.call("PATCH", "/api/v1/vsock", Some(&body)).status, 204);
        assert_eq!(
            vmm.call("GET", "/api/v1/vsock", None).json().unwrap()["g2h_fallback"],
            on
        );
    }
    vmm.shutdown();
}
