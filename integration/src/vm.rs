//! Starting guests under QEMU TCG and collecting their verdicts.
//!
//! Two kinds of guest:
//! - the **KVM host**: a stock Debian kernel with `kvm-amd` on emulated SVM;
//!   its initramfs (assembled per run by `make-host-initramfs.sh`) carries the
//!   scenario, extra binaries such as `vsock-vmm`, and the inner guest images
//!   under `/vr/inner/`;
//! - the **inner guest** booted directly by QEMU (to test the inner images
//!   themselves; in real tests `vsock-vmm` boots it inside the KVM host).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::artifacts::{guest_helper, images_dir, Artifacts};
use crate::console::{parse_console, platform_fault_lines, ConsoleReport};
use crate::inner_faults::inner_triple_faults;
use crate::HarnessError;

/// Linux's x86 command-line limit (COMMAND_LINE_SIZE), including our options.
const CMDLINE_MAX: usize = 2048;
/// Firmware a microvm QEMU loads for a PVH `-kernel` boot.
/// (`qboot.rom` is what microvm loads with `acpi=off`.)
const NESTED_QEMU_FIRMWARE: [&str; 4] = [
    "bios-microvm.bin",
    "qboot.rom",
    "pvh.bin",
    "linuxboot_dma.bin",
];
/// How long QEMU may take to exit after `VRTEST-DONE` before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// After a kernel fault shows on the console, how long the rest of its report may take to
/// arrive before QEMU is killed.
const FAULT_GRACE: Duration = Duration::from_secs(2);
/// A KVM host whose console stays silent this long after its boot line (from which its `/init`
/// prints a heartbeat, [`crate::console::HEARTBEAT`], every 30 s) has hung: its kernel no
/// longer runs the shell loop that prints it. Seen in two clean-clone CI runs: the console
/// stopped right after the module loads while QEMU spun at 100-190 % CPU for 14 and 27
/// minutes, with no kernel message.
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(300);
/// Where the guests find `vr-socat` (on their `PATH`).
const HELPER_GUEST_PATH: &str = "vr/bin/vr-socat";

/// Which guest a [`GuestRun`] boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// Stock Debian kernel with KVM (emulated AMD SVM) and our initramfs.
    KvmHost,
    /// The inner guest kernel + initramfs, booted directly by QEMU TCG.
    InnerDirect,
    /// No VM: a KVM-host scenario run directly on this machine (see `integration/src/machine.rs`), for
    /// machines with hardware virtualization, where `vsock-vmm` boots the inner guest on the
    /// machine's own `/dev/kvm`.
    Machine,
}

#[derive(Clone, Debug)]
enum Scenario {
    Script(String),
    Named(String),
}

/// Description of one guest run; build it, then [`GuestRun::run`] or
/// [`GuestRun::spawn`].
///
/// The scenario is a busybox `sh` script, sourced by the guest's `/init`
/// with the helpers of `images/rootfs/vrtest.sh` (`vr_pass`, `vr_fail`,
/// `vr_check`, `vr_relay`, ...). It reports `VRTEST <name> PASS|FAIL|SKIP`
/// lines; `/init` adds `VRTEST-DONE rc=<exit code>` and reboots, which ends
/// QEMU.
#[derive(Clone, Debug)]
pub struct GuestRun {
    name: String,
    kind: GuestKind,
    scenario: Scenario,
    binaries: Vec<PathBuf>,
    files: Vec<(PathBuf, String)>,
    qemu_args: Vec<String>,
    modules: Vec<String>,
    memfd: bool,
    append: String,
    memory: String,
    smp: u32,
    timeout: Duration,
    heartbeat_silence: Duration,
    workdir: Option<PathBuf>,
}

impl GuestRun {
    fn new(kind: GuestKind, scenario: Scenario) -> Self {
        // The KVM host's limit is a bound for a run under emulation on a loaded machine, not
        // its expected time: a reference-QEMU run that takes 11 s alone took over 180 s beside
        // other TCG guests and stress-ng (1 Dec 2026). Faults end a run at once anyway.
        let (memory, smp, timeout) = match kind {
            GuestKind::KvmHost => ("2G", 2, Duration::from_secs(600)),
            GuestKind::InnerDirect => ("256M", 1, Duration::from_secs(60)),
            GuestKind::Machine => ("-", 0, Duration::from_secs(180)),
        };
        GuestRun {
            name: format!("{kind:?}"),
            kind,
            scenario,
            binaries: Vec::new(),
            files: Vec::new(),
            qemu_args: Vec::new(),
            modules: vec!["kvm".to_string()],
            memfd: false,
            append: String::new(),
            memory: memory.to_string(),
            smp,
            timeout,
            heartbeat_silence: HEARTBEAT_SILENCE,
            workdir: None,
        }
    }

