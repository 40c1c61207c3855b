//! `vr-socat`: socat with a longer AF_VSOCK connect timeout, for the scenarios' guests only.
//!
//! Linux gives an AF_VSOCK connect 2 s (`SO_VM_SOCKETS_CONNECT_TIMEOUT`), after which the guest
//! gives up on a connection that the device may already have opened on the host side. socat
//! 1.7.4.4 (Debian 12, the one in our images) cannot raise it: its generic `setsockopt-bin` /
//! `setsockopt-int` options are parsed but never applied to a `VSOCK-CONNECT` socket (its debug
//! log shows no `setsockopt` call between `socket()` and `connect()`). So this program opens
//! each `VSOCK-CONNECT:<cid>:<port>[,<options>]` argument itself — `socket(AF_VSOCK)`, the
//! connect timeout (`$VR_VSOCK_CONNECT_TIMEOUT` seconds, default 60), `connect()` — and then
//! runs socat with `FD:<n>,shut-down[,<options>]` in its place, so socat's data transfer,
//! half-close and exit status stay exactly socat's. Every other argument is passed through.
//!
//! A failed connect prints `vr-socat[<pid>] E connect(AF=40 cid:<c> port:<p>): <reason>` on
//! stderr (the reason as socat would word it, e.g. `Connection reset by peer`) and exits 1, as
//! socat does. With `VR_SOCAT_LOCAL=<file>`, the connection's local port is written to `<file>`
//! before socat starts (a receiver names each connection by its peer port).
//!
//! It never runs on the machine itself: it refuses to start when
//! `VSOCK_ROUTER_FORBID_AF_VSOCK` is set, as `scripts/test.sh` sets it. The harness builds it
//! statically and puts it on `PATH` in the KVM host and the inner guest (`/vr/bin`).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

const AF_VSOCK: libc::c_int = 40;
/// `SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD`: a `struct timeval` (16 bytes on x86_64), in every kernel.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
const DEFAULT_TIMEOUT_S: i64 = 60;

const HELP: &str = "usage: vr-socat [SOCAT OPTIONS] ADDRESS ADDRESS

socat, except that each VSOCK-CONNECT:<cid>:<port>[,<options>] address is connected here with
the kernel's AF_VSOCK connect timeout raised to $VR_VSOCK_CONNECT_TIMEOUT seconds (default 60),
then handed to socat as FD:<n>,shut-down[,<options>].
VR_SOCAT_LOCAL=<file>: write the connection's local port to <file>.
Refuses to run when VSOCK_ROUTER_FORBID_AF_VSOCK is set (on the test machine itself).";

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockaddrVm {
    svm_family: libc::sa_family_t,
    svm_reserved1: u16,
    svm_port: u32,
    svm_cid: u32,
    svm_flags: u8,
    svm_zero: [u8; 3],
}

/// `VSOCK-CONNECT:<cid>:<port>[,<options>]` → (cid, port, `,<options>` or "").
fn parse_vsock_connect(arg: &str) -> Option<(u32, u32, &str)> {
    let prefix = "VSOCK-CONNECT:";
    if arg.len() < prefix.len() || !arg[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &arg[prefix.len()..];
    let (addr, opts) = match rest.find(',') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (cid, port) = addr.split_once(':')?;
    Some((cid.parse().ok()?, port.parse().ok()?, opts))
}

fn timeout_secs() -> Result<i64, String> {
    match std::env::var("VR_VSOCK_CONNECT_TIMEOUT") {
        Err(_) => Ok(DEFAULT_TIMEOUT_S),
        Ok(v) => match v.parse::<i64>() {
            Ok(s) if (1..=3600).contains(&s) => Ok(s),
            _ => Err(format!(
                "VR_VSOCK_CONNECT_TIMEOUT={v}: want seconds, 1 to 3600"
            )),
        },
    }
}

/// A connected AF_VSOCK stream socket (inheritable: no close-on-exec) and its local port.
fn connect(cid: u32, port: u32, timeout_s: i64) -> io::Result<(libc::c_int, u32)> {
    // SAFETY: plain system calls on a descriptor this function owns; the pointers passed point
    // to live, correctly sized locals.
    unsafe {
        let fd = libc::socket(AF_VSOCK, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd| {
            let e = io::Error::last_os_error();
            libc::close(fd);
            e
        };
        let tv = libc::timeval {
            tv_sec: timeout_s,
            tv_usec: 0,
        };
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        if libc::setsockopt(
            fd,
            AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&tv as *const libc::timeval).cast(),
            len,
        ) != 0
        {
            return Err(fail(fd));
        }
        // Read it back: a kernel that ignored it would bring back the 2 s flakes unnoticed.
        let mut got = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        let mut got_len = len;
        if libc::getsockopt(
            fd,
            AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&mut got as *mut libc::timeval).cast(),
            &mut got_len,
        ) != 0
        {
            return Err(fail(fd));
        }
        if got.tv_sec != timeout_s {
            libc::close(fd);
            return Err(io::Error::other(format!(
                "the kernel kept a connect timeout of {} s instead of {timeout_s} s",
                got.tv_sec
            )));
        }
        let addr = SockaddrVm {
            svm_family: AF_VSOCK as libc::sa_family_t,
            svm_port: port,
            svm_cid: cid,
            ..Default::default()
        };
        let addr_len = std::mem::size_of::<SockaddrVm>() as libc::socklen_t;
        if libc::connect(fd, (&addr as *const SockaddrVm).cast(), addr_len) != 0 {
            return Err(fail(fd));
        }
        let mut local = SockaddrVm::default();
        let mut local_len = addr_len;
        if libc::getsockname(fd, (&mut local as *mut SockaddrVm).cast(), &mut local_len) != 0 {
            return Err(fail(fd));
        }
        Ok((fd, local.svm_port))
    }
}

