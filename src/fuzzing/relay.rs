//! `relay`: one sibling [`Relay`] over a Unix socket pair, driven by an arbitrary sequence of
//! guest packets, RX buffers, link readiness, deadlines and link bytes written by a hostile
//! sibling (well-formed packets for the connection or anything at all), in virtual time.
//!
//! The harness plays our guest and the sibling device and asserts:
//! - every packet our guest receives carries the connection's addresses and type (STREAM, or
//!   SEQPACKET for one input in two, with fuzzed EOM/EOR flags both ways), a valid op, no
//!   payload unless it is RW, on RW no flags but a message's end (EOM, EOR only with it) and
//!   those only on SEQPACKET, a used length of 44 + `len` within the buffer, and (while our
//!   guest's credit fields are honest) never data beyond its credit;
//! - the first packet our guest receives on an offered link is the sibling's REQUEST (or an
//!   RST, or nothing at all), on a requested one the sibling's RESPONSE or an RST;
//! - what the sibling reads from the link is a sequence of whole packets of the connection,
//!   the first being our guest's REQUEST on a requested link, whose data bytes are a prefix of
//!   the data our guest sent (nothing invented, reordered or duplicated);
//! - the state never leaves Killed, and a killed relay sends our guest at most one RST and is
//!   done once nothing waits for the link.

use std::io::Read;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::csm::{build_chain, with_mem, RX_BUF, RX_TABLE, TX_BUF, TX_TABLE};
use super::Input;
use crate::csm::connection::{Addr, CsmConfig, State};
use crate::csm::relay::Relay;
use crate::stream::Readiness;
use crate::vq::GuestMemory;
use crate::wire::{op, seq, shutdown, sock_type, Header, HEADER_LEN, MAX_PAYLOAD};

const MAX_STEPS: usize = 64;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const SIB_CID: u64 = 7;
const SIB_PORT: u32 = 9000;

struct Books {
    /// Our guest's credit as its last packet said.
    g_buf_alloc: u32,
    g_fwd_cnt: Wrapping<u32>,
    /// RW bytes delivered to our guest.
    to_guest: Wrapping<u32>,
    /// The data bytes our guest sent, in order.
    guest_data: Vec<u8>,
    /// Link bytes the sibling read, not yet parsed into packets.
    link_raw: Vec<u8>,
    /// Data bytes the sibling received.
    link_data: Vec<u8>,
    /// Packets the sibling received.
    link_packets: usize,
    /// Packets our guest received.
    guest_packets: usize,
    offered: bool,
    /// The connection's socket type (on an offered link: the type of the sibling's REQUEST).
    ty: u16,
    /// Our guest's driver acknowledged SOCK_SEQPACKET.
    seqpacket_ok: bool,
    /// The types of our guest's packets before it received any (an RST answering one
    /// mirrors its type), as a set of `1 << type`.
    early_guest_types: u32,
    rsts_after_kill: usize,
    /// Whether our guest's credit fields were honest all along (constant buffer, `fwd_cnt` =
    /// everything received): only then is "no data beyond its credit" ours to promise.
    honest_credit: bool,
}

