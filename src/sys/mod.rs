//! The raw system calls of the crate, each wrapped once with its `SAFETY` argument: sockets,
//! `poll`, `readv`/`sendmsg` on guest-memory iovecs ([`socket`](mod@socket)), AF_VSOCK behind its
//! process-wide guard ([`vsock`]), and the file-descriptor limit ([`limits`]). The rest of the
//! crate calls these and holds no `unsafe` block for a system call. A leaf: depends only on
//! [`crate::vq`] for the iovec lists.

pub mod limits;
pub mod socket;
pub mod vsock;

pub use limits::{raise_fd_limit, FdLimit};
pub use socket::*;
