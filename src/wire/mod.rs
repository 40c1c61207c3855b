//! The wire formats, a leaf under everything else: the 44-byte virtio-vsock packet header with
//! its ops, flags and socket types ([`header`]), context IDs ([`cid`]), and the handshake lines
//! of the host-side Unix sockets ([`mod@line`]). Nothing here imports the rest of the crate.

pub mod cid;
pub mod header;
pub mod line;

pub use cid::Cid;
pub use header::{
    op, seq, shutdown, sock_type, Header, SockType, HEADER_LEN, HOST_CID, MAX_PAYLOAD,
};
