//! The VMM's lifecycle: check the configuration, build the VM, run the vCPUs and the API, wait
//! for a reason to stop, tear down.
//!
//! Exit status: 0 on guest shutdown or reboot (the i8042 reset, or a triple fault, which is
//! logged with the vCPU state: it is a crash unless the guest reboots with `reboot=t`),
//! `PUT /api/v1/vm.shutdown`, SIGTERM or SIGINT; the byte written to the debug-exit port; 1 on a
//! KVM or setup error (the reason is printed); 2 on a bad option (reported before KVM is
//! touched).

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};

use crate::api::lifecycle::VmLifecycle;
use crate::api::{self, server::SocketGuard, ApiContext};
use crate::cli::restore::RestoreConfig;
use crate::cli::{SerialMode, VmConfig, USAGE_EXIT_CODE};
use crate::devices::serial::{Discard, LineBuffered, Unbuffered};
use crate::exit::{wait_for_exit, ExitSignal, TerminationSignals};
use crate::lifecycle::VmmLifecycle;
use crate::snapshot::Snapshot;
use crate::vm::pause::PauseControl;
use crate::vm::vcpu::{install_kick_handler, kick_signal, Vcpu, VcpuStop};
use crate::vm::Vm;
use crate::vsock::{build_vsock, restore_vsock, VsockParts};

