//! AF_VSOCK system calls: the only place that creates AF_VSOCK sockets, behind a process-wide
//! guard.
//!
//! AF_VSOCK reaches whatever hypervisor the process runs under. Tests and development machines
//! must never touch it: when the environment variable [`FORBID_ENV`] is set to anything
//! non-empty (and always in this crate's unit tests), every AF_VSOCK operation here fails with
//! `PermissionDenied` before any syscall is made.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::socket::{cvt, set_timeval_option, socket as typed_socket};

/// Set this environment variable to anything non-empty to forbid AF_VSOCK in the process.
pub const FORBID_ENV: &str = "VSOCK_ROUTER_FORBID_AF_VSOCK";

/// `VMADDR_FLAG_TO_HOST`: route the connect to the host even if the CID could be a local guest.
pub const VMADDR_FLAG_TO_HOST: u8 = 0x01;

/// `VMADDR_CID_ANY`.
const VMADDR_CID_ANY: u32 = u32::MAX;

/// `IOCTL_VM_SOCKETS_GET_LOCAL_CID` = `_IO(7, 0xb9)`, on an fd of `/dev/vsock`.
const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;

/// AF_VSOCK sockets created by this process (tests prove it stays 0).
static CREATED: AtomicU64 = AtomicU64::new(0);

/// `struct sockaddr_vm` with `svm_flags`, which the `libc` crate does not expose.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct SockaddrVm {
    family: libc::sa_family_t,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

const _: () = assert!(mem::size_of::<SockaddrVm>() == mem::size_of::<libc::sockaddr_vm>());

impl SockaddrVm {
    fn new(cid: u32, port: u32, flags: u8) -> Self {
        SockaddrVm {
            family: libc::AF_VSOCK as libc::sa_family_t,
            cid,
            port,
            flags,
            ..Default::default()
        }
    }
}

fn forbidden_by(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Whether AF_VSOCK is forbidden in this process (see the module docs).
pub fn af_vsock_forbidden() -> bool {
    cfg!(test) || forbidden_by(std::env::var_os(FORBID_ENV).as_deref())
}

/// How many AF_VSOCK sockets this process created through this module.
pub fn sockets_created() -> u64 {
    CREATED.load(Ordering::Relaxed)
}

fn check_allowed(what: &str) -> io::Result<()> {
    if af_vsock_forbidden() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{what}: AF_VSOCK is forbidden in this process ({FORBID_ENV} is set)"),
        ));
    }
    Ok(())
}

/// A new AF_VSOCK socket of type `ty` (`SOCK_STREAM`, `SOCK_SEQPACKET`), behind the guard.
fn socket(what: &str, ty: libc::c_int) -> io::Result<OwnedFd> {
    check_allowed(what)?;
    CREATED.fetch_add(1, Ordering::Relaxed);
    typed_socket(libc::AF_VSOCK, ty)
}

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (the `struct timeval` form, option 6 at level `AF_VSOCK`).
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// Starts a non-blocking connect of a socket of type `ty` (`SOCK_STREAM`, `SOCK_SEQPACKET`) to
/// `cid:port` with `flags`, which the kernel gives `timeout` (`SO_VM_SOCKETS_CONNECT_TIMEOUT`;
/// its default is 2 s); `connected` is `false` while it is in progress (wait for writability,
/// then check `SO_ERROR`).
pub(crate) fn connect(
    cid: u32,
    port: u32,
    flags: u8,
    timeout: Duration,
    ty: libc::c_int,
) -> io::Result<(OwnedFd, bool)> {
    let fd = socket("vsock connect", ty)?;
    set_timeval_option(
        fd.as_raw_fd(),
        libc::AF_VSOCK,
        SO_VM_SOCKETS_CONNECT_TIMEOUT,
        timeout,
    )?;
    let addr = SockaddrVm::new(cid, port, flags);
    loop {
        // SAFETY: `addr` is a valid sockaddr_vm, alive for the call.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const SockaddrVm).cast(),
                mem::size_of::<SockaddrVm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok((fd, true));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINPROGRESS) => return Ok((fd, false)),
            _ => return Err(err),
        }
    }
}

/// A non-blocking AF_VSOCK listener on `port` (any local CID).
pub(crate) fn listen(port: u32) -> io::Result<OwnedFd> {
    let fd = socket("vsock listen", libc::SOCK_STREAM)?;
    let addr = SockaddrVm::new(VMADDR_CID_ANY, port, 0);
    // SAFETY: `addr` is a valid sockaddr_vm, alive for the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const SockaddrVm).cast(),
            mem::size_of::<SockaddrVm>() as libc::socklen_t,
        )
    };
    cvt(r as isize)?;
    // SAFETY: plain syscall on a socket we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) } as isize)?;
    Ok(fd)
}

/// Accepts one connection from an AF_VSOCK listener: the non-blocking stream socket and the
/// peer's CID and port.
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<(OwnedFd, u32, u32)> {
    check_allowed("vsock accept")?;
    let mut addr = SockaddrVm::default();
    let mut len = mem::size_of::<SockaddrVm>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes of the sizes given.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut addr as *mut SockaddrVm).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    cvt(fd as isize)?;
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((fd, addr.cid, addr.port))
}

/// This machine's own CID as its hypervisor sees it (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on the
/// vsock device at `dev`).
pub(crate) fn local_cid(dev: &Path) -> io::Result<u32> {
    check_allowed("vsock local CID")?;
    let f = File::open(dev)?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 into `cid`, which is valid for the call.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID as _,
            &mut cid as *mut u32,
        )
    };
    cvt(r as isize)?;
    Ok(cid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_guard_reads_non_empty_values() {
        assert!(!forbidden_by(None));
        assert!(!forbidden_by(Some(OsStr::new(""))));
        assert!(forbidden_by(Some(OsStr::new("1"))));
        assert!(forbidden_by(Some(OsStr::new("no"))));
    }

    #[test]
    fn every_af_vsock_entry_point_is_guarded() {
        assert!(af_vsock_forbidden());
        for ty in [libc::SOCK_STREAM, libc::SOCK_SEQPACKET] {
            let e = connect(2, 80, VMADDR_FLAG_TO_HOST, Duration::from_secs(2), ty).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(FORBID_ENV), "{e}");
        }
        assert!(listen(80).is_err());
        assert!(local_cid(Path::new("/dev/vsock")).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(accept(&OwnedFd::from(a)).is_err());
        assert_eq!(sockets_created(), 0);
    }

    #[test]
    fn sockaddr_layout_matches_the_kernel() {
        let a = SockaddrVm::new(3, 1024, VMADDR_FLAG_TO_HOST);
        // SAFETY: SockaddrVm is plain old data of 16 bytes (asserted at compile time).
        let bytes: [u8; 16] = unsafe { mem::transmute(a) };
        let mut want = [0u8; 16];
        want[..2].copy_from_slice(&(libc::AF_VSOCK as u16).to_ne_bytes());
        want[4..8].copy_from_slice(&1024u32.to_ne_bytes());
        want[8..12].copy_from_slice(&3u32.to_ne_bytes());
        want[12] = 1;
        assert_eq!(bytes, want);
    }
}
