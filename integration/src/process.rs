//! Helper processes on the machine (e.g. a vhost-user backend), killed by PID
//! when their guard is dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::artifacts::images_dir;
use crate::HarnessError;

/// A child process whose stdout and stderr go to a log file; it is killed
/// (SIGKILL to its PID) and reaped on drop, and also when the spawning
/// thread dies (PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct ProcessGuard {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl ProcessGuard {
    /// Starts `cmd` with stdin from /dev/null and output to `log_path`.
    pub fn spawn(name: &str, cmd: &mut Command, log_path: &Path) -> Result<Self, HarnessError> {
        let log = File::create(log_path)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        kill_with_parent(cmd);
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("cannot start {name}: {e}")))?;
        Ok(ProcessGuard {
            name: name.to_string(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
        })
    }

    /// The process ID (None once killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills (SIGKILL by PID) and reaps the process; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls (every 50 ms, at most `limit`) until `path` exists.
pub fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rust-vmm's `vhost-device-vsock` (crates.io, pinned), built once into the
/// cache by `images/build-vhost-user-backend.sh` (a few minutes the first
/// time). Only ever start it through [`start_vhost_user_vsock`], which uses
/// its Unix-socket (`uds-path`) mode: its other mode opens AF_VSOCK on the
/// machine, which is forbidden here.
pub fn vhost_user_backend() -> Result<&'static Path, HarnessError> {
    static BACKEND: OnceLock<Result<PathBuf, HarnessError>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            let script = images_dir().join("build-vhost-user-backend.sh");
            eprintln!("[vsock-integration] {}", script.display());
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| {
                    HarnessError::Setup(format!("cannot run {}: {e}", script.display()))
                })?;
            if !out.status.success() {
                return Err(HarnessError::Build {
                    what: "vhost-device-vsock".into(),
                    log: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        })
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// Starts `vhost-device-vsock` for one guest with CID `guest_cid` (the interop scenario,
/// `tests/vhost_user.rs`): the vhost-user socket at `vhost_socket` (pass it to QEMU as
/// `-chardev socket,id=X,path=...` + `-device vhost-user-vsock-device,chardev=X`, with
/// [`crate::GuestRun::memfd`]) and the hybrid-vsock Unix socket at `uds_path` (host → guest:
/// connect, write `CONNECT <port>\n`, read `OK <port>\n`; guest → host port P: listen on
/// `<uds_path>_P`). Unix-socket mode only: no AF_VSOCK is opened on the machine. Waits (at most
/// 10 s) for the vhost-user socket to appear. Log: `<vhost_socket>.log`.
pub fn start_vhost_user_vsock(
    guest_cid: u32,
    vhost_socket: &Path,
    uds_path: &Path,
) -> Result<ProcessGuard, HarnessError> {
    let bin = vhost_user_backend()?;
    let mut cmd = Command::new(bin);
    // Its `info` level logs dropped packets (unknown CID, group mismatch, spoofed source).
    cmd.env(
        "RUST_LOG",
        std::env::var("VR_VHOST_USER_LOG").unwrap_or_else(|_| "info".into()),
    );
    cmd.arg("--vm").arg(format!(
        "guest-cid={guest_cid},socket={},uds-path={}",
        vhost_socket.display(),
        uds_path.display()
    ));
    let log = PathBuf::from(format!("{}.log", vhost_socket.display()));
    let mut guard = ProcessGuard::spawn("vhost-device-vsock", &mut cmd, &log)?;
    if !wait_for_path(vhost_socket, Duration::from_secs(10)) || !guard.is_running() {
        return Err(HarnessError::Setup(format!(
            "vhost-device-vsock did not create {}:\n{}",
            vhost_socket.display(),
            guard.log()
        )));
    }
    Ok(guard)
}

/// Makes the kernel kill (SIGKILL) the process `cmd` starts when the thread that started it
/// dies, even if that thread never runs our `Drop` (a panicking or killed test). The setting
/// survives `exec`.
pub(crate) fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no parent memory; it
    // only asks the kernel to kill the child with us.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The first file named `tool` in this process's `PATH`.
pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// `vsock-routerd` (routerd/), the vsock device as a vhost-user-vsock backend daemon, built in
/// release mode the way the harness builds `vsock-vmm` for the KVM host
/// ([`crate::build_workspace_binary`]: its own target directory, once per process, so the
/// `cargo test` that runs this never waits for its own lock). The same binary runs on the
/// machine ([`start_routerd`]) and, shipped with [`crate::GuestRun::binary`], in a KVM host.
pub fn routerd_binary() -> Result<PathBuf, HarnessError> {
    crate::build_workspace_binary("vsock-routerd", "vsock-routerd")
}

/// One VM of a [`start_routerd`] daemon.
#[derive(Clone, Debug)]
pub struct RouterdVm<'a> {
    /// The guest's CID.
    pub cid: u32,
    /// The vhost-user socket the daemon listens on for this VM's QEMU
    /// (`-chardev socket,id=X,path=...` + `-device vhost-user-vsock-device,chardev=X`, with
    /// [`crate::GuestRun::memfd`]).
    pub vhost_socket: &'a Path,
    /// The VM's hybrid socket (`socket=`): host clients `CONNECT <port>\n` here, the guest's
    /// connects to CID 2 port P reach `<hybrid>_P`.
    pub hybrid: &'a Path,
    /// More `--vsock` keys, comma-separated (e.g. `fallback=0,uplink=unix:/tmp/x`), or empty.
    /// The uplink must be `none` (the default added here) or a `unix:DIR` stand-in: a daemon on
    /// the machine never opens AF_VSOCK.
    pub keys: &'a str,
}

