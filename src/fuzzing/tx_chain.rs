//! `tx_chain`: hostile descriptor tables, avail rings and buffers against [`Chain::walk`] and
//! [`parse_tx`].
//!
//! The input becomes the contents of a small guest memory (two adjacent regions, so buffers can
//! straddle them, and a third one after a hole), plus the queue size and the addresses of the
//! descriptor table and avail ring. Every head the avail ring names is walked both ways and
//! parsed as a TX packet. Asserted for every accepted chain: it has at most [`MAX_SEGMENTS`]
//! non-empty segments, each inside guest memory by our own map of it, `len()` is their sum,
//! reads and iovecs cover it exactly; and for every accepted TX packet: the header is the chain's
//! first 44 bytes, `len` ≤ 64 KiB and ≤ the chain's payload room, and `parse_tx` refuses exactly
//! what it must, with the reason it gives.

use std::cell::RefCell;

use vm_memory::{Bytes, GuestAddress};

use super::Input;
use crate::vq::chain::{Chain, Direction, MAX_SEGMENTS};
use crate::vq::iovec::IoVecs;
use crate::vq::GuestMemory;
use crate::vq::{parse_tx, TxError};
use crate::wire::{Header, HEADER_LEN, MAX_PAYLOAD};

/// The guest memory map: `[0, 0x4000)` in two regions, a hole, then `[0x10000, 0x11000)`.
const REGIONS: [(u64, u64); 3] = [(0, 0x2000), (0x2000, 0x2000), (0x1_0000, 0x1000)];
/// Folded addresses fall in `[0, SPAN)`: mostly inside memory, sometimes in the hole or past it.
const SPAN: u64 = 0x1_1800;
/// Most heads taken from the avail ring per input.
const MAX_HEADS: u32 = 4;

thread_local! {
    static MEM: RefCell<Option<GuestMemory>> = const { RefCell::new(None) };
}

fn with_mem<R>(f: impl FnOnce(&GuestMemory) -> R) -> R {
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            let ranges: Vec<(GuestAddress, usize)> = REGIONS
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l as usize))
                .collect();
            GuestMemory::from_ranges(&ranges).expect("fuzz guest memory")
        });
        f(mem)
    })
}

/// Whether `[addr, addr + len)` lies inside guest memory, by our own map (not vm-memory's).
fn inside(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    // The first two regions are adjacent: one range.
    let ranges = [(0u64, 0x4000u64), (0x1_0000, 0x1_1000)];
    ranges.iter().any(|&(s, e)| addr >= s && end <= e)
}

/// The fuzz body; see the module documentation of `fuzzing::tx_chain`.
pub fn tx_chain(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let qraw = inp.u16();
    let queue_size = if mode & 4 != 0 { qraw } else { 1 + qraw % 256 };
    let traw = inp.u64();
    let table = if mode & 2 != 0 { traw } else { traw % SPAN };
    let araw = inp.u64();
    let avail = if mode & 2 != 0 { araw } else { araw % SPAN };
    let heads = 1 + inp.below(MAX_HEADS);
    let image = inp.bytes(usize::MAX);
    with_mem(|mem| {
        // The whole memory is the input's image, zero-padded: nothing of the last run survives.
        let mut off = 0usize;
        for &(addr, len) in REGIONS.iter() {
            let mut buf = vec![0u8; len as usize];
            let n = image.len().saturating_sub(off).min(buf.len());
            buf[..n].copy_from_slice(&image[off..off + n]);
            off += n;
            mem.write_slice(&buf, GuestAddress(addr)).expect("region");
        }
        if mode & 1 != 0 {
            fold_table(mem, table, queue_size, mode & 8 != 0);
        }
        for k in 0..heads {
            let at = avail.wrapping_add(4 + 2 * u64::from(k));
            let head: u16 = match mem.read_obj(GuestAddress(at)) {
                Ok(h) => h,
                // The device reads the ring through virtio-queue, which refuses such a ring;
                // still walk something.
                Err(_) => k as u16,
            };
            check_one(mem, GuestAddress(table), queue_size, head);
        }
    });
}

/// Makes descriptors point mostly into memory and, with `fold_next`, at indexes inside the
/// table, so that the fuzzer reaches accepted chains often.
fn fold_table(mem: &GuestMemory, table: u64, queue_size: u16, fold_next: bool) {
    for i in 0..u64::from(queue_size.min(512)) {
        let at = table.wrapping_add(16 * i);
        if let Ok(a) = mem.read_obj::<u64>(GuestAddress(at)) {
            let _ = mem.write_obj(a % SPAN, GuestAddress(at));
        }
        if fold_next && queue_size > 0 {
            let nat = at.wrapping_add(14);
            if let Ok(n) = mem.read_obj::<u16>(GuestAddress(nat)) {
                let _ = mem.write_obj(n % queue_size, GuestAddress(nat));
            }
        }
    }
}

