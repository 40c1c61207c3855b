//! The guest's side of RX for the `csm` target: an RX buffer of fuzzed size and layout offered
//! to the connection, and every check on the packet it wrote there.

use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use super::{build_chain, Books, GUEST_CID, GUEST_PORT, LOCAL_PORT, RX_BUF, RX_TABLE};
use crate::csm::connection::{Connection, State};
use crate::fuzzing::Input;
use crate::vq::GuestMemory;
use crate::wire::{op, shutdown, sock_type, Header, HEADER_LEN, MAX_PAYLOAD};

/// Offers one RX buffer of fuzzed size and layout.
pub(super) fn fill_rx(
    inp: &mut Input,
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    now: Instant,
) {
    let room = match inp.u8() % 4 {
        0 => u64::from(inp.u16() % 64),
        1 => 4096,
        2 => u64::from(MAX_PAYLOAD) + 100,
        _ => u64::from(inp.u16()),
    };
    let total = HEADER_LEN as u64 + room;
    let cuts = [u64::from(inp.u16()) % total, u64::from(inp.u8())];
    fill_rx_with(mem, conn, b, now, room, &cuts);
}

/// Returns whether a packet was produced.
pub(super) fn fill_rx_with(
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    now: Instant,
    room: u64,
    cuts: &[u64],
) -> bool {
    let total = HEADER_LEN as u64 + room;
    let chain = build_chain(mem, RX_TABLE, RX_BUF, total, cuts, true);
    // Stale bytes must not pass for a header.
    mem.write_slice(&[0xeeu8; HEADER_LEN], GuestAddress(RX_BUF))
        .unwrap();
    let was = conn.state();
    let Some(used) = conn.fill_rx(mem, &chain, now) else {
        return false;
    };
    check_packet(mem, conn, b, was, &chain, used, total);
    true
}

/// RX buffers one batch offers at most (each one descriptor of its own table, 0x2000 apart).
const BATCH: usize = 4;

/// Offers 2 to [`BATCH`] RX buffers of fuzzed sizes at once (`Connection::fill_rx_many`): each
/// packet it writes must pass every check of a single one, in order, and a batch of more than
/// one packet carries stream bytes only.
pub(super) fn fill_rx_many(
    inp: &mut Input,
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    now: Instant,
) {
    let n = 2 + usize::from(inp.u8()) % (BATCH - 1);
    let chains: Vec<_> = (0..n)
        .map(|i| {
            let room = match inp.u8() % 3 {
                0 => u64::from(inp.u16() % 64),
                1 => 4096,
                _ => u64::from(inp.u16() % 0x1f00),
            };
            let (table, base) = (RX_TABLE + 0x100 * i as u64, RX_BUF + 0x2000 * i as u64);
            let total = HEADER_LEN as u64 + room;
            let cut = [u64::from(inp.u16()) % total];
            let chain = build_chain(mem, table, base, total, &cut, true);
            mem.write_slice(&[0xeeu8; HEADER_LEN], GuestAddress(base))
                .unwrap();
            (chain, total)
        })
        .collect();
    let only: Vec<_> = chains.iter().map(|(c, _)| c.clone()).collect();
    let mut lens = [0u32; BATCH];
    let was = conn.state();
    let used = conn.fill_rx_many(mem, &only, &mut lens, now);
    assert!(used <= n, "{used} buffers used of {n}");
    for ((chain, total), &len) in chains.iter().zip(&lens).take(used) {
        let h = check_packet(mem, conn, b, was, chain, len, *total);
        assert!(
            used == 1 || h.op == op::RW,
            "op {} in a batch of {used}",
            h.op
        );
    }
}

/// Checks the packet of `used` bytes the connection wrote into `chain` (of `total` bytes), in
/// state `was` before, and books it; returns its header.
fn check_packet(
    mem: &GuestMemory,
    conn: &Connection<UnixStream>,
    b: &mut Books,
    was: State,
    chain: &crate::vq::Chain,
    used: u32,
    total: u64,
) -> Header {
    let credit = b.g_buf_alloc.saturating_sub((b.dev_tx - b.g_fwd_cnt).0);
    b.packets_out += 1;
    let mut raw = [0u8; HEADER_LEN];
    assert_eq!(chain.read_at(mem, 0, &mut raw), HEADER_LEN);
    let h = Header::decode(&raw);
    assert_eq!(
        used as usize,
        HEADER_LEN + h.len as usize,
        "used length != 44 + len"
    );
    assert!(u64::from(used) <= total, "packet larger than the RX buffer");
    assert_eq!(
        (h.src_cid, h.src_port, h.dst_cid, h.dst_port),
        (2, LOCAL_PORT, GUEST_CID, GUEST_PORT),
        "packet addresses"
    );
    assert_eq!(h.type_, sock_type::STREAM);
    assert!(
        (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op),
        "op {}",
        h.op
    );
    if b.packets_out == 1 {
        let first = if b.guest_initiated {
            [op::RESPONSE, op::RST]
        } else {
            [op::REQUEST, op::RST]
        };
        assert!(first.contains(&h.op), "first packet is op {}", h.op);
    }
    if was == State::Killed {
        assert_eq!(h.op, op::RST, "a killed connection sent op {}", h.op);
    }
    if h.op != op::RW {
        assert_eq!(h.len, 0, "op {} with payload", h.op);
    }
    if h.op != op::RST {
        b.d_buf_alloc = h.buf_alloc;
        b.d_fwd_cnt = Wrapping(h.fwd_cnt);
    }
    match h.op {
        op::RW => {
            assert!(h.len > 0, "empty RW");
            assert!(h.len <= MAX_PAYLOAD);
            assert!(
                h.len <= credit,
                "RW of {} beyond guest credit {credit}",
                h.len
            );
            assert!(!b.sent_shutdown_send, "RW after SHUTDOWN(SEND)");
            assert!(!b.guest_shut_rcv, "RW after the guest's SHUTDOWN(RCV)");
            assert_eq!(was, State::Established, "RW in state {was:?}");
            let mut payload = vec![0u8; h.len as usize];
            assert_eq!(
                chain.read_at(mem, HEADER_LEN as u64, &mut payload),
                payload.len()
            );
            b.guest_got.extend_from_slice(&payload);
            b.dev_tx += Wrapping(h.len);
        }
        op::SHUTDOWN if h.flags & shutdown::SEND != 0 => b.sent_shutdown_send = true,
        _ => {}
    }
    if conn.state() == State::Killed && h.op == op::RST {
        assert!(conn.is_done(), "killed connection not done after its RST");
    }
    h
}
