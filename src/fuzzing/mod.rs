//! Fuzz bodies: one `pub fn(&[u8])` per fuzz target, shared by `fuzz/` (cargo-fuzz) and
//! `tests/fuzz_corpus.rs` (the checked-in corpus under plain `cargo test`).
//!
//! Every body treats its input as hostile guest (or host client) bytes, drives real library code
//! with it, and panics only when an invariant of ours is broken — a panic is a finding. Each
//! iteration is bounded in steps and time, opens no AF_VSOCK socket (host streams are Unix socket
//! pairs) and leaks nothing; the bodies that need guest memory reuse one mapping per thread.
//!
//! See `docs/security.md` for the threat model and what each target asserts.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use crate::stream::Readiness;

mod config;
mod csm;
mod device;
mod handshake;
mod input;
mod relay;
mod tx_chain;

pub use config::config;
pub use csm::csm;
pub use device::device;
pub use handshake::handshake;
pub use input::{Input, XorShift};
pub use relay::relay;
pub use tx_chain::tx_chain;

/// A fuzz body.
pub type FuzzBody = fn(&[u8]);

/// Every fuzz body with its target name (the name of its `fuzz/fuzz_targets/*.rs` and of its
/// corpus folder `fuzz/corpus/<name>/`).
pub const TARGETS: &[(&str, FuzzBody)] = &[
    ("tx_chain", tx_chain),
    ("device", device),
    ("csm", csm),
    ("relay", relay),
    ("handshake", handshake),
    ("config", config),
];

/// A non-blocking Unix socket pair for one connection's host stream (or link) and its peer,
/// with 2 KiB socket buffers when `small`, so that short writes and back-pressure happen early.
fn socket_pair(small: bool) -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    for s in [&a, &b] {
        s.set_nonblocking(true).expect("nonblocking");
        if small {
            crate::sim::backend::set_buf(s, 2048);
        }
    }
    (a, b)
}

/// A connection timeout the input picks: none at all (expires at once), 10 ms, or the 2 s
/// default.
fn timeout(sel: u8) -> std::time::Duration {
    match sel % 3 {
        0 => std::time::Duration::ZERO,
        1 => std::time::Duration::from_millis(10),
        _ => std::time::Duration::from_secs(2),
    }
}

/// Readiness of `fd` as level-triggered epoll would report it for `interest`.
fn level_readiness(fd: std::os::fd::RawFd, interest: crate::csm::types::Interest) -> Readiness {
    let revents = crate::sys::poll_one(fd, libc::POLLIN | libc::POLLOUT, 0).unwrap_or(0);
    Readiness {
        readable: interest.read && revents & (libc::POLLIN | libc::POLLHUP) != 0,
        writable: interest.write && revents & libc::POLLOUT != 0,
        hangup: revents & libc::POLLHUP != 0,
        error: revents & libc::POLLERR != 0,
    }
}

/// A non-blocking send on a host stream that never raises SIGPIPE: libFuzzer's main, unlike
/// Rust's, does not ignore it.
fn send_nosignal(s: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    crate::sys::send_nosignal(s.as_raw_fd(), buf)
}