    /// A KVM host run with `script` as its scenario (`/vr/scenario.sh`).
    /// Defaults: 2 GiB, 2 vCPUs, module set `kvm`, 600 s limit.
    pub fn kvm_host(script: impl Into<String>) -> Self {
        Self::new(GuestKind::KvmHost, Scenario::Script(script.into()))
    }

    /// A KVM-host scenario run directly on this machine instead of in the TCG KVM host: same
    /// script, helpers and layout (inner images at `$VR_INNER/`), a private `/tmp`, binaries
    /// from [`GuestRun::binary`] on `PATH`. Only meaningful with hardware virtualization
    /// ([`crate::host_has_hardware_kvm`]); scripts that mention AF_VSOCK are refused.
    pub fn machine(script: impl Into<String>) -> Self {
        Self::new(GuestKind::Machine, Scenario::Script(script.into()))
    }

    /// The inner guest booted directly under QEMU with `script` as its
    /// scenario. The script travels base64-encoded on the kernel command
    /// line (`vr.cmd=`), so it must stay under about 1400 bytes.
    /// Defaults: 256 MiB, 1 vCPU, 60 s limit.
    pub fn inner_direct(script: impl Into<String>) -> Self {
        Self::new(GuestKind::InnerDirect, Scenario::Script(script.into()))
    }

    /// The inner guest booted directly under QEMU running a scenario shipped
    /// in its initramfs (`images/inner-scenarios/<name>.sh`).
    pub fn inner_direct_named(name: &str) -> Self {
        Self::new(GuestKind::InnerDirect, Scenario::Named(name.to_string()))
    }

