//! Building and locating the images: a thin wrapper around
//! `integration/images/build-all.sh` and the `artifacts.env` it prints.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::HarnessError;

/// Upper bound for a cold `build-all.sh` (apt installs + kernel build).
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Upper bound for one `cargo build` of a binary the guests get.
const CARGO_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A build step that takes longer than this (a cold build, not a cache check) says so.
const QUIET_STEP: Duration = Duration::from_secs(3);

/// Writes `text` to stderr past libtest's output capture: build progress shows in tests too.
fn say(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
}

/// Copies the lines a build script appends to its log file to stderr as they come (a file, not
/// a pipe: the script's children may keep a pipe open after the script is gone).
struct LogFollower {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogFollower {
    fn start(path: PathBuf) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            let mut at = 0usize;
            loop {
                // Once told to stop, one last read takes what is left.
                let last = stop.load(Ordering::Acquire);
                let text = std::fs::read(&path).unwrap_or_default();
                if let Some(end) = text[at.min(text.len())..].iter().rposition(|&b| b == b'\n') {
                    let end = at + end + 1;
                    say(&String::from_utf8_lossy(&text[at..end]));
                    at = end;
                }
                if last {
                    if at < text.len() {
                        say(&format!("{}\n", String::from_utf8_lossy(&text[at..])));
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        LogFollower {
            done,
            thread: Some(thread),
        }
    }

    /// Prints what is left and stops the thread; idempotent (also run on drop).
    fn finish(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LogFollower {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Paths and facts from `$VR_CACHE/artifacts.env`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifacts {
    /// The cache directory (`$VSOCK_ROUTER_CACHE`, default `~/.cache/vsock-router`).
    pub cache_dir: PathBuf,
    /// Inner guest kernel, ELF with a PVH entry.
    pub inner_vmlinux: PathBuf,
    /// Inner guest initramfs, uncompressed newc cpio.
    pub inner_initramfs: PathBuf,
    /// Output directory of `build-host-kernel.sh` (has `modules/`).
    pub host_kernel_dir: PathBuf,
    /// KVM host kernel to boot: the extracted ELF vmlinux, else the bzImage.
    pub host_kernel: PathBuf,
    /// KVM host kernel release, e.g. `6.1.0-56-amd64`.
    pub host_kver: String,
    /// Static helper programs put on the KVM host's PATH (e.g. `vr-kvmcheck`).
    pub tools_dir: PathBuf,
    /// Host TSC frequency for `tsc_early_khz=`.
    pub tsc_khz: u64,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
}

/// `integration/images/` in this checkout.
pub fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("images")
}

/// True when this machine's CPU has hardware virtualization (`vmx` or `svm`
/// in `/proc/cpuinfo`). Only then could `vsock-vmm` run Linux guests directly
/// on the machine's `/dev/kvm`; everywhere else the tests nest it inside a
/// QEMU TCG "KVM host".
pub fn host_has_hardware_kvm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| cpuinfo_has_virt(&s))
        .unwrap_or(false)
}

fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

/// Parses the `KEY=VALUE` lines of `artifacts.env`.
pub fn parse_artifacts_env(text: &str) -> Result<Artifacts, HarnessError> {
    let get = |key: &str| -> Option<String> {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .next_back()
    };
    let need = |key: &str| -> Result<String, HarnessError> {
        get(key)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| HarnessError::Setup(format!("artifacts.env lacks {key}:\n{text}")))
    };
    let host_kernel = match get("VR_HOST_VMLINUX").filter(|v| !v.is_empty()) {
        Some(v) => v,
        None => need("VR_HOST_BZIMAGE")?,
    };
    let tsc = need("VR_TSC_KHZ")?;
    Ok(Artifacts {
        cache_dir: need("VR_CACHE")?.into(),
        inner_vmlinux: need("VR_INNER_VMLINUX")?.into(),
        inner_initramfs: need("VR_INNER_INITRAMFS")?.into(),
        host_kernel_dir: need("VR_HOST_KERNEL_DIR")?.into(),
        host_kernel: host_kernel.into(),
        host_kver: need("VR_HOST_KVER")?,
        tools_dir: need("VR_TOOLS_DIR")?.into(),
        tsc_khz: tsc
            .parse()
            .map_err(|_| HarnessError::Setup(format!("VR_TSC_KHZ is not a number: {tsc}")))?,
        qemu: need("VR_QEMU")?.into(),
    })
}

fn qemu_installed() -> bool {
    crate::process::find_in_path("qemu-system-x86_64").is_some()
}

/// Runs `build-all.sh` (builds only what is missing from the cache) and
/// returns the artifacts. The first call in a process does the work; later
/// calls return the same result. Returns [`HarnessError::Unavailable`] when
/// the platform cannot run here at all (not x86_64 Linux, or QEMU missing and
/// not installable), [`HarnessError::Build`] when a build failed.
pub fn ensure_artifacts() -> Result<&'static Artifacts, HarnessError> {
    static ARTIFACTS: OnceLock<Result<Artifacts, HarnessError>> = OnceLock::new();
    ARTIFACTS
        .get_or_init(build_all)
        .as_ref()
        .map_err(Clone::clone)
}

fn build_all() -> Result<Artifacts, HarnessError> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(HarnessError::Unavailable(
            "the integration platform needs x86_64 Linux".into(),
        ));
    }
    let script = images_dir().join("build-all.sh");
    let started = Instant::now();
    let log = tempfile::NamedTempFile::new()?;
    // Its progress lines ("[images] ...": what is being built, for how long) show as they come;
    // a warm run prints none.
    let mut follower = LogFollower::start(log.path().to_path_buf());
    let mut announced = false;
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.reopen()?)
        .spawn()
        .map_err(|e| HarnessError::Setup(format!("cannot run {}: {e}", script.display())))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if !announced && started.elapsed() > QUIET_STEP {
            announced = true;
            say(&format!(
                "[vsock-integration] building the guest images that are not cached yet ({}; \
                 from scratch about 7 minutes on 2 cores: apt packages, inner kernel, host \
                 kernel)\n",
                script.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    follower.finish();
    let stdout = reader.join().unwrap_or_default();
    let stderr = std::fs::read_to_string(log.path()).unwrap_or_default();
    match status {
        _ if !qemu_installed() => Err(HarnessError::Unavailable(format!(
            "qemu-system-x86_64 is missing and build-all.sh could not install it:\n{stderr}"
        ))),
        Some(s) if s.success() => {
            if announced {
                say(&format!(
                    "[vsock-integration] guest images ready after {:.0} s\n",
                    started.elapsed().as_secs_f64()
                ));
            }
            parse_artifacts_env(&stdout)
        }
        Some(s) => Err(HarnessError::Build {
            what: format!("integration artifacts ({}: {s})", script.display()),
            log: stderr,
        }),
        None => Err(HarnessError::Build {
            what: format!(
                "integration artifacts (killed after {} s)",
                BUILD_TIMEOUT.as_secs()
            ),
            log: stderr,
        }),
    }
}

/// Builds `bin` of workspace package `package` in release mode and returns
/// its path, to ship into the KVM host (e.g. `vsock-vmm`). Uses its own
/// target directory, `<workspace>/target/vr-integration` (or
/// `$CARGO_TARGET_DIR/vr-integration`), so it never waits for the lock of
/// the `cargo test` that runs it; incremental after the first build. Built
/// once per process.
pub fn build_workspace_binary(package: &str, bin: &str) -> Result<PathBuf, HarnessError> {
    // (package, bin) -> result; the lock is held while building, so builds
    // never run in parallel.
    type Built = HashMap<(String, String), Result<PathBuf, HarnessError>>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    built
        .entry((package.to_string(), bin.to_string()))
        .or_insert_with(|| cargo_build(package, bin))
        .clone()
}

/// `vr-socat` (`integration/src/bin/vr-socat.rs`), built as a static executable: the harness
/// puts it on `PATH` in every KVM host and inner guest (`/vr/bin`), where the scenarios use it
/// for their AF_VSOCK connects with a raised kernel connect timeout. Built once per process,
/// into `<target>/vr-integration-static`.
pub fn guest_helper() -> Result<&'static Path, HarnessError> {
    static HELPER: OnceLock<Result<PathBuf, HarnessError>> = OnceLock::new();
    HELPER
        .get_or_init(|| cargo_build_static("vsock-integration", "vr-socat"))
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

fn workspace_and_target(subdir: &str) -> (PathBuf, PathBuf) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ has a parent")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join(subdir);
    (workspace, target)
}

fn cargo_build(package: &str, bin: &str) -> Result<PathBuf, HarnessError> {
    let (workspace, target) = workspace_and_target("vr-integration");
    let mut cmd = cargo_command(&workspace, package, bin, &target);
    run_cargo(&mut cmd, package, bin, target.join("release").join(bin))
}

/// As [`cargo_build`], statically linked (glibc's static libraries, like `vsock-connect`'s
/// static build), in a target directory of its own so the flags never force a rebuild
/// elsewhere.
fn cargo_build_static(package: &str, bin: &str) -> Result<PathBuf, HarnessError> {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let (workspace, target) = workspace_and_target("vr-integration-static");
    let mut cmd = cargo_command(&workspace, package, bin, &target);
    cmd.args(["--target", TRIPLE])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    run_cargo(
        &mut cmd,
        package,
        bin,
        target.join(TRIPLE).join("release").join(bin),
    )
}

fn cargo_command(workspace: &Path, package: &str, bin: &str, target: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            package,
            "--bin",
            bin,
            "--target-dir",
        ])
        .arg(target)
        .stdin(Stdio::null());
    cmd
}

