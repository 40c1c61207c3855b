//! `vsock-routerd` (the device and router as a vhost-user-vsock daemon) with real Linux guests
//! (issue 15), and the SOCK_SEQPACKET uplink through a real parent `/dev/vsock` (issue 11).
//! QEMU TCG guests with the stock Debian kernel get their virtio-vsock device from QEMU's
//! `vhost-user-vsock-device` (guest RAM in a shared memfd), served by our daemon:
//!
//! 1. [`guest_and_host_both_ways_and_fallback_vs_strict`]: one guest (CID 3) of a daemon on
//!    the machine; 1 MiB guest → host to a hybrid listener, 1 MiB host → guest through
//!    `CONNECT` on the hybrid socket, both hash-checked; an unowned CID through the `unix:`
//!    uplink stand-in with fallback on, then refused after `PATCH .../vsock` to strict, with
//!    nothing at the stand-in; the API's VM list, connections and counters.
//! 2. [`two_guests_of_one_daemon_are_siblings_and_pass_vsock_test`]: two guests (CIDs 3 and 4)
//!    of one daemon reach each other by CID (1 MiB and 1000000 bytes, hash-checked at both
//!    ends), then Linux's `vsock_test` between them: all 11 cases, SOCK_STREAM and
//!    SOCK_SEQPACKET, must PASS on both sides.
//! 3. [`seqpacket_through_the_real_parent_dev_vsock`]: the KVM host gets its `/dev/vsock` from
//!    the daemon on the machine; `vsock-vmm` in it boots an inner guest with
//!    `uplink=/dev/vsock`; the inner guest's SOCK_SEQPACKET connects to the unowned CID 77 take
//!    `vsock-vmm`'s AF_VSOCK uplink, the KVM host's kernel and our daemon, whose `unix:` stand-in
//!    ends them in SOCK_SEQPACKET Unix listeners on the machine: every message boundary checked
//!    at both ends, both ways; with `vsock-vmm` switched to strict the connect is reset and no
//!    uplink attempt is made.
//! 4. [`a_daemon_guest_and_a_vsock_vmm_guest_share_a_registry`]: in one KVM host, a
//!    `vsock-routerd` guest (booted by QEMU on the KVM host's KVM) and a `vsock-vmm` guest
//!    share a CID registry: bytes both ways by CID.
//!
//! No AF_VSOCK on the machine: every daemon started here has `uplink=none` or `unix:DIR`
//! (`start_routerd` refuses anything else) and `VSOCK_ROUTER_FORBID_AF_VSOCK=1`.
//!
//! Run alone: `cargo test -p vsock-integration --test routerd_e2e -- --nocapture`.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vsock_integration::{
    accept_and_read_unless, api_counter, api_request, artifacts_or_skip, build_workspace_binary,
    connect_and_send_unless, images_dir, pattern, rerun_on_platform_fault, routerd_binary,
    sha256_hex, start_routerd, Artifacts, GuestRun, RouterdVm, RunOutcome, RunningVm, Status,
};

/// The QEMU guests of these tests are heavy (TCG): one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Which virtio-mmio transport QEMU gives a guest's `vhost-user-vsock-device`. QEMU's
/// virtio-mmio is legacy (version 1) unless told otherwise (`force-legacy`, default true, also
/// on `-M microvm`), and a driver on a legacy transport never sees, so never acknowledges,
/// VIRTIO_F_VERSION_1 (bit 32). Before fd56c84 the daemon refused such a driver (`features
/// 0x20000002: driver did not acknowledge VIRTIO_F_VERSION_1`, the device never started and
/// every connect of the guest timed out: found by the first run of these tests); a VMM that
/// offers VERSION_1 (a modern transport, PCI) is the other case. Both are exercised, and each
/// guest reports its device's negotiated features, which [`transport_problems`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mmio {
    /// QEMU's default.
    Legacy,
    /// `-global virtio-mmio.force-legacy=false`.
    Modern,
}

impl Mmio {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Mmio::Legacy => &[],
            Mmio::Modern => &["-global", "virtio-mmio.force-legacy=false"],
        }
    }
}

/// Prints the negotiated features of the guest's virtio-vsock device (virtio device ID 19) as
/// sysfs has them, bit 0 first: `VRTEST-INFO vsock-features <64 digits>`.
const FEATURES_INFO: &str = r#"vr_info vsock-features "$(for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && cat $d/features; done)"
"#;

/// The guest behind `prefix` in `outcome` negotiated VIRTIO_VSOCK_F_SEQPACKET (bit 1), and
/// VIRTIO_F_VERSION_1 (bit 32) exactly when its transport is modern; a list of problems.
fn transport_problems(outcome: &RunOutcome, prefix: &str, mmio: Mmio) -> Vec<String> {
    let key = format!("VRTEST-INFO {prefix}vsock-features ");
    let Some(bits) = outcome
        .console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key.as_str()))
    else {
        return vec![format!("{}: no {key:?} line", outcome.name)];
    };
    let bit = |i: usize| bits.as_bytes().get(i).copied();
    let version_1 = if mmio == Mmio::Modern { b'1' } else { b'0' };
    let mut p = Vec::new();
    if bit(1) != Some(b'1') {
        p.push(format!(
            "{}{prefix}: SEQPACKET not negotiated: {bits}",
            outcome.name
        ));
    }
    if bit(32) != Some(version_1) {
        p.push(format!(
            "{}{prefix}: VERSION_1 is {:?} on a {mmio:?} transport: {bits}",
            outcome.name,
            bit(32).map(char::from)
        ));
    }
    p
}

/// A bound for every wait of the machine's side on a guest (it gives up earlier once the run
/// has ended).
const GUEST_WAIT: Duration = Duration::from_secs(400);

// ---------------------------------------------------------------------------------------------
// Small helpers: the guests, JSON fields, SOCK_SEQPACKET Unix sockets.

/// A TCG guest (the KVM host image: stock Debian kernel, vsock modules) whose virtio-vsock
/// device is `vhost-user-vsock-device` on the daemon's socket `dir/vhu.sock`, on the `mmio`
/// transport. Its scenario starts with [`FEATURES_INFO`].
fn daemon_guest(script: &str, name: &str, dir: &Path, mmio: Mmio) -> GuestRun {
    GuestRun::kvm_host(format!("{FEATURES_INFO}{script}"))
        .name(name)
        .memfd(true)
        .workdir(dir)
        .qemu_args(mmio.qemu_args().iter().copied())
        .qemu_args([
            "-chardev",
            "socket,id=vu0,path={dir}/vhu.sock",
            "-device",
            "vhost-user-vsock-device,chardev=vu0",
        ])
}

