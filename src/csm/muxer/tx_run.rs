//! TX coalescing (issue 14): consecutive RW packets of one stream connection in one TX batch
//! go to the host in one `writev` ([`Connection::on_data_run`]), their descriptors returned to
//! the driver only after it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Muxer, Watch};
use crate::csm::conn::Conn;
use crate::csm::table::Key;
use crate::seam::Backend;
use crate::vq::{Chain, GuestMemory};
use crate::wire::{op, sock_type, Header};

#[cfg(doc)]
use crate::csm::connection::Connection;

/// How many packets at the front of `packets` (at least one, if any) may be handled as one
/// run: RW packets of SOCK_STREAM with the same addresses. Anything else stands alone.
pub fn tx_run_len(packets: &[(Chain, Header)]) -> usize {
    let Some((_, first)) = packets.first() else {
        return 0;
    };
    let joins = |h: &Header| {
        h.op == op::RW
            && h.type_ == sock_type::STREAM
            && h.src_cid == first.src_cid
            && h.dst_cid == first.dst_cid
            && h.src_port == first.src_port
            && h.dst_port == first.dst_port
    };
    if !joins(first) {
        return 1;
    }
    1 + packets[1..].iter().take_while(|(_, h)| joins(h)).count()
}

impl<B: Backend> Muxer<B> {
    /// Handles `packets`, a run as [`tx_run_len`] finds them, with the same effect as
    /// [`Muxer::handle_tx`] on each in turn: a run for a live stream connection of the guest's
    /// own CID is one host write; anything else goes packet by packet.
    pub fn handle_tx_run(
        &mut self,
        w: &impl Watch,
        mem: &GuestMemory,
        packets: &[(Chain, Header)],
        now: Instant,
    ) {
        if let [(_, h), _, ..] = packets {
            if h.src_cid == self.guest_cid {
                let key = Key {
                    cid: h.dst_cid,
                    port: h.dst_port,
                    guest_port: h.src_port,
                };
                if let Some(id) = self.table.find(&key) {
                    let ran = match self.table.get_mut(id).map(|e| &mut e.conn) {
                        Some(Conn::Stream(c)) => Some(c.on_data_run(packets, mem, now)),
                        _ => None,
                    };
                    if let Some(shared) = ran {
                        self.counters
                            .tx_coalesced
                            .fetch_add(shared as u64, Ordering::Relaxed);
                        self.after_change(w, id, now);
                        return;
                    }
                }
            }
        }
        for (chain, h) in packets {
            self.handle_tx(w, mem, chain, h, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vq::{Chain, Direction, GuestMemory};
    use vm_memory::{Bytes, GuestAddress};

    fn h(op: u16, type_: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port,
            dst_port,
            len: 1,
            type_,
            op,
            ..Header::default()
        }
    }

    fn chain(mem: &GuestMemory) -> Chain {
        // One 64-byte descriptor at 0x1000, in a table at 0.
        mem.write_obj(0x1000u64, GuestAddress(0)).unwrap();
        mem.write_obj(64u32, GuestAddress(8)).unwrap();
        mem.write_obj(0u16, GuestAddress(12)).unwrap();
        Chain::walk(mem, GuestAddress(0), 16, 0, Direction::DeviceReads).unwrap()
    }

    #[test]
    fn runs_are_rw_packets_of_one_stream_connection() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let c = chain(&mem);
        let p = |h: Header| (c.clone(), h);
        let rw = |port| p(h(op::RW, sock_type::STREAM, port, 80));
        assert_eq!(tx_run_len(&[]), 0);
        assert_eq!(tx_run_len(&[rw(1)]), 1);
        assert_eq!(tx_run_len(&[rw(1), rw(1), rw(1), rw(2), rw(1)]), 3);
        // A credit update between two RW packets ends the run; so does another type.
        let cu = p(h(op::CREDIT_UPDATE, sock_type::STREAM, 1, 80));
        assert_eq!(tx_run_len(&[rw(1), cu.clone(), rw(1)]), 1);
        assert_eq!(tx_run_len(&[cu, rw(1)]), 1);
        let seq = p(h(op::RW, sock_type::SEQPACKET, 1, 80));
        assert_eq!(tx_run_len(&[seq.clone(), seq]), 1);
        let mut other_cid = h(op::RW, sock_type::STREAM, 1, 80);
        other_cid.dst_cid = 9;
        assert_eq!(tx_run_len(&[rw(1), p(other_cid)]), 1);
    }
}
