//! Pause, snapshot and `--restore` of the `vsock-vmm` binary with a tiny counting guest on KVM:
//! registers and memory survive into a fresh process, and what cannot be done is refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{kvm_available, wait_for_path, Scratch};
use vsock_vmm::api::client::{self, Reply};
use vsock_vmm::snapshot::{Snapshot, MEMORY_FILE, STATE_FILE};
use vsock_vmm::testkit::asm::{Asm, Mode};
use vsock_vmm::testkit::images::elf_kernel;

const BIN: &str = env!("CARGO_BIN_EXE_vsock-vmm");
/// Where the guest keeps its counter.
const COUNTER: u32 = 0x20_0000;
/// Where the guest writes its mark once, before counting.
const MARK: u32 = 0x20_1000;
const MARK_VALUE: u32 = 0x5a5a_1234;
const LOAD: u32 = 0x10_0000;
const MEM: &str = "size=32M";

/// The guest: mark, then `eax += 1; [COUNTER] = eax` forever (interrupts off).
fn counting_guest() -> Vec<u8> {
    let mut a = Asm::new(Mode::Protected32);
    a.cli().store32(MARK, MARK_VALUE).mov_eax(0);
    let top = a.here();
    a.inc_eax().store_eax(COUNTER).jmp(top);
    a.finish()
}

/// A `vsock-vmm` process, killed (by PID) and reaped if the test ends before it exits.
struct Vmm {
    child: Option<Child>,
    api: PathBuf,
}

impl Vmm {
    fn spawn(args: &[String], api: PathBuf) -> Vmm {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vsock-vmm");
        Vmm {
            child: Some(child),
            api,
        }
    }

    /// Starts a VM and waits for its API socket.
    fn started(args: &[String], api: PathBuf) -> Vmm {
        let mut vmm = Vmm::spawn(args, api);
        if !wait_for_path(&vmm.api, Duration::from_secs(20)) {
            let status = vmm.wait(Duration::from_secs(1));
            panic!("the API socket never appeared (vsock-vmm: {status:?})");
        }
        vmm
    }

    fn put(&self, path: &str, body: Option<&str>) -> Reply {
        client::request(&self.api, "PUT", path, body).expect("API request")
    }

    fn snapshot(&self, dir: &Path) -> Reply {
        let body = serde_json::json!({ "destination": dir }).to_string();
        self.put("/api/v1/vm.snapshot", Some(&body))
    }

    /// Waits (bounded) for the process to exit; returns its status and stderr.
    fn wait(&mut self, timeout: Duration) -> Option<(ExitStatus, String)> {
        common::wait_exit(&mut self.child, timeout)
    }

    fn shutdown(&mut self) {
        assert_eq!(self.put("/api/v1/vm.shutdown", None).status, 204);
        let (status, err) = self
            .wait(Duration::from_secs(20))
            .expect("vsock-vmm did not exit");
        assert_eq!(status.code(), Some(0), "{err}");
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

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn boot_args(scratch: &Scratch, api: &Path) -> Vec<String> {
    let kernel = scratch.write("vmlinux", &elf_kernel(&counting_guest(), LOAD, true));
    args(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        MEM,
        "--serial",
        "off",
        "--api-socket",
        api.to_str().unwrap(),
    ])
}

fn restore_args(dir: &Path, api: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--restore",
        dir.to_str().unwrap(),
        "--serial",
        "off",
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    a.extend(args(extra));
    a
}

fn word_at(memory: &[u8], addr: u32) -> u32 {
    let a = addr as usize;
    u32::from_le_bytes(memory[a..a + 4].try_into().unwrap())
}

/// The counter in memory, the vCPU's `eax` and `rip` in the snapshot in `dir`.
fn counter_state(dir: &Path) -> (u32, u64, u64, Vec<u8>) {
    let snap = Snapshot::read(dir).expect("read the snapshot");
    let memory = std::fs::read(dir.join(MEMORY_FILE)).unwrap();
    assert_eq!(memory.len() as u64, snap.memory_bytes);
    let regs = &snap.vcpus[0].regs;
    (word_at(&memory, COUNTER), regs.rax, regs.rip, memory)
}

/// Counting, paused, snapshotted, ended; restored in a fresh process, it counts on from where
/// it was, with the memory as saved.
#[test]
fn counter_and_memory_survive_snapshot_and_restore_in_a_fresh_process() {
    if !kvm_available("counter_and_memory_survive_snapshot_and_restore_in_a_fresh_process") {
        return;
    }
    let scratch = Scratch::new("snap");
    let api1 = scratch.path("api1.sock");
    let mut first = Vmm::started(&boot_args(&scratch, &api1), api1);
    let snap1 = scratch.path("snap1");

    // Running: a snapshot and a resume are refused.
    let r = first.snapshot(&snap1);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("not paused"), "{}", r.body);
    assert_eq!(first.put("/api/v1/vm.resume", None).status, 409);
    assert!(!snap1.exists());

