//! The TX packet view: a chain checked once, its header copied out of guest memory once and
//! validated on the copy (so a guest that rewrites its buffer cannot change a decision taken).

use std::fmt;

use vm_memory::GuestAddress;

use super::chain::{Chain, ChainError, Direction};
use super::GuestMemory;
use crate::wire::{Header, HEADER_LEN, MAX_PAYLOAD};

/// Why a TX chain is malformed. The device returns it unanswered (its header cannot be
/// trusted) and counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxError {
    /// The chain itself is broken.
    Chain(ChainError),
    /// The chain is shorter than a header.
    ShortHeader,
    /// The header's `len` is beyond the chain or beyond 64 KiB.
    BadLen(u32),
}

impl fmt::Display for TxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxError::Chain(e) => write!(f, "{e}"),
            TxError::ShortHeader => write!(f, "chain shorter than the {HEADER_LEN}-byte header"),
            TxError::BadLen(n) => write!(f, "payload length {n} beyond the chain or 64 KiB"),
        }
    }
}

impl std::error::Error for TxError {}

/// Walks the TX chain at `head` of the descriptor table at `table` (a queue of `queue_size`)
/// and copies its header out once; `len` is checked against the chain and 64 KiB.
pub fn parse_tx(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<(Chain, Header), TxError> {
    let chain = Chain::walk(mem, table, queue_size, head, Direction::DeviceReads)
        .map_err(TxError::Chain)?;
    let mut raw = [0u8; HEADER_LEN];
    if chain.read_at(mem, 0, &mut raw) != HEADER_LEN {
        return Err(TxError::ShortHeader);
    }
    let h = Header::decode(&raw);
    if h.len > MAX_PAYLOAD || u64::from(h.len) > chain.len() - HEADER_LEN as u64 {
        return Err(TxError::BadLen(h.len));
    }
    Ok((chain, h))
}
