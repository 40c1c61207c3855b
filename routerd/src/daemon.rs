//! Runs the daemon: one router, device and vhost-user socket per VM, the REST API, and a clean
//! stop on SIGTERM, SIGINT or `PUT /api/v1/vm.shutdown`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{info, warn};
use vsock_router::backend::local::LocalPeers;
use vsock_router::router::connector::Router;
use vsock_router::vhost_user::{self, SharedVsock, VhostUserVsock};
use vsock_vmm::api::{self, ApiContext, VsockControl};
use vsock_vmm::exit::{wait_for_exit, ExitSignal, TerminationSignals};
use vsock_vmm::vsock::RouterParts;

use crate::cli::DaemonConfig;

/// A setup failure: what went wrong (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(pub String);

struct Vm {
    cid: u64,
    vsock: SharedVsock<Router>,
    thread: JoinHandle<()>,
}

/// Serves the VMs of `config` until a signal or the API ends the daemon; returns the exit
/// status. Every socket it made is removed before it returns.
pub fn run(config: &DaemonConfig) -> Result<i32, Failure> {
    // Before any thread exists, so that every thread inherits the mask.
    let signals =
        TerminationSignals::block().map_err(|e| Failure(format!("cannot block signals: {e}")))?;
    // VMs that name no registry share this one: all VMs of one daemon are siblings.
    let registry = tempfile::Builder::new()
        .prefix("vsock-routerd.")
        .tempdir()
        .map_err(|e| Failure(format!("cannot create the daemon's CID registry: {e}")))?;
    let mut vms: Vec<Vm> = Vec::new();
    let mut controls: BTreeMap<u64, Arc<dyn VsockControl>> = BTreeMap::new();
    // VMs of one registry (one CID namespace) relay to each other in memory.
    let mut groups: BTreeMap<PathBuf, LocalPeers> = BTreeMap::new();
    let started = (|| {
        for spec in &config.vms {
            let mut cfg = spec.vsock.clone();
            let dir = cfg
                .registry
                .get_or_insert_with(|| registry.path().to_path_buf())
                .clone();
            let peers = groups.entry(dir).or_default();
            let parts = RouterParts::with_local_peers(cfg, Some(peers))
                .map_err(|e| Failure(format!("CID {}: {e}", spec.vsock.cid)))?;
            let mut device = parts.device;
            device.queue_size = spec.queue_size;
            let vsock = VhostUserVsock::new(device, parts.router);
            controls.insert(spec.vsock.cid, parts.control.into_control(vsock.handle()));
            let (v, path, cid) = (vsock.clone(), spec.vhost_user.clone(), spec.vsock.cid);
            let thread = std::thread::Builder::new()
                .name(format!("vhost-user-{cid}"))
                .spawn(move || {
                    if let Err(e) = vhost_user::serve(&v, &path) {
                        log::error!("CID {cid}: {e}");
                    }
                })
                .map_err(|e| Failure(format!("cannot start a thread: {e}")))?;
            info!(
                "CID {cid}: vhost-user socket {}, hybrid socket {}",
                spec.vhost_user.display(),
                spec.vsock.socket.display()
            );
            vms.push(Vm { cid, vsock, thread });
        }
        Ok::<(), Failure>(())
    })();
    let exit = Arc::new(ExitSignal::new().map_err(|e| Failure(e.to_string()))?);
    let api_guard = match (&started, &config.api_socket) {
        (Ok(()), Some(path)) => {
            let listener = api::server::bind(path)
                .map_err(|e| Failure(format!("--api-socket {}: {e}", path.display())));
            match listener {
                Ok(listener) => {
                    let exit = exit.clone();
                    let ctx = ApiContext {
                        vsock: None,
                        vms: Some(Arc::new(controls)),
                    };
                    api::server::spawn(
                        listener,
                        ctx,
                        Box::new(move || exit.request(0, "shutdown requested through the API")),
                    )
                    .map_err(|e| Failure(format!("cannot start the API thread: {e}")))?;
                    Some(api::server::SocketGuard(path.clone()))
                }
                Err(e) => {
                    stop(vms);
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    if let Err(e) = started {
        stop(vms);
        return Err(e);
    }
    let (code, reason) = wait_for_exit(&exit, &signals);
    info!("stopping: {reason}");
    stop(vms);
    drop(api_guard);
    Ok(code)
}

/// Ends every VM's connection and socket and waits for their threads.
fn stop(vms: Vec<Vm>) {
    for vm in &vms {
        vm.vsock.shutdown();
    }
    for vm in vms {
        if vm.thread.join().is_err() {
            warn!("CID {}: its vhost-user thread panicked", vm.cid);
        }
    }
}