fn sib_header(ty: u16, op_: u16, len: u32, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: SIB_CID,
        dst_cid: GUEST_CID,
        src_port: SIB_PORT,
        dst_port: GUEST_PORT,
        len,
        type_: ty,
        op: op_,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

/// The fuzz body; see the module documentation of `fuzzing::relay`.
pub fn relay(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    let (dev_end, sib_end) = super::socket_pair(setup & 0x40 != 0);
    let ms = super::timeout;
    let cfg = CsmConfig {
        buf_alloc: if setup & 0x20 != 0 { 4096 } else { 256 * 1024 },
        request_timeout: ms(inp.u8()),
        connect_timeout: ms(inp.u8()),
        linger: ms(inp.u8()),
        // One input in eight has a driver that did not acknowledge SOCK_SEQPACKET.
        seqpacket: setup & 0x0e != 0x0e,
    };
    let base = Instant::now();
    let mut clock = Duration::ZERO;
    let mut b = Books {
        g_buf_alloc: 64 * 1024,
        g_fwd_cnt: Wrapping(0),
        to_guest: Wrapping(0),
        guest_data: Vec::new(),
        link_raw: Vec::new(),
        link_data: Vec::new(),
        link_packets: 0,
        guest_packets: 0,
        offered: setup & 1 != 0,
        ty: if setup & 0x10 != 0 {
            sock_type::SEQPACKET
        } else {
            sock_type::STREAM
        },
        early_guest_types: 0,
        seqpacket_ok: cfg.seqpacket,
        rsts_after_kill: 0,
        honest_credit: true,
    };
    let mut sib = Some(sib_end);
    with_mem(|mem| {
        let mut r = if b.offered {
            let addr = Addr {
                local_cid: SIB_CID,
                local_port: SIB_PORT,
                peer_cid: GUEST_CID,
                peer_port: GUEST_PORT,
            };
            let ahead = if setup & 2 != 0 {
                sib_header(b.ty, op::REQUEST, 0, 0, inp.u32(), 0).encode()
                    [..usize::from(inp.u8()) % 45]
                    .to_vec()
            } else {
                let n = usize::from(inp.u8() % 64);
                inp.bytes(n).to_vec()
            };
            Relay::offered(dev_end, addr, ahead, cfg, base)
        } else {
            let req = Header {
                src_cid: GUEST_CID,
                dst_cid: SIB_CID,
                src_port: GUEST_PORT,
                dst_port: SIB_PORT,
                len: 0,
                type_: b.ty,
                op: op::REQUEST,
                flags: 0,
                buf_alloc: b.g_buf_alloc,
                fwd_cnt: 0,
            };
            Relay::requested(dev_end, &req, cfg, base)
        };
        let mut was_killed = false;
        for _ in 0..MAX_STEPS {
            if inp.is_empty() {
                break;
            }
            let now = base + clock;
            match inp.u8() % 10 {
                0 | 1 => guest_packet(&mut inp, mem, &mut r, &mut b, now),
                2 | 3 => {
                    let room = match inp.u8() % 3 {
                        0 => u64::from(inp.u16() % 64),
                        1 => 4096,
                        _ => u64::from(MAX_PAYLOAD) + 100,
                    };
                    fill_rx(mem, &mut r, &mut b, now, room, was_killed);
                }
                4 => r.on_link_ready(readiness(&r)),
                5 => {
                    clock += Duration::from_millis(u64::from(inp.u16() % 3000));
                    r.on_deadline(base + clock);
                }
                6 => sibling_writes(&mut inp, sib.as_ref(), b.ty),
                7 => sibling_reads(sib.as_mut(), &mut b),
                8 => match inp.u8() % 3 {
                    0 => {
                        if let Some(s) = &sib {
                            let _ = s.shutdown(Shutdown::Write);
                        }
                    }
                    1 => sib = None,
                    _ => {}
                },
                _ => {
                    // The muxer's part: readiness, then RX buffers while something is owed.
                    r.on_link_ready(readiness(&r));
                    for _ in 0..64 {
                        if !r.has_pending_rx() {
                            break;
                        }
                        if !fill_rx(mem, &mut r, &mut b, now, 4096, was_killed) {
                            break;
                        }
                    }
                }
            }
            if was_killed {
                assert_eq!(r.state(), State::Killed, "left Killed");
            }
            was_killed = r.state() == State::Killed;
            check_link(&b);
        }
        // The end: a killed relay is done after at most one RX buffer and its deadline.
        if r.state() == State::Killed {
            fill_rx(mem, &mut r, &mut b, base + clock, 4096, true);
            r.on_deadline(base + clock + Duration::from_secs(3600));
            assert!(r.is_done(), "killed relay never done");
            assert!(!r.has_pending_rx());
        }
        sibling_reads(sib.as_mut(), &mut b);
        check_link(&b);
    });
}

fn readiness(r: &Relay<UnixStream>) -> Readiness {
    super::level_readiness(r.fd(), r.interest())
}

/// A packet our guest sends for the connection: any op, flags, credit and length.
fn guest_packet(
    inp: &mut Input,
    mem: &GuestMemory,
    r: &mut Relay<UnixStream>,
    b: &mut Books,
    now: Instant,
) {
    let op_ = inp.op();
    let len = if op_ == op::RW || inp.one_in(16) {
        usize::from(inp.u16()) % 20_000
    } else {
        0
    };
    let buf_alloc = if inp.one_in(4) {
        inp.u32()
    } else {
        b.g_buf_alloc
    };
    let fwd_cnt = if inp.one_in(4) {
        inp.u32()
    } else {
        b.to_guest.0
    };
    let honest = buf_alloc == b.g_buf_alloc && fwd_cnt == b.to_guest.0;
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: SIB_CID,
        src_port: GUEST_PORT,
        dst_port: SIB_PORT,
        len: len as u32,
        // Now and then the other type.
        type_: if inp.one_in(32) {
            sock_type::SEQPACKET + sock_type::STREAM - b.ty
        } else {
            b.ty
        },
        op: op_,
        flags: u32::from(inp.u8() % 4),
        buf_alloc,
        fwd_cnt,
    };
    let seq0 = b.guest_data.len();
    let payload: Vec<u8> = (0..len).map(|i| (seq0 + i) as u8 ^ 0x5a).collect();
    let mut raw = h.encode().to_vec();
    raw.extend_from_slice(&payload);
    mem.write_slice(&raw, GuestAddress(TX_BUF)).unwrap();
    let total = raw.len() as u64;
    let cuts = [u64::from(inp.u16()) % (total + 1), HEADER_LEN as u64];
    let chain = build_chain(mem, TX_TABLE, TX_BUF, total, &cuts, false);
    let alive = r.state() != State::Killed;
    if b.guest_packets == 0 {
        b.early_guest_types |= 1u32.checked_shl(u32::from(h.type_)).unwrap_or(0);
    }
    r.on_packet(&h, mem, &chain, now);
    if alive {
        b.honest_credit &= honest;
        b.g_buf_alloc = h.buf_alloc;
        b.g_fwd_cnt = Wrapping(h.fwd_cnt);
        if h.op == op::RW {
            // Whatever the relay forwards must come from here, in order.
            b.guest_data.extend_from_slice(&payload);
        }
    }
}