fn check_one(mem: &GuestMemory, table: GuestAddress, queue_size: u16, head: u16) {
    let mut walked_tx = None;
    for dir in [Direction::DeviceReads, Direction::DeviceWrites] {
        let Ok(chain) = Chain::walk(mem, table, queue_size, head, dir) else {
            continue;
        };
        check_chain(mem, &chain, queue_size, head);
        if dir == Direction::DeviceReads {
            walked_tx = Some(chain);
        }
    }
    let parsed = parse_tx(mem, table, queue_size, head);
    match (&parsed, &walked_tx) {
        (Ok((chain, h)), Some(walked)) => {
            assert_eq!(chain.segments(), walked.segments(), "walk is deterministic");
            assert!(
                h.len <= MAX_PAYLOAD,
                "accepted header len {} > 64 KiB",
                h.len
            );
            assert!(
                u64::from(h.len) + HEADER_LEN as u64 <= chain.len(),
                "accepted header len {} beyond chain of {}",
                h.len,
                chain.len()
            );
            let mut raw = [0u8; HEADER_LEN];
            read_segments(mem, chain, &mut raw);
            assert_eq!(
                *h,
                Header::decode(&raw),
                "header is the chain's first 44 bytes"
            );
        }
        (Ok(_), None) => panic!("parse_tx accepted a chain that walk refused"),
        (Err(e), None) => assert!(matches!(e, TxError::Chain(_)), "{e}"),
        (Err(e), Some(w)) => {
            // Refused only for a short chain or a bad header length.
            if w.len() < HEADER_LEN as u64 {
                assert_eq!(*e, TxError::ShortHeader);
            } else {
                let mut raw = [0u8; HEADER_LEN];
                read_segments(mem, w, &mut raw);
                let h = Header::decode(&raw);
                assert_eq!(*e, TxError::BadLen(h.len));
                assert!(
                    h.len > MAX_PAYLOAD || u64::from(h.len) + HEADER_LEN as u64 > w.len(),
                    "parse_tx refused a valid packet: {h:?}, chain {}",
                    w.len()
                );
            }
        }
    }
}

fn check_chain(mem: &GuestMemory, chain: &Chain, queue_size: u16, head: u16) {
    assert_eq!(chain.head(), head);
    let segs = chain.segments();
    assert!(segs.len() <= MAX_SEGMENTS);
    assert!(
        segs.len() <= usize::from(queue_size),
        "more segments than descriptors"
    );
    let mut sum = 0u64;
    for s in segs {
        assert!(s.len > 0, "empty segment kept");
        assert!(
            inside(s.addr.0, u64::from(s.len)),
            "accepted segment {:#x}+{:#x} outside guest memory",
            s.addr.0,
            s.len
        );
        sum += u64::from(s.len);
    }
    assert_eq!(chain.len(), sum, "len() is not the sum of the segments");
    assert_eq!(chain.is_empty(), sum == 0);
    // Reads and iovecs cover the whole chain (bounded: the memory is 20 KiB).
    let mut buf = vec![0u8; sum as usize + 8];
    assert_eq!(chain.read_at(mem, 0, &mut buf), sum as usize);
    let mut mine = vec![0u8; sum as usize];
    read_segments(mem, chain, &mut mine);
    assert_eq!(
        &buf[..sum as usize],
        &mine[..],
        "read_at differs from the segments"
    );
    if sum > 3 {
        assert_eq!(chain.read_at(mem, sum - 3, &mut buf[..8]), 3);
    }
    let mut iov = IoVecs::new();
    let covered = chain.iovecs(mem, 0, sum, &mut iov);
    assert_eq!(covered as u64, sum, "iovecs do not cover the chain");
    assert_eq!(iov.len(), covered);
}

/// Fills `out` from the chain's segments by plain guest reads (the test's own path).
fn read_segments(mem: &GuestMemory, chain: &Chain, out: &mut [u8]) {
    let mut done = 0usize;
    for s in chain.segments() {
        if done == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], s.addr)
            .expect("segment inside memory");
        done += n;
    }
    assert_eq!(done, out.len(), "chain shorter than asked");
}