/// `text` without whitespace (the API's JSON is pretty-printed; no value checked here has a
/// space in it).
fn compact(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

/// The raw value of the first `"key":` in compact JSON `obj` (a number, `true`, a quoted
/// string, ...), up to the next `,` or `}`.
fn field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let at = obj.find(&pat)? + pat.len();
    let rest = &obj[at..];
    Some(&rest[..rest.find([',', '}']).unwrap_or(rest.len())])
}

/// The objects of a compact JSON array of flat objects (`GET .../vsock/connections`).
fn objects(array: &str) -> Vec<String> {
    let inner = array.trim().trim_start_matches('[').trim_end_matches(']');
    if inner.is_empty() {
        return Vec::new();
    }
    inner.split("},{").map(|o| o.to_string()).collect()
}

/// Checks that `obj` has each `(key, value)`; a list of what differs.
fn expect_fields(what: &str, obj: &str, want: &[(&str, &str)]) -> Vec<String> {
    want.iter()
        .filter(|(k, v)| field(obj, k) != Some(*v))
        .map(|(k, v)| format!("{what}: {k} is {:?}, want {v} (in {obj})", field(obj, k)))
        .collect()
}

/// `GET` on the API, which must answer 200; the compact body.
fn api_get(api: &Path, path: &str) -> Result<String, String> {
    match api_request(api, "GET", path, None)? {
        (200, body) => Ok(compact(&body)),
        (status, body) => Err(format!("GET {path}: {status} {body}")),
    }
}

/// A SOCK_SEQPACKET Unix socket (listener or connection), closed on drop.
struct Seqpacket(OwnedFd);

impl Seqpacket {
    /// Binds a non-blocking SOCK_SEQPACKET listener at `path`.
    fn listen(path: &Path) -> std::io::Result<Seqpacket> {
        let cpath = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: plain system calls on a descriptor owned here at once; `addr` is a zeroed
        // sockaddr_un whose path (checked to fit with its NUL) is copied in before use.
        unsafe {
            let fd = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let sock = Seqpacket(OwnedFd::from_raw_fd(fd));
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let bytes = cpath.as_bytes_with_nul();
            if bytes.len() > addr.sun_path.len() {
                return Err(std::io::Error::other(format!(
                    "{}: too long for a Unix socket",
                    path.display()
                )));
            }
            for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::bind(fd, (&raw const addr).cast(), len) != 0 || libc::listen(fd, 16) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(sock)
        }
    }

    /// One pending connection, if any (never blocks).
    fn try_accept(&self) -> std::io::Result<Option<Seqpacket>> {
        // SAFETY: accept4 on our listener; the new descriptor is owned at once.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: a new descriptor nobody else owns.
            return Ok(Some(Seqpacket(unsafe { OwnedFd::from_raw_fd(fd) })));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        }
    }

    /// Waits (at most `limit`, 50 ms polls, giving up once `stop()`) for a connection.
    fn accept_unless(&self, limit: Duration, stop: &dyn Fn() -> bool) -> Result<Seqpacket, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(c) = self.try_accept().map_err(|e| format!("accept: {e}"))? {
                return Ok(c);
            }
            if stop() {
                return Err("stopped: the run ended".into());
            }
            if Instant::now() > deadline {
                return Err(format!("no connection within {} s", limit.as_secs()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The next message (`None` at end of stream), waiting at most `limit`. A message longer
    /// than 512 KiB (`MSG_TRUNC`) is an error: no message here may be cut.
    fn recv(&self, limit: Duration) -> Result<Option<Vec<u8>>, String> {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
        if n == 0 {
            return Err(format!("no message within {} s", limit.as_secs()));
        }
        if n < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 512 << 10];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: a zeroed msghdr pointing at one iovec over `buf`, which outlives the call.
        let (got, flags) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            let got = libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
            (got, msg.msg_flags)
        };
        if got < 0 {
            return Err(format!("recvmsg: {}", std::io::Error::last_os_error()));
        }
        if flags & libc::MSG_TRUNC != 0 {
            return Err("a message longer than 512 KiB".into());
        }
        if got == 0 {
            return Ok(None);
        }
        buf.truncate(got as usize);
        Ok(Some(buf))
    }

    /// Sends `data` as one message.
    fn send(&self, data: &[u8]) -> Result<(), String> {
        // SAFETY: send from a live buffer on our socket.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match n {
            n if n < 0 => Err(format!("send: {}", std::io::Error::last_os_error())),
            n if n as usize != data.len() => Err(format!("sent {n} of {} bytes", data.len())),
            _ => Ok(()),
        }
    }

    /// Every message until end of stream (each wait at most `limit`).
    fn recv_all(&self, limit: Duration) -> Result<Vec<Vec<u8>>, String> {
        let mut out = Vec::new();
        while let Some(m) = self.recv(limit)? {
            out.push(m);
            if out.len() > 1000 {
                return Err("more than 1000 messages".into());
            }
        }
        Ok(out)
    }
}

