//! The `vsock-vmm` binary end to end: a tiny PVH guest, the REST API over the Unix socket,
//! exit statuses and cleanup.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{kvm_available, wait_for_path, Scratch};
use vsock_vmm::api::client::{self, Reply};
use vsock_vmm::api::lifecycle::LIFECYCLE_ROUTES;
use vsock_vmm::api::routes::ROUTES;
use vsock_vmm::testkit::asm::{Asm, Mode};
use vsock_vmm::testkit::images::elf_kernel;
use vsock_vmm::vm::layout;

const BIN: &str = env!("CARGO_BIN_EXE_vsock-vmm");

/// A running `vsock-vmm`, killed (by PID) if the test ends before it exits.
struct Vmm {
    child: Option<Child>,
    api: PathBuf,
}

impl Vmm {
    /// Starts the VMM and waits for its API socket.
    fn start(scratch: &Scratch, code: &[u8], extra: &[&str]) -> Vmm {
        Self::start_with_fd_limit(scratch, code, extra, None)
    }

    /// [`Vmm::start`] with the VMM's soft `RLIMIT_NOFILE` set to `nofile` before it runs.
    fn start_with_fd_limit(
        scratch: &Scratch,
        code: &[u8],
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Vmm {
        let mut vmm = Self::spawn_with_fd_limit(scratch, code, extra, nofile);
        if !wait_for_path(&vmm.api, Duration::from_secs(20)) {
            let status = vmm.wait(Duration::from_secs(1));
            panic!("the API socket never appeared (vsock-vmm: {status:?})");
        }
        vmm
    }

    /// Starts the VMM (for guests that end by themselves).
    fn spawn(scratch: &Scratch, code: &[u8], extra: &[&str]) -> Vmm {
        Self::spawn_with_fd_limit(scratch, code, extra, None)
    }

    fn spawn_with_fd_limit(
        scratch: &Scratch,
        code: &[u8],
        extra: &[&str],
        nofile: Option<u64>,
    ) -> Vmm {
        let kernel = scratch.write("vmlinux", &elf_kernel(code, 0x10_0000, true));
        let api = scratch.path("api.sock");
        let mut args = vec![
            "--kernel".to_string(),
            kernel.display().to_string(),
            "--memory".into(),
            "size=64M".into(),
            "--api-socket".into(),
            api.display().to_string(),
        ];
        if !extra.contains(&"--serial") {
            args.extend(["--serial".to_string(), "off".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(soft) = nofile {
            // SAFETY: the closure runs in the child between fork and exec and only calls
            // getrlimit/setrlimit, which are async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let mut l = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.rlim_cur = soft.min(l.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn vsock-vmm");
        Vmm {
            child: Some(child),
            api,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn get(&self, path: &str) -> Reply {
        client::request(&self.api, "GET", path, None).expect("API request")
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        client::request(&self.api, method, path, body).expect("API request")
    }

    /// Waits (bounded) for the process to exit; returns its status and stderr.
    fn wait(&mut self, timeout: Duration) -> Option<(ExitStatus, String)> {
        common::wait_exit(&mut self.child, timeout)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A guest that parks its vCPU forever.
fn parked() -> Vec<u8> {
    let mut a = Asm::new(Mode::Protected32);
    a.cli().park();
    a.finish()
}

fn exit_of(vmm: &mut Vmm) -> (i32, String) {
    let (status, err) = vmm
        .wait(Duration::from_secs(20))
        .expect("vsock-vmm did not exit in time");
    (status.code().expect("exited, not killed by a signal"), err)
}

#[test]
fn api_serves_ping_errors_and_shutdown() {
    if !kvm_available("api_serves_ping_errors_and_shutdown") {
        return;
    }
    let scratch = Scratch::new("api");
    let mut vmm = Vmm::start(&scratch, &parked(), &[]);
    let mode = std::fs::metadata(&vmm.api).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "API socket mode");

    let ping = vmm.get("/api/v1/vmm.ping");
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json().unwrap()["version"], env!("CARGO_PKG_VERSION"));

    // Without --vsock the vsock routes exist but have no device.
    assert_eq!(vmm.get("/api/v1/vsock").status, 404);
    assert_eq!(vmm.get("/api/v1/vsock/connections").status, 404);
    assert_eq!(vmm.get("/api/v1/nothing").status, 404);
    let r = vmm.call("DELETE", "/api/v1/vsock", None);
    assert_eq!(r.status, 405);
    assert!(r.json().unwrap()["error"].is_string());
    assert_eq!(vmm.get("/api/v1/vm.shutdown").status, 405);

    let raw = |bytes: &[u8]| client::send_raw(&vmm.api, bytes).unwrap().status;
    assert_eq!(raw(b"HELLO THERE\r\n\r\n"), 400);
    assert_eq!(
        raw(b"PATCH /api/v1/vsock HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"),
        413
    );
    let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&big), 431);

    // The remote subcommand prints the JSON.
    let out = Command::new(BIN)
        .args(["remote", "--api-socket"])
        .arg(&vmm.api)
        .arg("ping")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let out = Command::new(BIN)
        .args(["remote", "--api-socket"])
        .arg(&vmm.api)
        .arg("info")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "info without a vsock device is an HTTP 404"
    );

    // The guest is still running (it parks), and the API still answers.
    assert_eq!(vmm.get("/api/v1/vmm.ping").status, 200);
    assert_eq!(vmm.call("PUT", "/api/v1/vm.shutdown", None).status, 204);
    let (code, err) = exit_of(&mut vmm);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!vmm.api.exists(), "API socket removed");
}

#[test]
fn sigterm_tears_down_and_exits_zero() {
    if !kvm_available("sigterm_tears_down_and_exits_zero") {
        return;
    }
    let scratch = Scratch::new("sigterm");
    let mut vmm = Vmm::start(&scratch, &parked(), &["--cpus", "boot=2"]);
    assert_eq!(vmm.get("/api/v1/vmm.ping").status, 200);
    // SAFETY: kill(2) on the PID of our own child process, which has not been reaped.
    assert_eq!(unsafe { libc::kill(vmm.pid(), libc::SIGTERM) }, 0);
    let (code, err) = exit_of(&mut vmm);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(!vmm.api.exists(), "API socket removed");
}

#[test]
fn guest_debug_exit_status_and_serial_file() {
    if !kvm_available("guest_debug_exit_status_and_serial_file") {
        return;
    }
    let scratch = Scratch::new("debugexit");
    let serial = scratch.path("serial.log");
    let mut a = Asm::new(Mode::Protected32);
    for b in b"hello\n" {
        a.outb(layout::SERIAL_PORT_BASE, *b);
    }
    a.outb(layout::DEBUG_EXIT_PORT, 7);
    let arg = format!("file={}", serial.display());
    let mut vmm = Vmm::spawn(&scratch, &a.finish(), &["--serial", &arg]);
    let (code, _) = exit_of(&mut vmm);
    assert_eq!(code, 7);
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), "hello\n");
    assert!(!vmm.api.exists());
}

#[test]
fn guest_reboot_exits_zero() {
    if !kvm_available("guest_reboot_exits_zero") {
        return;
    }
    let scratch = Scratch::new("reboot");
    let mut a = Asm::new(Mode::Protected32);
    a.outb(layout::I8042_COMMAND_PORT, 0xfe);
    a.outb(layout::DEBUG_EXIT_PORT, 9);
    let mut vmm = Vmm::spawn(&scratch, &a.finish(), &[]);
    assert_eq!(exit_of(&mut vmm).0, 0);
    assert!(!vmm.api.exists());
}

fn run_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_options_exit_2_naming_key_and_value() {
    let scratch = Scratch::new("badopts");
    let kernel = scratch.write("k", b"not a kernel");
    let k = kernel.to_str().unwrap();
    // A registry created as a local CID namespace, joined with the other mode.
    let reg = scratch.path("reg");
    std::fs::create_dir(&reg).unwrap();
    std::fs::write(reg.join("ns_mode"), "local\n").unwrap();
    let local_vs_global = format!(
        "cid=3,socket={},uplink=none,registry={},ns_mode=global",
        scratch.path("v.sock").display(),
        reg.display()
    );
    for (args, needles) in [
        (
            vec!["--kernel", k, "--cpus", "boot=0"],
            vec!["--cpus", "boot", "`0`"],
        ),
        (
            vec!["--kernel", k, "--memory", "size=1M"],
            vec!["--memory", "size", "`1M`"],
        ),
        (
            vec!["--kernel", k, "--serial", "pty"],
            vec!["--serial", "`pty`"],
        ),
        (
            vec!["--kernel", k, "--log-level", "loud"],
            vec!["--log-level", "`loud`"],
        ),
        (
            vec!["--kernel", k, "--log-format", "xml"],
            vec!["--log-format", "`xml`"],
        ),
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            vec!["--kernel", "/nonexistent/vmlinux"],
        ),
        (
            vec!["--kernel", k, "--serial", "file=/nonexistent/dir/log"],
            vec!["--serial", "file=/nonexistent/dir/log"],
        ),
        (vec!["--cpus", "boot=2"], vec!["--kernel is required"]),
        (
            vec!["--kernel", k, "--vsock", &local_vs_global],
            vec!["--vsock", "is a local namespace", "ns_mode=global"],
        ),
    ] {
        let (code, err) = run_cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: `{n}` missing from: {err}");
        }
    }
    let (code, _) = run_cli(&["--help"]);
    assert_eq!(code, 0);
}