/// A setup failure and its exit status.
#[derive(Debug)]
pub struct Failure {
    /// 2 for configuration errors found before KVM, 1 otherwise.
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

fn usage(message: String) -> Failure {
    Failure {
        code: USAGE_EXIT_CODE,
        message,
    }
}

fn fatal(message: String) -> Failure {
    Failure { code: 1, message }
}

fn open_serial(mode: &SerialMode) -> Result<Box<dyn Write + Send>, Failure> {
    Ok(match mode {
        // A person at a terminal sees every byte at once; a file or pipe (often shared with
        // the log, `2>&1`) gets whole lines, so that no log line splits a console line.
        SerialMode::Tty if io::stdout().is_terminal() => Box::new(Unbuffered(io::stdout())),
        SerialMode::Tty => Box::new(LineBuffered::new(io::stdout())),
        SerialMode::Off => Box::new(Discard),
        SerialMode::File(path) => Box::new(LineBuffered::new(File::create(path).map_err(|e| {
            usage(format!(
                "--serial: invalid value `file={}`: {e}",
                path.display()
            ))
        })?)),
    })
}

type ApiListener = Option<(std::os::unix::net::UnixListener, SocketGuard)>;

fn bind_api(path: Option<&std::path::Path>) -> Result<ApiListener, Failure> {
    match path {
        Some(path) => {
            let listener = api::server::bind(path).map_err(|e| {
                usage(format!(
                    "--api-socket: cannot bind `{}`: {e}",
                    path.display()
                ))
            })?;
            Ok(Some((listener, SocketGuard(path.to_path_buf()))))
        }
        None => Ok(None),
    }
}

/// A built VM, ready to run.
struct Prepared {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    control: Option<Arc<dyn api::VsockControl>>,
    vsock_config: Option<String>,
    api_listener: ApiListener,
    signals: TerminationSignals,
}

/// Runs the VM described by `config` to the end; returns the exit status.
pub fn run(config: &VmConfig) -> Result<i32, Failure> {
    // Phase 1: everything that can be wrong with the options, before KVM.
    let mut kernel = File::open(&config.kernel).map_err(|e| {
        usage(format!(
            "--kernel: cannot open `{}`: {e}",
            config.kernel.display()
        ))
    })?;
    let mut initramfs = match &config.initramfs {
        Some(p) => Some(
            File::open(p)
                .map_err(|e| usage(format!("--initramfs: cannot open `{}`: {e}", p.display())))?,
        ),
        None => None,
    };
    let vsock: Option<VsockParts> = match config.vsock.as_deref() {
        Some(raw) => Some(build_vsock(raw).map_err(|e| usage(e.to_string()))?),
        None => None,
    };
    let api_listener = bind_api(config.api_socket.as_deref())?;
    let serial_out = open_serial(&config.serial)?;
    let signals = TerminationSignals::block()
        .map_err(|e| fatal(format!("cannot block SIGTERM/SIGINT: {e}")))?;

    // Phase 2: the VM.
    let vm_err = |e: crate::vm::VmError| fatal(e.to_string());
    let mut vm = Vm::new(config.memory_bytes).map_err(vm_err)?;
    vm.add_serial(serial_out).map_err(vm_err)?;
    let mut control = None;
    if let Some(parts) = vsock {
        vm.add_virtio(parts.device).map_err(vm_err)?;
        control = Some(parts.control);
    }
    let boot = vm
        .load_guest(
            &mut kernel,
            initramfs.as_mut(),
            &config.cmdline,
            config.cpus,
        )
        .map_err(vm_err)?;
    info!("boot: {:?}, command line `{}`", boot.entry, boot.cmdline);
    let vcpus = vm.create_vcpus(config.cpus, &boot.entry).map_err(vm_err)?;
    serve(Prepared {
        vm,
        vcpus,
        control,
        vsock_config: config.vsock.clone(),
        api_listener,
        signals,
    })
}

/// Restores the VM saved in `config.dir` and runs it to the end; returns the exit status.
pub fn restore(config: &RestoreConfig) -> Result<i32, Failure> {
    // Phase 1: the snapshot and the options, before KVM.
    let snapshot = Snapshot::read(&config.dir).map_err(|e| usage(format!("--restore: {e}")))?;
    if let Some(size) = config.memory_bytes {
        if size != snapshot.memory_bytes {
            return Err(usage(format!(
                "--memory: size={size} bytes differs from the snapshot's {} bytes (a restored \
                 guest keeps its RAM; leave --memory out or give the same size)",
                snapshot.memory_bytes
            )));
        }
    }
    // The vsock device: the saved configuration, or the restorer's (another CID or socket).
    let vsock_config =
        match (&snapshot.vsock, &config.vsock) {
            (None, Some(_)) => return Err(usage(
                "--vsock: the snapshot has no vsock device (a restored guest keeps the devices \
                 it booted with)"
                    .into(),
            )),
            (None, None) => None,
            (Some(saved), given) => Some(given.clone().unwrap_or_else(|| saved.config.clone())),
        };
    let vsock = match (&snapshot.vsock, &vsock_config) {
        (Some(saved), Some(raw)) => {
            Some(restore_vsock(raw, saved.device.as_ref()).map_err(|e| usage(e.to_string()))?)
        }
        _ => None,
    };
    let api_listener = bind_api(config.api_socket.as_deref())?;
    let serial_out = open_serial(&config.serial)?;
    let signals = TerminationSignals::block()
        .map_err(|e| fatal(format!("cannot block SIGTERM/SIGINT: {e}")))?;

    // Phase 2: the VM, its memory and state.
    let vm_err = |e: crate::vm::VmError| fatal(format!("restore: {e}"));
    let mut vm = Vm::new(snapshot.memory_bytes).map_err(vm_err)?;
    crate::snapshot::load_memory(&config.dir, vm.memory())
        .map_err(|e| fatal(format!("restore: {e}")))?;
    let serial_state = (&snapshot.serial).into();
    vm.add_serial_from(serial_out, Some(&serial_state))
        .map_err(vm_err)?;
    let mut control = None;
    let mut restored_transport = None;
    if let (Some(saved), Some((parts, queues))) = (&snapshot.vsock, vsock) {
        let transport = vm.add_virtio(parts.device).map_err(vm_err)?;
        restored_transport = Some((transport, &saved.transport, queues));
        control = Some(parts.control);
    }
    let vcpus = vm
        .restore_vcpus(&snapshot.vcpus, &snapshot.vm)
        .map_err(vm_err)?;
    // The device starts after the irqchip is restored, so that its first interrupt (the
    // TRANSPORT_RESET event) is not overwritten by the saved irqchip state.
    if let Some((transport, state, queues)) = restored_transport {
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(state, queues)
            .map_err(|e| fatal(format!("restore: {e}")))?;
    }
    info!(
        "restored {} vCPU(s) and {} bytes of RAM from {}",
        vcpus.len(),
        snapshot.memory_bytes,
        config.dir.display()
    );
    serve(Prepared {
        vm,
        vcpus,
        control,
        vsock_config,
        api_listener,
        signals,
    })
}

/// Runs the vCPUs and the API until a reason to stop; tears down.
fn serve(prepared: Prepared) -> Result<i32, Failure> {
    let Prepared {
        vm,
        mut vcpus,
        control,
        vsock_config,
        api_listener,
        signals,
    } = prepared;
    let msrs =
        Arc::new(crate::snapshot::cpu::msr_indices(vm.kvm()).map_err(|e| fatal(e.to_string()))?);
    let pause = Arc::new(PauseControl::new(vcpus.len()));
    for vcpu in &mut vcpus {
        vcpu.set_pause(pause.clone(), msrs.clone());
    }
    let vm = Arc::new(vm);

    let exit = Arc::new(ExitSignal::new().map_err(|e| fatal(e.to_string()))?);
    let _api_socket = match api_listener {
        Some((listener, guard)) => {
            let exit = exit.clone();
            let lifecycle: Arc<dyn VmLifecycle> =
                Arc::new(VmmLifecycle::new(vm.clone(), pause.clone(), vsock_config));
            api::server::spawn_with_lifecycle(
                listener,
                ApiContext {
                    vsock: control,
                    vms: None,
                },
                Some(lifecycle),
                Box::new(move || exit.request(0, "shutdown requested through the API")),
            )
            .map_err(|e| fatal(format!("cannot start the API thread: {e}")))?;
            Some(guard)
        }
        None => None,
    };
    install_kick_handler();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for mut vcpu in vcpus {
        let (stop, exit) = (stop.clone(), exit.clone());
        let id = vcpu.id();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || match vcpu.run(&stop) {
                Ok(VcpuStop::Stopped) => {}
                Ok(VcpuStop::Reset) => exit.request(0, format!("vcpu{id}: guest reboot")),
                Ok(VcpuStop::Shutdown) => exit.request(0, format!("vcpu{id}: guest shutdown")),
                Ok(VcpuStop::TripleFault(state)) => {
                    // Status 0: with `reboot=t` this is the guest's reboot. Otherwise the guest
                    // crashed where even its fault handlers could not run; the state says where.
                    warn!("vcpu{id}: triple fault: {state}");
                    exit.request(
                        0,
                        format!(
                            "vcpu{id}: triple fault (a reboot with reboot=t, otherwise a guest \
                             crash) at {state}"
                        ),
                    )
                }
                Ok(VcpuStop::DebugExit(code)) => {
                    exit.request(i32::from(code), format!("vcpu{id}: debug exit {code}"))
                }
                Err(e) => exit.request(1, format!("vcpu{id}: {e}")),
            })
            .map_err(|e| fatal(format!("cannot start vcpu{id}: {e}")))?;
        pause.register_thread(id, t.as_pthread_t());
        threads.push(t);
    }

    let (code, reason) = wait_for_exit(&exit, &signals);
    if code == 0 {
        info!("exiting: {reason}");
    } else {
        error!("exiting with status {code}: {reason}");
        eprintln!("vsock-vmm: {reason}");
    }

    // Teardown: stop the vCPUs (parked ones too), stop the device, remove the API socket
    // (guard drop).
    stop.store(true, Ordering::Release);
    pause.close();
    let all_stopped = stop_vcpus(&threads, Duration::from_secs(2));
    for (_, transport) in vm.bus().mmio_devices() {
        transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown();
    }
    if !all_stopped {
        warn!("some vCPUs did not stop; exiting without unmapping guest memory");
        drop(_api_socket);
        std::process::exit(code);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(code)
}

/// Kicks every vCPU thread out of KVM_RUN until all have returned or `timeout` passes.
fn stop_vcpus(threads: &[JoinHandle<()>], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let running: Vec<_> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        for t in running {
            // SAFETY: the pthread_t belongs to a thread we spawned and have not joined, so it
            // is still valid; the kick signal has a no-op handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