    std::thread::sleep(Duration::from_millis(300));
    // Through the CLI client, as an operator would.
    let out = Command::new(BIN)
        .args([
            "remote",
            "--api-socket",
            first.api.to_str().unwrap(),
            "pause",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(first.put("/api/v1/vm.pause", None).status, 409);
    let r = first.snapshot(&snap1);
    assert_eq!(r.status, 204, "{}", r.body);
    // Not overwritten.
    let r = first.snapshot(&snap1);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("already exists"), "{}", r.body);

    let (c0, rax0, rip0, mem0) = counter_state(&snap1);
    assert!(c0 > 0, "the guest has not counted");
    // Paused between `inc` and the store, or after the store.
    assert!(
        rax0 == u64::from(c0) || rax0 == u64::from(c0) + 1,
        "{rax0} vs {c0}"
    );
    assert!(
        (u64::from(LOAD)..u64::from(LOAD) + 64).contains(&rip0),
        "rip {rip0:#x}"
    );
    assert_eq!(word_at(&mem0, MARK), MARK_VALUE);

    // Paused means paused: a second snapshot after a while shows the same counter.
    std::thread::sleep(Duration::from_millis(100));
    let snap1b = scratch.path("snap1b");
    assert_eq!(first.snapshot(&snap1b).status, 204);
    assert_eq!(counter_state(&snap1b).0, c0);

    // Resume works, then the process ends.
    assert_eq!(first.put("/api/v1/vm.resume", None).status, 204);
    first.shutdown();

    // A fresh process from the snapshot.
    let api2 = scratch.path("api2.sock");
    let mut second = Vmm::started(&restore_args(&snap1, &api2, &["--memory", MEM]), api2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(second.put("/api/v1/vm.pause", None).status, 204);
    let snap2 = scratch.path("snap2");
    let r = second.snapshot(&snap2);
    assert_eq!(r.status, 204, "{}", r.body);
    second.shutdown();

    let (c2, rax2, rip2, mem2) = counter_state(&snap2);
    eprintln!("counter {c0} (rax {rax0}) at the snapshot, {c2} (rax {rax2}) after the restore");
    assert!(c2 > c0, "the counter did not continue: {c2} after {c0}");
    assert!(
        rax2 == u64::from(c2) || rax2 == u64::from(c2) + 1,
        "{rax2} vs {c2}"
    );
    assert!(
        (u64::from(LOAD)..u64::from(LOAD) + 64).contains(&rip2),
        "rip {rip2:#x}"
    );
    // Everything but the counter is as saved (the guest writes nothing else).
    let c = COUNTER as usize;
    assert_eq!(mem2.len(), mem0.len());
    assert!(mem2[..c] == mem0[..c], "memory below the counter changed");
    assert!(
        mem2[c + 4..] == mem0[c + 4..],
        "memory above the counter changed"
    );
    // The restored snapshot itself was not changed by the run.
    assert_eq!(std::fs::read(snap1.join(MEMORY_FILE)).unwrap(), mem0);
}

/// What `--restore` refuses, before it touches KVM: exit status 2 and a message that names
/// the problem.
#[test]
fn restore_refuses_another_memory_size_and_bad_state_files() {
    if !kvm_available("restore_refuses_another_memory_size_and_bad_state_files") {
        return;
    }
    let scratch = Scratch::new("snap-refuse");
    let api = scratch.path("api.sock");
    let mut vmm = Vmm::started(&boot_args(&scratch, &api), api.clone());
    let good = scratch.path("good");
    assert_eq!(vmm.put("/api/v1/vm.pause", None).status, 204);
    assert_eq!(vmm.snapshot(&good).status, 204);
    vmm.shutdown();

    let refused = |dir: &Path, extra: &[&str], expect: &str| {
        let mut v = Vmm::spawn(
            &restore_args(dir, &scratch.path("r.sock"), extra),
            api.clone(),
        );
        let (status, err) = v.wait(Duration::from_secs(20)).expect("did not exit");
        assert_eq!(status.code(), Some(2), "{expect}: {err}");
        assert!(err.contains(expect), "expected `{expect}` in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    refused(
        &good,
        &["--memory", "size=64M"],
        "differs from the snapshot's",
    );
    refused(
        &good,
        &["--vsock", "cid=3,socket=/nonexistent/v.sock,uplink=none"],
        "the snapshot has no vsock device",
    );

    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = scratch.path(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(good.join(MEMORY_FILE), dir.join(MEMORY_FILE)).unwrap();
        let text = std::fs::read_to_string(good.join(STATE_FILE)).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        std::fs::write(dir.join(STATE_FILE), v.to_string()).unwrap();
        dir
    };
    let newer = copy("newer", &|v| v["version"] = 99.into());
    refused(&newer, &[], "state format version 99");
    let short_regs = copy("regs", &|v| v["vcpus"][0]["regs"] = "00ff".into());
    refused(&short_regs, &[], "2 bytes where");
    let no_vcpus = copy("novcpu", &|v| v["vcpus"] = serde_json::json!([]));
    refused(&no_vcpus, &[], "0 vCPUs");

    let truncated = scratch.path("truncated");
    std::fs::create_dir(&truncated).unwrap();
    std::fs::copy(good.join(MEMORY_FILE), truncated.join(MEMORY_FILE)).unwrap();
    let text = std::fs::read(good.join(STATE_FILE)).unwrap();
    std::fs::write(truncated.join(STATE_FILE), &text[..text.len() / 2]).unwrap();
    refused(&truncated, &[], "invalid snapshot");

    let short_mem = copy("shortmem", &|_| {});
    std::fs::File::options()
        .write(true)
        .open(short_mem.join(MEMORY_FILE))
        .unwrap()
        .set_len(4096)
        .unwrap();
    refused(&short_mem, &[], "has 4096 bytes");

    refused(&scratch.path("missing"), &[], "state.json");
}

/// A VM with a vsock device (here one its guest never started): the snapshot holds the
/// `--vsock` value and the transport registers. A restore beside the running original cannot
/// take its socket; one with `--vsock` (another CID and socket) runs beside it; once the
/// original is gone, a restore without `--vsock` takes the saved configuration.
#[test]
fn a_vsock_device_is_saved_and_restored_with_its_configuration_or_an_override() {
    if !kvm_available("a_vsock_device_is_saved_and_restored_with_its_configuration_or_an_override")
    {
        return;
    }
    let scratch = Scratch::new("snap-vsock");
    let api = scratch.path("api.sock");
    let mut a = boot_args(&scratch, &api);
    let original = scratch.path("v.sock");
    let vsock = format!("cid=3,socket={},uplink=none", original.display());
    a.extend(args(&["--vsock", &vsock]));
    let mut vmm = Vmm::started(&a, api);
    assert_eq!(vmm.put("/api/v1/vm.pause", None).status, 204);
    let dir = scratch.path("snap");
    let r = vmm.snapshot(&dir);
    assert_eq!(r.status, 204, "{}", r.body);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(state["vsock"]["config"], vsock.as_str());
    assert_eq!(state["vsock"]["transport"]["device_type"], 19);
    assert_eq!(state["vsock"]["transport"]["activated"], false);
    assert_eq!(state["vsock"]["device"], serde_json::Value::Null);
    assert_eq!(vmm.put("/api/v1/vm.resume", None).status, 204);
    let r = vmm.put(
        "/api/v1/vm.snapshot",
        Some(r#"{"destination": "relative"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.body);

    // The original still holds its socket: a restore of the same configuration is refused.
    let api2 = scratch.path("api2.sock");
    let mut same = Vmm::spawn(&restore_args(&dir, &api2, &[]), api2.clone());
    let (status, err) = same.wait(Duration::from_secs(20)).expect("did not exit");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(original.to_str().unwrap()), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // With an override it runs beside the original, on its own CID and socket.
    let clone_sock = scratch.path("clone.sock");
    let over = format!("cid=7,socket={},uplink=none", clone_sock.display());
    let mut clone = Vmm::started(
        &restore_args(&dir, &api2, &["--vsock", &over]),
        api2.clone(),
    );
    assert!(clone_sock.exists());
    let info = client::request(&api2, "GET", "/api/v1/vsock", None).unwrap();
    assert_eq!(info.json().unwrap()["cid"], 7, "{}", info.body);
    clone.shutdown();
    assert!(
        !clone_sock.exists(),
        "the clone's socket is removed at exit"
    );
    vmm.shutdown();
    assert!(!original.exists());

    // The original gone, the saved configuration is taken again.
    let mut again = Vmm::started(&restore_args(&dir, &api2, &[]), api2.clone());
    assert!(original.exists());
    let info = client::request(&api2, "GET", "/api/v1/vsock", None).unwrap();
    assert_eq!(info.json().unwrap()["cid"], 3, "{}", info.body);
    again.shutdown();
}