/// Offers one RX buffer; returns whether a packet was written. Checks what was written.
fn fill_rx(
    mem: &GuestMemory,
    r: &mut Relay<UnixStream>,
    b: &mut Books,
    now: Instant,
    room: u64,
    was_killed: bool,
) -> bool {
    let total = HEADER_LEN as u64 + room;
    let chain = build_chain(mem, RX_TABLE, RX_BUF, total, &[], true);
    mem.write_slice(&[0xeeu8; HEADER_LEN], GuestAddress(RX_BUF))
        .unwrap();
    let credit = b.g_buf_alloc.saturating_sub((b.to_guest - b.g_fwd_cnt).0);
    let Some(used) = r.fill_rx(mem, &chain, now) else {
        return false;
    };
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw, GuestAddress(RX_BUF)).unwrap();
    let h = Header::decode(&raw);
    b.guest_packets += 1;
    assert_eq!(
        used as usize,
        HEADER_LEN + h.len as usize,
        "used != 44 + len"
    );
    assert!(u64::from(used) <= total, "packet larger than the buffer");
    assert_eq!(
        (h.src_cid, h.src_port, h.dst_cid, h.dst_port),
        (SIB_CID, SIB_PORT, GUEST_CID, GUEST_PORT),
        "addresses"
    );
    if b.offered && b.guest_packets == 1 && h.op == op::REQUEST {
        // The sibling's REQUEST says what the connection is; a driver without SOCK_SEQPACKET
        // never sees one of that type.
        assert!(
            h.type_ == sock_type::STREAM || (h.type_ == sock_type::SEQPACKET && b.seqpacket_ok),
            "REQUEST of type {} offered (SEQPACKET acknowledged: {})",
            h.type_,
            b.seqpacket_ok
        );
        b.ty = h.type_;
    }
    // An RST that comes first on an offered link answers a packet of our guest sent before
    // it knew of the connection, and mirrors its type.
    let answers_guest = b.offered && b.guest_packets == 1 && h.op == op::RST;
    assert!(
        h.type_ == b.ty || (answers_guest && b.early_guest_types & (1u32 << (h.type_ % 32)) != 0),
        "packet type {}",
        h.type_
    );
    if h.op == op::RW {
        let end = h.flags & (seq::EOM | seq::EOR);
        let allowed = b.ty == sock_type::SEQPACKET && end == h.flags && (end != seq::EOR);
        assert!(h.flags == 0 || allowed, "RW flags {:#x}", h.flags);
    }
    assert!(
        (op::REQUEST..=op::CREDIT_REQUEST).contains(&h.op),
        "op {}",
        h.op
    );
    if h.op != op::RW {
        assert_eq!(h.len, 0, "op {} with payload", h.op);
    }
    if b.guest_packets == 1 {
        // An RST first on an offered link answers a packet our guest sent before it knew of
        // the connection, as the device answers packets for unknown connections.
        let first = if b.offered {
            [op::REQUEST, op::RST]
        } else {
            [op::RESPONSE, op::RST]
        };
        assert!(first.contains(&h.op), "first packet op {}", h.op);
    }
    if was_killed {
        assert_eq!(h.op, op::RST, "a killed relay sent op {}", h.op);
        b.rsts_after_kill += 1;
        assert!(b.rsts_after_kill <= 1, "more than one RST after the kill");
    }
    if h.op == op::RW {
        assert!(h.len > 0 && h.len <= MAX_PAYLOAD);
        if b.honest_credit {
            assert!(
                h.len <= credit,
                "RW of {} beyond the guest's credit {credit}",
                h.len
            );
        }
        b.to_guest += Wrapping(h.len);
    }
    if h.op == op::SHUTDOWN {
        assert_eq!(
            h.flags & !shutdown::BOTH,
            0,
            "SHUTDOWN flags {:#x}",
            h.flags
        );
    }
    true
}