/// Runs a `cargo build`; says what it builds once it takes longer than an up-to-date check.
fn run_cargo(
    cmd: &mut Command,
    package: &str,
    bin: &str,
    path: PathBuf,
) -> Result<PathBuf, HarnessError> {
    let started = Instant::now();
    let log = tempfile::NamedTempFile::new()?;
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(log.reopen()?)
        .spawn()
        .map_err(|e| HarnessError::Setup(format!("cannot run cargo: {e}")))?;
    let mut announced = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CARGO_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Build {
                what: format!(
                    "{package}/{bin} (killed after {} s)",
                    CARGO_TIMEOUT.as_secs()
                ),
                log: std::fs::read_to_string(log.path()).unwrap_or_default(),
            });
        }
        if !announced && started.elapsed() > QUIET_STEP {
            announced = true;
            say(&format!(
                "[vsock-integration] compiling {bin} (cargo build --release -p {package} --bin \
                 {bin}) ...\n"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        return Err(HarnessError::Build {
            what: format!("{package}/{bin}"),
            log: std::fs::read_to_string(log.path()).unwrap_or_default(),
        });
    }
    if announced {
        say(&format!(
            "[vsock-integration] {bin} compiled in {:.0} s\n",
            started.elapsed().as_secs_f64()
        ));
    }
    if !path.is_file() {
        return Err(HarnessError::Setup(format!(
            "cargo built {package} but {} is missing",
            path.display()
        )));
    }
    Ok(path)
}

/// For tests: the artifacts, or `None` after printing a loud
/// `SKIPPED: <test>: <reason>` line when the platform is unavailable here
/// or `VR_INTEGRATION=skip` is set. Set `VR_INTEGRATION=require` to turn
/// a skip into a panic (for CI). Panics on build errors.
pub fn artifacts_or_skip(test: &str) -> Option<&'static Artifacts> {
    let mode = std::env::var("VR_INTEGRATION").unwrap_or_default();
    let reason = if mode == "skip" {
        "VR_INTEGRATION=skip".to_string()
    } else {
        match ensure_artifacts() {
            Ok(a) => {
                let line = format!("[vsock-integration] {test}: platform: {}\n", platform());
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                return Some(a);
            }
            Err(HarnessError::Unavailable(why)) => why,
            Err(e) => panic!("{test}: {e}"),
        }
    };
    if mode == "require" {
        panic!("{test}: integration platform required (VR_INTEGRATION=require) but unavailable: {reason}");
    }
    // Written to the real stderr, past libtest's output capture, so a skip
    // shows even when the test "passes" without --nocapture.
    let line = format!("SKIPPED: {test}: {reason}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    None
}

/// Which platforms run the real-guest scenarios here, for the test logs.
pub fn platform() -> &'static str {
    if host_has_hardware_kvm() {
        "QEMU TCG KVM host, and (for the `*_on_this_machine` tests) vsock-vmm directly on this \
         machine's hardware KVM"
    } else {
        "QEMU TCG KVM host, vsock-vmm on its (emulated-SVM) KVM; no hardware virtualization here"
    }
}

