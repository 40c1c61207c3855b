//! Snapshots of a paused VM: what `PUT /api/v1/vm.snapshot` writes and `--restore` reads.
//!
//! A snapshot is a directory with two files:
//! - `state.json`: [`Snapshot`], versioned ([`FORMAT_VERSION`]): the vCPUs ([`cpu`]), the
//!   in-kernel irqchip, PIT and clock ([`vm`]), the serial UART, the memory size, and the vsock
//!   device ([`VsockSnapshot`]: its `--vsock` value, virtio-mmio registers and device state;
//!   `null` for a VM without one);
//! - `memory`: guest RAM, raw, from guest address 0 (read back into fresh anonymous memory on
//!   restore, so the snapshot stays unchanged).
//!
//! The state is written to `state.json.tmp` and renamed, after `memory` is complete: a
//! directory with a `state.json` holds a whole snapshot.

pub mod cpu;
pub mod pod;
pub mod vm;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vsock_router::device::virtio::GuestMemory;
use vsock_router::device::VsockState;

use crate::transport::MmioState;

pub use cpu::VcpuState;
pub use vm::{SerialSnapshot, VmState};

/// The version of [`Snapshot`]; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// The value of [`Snapshot::format`].
pub const FORMAT_NAME: &str = "vsock-vmm-snapshot";
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The largest `state.json` read (the real one is some 100 KiB per vCPU at most).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// The piece of guest RAM copied at a time.
const COPY_CHUNK: usize = 1 << 20;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading or writing a snapshot file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The VM has something a snapshot cannot hold yet.
    #[error("snapshot not supported: {0}")]
    Unsupported(String),
    /// The snapshot files are not a snapshot this VMM can restore.
    #[error("invalid snapshot: {0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The whole state of a paused VM but its memory (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the VMM that wrote it.
    pub version: u32,
    /// The `vsock-vmm` version that wrote it (informational).
    pub vmm_version: String,
    /// Guest RAM in bytes (the size of the `memory` file).
    pub memory_bytes: u64,
    /// The vCPUs, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide in-kernel devices and clock.
    pub vm: VmState,
    /// The COM1 UART.
    pub serial: SerialSnapshot,
    /// The vsock device, `null` for a VM without one.
    pub vsock: Option<VsockSnapshot>,
}

/// The vsock device of a snapshot: how it was configured, its transport and its own state.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSnapshot {
    /// The `--vsock` value it ran with: a restore without `--vsock` uses it again.
    pub config: String,
    /// The virtio-mmio registers.
    pub transport: MmioState,
    /// The device's state (`VsockDevice::save`); `null` when the driver had not started it.
    pub device: Option<VsockState>,
}

impl Snapshot {
    /// Checks what the state file alone can tell: format, version, vCPU indices.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if self.format != FORMAT_NAME {
            return Err(SnapshotError::Invalid(format!(
                "format `{}`, expected `{FORMAT_NAME}`",
                self.format
            )));
        }
        if self.version != FORMAT_VERSION {
            return Err(SnapshotError::Invalid(format!(
                "state format version {} (written by vsock-vmm {}); this vsock-vmm reads \
                 version {FORMAT_VERSION}",
                self.version, self.vmm_version
            )));
        }
        if self.vcpus.is_empty() || self.vcpus.len() > crate::cli::MAX_CPUS as usize {
            return Err(SnapshotError::Invalid(format!(
                "{} vCPUs (1 to {} expected)",
                self.vcpus.len(),
                crate::cli::MAX_CPUS
            )));
        }
        if let Some(bad) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| usize::from(v.id) != *i)
        {
            return Err(SnapshotError::Invalid(format!(
                "vCPU {} is stored at position {}",
                bad.1.id, bad.0
            )));
        }
        if let Some(v) = &self.vsock {
            if v.transport.activated != v.device.is_some() {
                return Err(SnapshotError::Invalid(format!(
                    "the vsock transport says activated={} but the device state is {}",
                    v.transport.activated,
                    if v.device.is_some() {
                        "there"
                    } else {
                        "missing"
                    }
                )));
            }
        }
        Ok(())
    }

    /// Reads and validates `dir/state.json`, and checks that `dir/memory` has
    /// [`Snapshot::memory_bytes`] bytes.
    pub fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut text = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io_err(&path))?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::Invalid(format!(
                "{} is larger than {MAX_STATE_BYTES} bytes",
                path.display()
            )));
        }
        // The version first, so that a newer or older format says so rather than failing on
        // a field it does not know.
        let head: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| SnapshotError::Invalid(format!("{}: {e}", path.display())))?;
        if let Some(v) = head.get("version").and_then(|v| v.as_u64()) {
            if v != u64::from(FORMAT_VERSION) {
                return Err(SnapshotError::Invalid(format!(
                    "state format version {v}; this vsock-vmm reads version {FORMAT_VERSION}"
                )));
            }
        }
        let snapshot: Snapshot = serde_json::from_value(head)
            .map_err(|e| SnapshotError::Invalid(format!("{}: {e}", path.display())))?;
        snapshot.validate()?;
        let mem_path = dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&mem_path)
            .map_err(io_err(&mem_path))?
            .len();
        if len != snapshot.memory_bytes {
            return Err(SnapshotError::Invalid(format!(
                "{} has {len} bytes, the state says {}",
                mem_path.display(),
                snapshot.memory_bytes
            )));
        }
        Ok(snapshot)
    }

    /// Writes `dir/memory` from `mem`, then `dir/state.json` (through a rename). `dir` is
    /// created if missing; an existing `state.json` in it is refused.
    pub fn write(&self, dir: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let state = dir.join(STATE_FILE);
        if state.exists() {
            return Err(SnapshotError::Unsupported(format!(
                "{} already exists; snapshots are not overwritten",
                state.display()
            )));
        }
        let mem_path = dir.join(MEMORY_FILE);
        let mut file = File::create(&mem_path).map_err(io_err(&mem_path))?;
        copy_memory(mem, &mem_path, |buf, addr| {
            mem.read_slice(buf, addr)
                .map_err(|e| io::Error::other(e.to_string()))?;
            file.write_all(buf)
        })?;
        file.sync_all().map_err(io_err(&mem_path))?;
        let tmp = dir.join("state.json.tmp");
        let text = serde_json::to_vec(self)
            .map_err(|e| SnapshotError::Invalid(format!("cannot encode the state: {e}")))?;
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&text).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &state).map_err(io_err(&state))?;
        Ok(())
    }
}

/// Fills guest RAM from `dir/memory` (whose size [`Snapshot::read`] checked).
pub fn load_memory(dir: &Path, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let mut file = File::open(&path).map_err(io_err(&path))?;
    copy_memory(mem, &path, |buf, addr| {
        file.read_exact(buf)?;
        mem.write_slice(buf, addr)
            .map_err(|e| io::Error::other(e.to_string()))
    })
}

/// Calls `step` on every [`COPY_CHUNK`]-sized piece of guest RAM, in address order.
fn copy_memory(
    mem: &GuestMemory,
    path: &Path,
    mut step: impl FnMut(&mut [u8], GuestAddress) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    use vm_memory::GuestMemoryRegion;
    let mut buf = vec![0u8; COPY_CHUNK];
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let mut off = 0;
        while off < len {
            let n = (len - off).min(COPY_CHUNK as u64) as usize;
            step(&mut buf[..n], GuestAddress(start + off)).map_err(io_err(path))?;
            off += n as u64;
        }
    }
    Ok(())
}
