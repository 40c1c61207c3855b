//! The nested-cloud topology of the tests that cross the real AF_VSOCK uplink: on the machine,
//! one rust-vmm `vhost-device-vsock` daemon (Unix-socket mode only: no AF_VSOCK is opened on the
//! machine) serves two TCG guests as siblings on one "cloud host" — the KVM host
//! ([`KVM_HOST_CID`]), whose `vsock-vmm` guests take the g2h fallback through its `/dev/vsock`,
//! and the enclave ([`ENCLAVE_CID`]). Both wait at the [`SiblingBarrier`] before they send to
//! each other.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{
    rerun_on_platform_fault, start_vhost_user_vsock_vms, Artifacts, GuestRun, HarnessError,
    RunOutcome, RunningVm, SiblingBarrier, VhostUserVm,
};

/// The KVM host's CID on the daemon.
pub const KVM_HOST_CID: u32 = 3;
/// The enclave's CID on the daemon.
pub const ENCLAVE_CID: u32 = 10;
/// How long the barrier waits for both guests' devices.
const BARRIER_LIMIT: Duration = Duration::from_secs(300);

/// What one run of the topology gave.
pub struct UplinkRun {
    /// The KVM host's run.
    pub host: RunOutcome,
    /// The enclave's run.
    pub enclave: RunOutcome,
    /// How long until both guests' vsock devices were up (the barrier released them).
    pub both_up: Duration,
    /// Everything the daemon printed.
    pub daemon_log: String,
}

/// Runs `host` and `enclave` (each with its name, binaries, files, modules, size and timeout
/// set; this adds the working directory, memfd-backed memory and the vhost-user vsock device)
/// on a fresh daemon and barrier, and waits for both. A platform fault in either guest ends
/// both, and the whole topology is set up once more. A barrier that does not release both is
/// [`HarnessError::Setup`], with both consoles.
pub fn run_uplink(
    name: &str,
    artifacts: &Artifacts,
    host: &GuestRun,
    enclave: &GuestRun,
) -> Result<UplinkRun, HarnessError> {
    rerun_on_platform_fault(name, || {
        let dir = tempfile::Builder::new().prefix("vr-uplink.").tempdir()?;
        let (host_dir, enclave_dir) = (dir.path().join("kvm-host"), dir.path().join("enclave"));
        std::fs::create_dir(&host_dir)?;
        std::fs::create_dir(&enclave_dir)?;
        let (host_vhu, enclave_vhu) = (host_dir.join("vhu.sock"), enclave_dir.join("vhu.sock"));
        let (host_uds, enclave_uds) = (host_dir.join("vm.vsock"), enclave_dir.join("vm.vsock"));
        let daemon = start_vhost_user_vsock_vms(&[
            VhostUserVm {
                cid: KVM_HOST_CID,
                vhost_socket: &host_vhu,
                uds_path: &host_uds,
            },
            VhostUserVm {
                cid: ENCLAVE_CID,
                vhost_socket: &enclave_vhu,
                uds_path: &enclave_uds,
            },
        ])?;
        let barrier =
            SiblingBarrier::new(&[&host_uds, &enclave_uds]).map_err(HarnessError::Setup)?;
        let on_daemon = |run: &GuestRun, dir: &Path| {
            run.clone()
                .memfd(true)
                .workdir(dir)
                .qemu_args([
                    "-chardev",
                    "socket,id=vu0,path={dir}/vhu.sock",
                    "-device",
                    "vhost-user-vsock-device,chardev=vu0",
                ])
                .spawn(artifacts)
        };
        let enclave = on_daemon(enclave, &enclave_dir)?;
        let host = on_daemon(host, &host_dir)?;
        // The barrier runs beside the guests and gives up when their runs end.
        let ended = Arc::new(AtomicBool::new(false));
        let barrier = {
            let ended = Arc::clone(&ended);
            std::thread::spawn(move || {
                barrier.wait_unless(BARRIER_LIMIT, &|| ended.load(Ordering::Relaxed))
            })
        };
        let outcomes = RunningVm::wait_all(vec![host, enclave]);
        ended.store(true, Ordering::Relaxed);
        let barrier = barrier.join().expect("barrier thread");
        let daemon_log = daemon.log();
        drop(daemon);
        let mut outcomes = outcomes?.into_iter();
        let (host, enclave) = (outcomes.next().unwrap(), outcomes.next().unwrap());
        let both_up = barrier.map_err(|e| {
            HarnessError::Setup(format!("{e}\n{}\n{}", host.console, enclave.console))
        })?;
        Ok(UplinkRun {
            host,
            enclave,
            both_up,
            daemon_log,
        })
    })
}