/// The handshake budgets of emulated runs (`$VR_VSOCK_TIMEOUTS` in the guests' `vrtest.sh`):
/// a TCG guest on a loaded 2-core machine answers far slower than the device's 2 s defaults.
pub const EMULATED_TIMEOUTS: &str =
    "request_timeout_ms=30000,connect_timeout_ms=30000,handshake_timeout_ms=30000";

/// The `--vsock` value of `vm` for a daemon on the machine: `uplink=none` unless a `unix:`
/// stand-in is given, any other uplink refused.
fn routerd_vsock_arg(vm: &RouterdVm<'_>) -> Result<String, HarnessError> {
    let mut keys: Vec<&str> = vm.keys.split(',').filter(|k| !k.is_empty()).collect();
    match keys.iter().find_map(|k| k.strip_prefix("uplink=")) {
        None => keys.push("uplink=none"),
        Some(u) if u == "none" || u.starts_with("unix:") => {}
        Some(u) => {
            return Err(HarnessError::Setup(format!(
            "start_routerd: uplink={u} would open AF_VSOCK on this machine; use none or unix:DIR"
        )))
        }
    }
    if !keys.iter().any(|k| k.starts_with("request_timeout_ms=")) {
        keys.push(EMULATED_TIMEOUTS);
    }
    Ok(format!(
        "cid={},socket={},vhost-user={},{}",
        vm.cid,
        vm.hybrid.display(),
        vm.vhost_socket.display(),
        keys.join(",")
    ))
}

