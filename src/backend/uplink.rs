//! The G2H uplink: connections our guest makes to CIDs nobody on this machine owns go to the
//! parent machine's hypervisor, over AF_VSOCK with `VMADDR_FLAG_TO_HOST` (see the protocol notes,
//! §9). For tests and single-level setups a Unix stand-in replaces AF_VSOCK. Both carry
//! `SOCK_STREAM` and `SOCK_SEQPACKET` connections ([`Uplink::connect`]); `listen=` (inbound,
//! [`super::listen`]) is stream-only.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::seqpacket;
use super::stream::SockStream;
use super::unix;
use super::vsock::{self, VMADDR_FLAG_TO_HOST};
use crate::wire::{Cid, SockType};

/// The default vsock device of the parent machine.
pub const DEV_VSOCK: &str = "/dev/vsock";

/// Where the uplink goes, as configured.
///
/// Text form ([`FromStr`] / [`Display`](fmt::Display)): `none`; `vsock` or `/dev/vsock` for the
/// parent's `/dev/vsock`; `vsock:PATH` for another vsock device node; `unix:DIR` for the Unix
/// stand-in, which connects to `DIR/<cid>_<port>` (and listens on `DIR/listen_<port>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UplinkSpec {
    /// No uplink: connects that would need it are refused.
    None,
    /// AF_VSOCK through the parent's vsock device (its path is only used to ask for our CID).
    Vsock(PathBuf),
    /// The Unix stand-in rooted at a directory.
    Unix(PathBuf),
}

/// A bad uplink specification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid uplink {0:?}: expected none, vsock, /dev/vsock, vsock:PATH or unix:DIR")]
pub struct UplinkSpecError(
    /// The text as given.
    pub String,
);

impl FromStr for UplinkSpec {
    type Err = UplinkSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(UplinkSpec::None),
            "vsock" | DEV_VSOCK => Ok(UplinkSpec::Vsock(PathBuf::from(DEV_VSOCK))),
            _ => {
                if let Some(dir) = s.strip_prefix("unix:").filter(|d| !d.is_empty()) {
                    Ok(UplinkSpec::Unix(PathBuf::from(dir)))
                } else if let Some(dev) = s.strip_prefix("vsock:").filter(|d| !d.is_empty()) {
                    Ok(UplinkSpec::Vsock(PathBuf::from(dev)))
                } else {
                    Err(UplinkSpecError(s.to_string()))
                }
            }
        }
    }
}

impl fmt::Display for UplinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkSpec::None => f.write_str("none"),
            UplinkSpec::Vsock(p) if p == Path::new(DEV_VSOCK) => f.write_str(DEV_VSOCK),
            UplinkSpec::Vsock(p) => write!(f, "vsock:{}", p.display()),
            UplinkSpec::Unix(d) => write!(f, "unix:{}", d.display()),
        }
    }
}

/// The uplink of one device: opens outbound connections and counts every attempt.
#[derive(Debug)]
pub struct Uplink {
    spec: UplinkSpec,
    attempts: Arc<AtomicU64>,
    max_message: usize,
}

impl Uplink {
    /// An uplink as specified. Nothing is opened until the first connect. The Unix stand-in's
    /// seqpacket sockets are sized for messages of [`seqpacket::DEFAULT_MAX_MESSAGE`] bytes
    /// unless [`Uplink::with_max_message`] says otherwise.
    pub fn new(spec: UplinkSpec) -> Self {
        Uplink {
            spec,
            attempts: Arc::default(),
            max_message: seqpacket::DEFAULT_MAX_MESSAGE,
        }
    }

    /// Sizes the Unix stand-in's seqpacket sockets for messages of `bytes` (the device's
    /// buffer size; [`seqpacket::fit_messages`], best effort). AF_VSOCK needs no such sizing:
    /// its messages are bounded by the peer's advertised buffer.
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// The specification.
    pub fn spec(&self) -> &UplinkSpec {
        &self.spec
    }

    /// Whether there is an uplink at all.
    pub fn is_some(&self) -> bool {
        self.spec != UplinkSpec::None
    }

