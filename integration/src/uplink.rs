//! The nested-cloud topology of the tests that cross the real AF_VSOCK uplink: on the machine,
//! one `vsock-routerd` (`uplink=none` for both VMs: no AF_VSOCK is opened on the machine) serves
//! two TCG guests as siblings on one "cloud host" — the KVM host ([`KVM_HOST_CID`]), whose
//! `vsock-vmm` guests take the g2h fallback through its `/dev/vsock`, and the enclave
//! ([`ENCLAVE_CID`]). Both devices offer SOCK_SEQPACKET, and siblings of one daemon reach each
//! other in memory, with the kernel's semantics (RST for a refused connect, half-close, credit)
//! and no limit on packet size and no order in which their devices must start.
//!
//! This used to be `vhost-device-vsock` 0.3.0, which needed a start barrier (a sibling packet
//! that arrived before the target's rings were set up ended that VM's service thread), packets
//! of less than 4 KiB between the siblings, and SKIPs for every SOCK_SEQPACKET case; its
//! interop scenario is `tests/vhost_user.rs`.

use std::path::Path;

use crate::{
    api_counter, api_request, rerun_on_platform_fault, start_routerd, Artifacts, GuestRun,
    HarnessError, RouterdVm, RunOutcome, RunningVm,
};

/// The KVM host's CID on the daemon.
pub const KVM_HOST_CID: u32 = 3;
/// The enclave's CID on the daemon.
pub const ENCLAVE_CID: u32 = 10;

/// What one run of the topology gave.
pub struct UplinkRun {
    /// The KVM host's run.
    pub host: RunOutcome,
    /// The enclave's run.
    pub enclave: RunOutcome,
    /// The daemon's `GET /api/v1/vms/<cid>/vsock` for the KVM host and the enclave, once both
    /// runs ended (counters, connections), or why it could not be read.
    pub vm_info: [Result<String, String>; 2],
    /// Everything the daemon printed.
    pub daemon_log: String,
}

impl UplinkRun {
    /// A counter of the daemon's `counters` object for the VM at `index` of
    /// [`UplinkRun::vm_info`] (0 the KVM host, 1 the enclave), e.g. `"sibling"`.
    pub fn counter(&self, index: usize, key: &str) -> Option<u64> {
        api_counter(self.vm_info.get(index)?.as_ref().ok()?, key)
    }
}

/// Runs `host` and `enclave` (each with its name, binaries, files, modules, size and timeout
/// set; this adds the working directory, memfd-backed memory and the vhost-user vsock device)
/// on a fresh daemon, and waits for both. A platform fault in either guest ends both, and the
/// whole topology is set up once more.
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
        let api = dir.path().join("api.sock");
        let daemon = start_routerd(
            &[
                RouterdVm {
                    cid: KVM_HOST_CID,
                    vhost_socket: &host_vhu,
                    hybrid: &host_uds,
                    keys: "",
                },
                RouterdVm {
                    cid: ENCLAVE_CID,
                    vhost_socket: &enclave_vhu,
                    hybrid: &enclave_uds,
                    keys: "",
                },
            ],
            Some(&api),
            &dir.path().join("routerd.log"),
        )?;
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
        let outcomes = RunningVm::wait_all(vec![host, enclave]);
        let vm_info = [KVM_HOST_CID, ENCLAVE_CID].map(|cid| {
            api_request(&api, "GET", &format!("/api/v1/vms/{cid}/vsock"), None).and_then(
                |(status, body)| match status {
                    200 => Ok(body),
                    _ => Err(format!("HTTP {status}: {body}")),
                },
            )
        });
        let daemon_log = daemon.log();
        drop(daemon);
        let mut outcomes = outcomes?.into_iter();
        let (host, enclave) = (outcomes.next().unwrap(), outcomes.next().unwrap());
        Ok(UplinkRun {
            host,
            enclave,
            vm_info,
            daemon_log,
        })
    })
}