/// Starts `vsock-routerd` on the machine serving `vms` (siblings of one another), with
/// `--log-level info`, the REST API on `api_socket` if given, `VSOCK_ROUTER_FORBID_AF_VSOCK=1`
/// (whatever the caller's environment says) and every VM's uplink `none` or a `unix:` stand-in
/// (see [`RouterdVm::keys`]); [`EMULATED_TIMEOUTS`] unless the keys set their own. Waits (at
/// most 10 s each) for the vhost-user sockets and the API socket. Log: `log`. The daemon is
/// killed by PID when the guard drops; its `TMPDIR` is the log's directory.
pub fn start_routerd(
    vms: &[RouterdVm<'_>],
    api_socket: Option<&Path>,
    log: &Path,
) -> Result<ProcessGuard, HarnessError> {
    if vms.is_empty() {
        return Err(HarnessError::Setup("start_routerd: no VMs".into()));
    }
    let bin = routerd_binary()?;
    let mut cmd = Command::new(&bin);
    cmd.env("VSOCK_ROUTER_FORBID_AF_VSOCK", "1");
    // The daemon's private registry (for VMs without `registry=`) is made under TMPDIR: beside
    // the log, in the test's own directory, so that the guard's SIGKILL leaves nothing behind
    // in the machine's /tmp.
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.env("TMPDIR", dir);
    }
    for vm in vms {
        cmd.arg("--vsock").arg(routerd_vsock_arg(vm)?);
    }
    if let Some(api) = api_socket {
        cmd.arg("--api-socket").arg(api);
    }
    cmd.args(["--log-level", "info"]);
    let mut guard = ProcessGuard::spawn("vsock-routerd", &mut cmd, log)?;
    let waits = vms.iter().map(|vm| vm.vhost_socket).chain(api_socket);
    for path in waits {
        if !wait_for_path(path, Duration::from_secs(10)) || !guard.is_running() {
            return Err(HarnessError::Setup(format!(
                "vsock-routerd did not create {}:\n{}",
                path.display(),
                guard.log()
            )));
        }
    }
    Ok(guard)
}

/// A number of the `counters` object of a VM's `GET .../vsock` answer (`vsock-routerd`'s or
/// `vsock-vmm`'s JSON, pretty-printed or not), e.g. `"sibling"`.
pub fn api_counter(info: &str, key: &str) -> Option<u64> {
    let compact: String = info.chars().filter(|c| !c.is_whitespace()).collect();
    let counters = &compact[compact.find("\"counters\":{")?..];
    let pat = format!("\"{key}\":");
    let rest = &counters[counters.find(&pat)? + pat.len()..];
    rest[..rest.find([',', '}']).unwrap_or(rest.len())]
        .parse()
        .ok()
}

/// One HTTP/1.1 request to a REST API on the Unix socket `socket` (`vsock-routerd`'s or
/// `vsock-vmm`'s): `Connection: close`, an optional JSON body, 10 s read and write timeouts.
/// Returns the status code and the body.
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let body = body.unwrap_or("");
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        raw.push_str("Content-Type: application/json\r\n");
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    s.write_all(raw.as_bytes())
        .map_err(|e| format!("{method} {path}: write: {e}"))?;
    let mut resp = Vec::new();
    s.take(4 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| format!("{method} {path}: read: {e}"))?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: no HTTP header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status in {head:?}"))?;
    Ok((status, rest.to_string()))
}

#[cfg(test)]
mod routerd_tests {
    use super::*;

    #[test]
    fn routerd_uplink_is_none_or_a_stand_in() {
        let (v, h) = (Path::new("/d/v.vhost"), Path::new("/d/v.vsock"));
        let vm = |keys| RouterdVm {
            cid: 3,
            vhost_socket: v,
            hybrid: h,
            keys,
        };
        assert_eq!(
            routerd_vsock_arg(&vm("")).unwrap(),
            format!(
                "cid=3,socket=/d/v.vsock,vhost-user=/d/v.vhost,uplink=none,{EMULATED_TIMEOUTS}"
            )
        );
        assert!(routerd_vsock_arg(&vm("fallback=1,uplink=unix:/d/up"))
            .unwrap()
            .contains(",fallback=1,uplink=unix:/d/up,request_timeout_ms=30000,"));
        assert!(routerd_vsock_arg(&vm("request_timeout_ms=5"))
            .unwrap()
            .ends_with(",request_timeout_ms=5,uplink=none"));
        for bad in [
            "uplink=/dev/vsock",
            "uplink=vsock",
            "fallback=1,uplink=vsock:/x",
        ] {
            assert!(routerd_vsock_arg(&vm(bad)).is_err(), "{bad}");
        }
    }
}
