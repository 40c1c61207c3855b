//! Integration test platform for vsock-router.
//!
//! Real Linux guests need hardware virtualization, which the project's
//! machines lack, so the tests run QEMU TCG (software emulation) with an
//! emulated AMD SVM: a stock Debian kernel in it loads `kvm-amd` and becomes
//! a genuine **KVM host**. Its initramfs carries `vsock-vmm`, an **inner
//! guest** kernel + initramfs, and a scenario script; the scenario reports
//! `VRTEST <name> PASS|FAIL|SKIP <detail>` lines on the serial console,
//! which this crate parses. No AF_VSOCK socket is ever opened on the machine
//! itself.
//!
//! Images are built from Debian packages by `integration/images/*.sh` and
//! cached in `${VSOCK_ROUTER_CACHE:-~/.cache/vsock-router}`; see
//! `integration/README.md`.
//!
//! ```no_run
//! use vsock_integration::{artifacts_or_skip, GuestRun};
//! let Some(artifacts) = artifacts_or_skip("my_test") else { return };
//! GuestRun::kvm_host("vr_check kvm vr-kvmcheck\n")
//!     .run(artifacts, &["kvm"])
//!     .unwrap();
//! ```

#![warn(missing_docs)]

mod artifacts;
mod console;
mod cpio;
mod error;
mod faults;
mod hybrid;
mod inner_faults;
mod machine;
mod probe;
mod process;
mod uplink;
mod vm;

pub use artifacts::{
    artifacts_or_skip, build_workspace_binary, ensure_artifacts, guest_helper,
    hardware_kvm_or_skip, host_has_hardware_kvm, images_dir, parse_artifacts_env, platform,
    Artifacts,
};
pub use console::KERNEL_FAULT_MARKERS;
pub use console::{
    is_kernel_fault_line, kernel_fault_lines, parse_console, platform_fault_lines, CheckResult,
    ConsoleReport, Status, PLATFORM_FAULT,
};
pub use error::HarnessError;
pub use faults::{rerun_on_platform_fault, PLATFORM_FAULTS_ENV};
pub use hybrid::{
    accept_and_read, accept_and_read_unless, connect_and_send, connect_and_send_unless, pattern,
    sha256_hex,
};
pub use inner_faults::{inner_triple_faults, kernel_report, symbolize, InnerTripleFault};
pub use process::{
    api_counter, api_request, routerd_binary, start_routerd, start_vhost_user_vsock,
    vhost_user_backend, wait_for_path, ProcessGuard, RouterdVm, EMULATED_TIMEOUTS,
};
pub use uplink::{run_uplink, UplinkRun, ENCLAVE_CID, KVM_HOST_CID};
pub use vm::{base64, GuestKind, GuestRun, RunOutcome, RunningVm};
