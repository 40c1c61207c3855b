//! Running a KVM-host scenario directly on this machine (`GuestKind::Machine`), for machines
//! with hardware virtualization: `vsock-vmm` then boots the inner guest on the machine's own
//! `/dev/kvm`, much faster than nested in QEMU TCG.
//!
//! The scenario script is the same busybox `sh` script a KVM host runs, with the same helpers
//! (`images/rootfs/vrtest.sh`), and it sees the same environment: busybox applets, socat and the
//! shipped binaries on `PATH`, the inner guest's images at `$VR_INNER/vmlinux` and
//! `$VR_INNER/initramfs.cpio`, and a `/tmp` of its own. It runs in new mount and PID namespaces
//! (`unshare`): `/tmp` is a private tmpfs, and when the run ends or is killed every process it
//! started dies with the namespace's first process. Its output is the "console".
//!
//! A script that could open AF_VSOCK on the machine (socat `VSOCK-*` addresses, `/dev/vsock`) is
//! refused before it starts; `vsock-vmm` inherits `VSOCK_ROUTER_FORBID_AF_VSOCK` from the tests.
//!
//! The private `/tmp` hides everything under the machine's `/tmp`, possibly the checkout itself
//! (its `vrtest.sh`), the cargo target directory (the binaries) or the image cache. So what the
//! run needs from there is copied (hard-linked where possible) into the run's directory, which
//! lives under `/var/tmp`, before the namespace replaces `/tmp`; the rest is symlinked.

use std::fs::File;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::artifacts::{images_dir, Artifacts};
use crate::error::HarnessError;
use crate::process::find_in_path;

/// Tools the scenarios use that busybox does not provide, taken from the machine's `PATH`.
const MACHINE_TOOLS: &[&str] = &["socat"];

/// Refuses a script that could open AF_VSOCK on the machine.
pub(crate) fn check_script(name: &str, script: &str) -> Result<(), HarnessError> {
    for word in ["VSOCK-", "/dev/vsock", "vsock-connect"] {
        if script.contains(word) {
            return Err(HarnessError::Setup(format!(
                "{name}: a scenario that runs on this machine must not use AF_VSOCK \
                 (it contains `{word}`); run it in the KVM host instead"
            )));
        }
    }
    Ok(())
}

/// Makes `src` available as `dest` inside the run: a symlink, or, when `src` is under `/tmp`
/// (hidden by the run's private `/tmp`), a hard link or a copy.
fn provide(src: &Path, dest: &Path) -> Result<(), HarnessError> {
    let real = std::fs::canonicalize(src)
        .map_err(|e| HarnessError::Setup(format!("{}: {e}", src.display())))?;
    if !real.starts_with("/tmp") {
        symlink(&real, dest)?;
    } else if std::fs::hard_link(&real, dest).is_err() {
        std::fs::copy(&real, dest)?;
    }
    Ok(())
}

/// `dir/bin`: every busybox applet, the machine tools and `binaries`.
fn populate_bin(dir: &Path, binaries: &[PathBuf]) -> Result<PathBuf, HarnessError> {
    let missing =
        |what: &str| HarnessError::Unavailable(format!("{what} not found on this machine"));
    let busybox = find_in_path("busybox").ok_or_else(|| missing("busybox"))?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let list = Command::new(&busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        symlink(&busybox, bin.join(applet))?;
    }
    let tools = MACHINE_TOOLS
        .iter()
        .map(|t| find_in_path(t).ok_or_else(|| missing(t)))
        .collect::<Result<Vec<_>, _>>()?;
    for path in tools.iter().chain(binaries) {
        let name = path
            .file_name()
            .ok_or_else(|| HarnessError::Setup(format!("not a file: {}", path.display())))?;
        let link = bin.join(name);
        // Ours win over a busybox applet of the same name.
        let _ = std::fs::remove_file(&link);
        provide(path, &link)?;
    }
    Ok(bin)
}

/// Prepares `dir` (scenario, helpers, tools, inner images: the kernel from `artifacts`, the
/// initramfs `inner_initramfs`) and starts the scenario; its output goes to `console`. The child
/// is `unshare`, which kills the namespace's processes when it dies. `dir` must not be under
/// `/tmp`.
pub(crate) fn spawn(
    name: &str,
    script: &str,
    binaries: &[PathBuf],
    artifacts: &Artifacts,
    inner_initramfs: &Path,
    dir: &Path,
    console: &Path,
) -> Result<Child, HarnessError> {
    check_script(name, script)?;
    let bin = populate_bin(dir, binaries)?;
    let inner = dir.join("inner");
    std::fs::create_dir_all(&inner)?;
    provide(&artifacts.inner_vmlinux, &inner.join("vmlinux"))?;
    provide(inner_initramfs, &inner.join("initramfs.cpio"))?;
    // The helpers every scenario sources, from the checkout, which may be under /tmp.
    let vrtest = dir.join("vrtest.sh");
    std::fs::copy(images_dir().join("rootfs/vrtest.sh"), &vrtest)?;
    std::fs::write(dir.join("scenario.sh"), script)?;
    let run = dir.join("run.sh");
    std::fs::write(
        &run,
        format!(
            "mount -t tmpfs -o mode=1777 vr-tmp /tmp || {{ echo 'VRTEST machine-tmp FAIL cannot \
             mount a private /tmp'; echo 'VRTEST-DONE rc=97'; exit 97; }}\n\
             . {vrtest}\n\
             ( . {dir}/scenario.sh )\n\
             echo \"VRTEST-DONE rc=$?\"\n",
            vrtest = vrtest.display(),
            dir = dir.display(),
        ),
    )?;
    let out = File::create(console)?;
    let mut path = std::ffi::OsString::from(&bin);
    path.push(":/usr/sbin:/usr/bin:/sbin:/bin");
    // util-linux's, found before PATH points at busybox (whose unshare lacks --kill-child).
    let unshare = find_in_path("unshare").ok_or_else(|| {
        HarnessError::Unavailable("unshare (util-linux) not found on this machine".into())
    })?;
    let mut cmd = Command::new(unshare);
    cmd.current_dir(dir)
        .args(["--mount", "--propagation", "private", "--pid", "--fork"])
        .args(["--kill-child", "--mount-proc"])
        .arg(bin.join("sh"))
        .arg(&run)
        .env("PATH", path)
        .env("VR_INNER", &inner)
        .env("VR_TSC_KHZ", artifacts.tsc_khz.to_string())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    crate::process::kill_with_parent(&mut cmd);
    cmd.spawn()
        .map_err(|e| HarnessError::Setup(format!("{name}: cannot start unshare: {e}")))
}