/// socat's wording of an errno ("Connection reset by peer"), without Rust's "(os error N)".
fn reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::from(if args.is_empty() { 2 } else { 0 });
    }
    if std::env::var_os("VSOCK_ROUTER_FORBID_AF_VSOCK").is_some() {
        eprintln!("vr-socat: VSOCK_ROUTER_FORBID_AF_VSOCK is set: no AF_VSOCK on this machine");
        return ExitCode::from(2);
    }
    let timeout = match timeout_secs() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vr-socat: {e}");
            return ExitCode::from(2);
        }
    };
    let pid = std::process::id();
    let mut socat_args = Vec::with_capacity(args.len());
    for arg in args {
        let Some((cid, port, opts)) = arg.to_str().and_then(parse_vsock_connect) else {
            socat_args.push(arg);
            continue;
        };
        match connect(cid, port, timeout) {
            Ok((fd, local_port)) => {
                if let Some(file) = std::env::var_os("VR_SOCAT_LOCAL") {
                    if let Err(e) = std::fs::write(&file, format!("{local_port}\n")) {
                        eprintln!("vr-socat[{pid}] E writing VR_SOCAT_LOCAL: {e}");
                        return ExitCode::from(1);
                    }
                }
                socat_args.push(format!("FD:{fd},shut-down{opts}").into());
            }
            Err(e) => {
                eprintln!(
                    "vr-socat[{pid}] E connect(AF=40 cid:{cid} port:{port}): {}",
                    reason(&e)
                );
                return ExitCode::from(1);
            }
        }
    }
    let e = Command::new("socat").args(&socat_args).exec();
    eprintln!("vr-socat[{pid}] E cannot run socat: {e}");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_vsock_connect_addresses_only() {
        assert_eq!(
            parse_vsock_connect("VSOCK-CONNECT:2:1234"),
            Some((2, 1234, ""))
        );
        assert_eq!(
            parse_vsock_connect("vsock-connect:77:6000,b=2048"),
            Some((77, 6000, ",b=2048"))
        );
        assert_eq!(parse_vsock_connect("VSOCK-LISTEN:5000"), None);
        assert_eq!(parse_vsock_connect("VSOCK-CONNECT:2"), None);
        assert_eq!(parse_vsock_connect("VSOCK-CONNECT:x:1"), None);
        assert_eq!(parse_vsock_connect("FILE:/tmp/VSOCK-CONNECT:2:1"), None);
        assert_eq!(parse_vsock_connect("-u"), None);
    }

    #[test]
    fn reasons_read_like_socat() {
        let e = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(reason(&e), "Connection reset by peer");
    }

    #[test]
    fn the_sockaddr_is_the_kernels() {
        assert_eq!(std::mem::size_of::<SockaddrVm>(), 16);
        assert_eq!(std::mem::size_of::<libc::timeval>(), 16);
    }
}