    /// Name used in messages (e.g. the test's name).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// KVM host only: add an executable as `/vr/bin/<file name>` (on PATH),
    /// with the shared libraries `ldd` lists.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binaries.push(path.into());
        self
    }

    /// KVM host only: ship the machine's `qemu-system-x86_64` (with its
    /// libraries and the microvm firmware) so the scenario can boot the inner
    /// guest on the KVM host's KVM with `vr_qemu_inner` — a reference VMM to
    /// compare `vsock-vmm` with. Adds about 45 MB to the initramfs. QEMU-only
    /// devices such as kernel vhost-vsock then run inside the TCG guest,
    /// never on the machine itself.
    pub fn nested_qemu(mut self) -> Self {
        self.binaries
            .push(PathBuf::from("/usr/bin/qemu-system-x86_64"));
        for fw in NESTED_QEMU_FIRMWARE {
            let path = format!("/usr/share/qemu/{fw}");
            self.files.push((PathBuf::from(&path), path));
        }
        self
    }

    /// KVM host only: add a file at the absolute path `dest` in the guest.
    pub fn file(mut self, src: impl Into<PathBuf>, dest: &str) -> Self {
        self.files.push((src.into(), dest.to_string()));
        self
    }

    /// Extra QEMU arguments. `{dir}` in an argument is replaced by the run's
    /// working directory (see [`GuestRun::workdir`]).
    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// KVM host only: module sets `/init` loads, e.g. `["kvm", "vsock"]`
    /// (sets: `kvm`, `vsock`, `vhost-vsock`, `vsock-loopback`; default `kvm`).
    /// Each set reports `VRTEST host-modules-<set> PASS|FAIL`.
    pub fn modules(mut self, sets: &[&str]) -> Self {
        self.modules = sets.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Back guest RAM with a shared memfd (needed by vhost-user devices).
    pub fn memfd(mut self, on: bool) -> Self {
        self.memfd = on;
        self
    }

    /// Extra kernel command-line options.
    pub fn append(mut self, args: &str) -> Self {
        if !self.append.is_empty() {
            self.append.push(' ');
        }
        self.append.push_str(args);
        self
    }

    /// Guest RAM in QEMU syntax (e.g. `"1G"`).
    pub fn memory(mut self, size: &str) -> Self {
        self.memory = size.to_string();
        self
    }

    /// Number of vCPUs.
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Limit from QEMU's start to `VRTEST-DONE`. The guest's own watchdog
    /// (`vr.timeout=`) is set 10 s shorter so a hung scenario still reports.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// How long the KVM host's console may stay silent after a heartbeat before the run ends
    /// as the platform's fault (default 300 s; shorter only in the harness's own test).
    pub fn heartbeat_silence(mut self, limit: Duration) -> Self {
        self.heartbeat_silence = limit;
        self
    }

    /// Use `dir` (which must exist and is left in place) for the console log,
    /// the initramfs and QEMU's output instead of a fresh temporary directory
    /// that is removed afterwards. Useful to put vhost-user sockets next to them.
    pub fn workdir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Boots the guest, waits for the scenario and checks the verdict: every
    /// name in `required` must be PASS, no check may FAIL, and the scenario
    /// must exit 0. Errors carry the whole console log. A platform fault (the KVM host's kernel
    /// faulted) reruns the scenario once ([`crate::rerun_on_platform_fault`]).
    pub fn run(
        &self,
        artifacts: &Artifacts,
        required: &[&str],
    ) -> Result<RunOutcome, HarnessError> {
        crate::faults::rerun_on_platform_fault(&self.name, || {
            let outcome = self.spawn(artifacts)?.wait()?;
            outcome.check(required)?;
            Ok(outcome)
        })
    }

    /// Boots the guest and returns at once; QEMU is killed when the returned
    /// [`RunningVm`] is dropped.
    pub fn spawn(&self, artifacts: &Artifacts) -> Result<RunningVm, HarnessError> {
        // A machine run hides the machine's /tmp behind its own: its files live elsewhere.
        let parent = match self.kind {
            GuestKind::Machine => PathBuf::from("/var/tmp"),
            _ => std::env::temp_dir(),
        };
        let (tempdir, dir) = match &self.workdir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("vr-integration.")
                    .tempdir_in(&parent)?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        if self.kind == GuestKind::Machine {
            return self.spawn_on_machine(artifacts, tempdir, dir);
        }
        let guest_timeout = self.timeout.as_secs().saturating_sub(10).max(5);
        let mut append = format!("vr.timeout={guest_timeout}");
        let (kernel, initrd) = match self.kind {
            GuestKind::KvmHost => {
                let Scenario::Script(script) = &self.scenario else {
                    return Err(HarnessError::Setup("KVM host runs take a script".into()));
                };
                let initrd = dir.join("host-initramfs.cpio");
                let inner = inner_initramfs_with_helper(artifacts, &dir)?;
                self.make_host_initramfs(artifacts, &dir, script, &inner, &initrd)?;
                (artifacts.host_kernel.clone(), initrd)
            }
            GuestKind::Machine => unreachable!("handled above"),
            GuestKind::InnerDirect => {
                if !self.binaries.is_empty() || !self.files.is_empty() {
                    return Err(HarnessError::Setup(
                        "binaries/files are only supported for KVM host runs".into(),
                    ));
                }
                match &self.scenario {
                    Scenario::Script(s) => {
                        append.push_str(&format!(" vr.cmd={}", base64(s.as_bytes())))
                    }
                    Scenario::Named(n) => append.push_str(&format!(" vr.scenario={n}")),
                }
                append.push_str(" reboot=t");
                (
                    artifacts.inner_vmlinux.clone(),
                    artifacts.inner_initramfs.clone(),
                )
            }
        };
        if !self.append.is_empty() {
            append.push(' ');
            append.push_str(&self.append);
        }
        // run-kvm-host.sh adds about 100 bytes of its own options.
        if append.len() + 128 > CMDLINE_MAX {
            return Err(HarnessError::Setup(format!(
                "{}: kernel command line too long ({} bytes); ship a named scenario instead",
                self.name,
                append.len()
            )));
        }

        let console_path = dir.join("console.log");
        let qemu_log_path = dir.join("qemu.log");
        File::create(&console_path)?;
        let qemu_log = File::create(&qemu_log_path)?;
        let dir_str = dir.to_string_lossy();
        let mut cmd = Command::new("bash");
        cmd.arg(images_dir().join("run-kvm-host.sh"))
            .arg("--kernel")
            .arg(&kernel)
            .arg("--initrd")
            .arg(&initrd)
            .arg("--serial-log")
            .arg(&console_path)
            .args(["--mem", &self.memory, "--smp", &self.smp.to_string()])
            .args(["--modules", &self.modules.join(",")])
            .args(["--append", &append])
            .env("VR_TSC_KHZ", artifacts.tsc_khz.to_string());
        if self.memfd {
            cmd.arg("--memfd");
        }
        // The human monitor, asked what the virtual CPUs do if the console goes silent.
        cmd.arg("--monitor")
            .arg(dir.join(crate::probe::MONITOR_SOCKET));
        cmd.arg("--")
            .args(self.qemu_args.iter().map(|a| a.replace("{dir}", &dir_str)))
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log);
        // The script execs QEMU, which so dies with the test thread.
        crate::process::kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::Setup(format!("cannot start run-kvm-host.sh: {e}")))?;
        Ok(self.running(artifacts, child, dir, tempdir))
    }

    /// The handle of a run just started in `dir` (console and QEMU logs at their usual names).
    fn running(
        &self,
        artifacts: &Artifacts,
        child: Child,
        dir: PathBuf,
        tempdir: Option<tempfile::TempDir>,
    ) -> RunningVm {
        let child_cpu = crate::probe::cpu_time(child.id());
        RunningVm {
            name: self.name.clone(),
            child: Some(child),
            console_path: dir.join("console.log"),
            qemu_log_path: dir.join("qemu.log"),
            dir,
            _tempdir: tempdir,
            started: Instant::now(),
            timeout: self.timeout,
            heartbeat_silence: self.heartbeat_silence,
            // A machine run's "console" is its script's output, not a kernel's.
            detect_faults: self.kind != GuestKind::Machine,
            done_at: None,
            fault_at: None,
            console_len: 0,
            grew_at: Instant::now(),
            cpu_at_growth: child_cpu,
            silence: Vec::new(),
            inner_vmlinux: artifacts.inner_vmlinux.clone(),
        }
    }

    fn spawn_on_machine(
        &self,
        artifacts: &Artifacts,
        tempdir: Option<tempfile::TempDir>,
        dir: PathBuf,
    ) -> Result<RunningVm, HarnessError> {
        let Scenario::Script(script) = &self.scenario else {
            return Err(HarnessError::Setup("machine runs take a script".into()));
        };
        if dir.starts_with("/tmp") {
            return Err(HarnessError::Setup(format!(
                "{}: a machine run's directory cannot be under /tmp, which it hides",
                self.name
            )));
        }
        if !self.files.is_empty() || !self.qemu_args.is_empty() || self.memfd {
            return Err(HarnessError::Setup(format!(
                "{}: files, QEMU arguments and memfd need a VM, not a machine run",
                self.name
            )));
        }
        let console_path = dir.join("console.log");
        let qemu_log_path = dir.join("qemu.log");
        File::create(&qemu_log_path)?;
        // The inner guest gets vr-socat; the machine-side script has no use for it (it never
        // opens AF_VSOCK).
        let inner = inner_initramfs_with_helper(artifacts, &dir)?;
        let child = crate::machine::spawn(
            &self.name,
            script,
            &self.binaries,
            artifacts,
            &inner,
            &dir,
            &console_path,
        )?;
        Ok(self.running(artifacts, child, dir, tempdir))
    }

    fn make_host_initramfs(
        &self,
        artifacts: &Artifacts,
        dir: &Path,
        script: &str,
        inner_initramfs: &Path,
        out: &Path,
    ) -> Result<(), HarnessError> {
        let scenario = dir.join("scenario.sh");
        std::fs::write(&scenario, script)?;
        let mut cmd = Command::new("bash");
        cmd.arg(images_dir().join("make-host-initramfs.sh"))
            .arg("-o")
            .arg(out)
            .arg("-s")
            .arg(&scenario)
            .arg("--inner-kernel")
            .arg(&artifacts.inner_vmlinux)
            .arg("--inner-initramfs")
            .arg(inner_initramfs)
            .arg("--host-kernel-dir")
            .arg(&artifacts.host_kernel_dir)
            .arg("--tools-dir")
            .arg(&artifacts.tools_dir)
            .env("TMPDIR", dir);
        for b in self
            .binaries
            .iter()
            .map(PathBuf::as_path)
            .chain([guest_helper()?])
        {
            cmd.arg("-b").arg(b);
        }
        for (src, dest) in &self.files {
            cmd.arg("-f").arg(format!("{}:{dest}", src.display()));
        }
        let out = cmd.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(HarnessError::Build {
                what: format!("{}: KVM host initramfs", self.name),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }
}

/// `dir/inner-initramfs.cpio`: the cached inner guest image with `vr-socat` added as
/// `/vr/bin/vr-socat`, for `vsock-vmm` (or a nested QEMU) to boot.
fn inner_initramfs_with_helper(artifacts: &Artifacts, dir: &Path) -> Result<PathBuf, HarnessError> {
    let helper = std::fs::read(guest_helper()?)?;
    let out = dir.join("inner-initramfs.cpio");
    crate::cpio::extend_initramfs(
        &artifacts.inner_initramfs,
        &[(HELPER_GUEST_PATH, &helper)],
        &out,
    )?;
    Ok(out)
}

/// A QEMU process that is killed (by PID) and reaped when this is dropped;
/// a temporary working directory is removed then too.
#[derive(Debug)]
pub struct RunningVm {
    name: String,
    child: Option<Child>,
    dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    console_path: PathBuf,
    qemu_log_path: PathBuf,
    started: Instant,
    timeout: Duration,
    detect_faults: bool,
    done_at: Option<Instant>,
    fault_at: Option<Instant>,
    /// The console's length at the last look, and when it last grew.
    console_len: usize,
    grew_at: Instant,
    /// The limit of [`GuestRun::heartbeat_silence`].
    heartbeat_silence: Duration,
    /// QEMU's CPU time when the console last grew (see [`crate::probe`]).
    cpu_at_growth: Option<Duration>,
    /// Set when the console went silent past its heartbeat: what was seen of QEMU then.
    silence: Vec<String>,
    /// The inner guests' kernel, to locate their triple faults.
    inner_vmlinux: PathBuf,
}

impl RunningVm {
    /// QEMU's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The run's working directory (console log, initramfs, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the serial console log.
    pub fn console_path(&self) -> &Path {
        &self.console_path
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console_path)
    }

    /// The results printed so far.
    pub fn report(&self) -> ConsoleReport {
        parse_console(&self.console())
    }

    /// Polls (bounded by `limit`) until a `VRTEST` result named `name` appears;
    /// returns false on timeout or when QEMU has exited.
    pub fn wait_for_result(&mut self, name: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.report().results.contains_key(name) {
                return true;
            }
            if self.exited() {
                return self.report().results.contains_key(name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Waits until the guest prints `VRTEST-DONE` (then up to 10 s more for
    /// QEMU to exit) or QEMU exits, bounded by the run's time limit counted
    /// from the start. Does not judge the results: see [`RunOutcome::check`].
    /// A kernel fault on the console (see [`crate::is_kernel_fault_line`]) ends the run at once
    /// with [`HarnessError::PlatformFault`].
    /// With `VR_SHOW_CONSOLE` set, prints the whole console to stderr.
    pub fn wait(mut self) -> Result<RunOutcome, HarnessError> {
        loop {
            if let Some(result) = self.poll()? {
                return result;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for every run of `vms` (guests that work together) as [`RunningVm::wait`] does,
    /// all at once; the first error (a platform fault, a timeout, QEMU's exit) ends and kills
    /// the others and is returned. The outcomes are in the order of `vms`.
    pub fn wait_all(mut vms: Vec<RunningVm>) -> Result<Vec<RunOutcome>, HarnessError> {
        let mut outcomes: Vec<Option<RunOutcome>> = vms.iter().map(|_| None).collect();
        loop {
            for (vm, slot) in vms.iter_mut().zip(outcomes.iter_mut()) {
                if slot.is_some() {
                    continue;
                }
                match vm.poll()? {
                    None => {}
                    Some(Ok(outcome)) => *slot = Some(outcome),
                    Some(Err(e)) => {
                        vms.iter_mut().for_each(RunningVm::kill);
                        return Err(e);
                    }
                }
            }
            if outcomes.iter().all(Option::is_some) {
                return Ok(outcomes.into_iter().flatten().collect());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One look at the run: `None` while it goes on, else how it ended (QEMU is then killed).
    fn poll(&mut self) -> Result<Option<Result<RunOutcome, HarnessError>>, HarnessError> {
        let child = self
            .child
            .as_mut()
            .expect("child present until the run ends");
        let status = child.try_wait()?;
        let now = Instant::now();
        let console = self.console();
        if console.len() != self.console_len {
            self.console_len = console.len();
            self.grew_at = now;
            self.cpu_at_growth = self.pid().and_then(crate::probe::cpu_time);
        }
        if self.detect_faults
            && self.fault_at.is_none()
            && self.done_at.is_none()
            && now.duration_since(self.grew_at) > self.heartbeat_silence
            && console.contains(crate::console::HEARTBEAT_FROM)
        {
            let line = format!(
                "{}: the KVM host printed nothing for {} s, not even its heartbeat (every {} s): \
                 its kernel hung",
                self.name,
                self.heartbeat_silence.as_secs(),
                crate::console::HEARTBEAT_SECS
            );
            eprintln!(
                "[vsock-integration] {}: the platform faulted after {:.1} s, ending the run: {line}",
                self.name,
                self.started.elapsed().as_secs_f64()
            );
            self.silence = vec![line];
            self.silence.extend(self.probe_silence(now));
            self.fault_at = Some(now);
        }
        if self.detect_faults && self.fault_at.is_none() {
            if let Some(first) = platform_fault_lines(&console).first() {
                self.fault_at = Some(now);
                let line = format!(
                    "[vsock-integration] {}: the platform faulted after {:.1} s, ending the run: \
                     {first}\n",
                    self.name,
                    self.started.elapsed().as_secs_f64()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
        }
        if let Some(at) = self.fault_at {
            if status.is_none() && now.duration_since(at) < FAULT_GRACE {
                return Ok(None);
            }
            self.kill();
            let console = self.console();
            let mut lines = platform_fault_lines(&console);
            lines.extend(self.silence.iter().cloned());
            return Ok(Some(Err(HarnessError::PlatformFault {
                name: self.name.clone(),
                lines,
                after: at.duration_since(self.started),
                console,
                qemu_log: read_lossy(&self.qemu_log_path),
            })));
        }
        if self.done_at.is_none() && parse_console(&console).is_done() {
            self.done_at = Some(now);
        }
        match (status, self.done_at) {
            (Some(status), _) => Ok(Some(self.finish(Some(status)))),
            (None, Some(t)) if now.duration_since(t) > EXIT_GRACE => Ok(Some(self.finish(None))),
            (None, None) if now > self.started + self.timeout => {
                self.kill();
                Ok(Some(Err(HarnessError::Timeout {
                    name: self.name.clone(),
                    after: self.timeout,
                    console: self.console(),
                    qemu_log: read_lossy(&self.qemu_log_path),
                })))
            }
            _ => Ok(None),
        }
    }

    /// What QEMU was doing over a silence that ends `now`: its CPU use, and (a KVM host's) the
    /// virtual CPUs' state from its monitor, also kept in `monitor-dump.txt` of the run's
    /// directory.
    fn probe_silence(&self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        let cpu = self.pid().and_then(crate::probe::cpu_time);
        if let (Some(then), Some(cpu)) = (self.cpu_at_growth, cpu) {
            let used = cpu.saturating_sub(then);
            lines.push(crate::probe::cpu_line(
                used,
                now.duration_since(self.grew_at),
            ));
        }
        match crate::probe::monitor_dump(&self.dir, Duration::from_secs(10)) {
            Ok(dump) => {
                let _ = std::fs::write(self.dir.join("monitor-dump.txt"), &dump);
                lines.push("QEMU's monitor at the silence:".into());
                lines.extend(dump.lines().map(|l| format!("  {l}")));
            }
            Err(e) => lines.push(format!("QEMU's monitor could not be asked: {e}")),
        }
        for l in &lines {
            eprintln!("[vsock-integration] {}: {l}", self.name);
        }
        lines
    }

    /// QEMU exited (`status`) or must go after `VRTEST-DONE` (`None`): the outcome.
    fn finish(&mut self, status: Option<ExitStatus>) -> Result<RunOutcome, HarnessError> {
        self.kill();
        let console = self.console();
        let qemu_log = read_lossy(&self.qemu_log_path);
        let report = parse_console(&console);
        if !report.is_done() && status.is_some_and(|s| s.success()) {
            // QEMU runs the KVM host with -no-reboot, and the host's /init prints VRTEST-DONE
            // before it powers off, also when its scenario times out; a kernel panic would have
            // printed a fault line (caught in `poll`). QEMU exiting 0 before that line is the
            // emulated machine resetting itself without a word: a triple fault of the KVM
            // host's kernel, whose only link to the code under test is a user process
            // (`vsock-vmm`) on its KVM. The platform's fault.
            return Err(HarnessError::PlatformFault {
                name: self.name.clone(),
                lines: vec![format!(
                    "{}: the KVM host reset itself without a kernel message (QEMU, run with \
                     -no-reboot, exited 0 before VRTEST-DONE)",
                    self.name
                )],
                after: self.started.elapsed(),
                console,
                qemu_log,
            });
        }
        if !report.is_done() {
            return Err(HarnessError::QemuExited {
                name: self.name.clone(),
                status: status.map_or("killed".to_string(), |s| s.to_string()),
                console,
                qemu_log,
            });
        }
        let elapsed = self.started.elapsed();
        let triple_faults = inner_triple_faults(&console);
        if !triple_faults.is_empty() && triple_faults.iter().all(|f| f.is_platform_fault()) {
            // The device had not started, or the inner kernel died without a word: the
            // emulated platform's fault (see crate::inner_faults).
            return Err(HarnessError::PlatformFault {
                name: self.name.clone(),
                lines: triple_faults
                    .iter()
                    .map(|f| f.describe(Some(&self.inner_vmlinux)))
                    .collect(),
                after: elapsed,
                console,
                qemu_log,
            });
        }
        // At least one inner kernel reported a fault before it died: the code under test's.
        let inner_crashes = triple_faults
            .iter()
            .map(|f| f.describe(Some(&self.inner_vmlinux)))
            .collect();
        if std::env::var_os("VR_SHOW_CONSOLE").is_some() {
            eprintln!(
                "---- {}: serial console ----\n{console}\n---- end ----",
                self.name
            );
        }
        eprintln!(
            "[vsock-integration] {}: finished in {:.1} s",
            self.name,
            elapsed.as_secs_f64()
        );
        Ok(RunOutcome {
            name: self.name.clone(),
            report,
            console,
            qemu_log,
            exit: status,
            elapsed,
            inner_crashes,
        })
    }

    /// Kills QEMU (SIGKILL to its PID) and reaps it; idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished run: the parsed results and the raw logs.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Name of the run.
    pub name: String,
    /// Parsed `VRTEST` lines.
    pub report: ConsoleReport,
    /// Full serial console.
    pub console: String,
    /// QEMU's own stdout/stderr.
    pub qemu_log: String,
    /// QEMU's exit status (`None` if it had to be killed after `VRTEST-DONE`).
    pub exit: Option<ExitStatus>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
    /// The inner guests that crashed with a triple fault, one line each (see
    /// [`crate::InnerTripleFault::describe`]), when one of them had its kernel report a fault
    /// first (else the run is a platform fault): reported with the problems.
    pub inner_crashes: Vec<String>,
}

impl RunOutcome {
    /// Ok when every name in `required` is PASS, nothing FAILed, no line was
    /// malformed and the scenario exited 0; else
    /// [`HarnessError::ChecksFailed`] with the console log.
    pub fn check(&self, required: &[&str]) -> Result<(), HarnessError> {
        let mut problems = self.report.problems(required);
        // An inner guest that crashed is a problem of its own, and says why checks failed.
        problems.extend(self.inner_crashes.iter().cloned());
        if problems.is_empty() {
            return Ok(());
        }
        Err(HarnessError::ChecksFailed {
            name: self.name.clone(),
            problems,
            console: self.console.clone(),
            qemu_log: self.qemu_log.clone(),
        })
    }

    /// Detail text of the check `name` (empty string if it had none).
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.report.results.get(name).map(|r| r.detail.as_str())
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Standard base64 with padding (what busybox `base64 -d` reads).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