/// For the direct variants of the scenarios ([`crate::GuestRun::machine`]): the artifacts when
/// this machine has hardware virtualization; otherwise `None` after a loud `SKIPPED:` line
/// (kvm_pvm and other software KVMs cannot run a Linux guest's user space, so there the
/// scenario runs only in the TCG KVM host, its other variant).
pub fn hardware_kvm_or_skip(test: &str) -> Option<&'static Artifacts> {
    if !host_has_hardware_kvm() {
        let line = format!(
            "SKIPPED: {test}: no hardware virtualization (vmx/svm) on this machine; the same \
             scenario runs nested in the TCG KVM host instead\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        return None;
    }
    artifacts_or_skip(test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_file_and_prefers_elf_kernel() {
        let env = "VR_CACHE=/c\nVR_INNER_VMLINUX=/c/i/vmlinux\nVR_INNER_INITRAMFS=/c/i.cpio\n\
                   VR_HOST_KERNEL_DIR=/c/h\nVR_HOST_VMLINUX=/c/h/vmlinux\nVR_HOST_BZIMAGE=/c/h/bzImage\n\
                   VR_HOST_KVER=6.1.0-56-amd64\nVR_TOOLS_DIR=/c/t\nVR_TSC_KHZ=2596096\nVR_QEMU=/usr/bin/q\n";
        let a = parse_artifacts_env(env).unwrap();
        assert_eq!(a.host_kernel, PathBuf::from("/c/h/vmlinux"));
        assert_eq!(a.tsc_khz, 2596096);
        let a =
            parse_artifacts_env(&env.replace("VR_HOST_VMLINUX=/c/h/vmlinux", "VR_HOST_VMLINUX="))
                .unwrap();
        assert_eq!(a.host_kernel, PathBuf::from("/c/h/bzImage"));
        assert!(parse_artifacts_env("VR_CACHE=/c\n").is_err());
    }

    #[test]
    fn detects_virtualization_flags() {
        assert!(cpuinfo_has_virt(
            "processor: 0\nflags\t\t: fpu vme svm lm\n"
        ));
        assert!(cpuinfo_has_virt("flags : fpu vmx\n"));
        assert!(!cpuinfo_has_virt("flags : fpu vme lm\nbugs : svmx\n"));
    }
}