/// Serves a phase word on a guest's `<hybrid>_999` (read by `vr_host_phase_is` in the guest),
/// one connection at a time, until dropped.
struct PhaseServer {
    phase: Arc<Mutex<String>>,
    ended: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PhaseServer {
    fn start(hybrid: &Path, first: &str) -> std::io::Result<PhaseServer> {
        let listener = UnixListener::bind(format!("{}_999", hybrid.display()))?;
        listener.set_nonblocking(true)?;
        let phase = Arc::new(Mutex::new(first.to_string()));
        let ended = Arc::new(AtomicBool::new(false));
        let thread = {
            let (phase, ended) = (Arc::clone(&phase), Arc::clone(&ended));
            std::thread::spawn(move || {
                while !ended.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let word = phase.lock().unwrap().clone();
                            let _ = s.write_all(word.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        Ok(PhaseServer {
            phase,
            ended,
            thread: Some(thread),
        })
    }

    fn set(&self, word: &str) {
        *self.phase.lock().unwrap() = word.to_string();
    }
}

impl Drop for PhaseServer {
    fn drop(&mut self) {
        self.ended.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `side` on a thread beside `vms` (guests that work together) and waits for all of
/// them; `side` gets a `stop()` that turns true once the guests' runs have ended.
fn beside<T: Send + 'static>(
    vms: Vec<RunningVm>,
    side: impl FnOnce(&dyn Fn() -> bool) -> T + Send + 'static,
) -> (Result<Vec<RunOutcome>, vsock_integration::HarnessError>, T) {
    let ended = Arc::new(AtomicBool::new(false));
    let thread = {
        let ended = Arc::clone(&ended);
        std::thread::spawn(move || side(&|| ended.load(Ordering::Relaxed)))
    };
    let outcomes = RunningVm::wait_all(vms);
    ended.store(true, Ordering::Relaxed);
    (
        outcomes,
        thread.join().expect("the machine's side panicked"),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. One guest: both ways through the hybrid socket, fallback vs strict over the stand-in.

const LEN: usize = 1 << 20;
/// The bytes the guest sends to the stand-in.
const UPLINK_LEN: usize = 65536;

const BOTH_WAYS: &str = r#"
vr_check dev-vsock test -c /dev/vsock
sum="$(vr_pattern_file /tmp/d 1048576)"
vr_check g2h-send vr-socat -u FILE:/tmp/d VSOCK-CONNECT:2:5000
# The machine retries until we listen: keep accepting; its last connection is the one (the
# machine checks that its name carries the port of the OK line it got).
vr_collect 5001 /tmp/back.d &
back=$!
vr_wait_for 300 vr_collected_is /tmp/back.d "$sum"
kill "$back"
f=$(vr_collected /tmp/back.d)
vr_info h2g-connections "$(vr_collected_count /tmp/back.d)"
vr_info h2g-file "$(basename "$f")"
vr_expect_eq h2g-receive "$sum" "$([ -f "$f" ] && vr_sha256 "$f")"
# Fallback on: CID 77 belongs to nobody, so the daemon takes the uplink, its unix: stand-in; the
# machine answers with the sha256 of what it got there.
head -c 65536 /dev/urandom >/tmp/u
vr-socat -t 120 'FILE:/tmp/u!!CREATE:/tmp/u.reply' VSOCK-CONNECT:77:6000 2>/tmp/u.err
vr_expect_eq fallback-connect 0 "$?"
vr_expect_eq fallback-reply "$(vr_sha256 /tmp/u)" "$(cat /tmp/u.reply 2>/dev/null)"
[ -s /tmp/u.err ] && vr_info fallback-stderr "$(cat /tmp/u.err)"
# The machine switches the VM to strict through the daemon's API.
vr_wait_for 300 vr_host_phase_is strict || vr_fail strict-phase "the machine never switched"
vr_expect_reset 77 6000
echo done | vr-socat -u - VSOCK-CONNECT:2:998
vr_expect_eq strict-done-sent 0 "$?"
"#;

/// What the machine saw in test 1.
#[derive(Debug, Default)]
struct BothWays {
    /// `GET /api/v1/vms` before the guest ran.
    vms: String,
    g2h: Vec<u8>,
    ok_line: String,
    /// What arrived at the stand-in, and the connection list meanwhile.
    uplink: Vec<u8>,
    connections: String,
    /// The PATCH's status, and `GET .../vsock` after it and after the strict connect.
    patch_status: u16,
    after_patch: String,
    after_strict: String,
    /// A connection at the stand-in after the switch.
    late_uplink: bool,
}

fn both_ways_machine(
    dir: &Path,
    api: &Path,
    phase: &PhaseServer,
    stop: &dyn Fn() -> bool,
) -> Result<BothWays, String> {
    let mut seen = BothWays {
        vms: api_get(api, "/api/v1/vms")?,
        ..Default::default()
    };
    let hybrid = dir.join("vm.vsock");
    let g2h = UnixListener::bind(dir.join("vm.vsock_5000")).map_err(|e| e.to_string())?;
    let done = UnixListener::bind(dir.join("vm.vsock_998")).map_err(|e| e.to_string())?;
    let stand_in = UnixListener::bind(dir.join("up/77_6000")).map_err(|e| e.to_string())?;
    seen.g2h = accept_and_read_unless(&g2h, GUEST_WAIT, stop).map_err(|e| format!("g2h: {e}"))?;
    seen.ok_line = connect_and_send_unless(&hybrid, 5001, &pattern(LEN), GUEST_WAIT, stop)
        .map_err(|e| format!("h2g: {e}"))?;
    // The uplink stand-in: read to the guest's EOF, look at the API while the connection is
    // open, answer with the hash.
    stand_in.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + GUEST_WAIT;
    let mut up = loop {
        match stand_in.accept() {
            Ok((s, _)) => break s,
            Err(_) if !stop() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("stand-in: no connection: {e}")),
        }
    };
    up.set_nonblocking(false).map_err(|e| e.to_string())?;
    up.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    up.read_to_end(&mut seen.uplink)
        .map_err(|e| format!("stand-in read: {e}"))?;
    seen.connections = api_get(api, "/api/v1/vms/3/vsock/connections")?;
    up.write_all(sha256_hex(&seen.uplink).as_bytes())
        .map_err(|e| format!("stand-in answer: {e}"))?;
    drop(up);
    // Strict from now on, through the daemon's API.
    let (status, body) = api_request(
        api,
        "PATCH",
        "/api/v1/vms/3/vsock",
        Some(r#"{"g2h_fallback": false}"#),
    )?;
    seen.patch_status = status;
    if status != 204 {
        return Err(format!("PATCH: {status} {body}"));
    }
    seen.after_patch = api_get(api, "/api/v1/vms/3/vsock")?;
    phase.set("strict");
    let said = accept_and_read_unless(&done, GUEST_WAIT, stop)
        .map_err(|e| format!("strict phase: no word from the guest: {e}"))?;
    if said != b"done\n" {
        return Err(format!("strict phase: the guest said {said:?}"));
    }
    seen.late_uplink = stand_in.accept().is_ok();
    seen.after_strict = api_get(api, "/api/v1/vms/3/vsock")?;
    Ok(seen)
}

/// Everything test 1 checks on the machine's side; a list of problems.
fn both_ways_problems(seen: &BothWays, console: &str) -> Vec<String> {
    let mut p = Vec::new();
    let want = pattern(LEN);
    if !seen.vms.contains("\"3\":{") || field(&seen.vms, "g2h_fallback") != Some("true") {
        p.push(format!(
            "GET /api/v1/vms: want VM 3 with g2h_fallback true: {}",
            seen.vms
        ));
    }
    if seen.g2h.len() != LEN || sha256_hex(&seen.g2h) != sha256_hex(&want) {
        p.push(format!(
            "guest -> host: {} bytes, sha256 {} (want {LEN}, {})",
            seen.g2h.len(),
            sha256_hex(&seen.g2h),
            sha256_hex(&want)
        ));
    }
    // The guest's last connection on 5001 is the one whose OK line the machine got.
    let ok_port = seen.ok_line.strip_prefix("OK ").unwrap_or("?");
    let file = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("VRTEST-INFO h2g-file "))
        .unwrap_or("");
    if !file.ends_with(&format!(".{ok_port}")) {
        p.push(format!(
            "host -> guest: the guest's file {file:?} is not the connection of {:?}",
            seen.ok_line
        ));
    }
    if seen.uplink.len() != UPLINK_LEN {
        p.push(format!(
            "stand-in: {} bytes, want {UPLINK_LEN}",
            seen.uplink.len()
        ));
    }
    let uplink_conns: Vec<String> = objects(&seen.connections)
        .into_iter()
        .filter(|o| field(o, "path") == Some("\"uplink\""))
        .collect();
    match uplink_conns.as_slice() {
        [c] => p.extend(expect_fields(
            "the uplink connection",
            c,
            &[
                ("local_cid", "77"),
                ("local_port", "6000"),
                ("peer_cid", "3"),
                ("to_host", "true"),
                ("initiator", "\"guest\""),
                ("type", "\"stream\""),
                ("bytes_to_host", &UPLINK_LEN.to_string()),
            ],
        )),
        _ => p.push(format!(
            "connections: want one uplink connection: {}",
            seen.connections
        )),
    }
    if field(&seen.after_patch, "g2h_fallback") != Some("false") {
        p.push(format!("after the PATCH: {}", seen.after_patch));
    }
    if seen.late_uplink {
        p.push("strict: a connection reached the stand-in".into());
    }
    let info = &seen.after_strict;
    for (key, want) in [("uplink", 1), ("uplink_attempts", 1), ("refused", 1)] {
        if api_counter(info, key) != Some(want) {
            p.push(format!(
                "counters after strict: {key} is {:?}, want {want}: {info}",
                api_counter(info, key)
            ));
        }
    }
    if api_counter(info, "host").unwrap_or(0) < 3 {
        p.push(format!("counters: want 3 or more host connections: {info}"));
    }
    p
}

#[test]
fn guest_and_host_both_ways_and_fallback_vs_strict() {
    let name = "routerd_guest_and_host_both_ways_and_fallback_vs_strict";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let (outcome, seen, log) = rerun_on_platform_fault(name, || {
        let tmp = tempfile::Builder::new().prefix("vr-routerd.").tempdir()?;
        let dir = tmp.path();
        std::fs::create_dir(dir.join("up"))?;
        let (vhu, hybrid, api) = (dir.join("vhu.sock"), dir.join("vm.vsock"), dir.join("api"));
        let stand_in = format!("fallback=1,uplink=unix:{}", dir.join("up").display());
        let daemon = start_routerd(
            &[RouterdVm {
                cid: 3,
                vhost_socket: &vhu,
                hybrid: &hybrid,
                keys: &stand_in,
            }],
            Some(&api),
            &dir.join("routerd.log"),
        )?;
        let phase = PhaseServer::start(&hybrid, "fallback")?;
        let vm = daemon_guest(BOTH_WAYS, name, dir, Mmio::Legacy)
            .modules(&["vsock"])
            .memory("512M")
            .smp(1)
            .spawn(artifacts)?;
        let d = dir.to_path_buf();
        let (outcomes, seen) = beside(vec![vm], move |stop| {
            both_ways_machine(&d, &d.join("api"), &phase, stop)
        });
        let log = daemon.log();
        drop(daemon);
        Ok((outcomes?.remove(0), seen, log))
    })
    .unwrap();
    let fail = |what: String| -> ! {
        panic!(
            "{what}\n---- console ----\n{}\n---- vsock-routerd log ----\n{log}",
            outcome.console
        )
    };
    if let Err(e) = outcome.check(&[
        "host-modules-vsock",
        "dev-vsock",
        "g2h-send",
        "h2g-receive",
        "fallback-connect",
        "fallback-reply",
        "strict-refused",
        "strict-econnreset",
        "strict-done-sent",
    ]) {
        fail(e.to_string());
    }
    let seen = seen.unwrap_or_else(|e| fail(format!("the machine's side: {e}")));
    let mut problems = transport_problems(&outcome, "", Mmio::Legacy);
    problems.extend(both_ways_problems(&seen, &outcome.console));
    if !problems.is_empty() {
        fail(problems.join("\n"));
    }
    eprintln!(
        "{name}: passed in {:.1} s (guest {:.1} s); host -> guest handshake {}",
        start.elapsed().as_secs_f64(),
        outcome.elapsed.as_secs_f64(),
        seen.ok_line
    );
}

/// The machine-side checks of test 1 must be able to fail.
#[test]
fn both_ways_checks_fail_on_wrong_data() {
    let want = pattern(LEN);
    let conn = |bytes: usize| {
        format!(
            "[{{\"local_cid\":2,\"local_port\":5000,\"path\":\"host\"}},{{\"local_cid\":77,\
             \"local_port\":6000,\"peer_cid\":3,\"peer_port\":1025,\"path\":\"uplink\",\
             \"to_host\":true,\"initiator\":\"guest\",\"state\":\"established\",\
             \"bytes_to_host\":{bytes},\"bytes_to_guest\":0,\"type\":\"stream\"}}]"
        )
    };
    let info = |fallback: &str, uplink: u64, attempts: u64, refused: u64| {
        format!(
            "{{\"cid\":3,\"g2h_fallback\":{fallback},\"uplink\":\"unix:/x\",\"counters\":\
             {{\"host\":4,\"sibling\":0,\"uplink\":{uplink},\"refused\":{refused},\
             \"uplink_attempts\":{attempts}}}}}"
        )
    };
    let good = BothWays {
        vms: compact(&format!("{{\"3\":{}}}", info("true", 0, 0, 0))),
        g2h: want.clone(),
        ok_line: "OK 1073741824".into(),
        uplink: vec![0; UPLINK_LEN],
        connections: conn(UPLINK_LEN),
        patch_status: 204,
        after_patch: info("false", 1, 1, 0),
        after_strict: info("false", 1, 1, 1),
        late_uplink: false,
    };
    let console = "VRTEST-INFO h2g-file 123.45.1073741824\n";
    assert_eq!(both_ways_problems(&good, console), Vec::<String>::new());
    let bad: Vec<(&str, BothWays)> = vec![
        (
            "short g2h",
            BothWays {
                g2h: want[1..].to_vec(),
                ..clone(&good)
            },
        ),
        (
            "late uplink",
            BothWays {
                late_uplink: true,
                ..clone(&good)
            },
        ),
        (
            "attempt in strict",
            BothWays {
                after_strict: info("false", 1, 2, 1),
                ..clone(&good)
            },
        ),
        (
            "not refused",
            BothWays {
                after_strict: info("false", 1, 1, 0),
                ..clone(&good)
            },
        ),
        (
            "still fallback",
            BothWays {
                after_patch: info("true", 1, 1, 0),
                ..clone(&good)
            },
        ),
        (
            "bytes",
            BothWays {
                connections: conn(100),
                ..clone(&good)
            },
        ),
        (
            "no uplink conn",
            BothWays {
                connections: "[]".into(),
                ..clone(&good)
            },
        ),
        (
            "other ok",
            BothWays {
                ok_line: "OK 1073741825".into(),
                ..clone(&good)
            },
        ),
    ];
    for (what, seen) in bad {
        assert!(!both_ways_problems(&seen, console).is_empty(), "{what}");
    }
    fn clone(b: &BothWays) -> BothWays {
        BothWays {
            vms: b.vms.clone(),
            g2h: b.g2h.clone(),
            ok_line: b.ok_line.clone(),
            uplink: b.uplink.clone(),
            connections: b.connections.clone(),
            patch_status: b.patch_status,
            after_patch: b.after_patch.clone(),
            after_strict: b.after_strict.clone(),
            late_uplink: b.late_uplink,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Two guests of one daemon: siblings, then vsock_test.

/// The 11 cases of vsock_test in linux-source-6.1 (as `conformance.rs` lists them), each
/// reported by both sides as `vsock_test/<index>-<slug>`.
const VSOCK_TEST_CASES: [&str; 11] = [
    "0-stream-connection-reset",
    "1-stream-bind-only",
    "2-stream-client-close",
    "3-stream-server-close",
    "4-stream-multiple-connections",
    "5-stream-msg-peek",
    "6-seqpacket-msg-bounds",
    "7-seqpacket-msg-trunc-flag",
    "8-seqpacket-timeout",
    "9-seqpacket-invalid-receive-buffer",
    "10-stream-poll-so-rcvlowat",
];

/// Every vsock_test case must PASS on this side (no SKIP: both devices are ours and offer
/// SOCK_SEQPACKET); a list of problems.
fn vsock_test_problems(side: &str, outcome: &RunOutcome, prefix: &str) -> Vec<String> {
    VSOCK_TEST_CASES
        .iter()
        .filter_map(|case| {
            let name = format!("{prefix}vsock_test/{case}");
            match outcome.report.results.get(&name) {
                None => Some(format!("{side}: {name}: not reported")),
                Some(r) if r.status != Status::Pass => {
                    Some(format!("{side}: {name}: {}: {}", r.status, r.detail))
                }
                Some(_) => None,
            }
        })
        .collect()
}

/// Prints one line per vsock_test case with its verdict on each side (a run and the prefix of
/// that side in its console).
fn print_cases(sides: &[(&RunOutcome, &str)]) {
    for case in VSOCK_TEST_CASES {
        let mut line = format!("  {case:<38}");
        for (outcome, prefix) in sides {
            let r = outcome
                .report
                .results
                .get(&format!("{prefix}vsock_test/{case}"));
            let verdict = r.map_or("(not reported)".to_string(), |r| {
                format!("{} {}", r.status, r.detail)
            });
            line.push_str(&format!(" | {verdict}"));
        }
        eprintln!("{line}");
    }
}

/// The transports of the two siblings: one of each, so that a legacy driver and a modern one
/// meet through the daemon.
const A_MMIO: Mmio = Mmio::Legacy;
const B_MMIO: Mmio = Mmio::Modern;

fn sibling_script(me: u32, peer: u32, role: &str) -> String {
    format!(
        r#"
VR_SELF={me} VR_PEER={peer} . /vr/files/routerd-siblings.sh
VR_ROLE={role} VR_PEER={peer} VR_CT_DEVICE=vsock-routerd . /vr/files/conformance-vsock-test.sh
"#
    )
}

/// The static vsock_test binary (`images/build-vsock-test.sh`, cached).
fn vsock_test_binary() -> PathBuf {
    let script = images_dir().join("build-vsock-test.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn two_guests_of_one_daemon_are_siblings_and_pass_vsock_test() {
    let name = "routerd_two_guests_are_siblings_and_pass_vsock_test";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vsock_test = vsock_test_binary();
    let start = Instant::now();
    let (a, b, infos, log) = rerun_on_platform_fault(name, || {
        let tmp = tempfile::Builder::new().prefix("vr-routerd.").tempdir()?;
        let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&da)?;
        std::fs::create_dir(&db)?;
        let (va, vb) = (da.join("vhu.sock"), db.join("vhu.sock"));
        let (ha, hb) = (da.join("vm.vsock"), db.join("vm.vsock"));
        let api = tmp.path().join("api");
        let daemon = start_routerd(
            &[
                RouterdVm {
                    cid: 3,
                    vhost_socket: &va,
                    hybrid: &ha,
                    keys: "",
                },
                RouterdVm {
                    cid: 4,
                    vhost_socket: &vb,
                    hybrid: &hb,
                    keys: "",
                },
            ],
            Some(&api),
            &tmp.path().join("routerd.log"),
        )?;
        let guest = |script: String, who: &str, dir: &Path, mmio| {
            daemon_guest(&script, who, dir, mmio)
                .binary(&vsock_test)
                .file(
                    images_dir().join("inner-scenarios/conformance-vsock-test.sh"),
                    "/vr/files/conformance-vsock-test.sh",
                )
                .file(
                    images_dir().join("inner-scenarios/routerd-siblings.sh"),
                    "/vr/files/routerd-siblings.sh",
                )
                .modules(&["vsock"])
                .memory("512M")
                .smp(1)
                .timeout(Duration::from_secs(1200))
                .spawn(artifacts)
        };
        let a = guest(
            sibling_script(3, 4, "client"),
            "routerd-sibling-3",
            &da,
            A_MMIO,
        )?;
        let b = guest(
            sibling_script(4, 3, "server"),
            "routerd-sibling-4",
            &db,
            B_MMIO,
        )?;
        let outcomes = RunningVm::wait_all(vec![a, b]);
        let infos = [3, 4].map(|cid| api_get(&api, &format!("/api/v1/vms/{cid}/vsock")));
        let log = daemon.log();
        drop(daemon);
        let mut o = outcomes?.into_iter();
        Ok((o.next().unwrap(), o.next().unwrap(), infos, log))
    })
    .unwrap();
    let mut problems = Vec::new();
    for (side, outcome, mmio) in [
        ("CID 3 (client)", &a, A_MMIO),
        ("CID 4 (server)", &b, B_MMIO),
    ] {
        problems.extend(transport_problems(outcome, "", mmio));
        if let Err(e) = outcome.check(&[
            "host-modules-vsock",
            "sibling-send",
            "sibling-receive",
            "sibling-peer-cid",
        ]) {
            problems.push(format!("{side}: {e}"));
        }
        problems.extend(vsock_test_problems(side, outcome, ""));
    }
    for (cid, info) in [3, 4].iter().zip(&infos) {
        match info {
            Ok(info) if api_counter(info, "sibling").unwrap_or(0) >= 1 => {}
            other => problems.push(format!("CID {cid}: want sibling connections: {other:?}")),
        }
    }
    eprintln!(
        "{name}: {:.1} s (guests {:.1} s and {:.1} s)",
        start.elapsed().as_secs_f64(),
        a.elapsed.as_secs_f64(),
        b.elapsed.as_secs_f64()
    );
    print_cases(&[(&a, ""), (&b, "")]);
    assert!(
        problems.is_empty(),
        "{}\n---- vsock-routerd log ----\n{log}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. SOCK_SEQPACKET through the real parent /dev/vsock (issue 11).

const SEQPACKET_KVM_HOST: &str = r#"
echo fallback >/tmp/phase
socat UNIX-LISTEN:/tmp/v.sock_999,fork SYSTEM:'cat /tmp/phase' &
socat -u UNIX-LISTEN:/tmp/v.sock_998 CREATE:/tmp/fallback-done &
socat -u UNIX-LISTEN:/tmp/v.sock_997 CREATE:/tmp/strict-done &
vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=192M \
	--cmdline "$(vr_inner_cmdline vr.scenario=routerd-seqpacket-uplink vr.timeout=500)" \
	--vsock cid=5,socket=/tmp/v.sock,uplink=/dev/vsock,fallback=1,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/api --log-level info >/tmp/inner.log 2>&1 &
vmm=$!
attempts() { tr -d ' \n' <"$1" | sed -n 's/.*"uplink_attempts":\([0-9]*\).*/\1/p'; }
if ! vr_wait_while "$vmm" 400 test -s /tmp/fallback-done; then
	vr_fail guest-fallback-phase "no signal from the guest"
	vr_vmm_lost inner "$vmm" /tmp/api
fi
vsock-vmm remote --api-socket /tmp/api info >/tmp/info1.json 2>&1
vr_expect_eq vmm-uplink-attempts-fallback 2 "$(attempts /tmp/info1.json)"
vsock-vmm remote --api-socket /tmp/api fallback off >/dev/null 2>&1
vr_expect_eq vmm-fallback-off 0 "$?"
echo strict >/tmp/phase
if ! vr_wait_while "$vmm" 300 test -s /tmp/strict-done; then
	vr_fail guest-strict-phase "no signal from the guest"
	vr_vmm_lost inner "$vmm" /tmp/api
fi
vsock-vmm remote --api-socket /tmp/api info >/tmp/info2.json 2>&1
vr_expect_eq vmm-uplink-attempts-strict 2 "$(attempts /tmp/info2.json)"
vr_check vmm-counts-refused grep -q '"refused": *1,' /tmp/info2.json
vr_info vmm-api-info "$(tr -d ' \n' </tmp/info2.json)"
# The guest waits for this before it ends (and its vsock-vmm with it): the counters are read.
echo finish >/tmp/phase
for _ in $(seq 1 3000); do kill -0 "$vmm" 2>/dev/null || break; usleep 100000; done
wait "$vmm"
vr_expect_eq vmm-exit-status 0 "$?"
vr_relay inner </tmp/inner.log
"#;

/// What the machine saw at the stand-in in test 3.
#[derive(Debug, Default)]
struct SeqSeen {
    /// The messages of the 77:6000 connection, and the daemon's connections meanwhile.
    exchange: Vec<Vec<u8>>,
    connections: String,
    /// The messages of the 77:6001 connection.
    big: Vec<Vec<u8>>,
}

fn seqpacket_machine(
    listeners: &[Seqpacket; 2],
    api: &Path,
    stop: &dyn Fn() -> bool,
) -> Result<SeqSeen, String> {
    let wait = Duration::from_secs(120);
    let c = listeners[0]
        .accept_unless(GUEST_WAIT, stop)
        .map_err(|e| format!("77_6000: {e}"))?;
    let mut seen = SeqSeen {
        exchange: c.recv_all(wait).map_err(|e| format!("77_6000: {e}"))?,
        ..Default::default()
    };
    seen.connections = api_get(api, "/api/v1/vms/3/vsock/connections")?;
    c.send(&[b'r'; 1500])
        .map_err(|e| format!("77_6000 answer: {e}"))?;
    c.send(&[b'r'; 2500])
        .map_err(|e| format!("77_6000 answer: {e}"))?;
    drop(c);
    let c = listeners[1]
        .accept_unless(GUEST_WAIT, stop)
        .map_err(|e| format!("77_6001: {e}"))?;
    seen.big = c.recv_all(wait).map_err(|e| format!("77_6001: {e}"))?;
    Ok(seen)
}

fn seqpacket_problems(seen: &SeqSeen, late: usize, after: &str) -> Vec<String> {
    let mut p = Vec::new();
    let lens = |m: &[Vec<u8>]| m.iter().map(Vec::len).collect::<Vec<_>>();
    if lens(&seen.exchange) != [3000, 3000, 1000]
        || seen.exchange.iter().flatten().any(|&b| b != b'a')
    {
        p.push(format!(
            "77_6000: messages of {:?} bytes, want 3000, 3000, 1000 of 'a'",
            lens(&seen.exchange)
        ));
    }
    if lens(&seen.big) != [100000] || seen.big.iter().flatten().any(|&b| b != b'b') {
        p.push(format!(
            "77_6001: messages of {:?} bytes, want one of 100000 'b'",
            lens(&seen.big)
        ));
    }
    let up: Vec<String> = objects(&seen.connections)
        .into_iter()
        .filter(|o| field(o, "path") == Some("\"uplink\""))
        .collect();
    match up.as_slice() {
        [c] => p.extend(expect_fields(
            "the daemon's uplink connection",
            c,
            &[
                ("local_cid", "77"),
                ("local_port", "6000"),
                ("peer_cid", "3"),
                ("to_host", "true"),
                ("type", "\"seqpacket\""),
                ("messages_to_host", "3"),
                ("bytes_to_host", "7000"),
            ],
        )),
        _ => p.push(format!(
            "the daemon's connections: want one uplink connection: {}",
            seen.connections
        )),
    }
    if late != 0 {
        p.push(format!(
            "{late} connection(s) at the stand-in after the switch to strict"
        ));
    }
    // The KVM host's two fallback connections, nothing in strict mode (vsock-vmm refused it).
    for (key, want) in [("uplink", 2), ("uplink_attempts", 2), ("refused", 0)] {
        if api_counter(after, key) != Some(want) {
            p.push(format!(
                "the daemon's counters: {key} is {:?}, want {want}: {after}",
                api_counter(after, key)
            ));
        }
    }
    p
}

#[test]
fn seqpacket_through_the_real_parent_dev_vsock() {
    let name = "routerd_seqpacket_through_the_real_parent_dev_vsock";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let start = Instant::now();
    let (outcome, seen, late, after, log) = rerun_on_platform_fault(name, || {
        let tmp = tempfile::Builder::new().prefix("vr-routerd.").tempdir()?;
        let dir = tmp.path();
        std::fs::create_dir(dir.join("up"))?;
        let (vhu, hybrid, api) = (dir.join("vhu.sock"), dir.join("vm.vsock"), dir.join("api"));
        let stand_in = format!("fallback=1,uplink=unix:{}", dir.join("up").display());
        let daemon = start_routerd(
            &[RouterdVm {
                cid: 3,
                vhost_socket: &vhu,
                hybrid: &hybrid,
                keys: &stand_in,
            }],
            Some(&api),
            &dir.join("routerd.log"),
        )?;
        let listeners = Arc::new([
            Seqpacket::listen(&dir.join("up/77_6000"))?,
            Seqpacket::listen(&dir.join("up/77_6001"))?,
        ]);
        let vm = daemon_guest(SEQPACKET_KVM_HOST, name, dir, Mmio::Legacy)
            .binary(&vmm)
            .modules(&["kvm", "vsock"])
            .timeout(Duration::from_secs(600))
            .spawn(artifacts)?;
        let (l, a) = (Arc::clone(&listeners), api.clone());
        let (outcomes, seen) = beside(vec![vm], move |stop| seqpacket_machine(&l, &a, stop));
        let late = listeners
            .iter()
            .map(|l| usize::from(matches!(l.try_accept(), Ok(Some(_)))))
            .sum::<usize>();
        let after = api_get(&api, "/api/v1/vms/3/vsock");
        let log = daemon.log();
        drop(daemon);
        Ok((outcomes?.remove(0), seen, late, after, log))
    })
    .unwrap();
    let fail = |what: String| -> ! {
        panic!(
            "{what}\n---- console ----\n{}\n---- vsock-routerd log ----\n{log}",
            outcome.console
        )
    };
    if let Err(e) = outcome.check(&[
        "host-modules-kvm",
        "host-modules-vsock",
        "vmm-uplink-attempts-fallback",
        "vmm-fallback-off",
        "vmm-uplink-attempts-strict",
        "vmm-counts-refused",
        "vmm-exit-status",
        "inner/fallback-exchange",
        "inner/fallback-sent-lengths",
        "inner/fallback-received-lengths",
        "inner/fallback-received-bytes",
        "inner/fallback-big-sent",
        "inner/fallback-big-lengths",
        "inner/fallback-done-sent",
        "inner/strict-refused",
        "inner/strict-econnreset",
        "inner/strict-done-sent",
        "inner/done",
    ]) {
        fail(e.to_string());
    }
    let seen = seen.unwrap_or_else(|e| fail(format!("the machine's side: {e}")));
    let after = after.unwrap_or_else(|e| fail(format!("the daemon's API: {e}")));
    let mut problems = transport_problems(&outcome, "", Mmio::Legacy);
    // The inner guest's device is vsock-vmm's: modern virtio-mmio only.
    problems.extend(transport_problems(&outcome, "inner/", Mmio::Modern));
    problems.extend(seqpacket_problems(&seen, late, &after));
    if !problems.is_empty() {
        fail(problems.join("\n"));
    }
    eprintln!(
        "{name}: passed in {:.1} s (KVM host {:.1} s)",
        start.elapsed().as_secs_f64(),
        outcome.elapsed.as_secs_f64()
    );
}

/// The machine-side checks of test 3 must be able to fail.
#[test]
fn seqpacket_checks_fail_on_cut_or_merged_messages() {
    let conn = |msgs: u32| {
        format!(
            "[{{\"local_cid\":77,\"local_port\":6000,\"peer_cid\":3,\"path\":\"uplink\",\
             \"to_host\":true,\"bytes_to_host\":7000,\"type\":\"seqpacket\",\
             \"messages_to_host\":{msgs}}}]"
        )
    };
    let after = |uplink: u64, attempts: u64| {
        format!(
            "{{\"counters\":{{\"uplink\":{uplink},\"refused\":0,\"uplink_attempts\":{attempts}}}}}"
        )
    };
    let msgs = |lens: &[usize], b: u8| lens.iter().map(|&n| vec![b; n]).collect::<Vec<_>>();
    let good = || SeqSeen {
        exchange: msgs(&[3000, 3000, 1000], b'a'),
        connections: conn(3),
        big: msgs(&[100000], b'b'),
    };
    assert_eq!(
        seqpacket_problems(&good(), 0, &after(2, 2)),
        Vec::<String>::new()
    );
    let cases: Vec<(&str, SeqSeen, usize, String)> = vec![
        (
            "merged",
            SeqSeen {
                exchange: msgs(&[6000, 1000], b'a'),
                ..good()
            },
            0,
            after(2, 2),
        ),
        (
            "cut",
            SeqSeen {
                big: msgs(&[65536, 34464], b'b'),
                ..good()
            },
            0,
            after(2, 2),
        ),
        (
            "count",
            SeqSeen {
                connections: conn(2),
                ..good()
            },
            0,
            after(2, 2),
        ),
        ("late", good(), 1, after(2, 2)),
        ("attempt", good(), 0, after(2, 3)),
    ];
    for (what, seen, late, after) in cases {
        assert!(
            !seqpacket_problems(&seen, late, &after).is_empty(),
            "{what}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A daemon guest and a vsock-vmm guest through one CID registry: bytes, then vsock_test.

const REGISTRY_KVM_HOST: &str = r#"
mkdir -p /tmp/reg
VSOCK_ROUTER_FORBID_AF_VSOCK=1 vsock-routerd \
	--vsock cid=6,socket=/tmp/r6.vsock,vhost-user=/tmp/r6.vhost,uplink=none,registry=/tmp/reg,$VR_VSOCK_TIMEOUTS \
	--api-socket /tmp/rapi --log-level info >/tmp/routerd.log 2>&1 &
rd=$!
vr_wait_for 30 test -S /tmp/r6.vhost
vr_expect_eq routerd-up 0 "$?"
vr_check routerd-claims-cid test -S /tmp/reg/6.sock
# The daemon's guest: QEMU on this host's KVM, its vsock device on the daemon (shared memory).
vr_qemu_inner "vr.scenario=routerd-registry vr.self=6 vr.peer=5 vr.role=server vr.ct_device=vsock-routerd vr.timeout=1200" \
	-object memory-backend-memfd,id=vrm,size=256M,share=on -machine memory-backend=vrm \
	-global virtio-mmio.force-legacy=false \
	-chardev socket,id=vu,path=/tmp/r6.vhost -device vhost-user-vsock-device,chardev=vu \
	>/tmp/daemon-guest.log &
qemu=$!
# The vsock-vmm guest boots once the first one's user space runs (two early boots at once gain
# nothing).
if vr_wait_while "$qemu" 180 grep -q VRTEST-BOOT /tmp/daemon-guest.log; then
	vsock-vmm --kernel $VR_INNER/vmlinux --initramfs $VR_INNER/initramfs.cpio --memory size=192M \
		--cmdline "$(vr_inner_cmdline vr.scenario=routerd-registry vr.self=5 vr.peer=6 vr.role=client vr.ct_device=vsock-vmm vr.timeout=1200)" \
		--vsock cid=5,socket=/tmp/v5.sock,uplink=none,registry=/tmp/reg,$VR_VSOCK_TIMEOUTS \
		--api-socket /tmp/vapi --log-level info >/tmp/vmm.log 2>&1 &
	vmm=$!
else
	vr_info daemon-guest-not-booted "$(tail -n 5 /tmp/daemon-guest.log)"
	vmm=
	# QEMU (-no-reboot, the guest's reboot=t) that ended by itself before its guest's user
	# space ran, with no fault line from the guest's kernel: the nested guest's virtual CPU
	# reset without a word (a triple fault), the emulated platform's (docs/testing.md).
	if ! vr_running "$qemu" && ! grep -qE 'VRTEST|BUG|Oops|panic|WARNING' /tmp/daemon-guest.log; then
		echo "VRTEST-PLATFORM-FAULT daemon guest: QEMU ended without a word from its guest's kernel before the guest's user space ran"
	fi
fi
vr_wait_vmms 1300 daemon:$qemu:/tmp/daemon-guest.log ${vmm:+vmm:$vmm:/tmp/vmm.log}
printf 'GET /api/v1/vms/6/vsock HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' |
	socat -t 10 - UNIX-CONNECT:/tmp/rapi 2>&1 | tr -d ' \r\n' >/tmp/rinfo
vr_info routerd-api-info "$(cat /tmp/rinfo)"
vr_check routerd-counts-sibling grep -q '"sibling":[1-9]' /tmp/rinfo
if [ -n "$vmm" ]; then
	wait "$vmm"
	vr_expect_eq vmm-exit-status 0 "$?"
fi
wait "$qemu"
vr_info qemu-exit "$?"
kill -TERM "$rd"
wait "$rd"
vr_expect_eq routerd-exit-status 0 "$?"
vr_check routerd-cleanup test ! -e /tmp/r6.vhost -a ! -e /tmp/r6.vsock -a ! -e /tmp/reg/6.sock -a ! -e /tmp/rapi
vr_relay daemon </tmp/daemon-guest.log
[ -z "$vmm" ] || vr_relay vmm </tmp/vmm.log
vr_info routerd-log "$(tail -n 20 /tmp/routerd.log)"
:
"#;

#[test]
fn a_daemon_guest_and_a_vsock_vmm_guest_share_a_registry() {
    let name = "routerd_and_vsock_vmm_guests_share_a_registry";
    let Some(artifacts) = artifacts_or_skip(name) else {
        return;
    };
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vmm = build_workspace_binary("vsock-vmm", "vsock-vmm").unwrap();
    let routerd = routerd_binary().unwrap();
    let start = Instant::now();
    let outcome = registry_run(name, artifacts, &vmm, &routerd);
    let mut required = vec![
        "host-modules-kvm",
        "routerd-up",
        "routerd-claims-cid",
        "routerd-counts-sibling",
        "vmm-exit-status",
        "routerd-exit-status",
        "routerd-cleanup",
    ];
    let per_side = [
        "sibling-send",
        "sibling-receive",
        "sibling-peer-cid",
        "done",
    ];
    let names: Vec<String> = ["daemon", "vmm"]
        .iter()
        .flat_map(|s| per_side.iter().map(move |c| format!("{s}/{c}")))
        .collect();
    required.extend(names.iter().map(String::as_str));
    outcome.check(&required).unwrap();
    let mut problems = transport_problems(&outcome, "daemon/", Mmio::Modern);
    problems.extend(transport_problems(&outcome, "vmm/", Mmio::Modern));
    // vsock_test: the vsock-vmm guest is the client, the daemon's guest the server; every case
    // crosses the registry from one device to the other.
    problems.extend(vsock_test_problems(
        "vsock-routerd guest (server)",
        &outcome,
        "daemon/",
    ));
    problems.extend(vsock_test_problems(
        "vsock-vmm guest (client)",
        &outcome,
        "vmm/",
    ));
    assert!(
        problems.is_empty(),
        "{}\n{}",
        problems.join("\n"),
        outcome.console
    );
    eprintln!(
        "{name}: passed in {:.1} s (KVM host {:.1} s); vsock_test, vsock-vmm guest (client) | \
         vsock-routerd guest (server):",
        start.elapsed().as_secs_f64(),
        outcome.elapsed.as_secs_f64()
    );
    print_cases(&[(&outcome, "vmm/"), (&outcome, "daemon/")]);
}

fn registry_run(name: &str, artifacts: &Artifacts, vmm: &Path, routerd: &Path) -> RunOutcome {
    rerun_on_platform_fault(name, || {
        GuestRun::kvm_host(REGISTRY_KVM_HOST)
            .name(name)
            .binary(vmm)
            .binary(routerd)
            .nested_qemu()
            // Two inner guests on one virtual CPU of the KVM host (docs/testing.md, "Inner
            // guests that die without a word").
            .smp(1)
            .timeout(Duration::from_secs(1500))
            .spawn(artifacts)?
            .wait()
    })
    .unwrap()
}

/// The transport check must be able to fail.
#[test]
fn transport_checks_fail_on_the_wrong_features() {
    let outcome = |bits: &str| {
        let console = format!("VRTEST-INFO x/vsock-features {bits}\n");
        RunOutcome {
            name: "t".into(),
            report: vsock_integration::parse_console(&console),
            console,
            qemu_log: String::new(),
            exit: None,
            elapsed: Duration::ZERO,
            inner_crashes: Vec::new(),
        }
    };
    // EVENT_IDX (29) and SEQPACKET (1), VERSION_1 (32) only on the modern transport.
    let legacy = format!("01{}1{}", "0".repeat(27), "0".repeat(34));
    let modern = format!("01{}1001{}", "0".repeat(27), "0".repeat(31));
    assert_eq!(legacy.len(), 64);
    assert_eq!(modern.len(), 64);
    assert!(transport_problems(&outcome(&legacy), "x/", Mmio::Legacy).is_empty());
    assert!(transport_problems(&outcome(&modern), "x/", Mmio::Modern).is_empty());
    assert!(!transport_problems(&outcome(&legacy), "x/", Mmio::Modern).is_empty());
    assert!(!transport_problems(&outcome(&modern), "x/", Mmio::Legacy).is_empty());
    let no_seqpacket = modern.replacen("01", "00", 1);
    assert!(!transport_problems(&outcome(&no_seqpacket), "x/", Mmio::Modern).is_empty());
    assert!(!transport_problems(&outcome(&modern), "y/", Mmio::Modern).is_empty());
}
