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

mod config;
mod csm;
mod device;
mod handshake;
mod input;
mod tx_chain;

pub use config::config;
pub use csm::csm;
pub use device::device;
pub use handshake::handshake;
pub use input::{Input, XorShift};
pub use tx_chain::tx_chain;

/// A fuzz body.
pub type FuzzBody = fn(&[u8]);

/// Every fuzz body with its target name (the name of its `fuzz/fuzz_targets/*.rs` and of its
/// corpus folder `fuzz/corpus/<name>/`).
pub const TARGETS: &[(&str, FuzzBody)] = &[
    ("tx_chain", tx_chain),
    ("device", device),
    ("csm", csm),
    ("handshake", handshake),
    ("config", config),
];

/// A non-blocking send on a host stream that never raises SIGPIPE: libFuzzer's main, unlike
/// Rust's, does not ignore it.
fn send_nosignal(s: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