/// The sibling writes a packet for the connection (sometimes a broken one) or raw bytes.
fn sibling_writes(inp: &mut Input, sib: Option<&UnixStream>, ty: u16) {
    let Some(s) = sib else { return };
    let bytes = match inp.u8() % 4 {
        0 => {
            let n = usize::from(inp.u8());
            inp.bytes(n).to_vec()
        }
        sel => {
            let op_ = match sel {
                1 => op::RW,
                _ => u16::from(inp.u8() % 8),
            };
            let len = if op_ == op::RW {
                u32::from(inp.u16()) % 9000
            } else {
                0
            };
            let h = sib_header(
                if inp.one_in(32) {
                    sock_type::STREAM
                } else {
                    ty
                },
                op_,
                len,
                u32::from(inp.u8() % 4),
                if inp.one_in(4) { inp.u32() } else { 64 * 1024 },
                inp.u32() % 4096,
            );
            let mut v = h.encode().to_vec();
            v.extend(std::iter::repeat_n(0x33u8, len as usize));
            if inp.one_in(8) {
                v.truncate(usize::from(inp.u16()) % (v.len() + 1));
            }
            v
        }
    };
    let _ = super::send_nosignal(s, &bytes);
}

fn sibling_reads(sib: Option<&mut UnixStream>, b: &mut Books) {
    let Some(s) = sib else { return };
    let mut buf = [0u8; 16384];
    for _ in 0..64 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => b.link_raw.extend_from_slice(&buf[..n]),
        }
    }
    // Whole packets only; a partial one stays for later.
    loop {
        if b.link_raw.len() < HEADER_LEN {
            break;
        }
        let h = Header::decode(b.link_raw[..HEADER_LEN].try_into().expect("44 bytes"));
        let plen = if h.op == op::RW { h.len as usize } else { 0 };
        if b.link_raw.len() < HEADER_LEN + plen {
            break;
        }
        b.link_packets += 1;
        assert_eq!(
            (h.src_cid, h.src_port, h.dst_cid, h.dst_port),
            (GUEST_CID, GUEST_PORT, SIB_CID, SIB_PORT),
            "link packet addresses"
        );
        assert_eq!(h.type_, b.ty, "link packet type");
        assert!(h.len <= MAX_PAYLOAD, "link packet of {} bytes", h.len);
        if h.op != op::RW {
            assert_eq!(h.len, 0, "link op {} with payload", h.op);
        }
        if b.link_packets == 1 && !b.offered {
            assert_eq!(
                h.op,
                op::REQUEST,
                "a requested link starts with the REQUEST"
            );
        }
        if h.op == op::RW {
            b.link_data
                .extend_from_slice(&b.link_raw[HEADER_LEN..HEADER_LEN + plen]);
        }
        b.link_raw.drain(..HEADER_LEN + plen);
    }
    let _ = s.as_raw_fd();
}

fn check_link(b: &Books) {
    assert!(
        b.guest_data.starts_with(&b.link_data),
        "the sibling got {} data bytes that are not a prefix of the {} our guest sent",
        b.link_data.len(),
        b.guest_data.len()
    );
}