    /// Connect attempts so far, failed ones and ones without an uplink included.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// The attempt count, readable from other threads.
    pub fn attempt_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.attempts)
    }

    /// Starts a non-blocking connect to `cid:port` on the parent side with a socket of type
    /// `sock_type`, which the parent's kernel gives `timeout` (its own default would be 2 s):
    /// AF_VSOCK with `VMADDR_FLAG_TO_HOST`, or with the Unix stand-in a Unix socket of that type
    /// to `DIR/<cid>_<port>` (a listener of the other type refuses with `EPROTOTYPE`).
    /// `connected` is `false` while an AF_VSOCK connect is in progress. Errors: `NotConnected`
    /// without an uplink, `InvalidInput` for a CID above `u32::MAX`, `PermissionDenied` when
    /// AF_VSOCK is forbidden ([`vsock::FORBID_ENV`]), or the connect's own error.
    pub fn connect(
        &self,
        cid: u64,
        port: u32,
        timeout: Duration,
        sock_type: SockType,
    ) -> io::Result<(SockStream, bool)> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        match &self.spec {
            UplinkSpec::None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no uplink configured",
            )),
            UplinkSpec::Unix(dir) => {
                let s = unix::connect_typed(&dir.join(format!("{cid}_{port}")), sock_type)?;
                if sock_type == SockType::Seqpacket {
                    seqpacket::fit_messages(s.as_raw_fd(), self.max_message);
                }
                Ok((s, true))
            }
            UplinkSpec::Vsock(_) => {
                let cid = Cid(cid).to_u32().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("CID {cid} does not fit AF_VSOCK's 32 bits"),
                    )
                })?;
                vsock::connect(cid, port, VMADDR_FLAG_TO_HOST, timeout, sock_type.libc())
                    .map(|(fd, done)| (SockStream::from_nonblocking(fd), done))
            }
        }
    }

    /// The parent machine's own CID for this machine (`IOCTL_VM_SOCKETS_GET_LOCAL_CID`), so a
    /// nested guest is never given it. `Ok(None)` unless the uplink is AF_VSOCK; fails when
    /// AF_VSOCK is forbidden.
    pub fn parent_cid(&self) -> io::Result<Option<u32>> {
        match &self.spec {
            UplinkSpec::Vsock(dev) => vsock::local_cid(dev).map(Some),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn specs_parse_and_display() {
        let ok = [
            ("none", UplinkSpec::None, "none"),
            ("vsock", UplinkSpec::Vsock(DEV_VSOCK.into()), DEV_VSOCK),
            ("/dev/vsock", UplinkSpec::Vsock(DEV_VSOCK.into()), DEV_VSOCK),
            (
                "vsock:/dev/vsock-1",
                UplinkSpec::Vsock("/dev/vsock-1".into()),
                "vsock:/dev/vsock-1",
            ),
            (
                "unix:/tmp/up",
                UplinkSpec::Unix("/tmp/up".into()),
                "unix:/tmp/up",
            ),
            ("unix:rel", UplinkSpec::Unix("rel".into()), "unix:rel"),
        ];
        for (text, spec, shown) in ok {
            assert_eq!(text.parse::<UplinkSpec>(), Ok(spec.clone()), "{text}");
            assert_eq!(spec.to_string(), shown);
            assert_eq!(shown.parse::<UplinkSpec>(), Ok(spec));
        }
        for bad in [
            "",
            "None",
            "unix:",
            "unix",
            "vsock:",
            "/dev/vsock2",
            "tcp:1.2.3.4",
        ] {
            let e = bad.parse::<UplinkSpec>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn unix_stand_in_connects_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uplink::new(UplinkSpec::Unix(dir.path().to_path_buf()));
        assert_eq!(up.attempts(), 0);
        let l = UnixListener::bind(dir.path().join("77_5000")).unwrap();
        let (_s, connected) = up.connect(77, 5000, T, SockType::Stream).unwrap();
        assert!(connected);
        assert!(l.accept().is_ok());
        assert_eq!(up.attempts(), 1);
        assert!(up.connect(77, 5001, T, SockType::Stream).is_err());
        assert_eq!(up.attempts(), 2);
        assert_eq!(up.parent_cid().unwrap(), None);
    }

    #[test]
    fn unix_stand_in_connects_seqpacket_to_the_same_path() {
        use crate::backend::seqpacket::max_sendable;
        use crate::backend::seqpacket::tests::{pattern, recv_one, send_one, seq_listener};
        let dir = tempfile::tempdir().unwrap();
        let up = Uplink::new(UplinkSpec::Unix(dir.path().to_path_buf())).with_max_message(300_000);
        let l = seq_listener(&dir.path().join("77_5000"));
        let (s, connected) = up.connect(77, 5000, T, SockType::Seqpacket).unwrap();
        assert!(connected);
        assert!(max_sendable(s.as_raw_fd()).unwrap() >= 300_000);
        let (peer, _) = l.accept().unwrap();
        let msg = pattern(300_000, 3);
        assert_eq!(send_one(&s, &msg).unwrap(), msg.len());
        let (got, m) = recv_one(&peer, msg.len() + 1);
        assert!(!m.truncated);
        assert_eq!(got, msg);
        send_one(&peer, b"reply").unwrap();
        assert_eq!(recv_one(&s, 64).0, b"reply");
        // The stream listener of the stream test refuses a seqpacket connect, and back.
        let _sl = UnixListener::bind(dir.path().join("77_5001")).unwrap();
        let e = up.connect(77, 5001, T, SockType::Seqpacket).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE));
        let e = up.connect(77, 5000, T, SockType::Stream).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPROTOTYPE));
        assert_eq!(up.attempts(), 3);
    }

    #[test]
    fn no_uplink_refuses() {
        let up = Uplink::new(UplinkSpec::None);
        assert!(!up.is_some());
        let e = up.connect(3, 1, T, SockType::Stream).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected);
        assert_eq!(up.attempts(), 1);
    }

    #[test]
    fn vsock_uplink_fails_loudly_under_the_guard() {
        std::env::set_var(vsock::FORBID_ENV, "1");
        let up = Uplink::new("/dev/vsock".parse().unwrap());
        for ty in [SockType::Stream, SockType::Seqpacket] {
            let e = up.connect(2, 1234, T, ty).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(vsock::FORBID_ENV), "{e}");
        }
        assert!(up.parent_cid().is_err());
        assert_eq!(up.attempts(), 2);
        assert_eq!(vsock::sockets_created(), 0);
    }
}
