//! The hostile steps of the `device` body: packets whose every header field is fuzzed, and
//! hand-written TX descriptor chains with fuzzed addresses, lengths, flags and links. Both use
//! their own port range (`RAW_BASE`..), so they cannot corrupt the books the
//! [parent module](super) keeps on tracked sockets.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::{Input, Run, GUEST, RAW_BASE};
use crate::sim::{RawDesc, MEM_SIZE, REGION_SPLIT};
use crate::wire::{sock_type, Header, MAX_PAYLOAD};

/// Scratch guest memory for hostile chains, away from the simulated driver's buffers.
const SCRATCH: u64 = 0x300_0000;

impl Run {
    /// A header with every field fuzzed, from a port range nothing tracked uses.
    fn raw_header(inp: &mut Input) -> Header {
        let mut h = Header {
            src_cid: if inp.one_in(6) { inp.u64() } else { GUEST },
            dst_cid: match inp.u8() % 6 {
                0 => inp.u64(),
                1 => 1,
                _ => 2,
            },
            src_port: RAW_BASE + inp.below(4),
            dst_port: if inp.one_in(4) {
                inp.u32()
            } else {
                inp.below(4)
            },
            len: 0,
            type_: if inp.one_in(6) {
                inp.u16()
            } else {
                sock_type::STREAM
            },
            op: inp.op(),
            flags: inp.flags(),
            buf_alloc: match inp.u8() % 4 {
                0 => inp.u32(),
                1 => 0,
                _ => 256 * 1024,
            },
            fwd_cnt: if inp.one_in(2) { inp.u32() } else { 0 },
        };
        h.len = match inp.u8() % 4 {
            0 => inp.u32(),
            1 => u32::from(inp.u16()),
            _ => u32::from(inp.u8()),
        };
        h
    }

    /// A packet with every header field fuzzed and a payload of any length up to 64 KiB.
    pub(super) fn hostile_packet(&mut self, inp: &mut Input) {
        self.set_layout(inp);
        let h = Self::raw_header(inp);
        let plen = if h.len <= MAX_PAYLOAD && inp.one_in(2) {
            h.len as usize
        } else {
            usize::from(inp.u16()) % (MAX_PAYLOAD as usize + 1)
        };
        let payload = vec![0xabu8; plen];
        self.g.send_packet(&h, &payload);
        self.g.pump(Duration::ZERO);
    }

    /// A hand-written chain of 1–4 descriptors with fuzzed addresses, lengths, flags and links
    /// (links stay inside the chain or leave the table, so no tracked packet is read twice).
    pub(super) fn hostile_chain(&mut self, inp: &mut Input) {
        let n = 1 + inp.below(4) as usize;
        if self.g.txq.free_descs() < n + 20 {
            return;
        }
        let h = Self::raw_header(inp).encode();
        let m = self.g.mem.clone();
        m.write_slice(&h, GuestAddress(SCRATCH)).expect("scratch");
        self.g.mark_written(GuestAddress(SCRATCH), h.len());
        let ids = self.g.txq.take_descs(n).expect("checked");
        for (k, &id) in ids.iter().enumerate() {
            let addr = match inp.u8() % 8 {
                0 => MEM_SIZE - u64::from(inp.u8()),
                1 => u64::MAX - u64::from(inp.u8()),
                2 => REGION_SPLIT - 22,
                3 => inp.u64(),
                _ => SCRATCH + u64::from(inp.u8() % 64),
            };
            let len = match inp.u8() % 6 {
                0 => 0,
                1 => inp.u32(),
                2 => 44,
                _ => u32::from(inp.u16() % 0x2000),
            };
            let flags = if inp.one_in(6) {
                inp.u16()
            } else {
                u16::from(inp.u8() % 8)
            };
            let next = match inp.u8() % 4 {
                0 => 256 + inp.u16() % 1000,
                _ => ids[inp.below(n as u32) as usize],
            };
            let next = if next < 256 && !ids.contains(&next) {
                ids[k]
            } else {
                next
            };
            self.g.txq.write_desc(
                &m,
                id,
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.g.txq.track(ids[0], &ids);
        self.g.txq.publish(&m, ids[0]);
        self.g.kick(1);
        self.g.pump(Duration::ZERO);
    }
}