/// Every (path, method) → documented status codes, from docs/api.yaml.
fn openapi_operations() -> Vec<(String, String, BTreeSet<u16>)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml"))
            .expect("read api.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("parse api.yaml");
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths") {
        for (method, op) in item.as_mapping().unwrap() {
            let statuses = op["responses"]
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().parse::<u16>().unwrap())
                .collect();
            ops.push((
                path.as_str().unwrap().to_string(),
                method.as_str().unwrap().to_uppercase(),
                statuses,
            ));
        }
    }
    ops
}

#[test]
fn openapi_document_matches_the_routes() {
    let documented: BTreeSet<(String, String)> = openapi_operations()
        .into_iter()
        .map(|(p, m, _)| (p, m))
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .chain(LIFECYCLE_ROUTES)
        .flat_map(|(p, ms)| ms.iter().map(|m| (p.to_string(), m.to_string())))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn running_server_answers_every_documented_operation() {
    if !kvm_available("running_server_answers_every_documented_operation") {
        return;
    }
    let scratch = Scratch::new("openapi");
    let mut vmm = Vmm::start(&scratch, &parked(), &[]);
    let mut ops = openapi_operations();
    // Shut down last.
    ops.sort_by_key(|(p, _, _)| p == "/api/v1/vm.shutdown");
    for (path, method, statuses) in &ops {
        let body = (method == "PATCH").then_some(r#"{"g2h_fallback": true}"#);
        let r = vmm.call(method, path, body);
        assert!(
            statuses.contains(&r.status),
            "{method} {path} answered {} (documented: {statuses:?})",
            r.status
        );
        // Served routes never answer 404 "no route" / 405.
        assert!(!r.body.contains("no route"), "{method} {path}: {}", r.body);
    }
    assert_eq!(exit_of(&mut vmm).0, 0);
}

/// What a device with the default limits may hold at once: 1023 connections and 1024 pending
/// handshakes on each of its two sockets.
const MIN_FDS: u64 = 1023 + 2 * 1024;

/// The soft and hard "Max open files" of process `pid` (`/proc/<pid>/limits`).
fn fd_limits(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut n = line
        .split_whitespace()
        .skip(3)
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    (n.next().unwrap(), n.next().unwrap())
}

#[test]
fn vsock_endpoints_end_to_end() {
    if !kvm_available("vsock_endpoints_end_to_end") {
        return;
    }
    let scratch = Scratch::new("vsock");
    let sock = scratch.path("v.sock");
    let vsock_arg = format!("cid=3,socket={},uplink=none", sock.display());
    // Started with the common soft limit of 1024 descriptors, too few for the device's
    // defaults: the VMM raises it (as far as the hard limit allows).
    let mut vmm =
        Vmm::start_with_fd_limit(&scratch, &parked(), &["--vsock", &vsock_arg], Some(1024));
    let (soft, hard) = fd_limits(vmm.pid());
    assert!(
        soft >= MIN_FDS.min(hard),
        "the VMM's soft descriptor limit is {soft} (hard {hard})"
    );
    let info = vmm.get("/api/v1/vsock");
    assert_eq!(info.status, 200);
    let v = info.json().unwrap();
    assert_eq!(v["cid"], 3);
    for key in [
        "socket",
        "g2h_fallback",
        "uplink",
        "registry",
        "listen",
        "counters",
    ] {
        assert!(v.get(key).is_some(), "info lacks {key}: {v}");
    }
    assert_eq!(v["ns_mode"], "global");
    for on in [true, false, true] {
        let body = format!(r#"{{"g2h_fallback": {on}}}"#);
        assert_eq!(vmm.call("PATCH", "/api/v1/vsock", Some(&body)).status, 204);
        assert_eq!(vmm.get("/api/v1/vsock").json().unwrap()["g2h_fallback"], on);
    }
    for bad in [r#"{"g2h_fallback": 1}"#, r#"{"cid": 4}"#, "nope"] {
        assert_eq!(
            vmm.call("PATCH", "/api/v1/vsock", Some(bad)).status,
            400,
            "{bad}"
        );
    }
    let conns = vmm.get("/api/v1/vsock/connections");
    assert_eq!(conns.status, 200);
    assert!(conns.json().unwrap().is_array());
    // The metrics of an idle device: no connection yet, the fallback as last set.
    let metrics = vmm.get("/metrics");
    assert_eq!(metrics.status, 200);
    for line in [
        "vsock_guest_cid 3",
        "vsock_g2h_fallback 1",
        "vsock_guest_connections_total{route=\"host\"} 0",
        "vsock_connections{path=\"host\",state=\"established\",type=\"stream\"} 0",
        "vsock_connections{path=\"host\",state=\"established\",type=\"seqpacket\"} 0",
        "vsock_handshakes_total{socket=\"host_seqpacket\",result=\"completed\"} 0",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "no `{line}` in\n{}",
            metrics.body
        );
    }
    assert!(sock.exists(), "the hybrid socket is bound");
    assert_eq!(vmm.call("PUT", "/api/v1/vm.shutdown", None).status, 204);
    assert_eq!(exit_of(&mut vmm).0, 0);
    assert!(!vmm.api.exists());
    assert!(!sock.exists(), "the hybrid socket is removed on exit");
}

/// A guest that faults with no usable IDT: real KVM triple-faults (KVM_EXIT_SHUTDOWN, exit 0,
/// as with `reboot=t`, and the vCPU state logged as a warning); kvm_pvm cannot emulate the
/// event delivery and reports KVM_EXIT_INTERNAL_ERROR, which must end the VMM with status 1
/// and the reason on stderr.
#[test]
fn guest_fault_ends_with_shutdown_or_a_reported_kvm_error() {
    if !kvm_available("guest_fault_ends_with_shutdown_or_a_reported_kvm_error") {
        return;
    }
    let scratch = Scratch::new("fault");
    let mut a = Asm::new(Mode::Protected32);
    a.int3().outb(layout::DEBUG_EXIT_PORT, 9);
    let mut vmm = Vmm::spawn(&scratch, &a.finish(), &[]);
    let (code, err) = exit_of(&mut vmm);
    assert!(
        (code == 0 && err.contains("vcpu0: triple fault: rip=0x"))
            || (code == 1 && err.contains("KVM_EXIT_INTERNAL_ERROR")),
        "status {code}, stderr: {err}"
    );
    assert!(!vmm.api.exists());
}
