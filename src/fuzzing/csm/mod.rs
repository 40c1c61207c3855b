//! `csm`: one [`Connection`] over a Unix socket pair, driven by an arbitrary sequence of guest
//! packets, host-stream readiness, deadlines, RX buffers and host-side writes, reads and
//! shutdowns, in virtual time.
//!
//! The harness plays both peers and keeps its own books, so it can assert:
//! - the connection never sends RW beyond the credit the guest advertised last;
//! - a guest that stays within the credit the connection advertised is never reset for overrun;
//! - the bytes the host reads are a prefix of the RW bytes the guest sent while the connection
//!   lived (nothing invented, lost or reordered), and all of them once the stream is flushed;
//! - the bytes the guest receives are a prefix of what the host wrote;
//! - every packet carries the connection's addresses and type STREAM, a RESPONSE or RST comes
//!   before anything else on a guest-initiated connection, no RW follows our SHUTDOWN(SEND) or
//!   the guest's SHUTDOWN(RCV), and RX lengths match the header;
//! - the state never leaves Killed, and a killed connection is done once its RST was written.

use std::cell::RefCell;
use std::io::Read;
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

mod rx;

use self::rx::{fill_rx, fill_rx_many, fill_rx_with};
use super::Input;
use crate::csm::connection::{Addr, Connection, CsmConfig, KillReason, State};
use crate::stream::Readiness;
use crate::vq::chain::{Chain, Direction};
use crate::vq::GuestMemory;
use crate::wire::{op, shutdown, sock_type, Header, SockType, HEADER_LEN};

const MEM_LEN: u64 = 0x4_0000;
const QSIZE: u16 = 16;
pub(super) const TX_TABLE: u64 = 0x0;
pub(super) const RX_TABLE: u64 = 0x400;
pub(super) const TX_BUF: u64 = 0x1000;
pub(super) const RX_BUF: u64 = 0x1_8000;
const MAX_STEPS: usize = 64;
const MAX_TX_PAYLOAD: usize = 20 * 1024;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const LOCAL_PORT: u32 = 52;

thread_local! {
    static MEM: RefCell<Option<GuestMemory>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's guest memory (one mapping per thread, reused).
pub(super) fn with_mem<R>(f: impl FnOnce(&GuestMemory) -> R) -> R {
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            GuestMemory::from_ranges(&[(GuestAddress(0), MEM_LEN as usize)]).expect("memory")
        });
        f(mem)
    })
}

/// Byte `i` of a stream, distinct enough that loss, duplication or reordering shows.
fn pattern(seed: u8, i: u64) -> u8 {
    (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8).wrapping_mul(7) ^ seed
}

/// Writes a chain of descriptors covering `[base, base + total)` cut at `cuts`, and walks it.
pub(super) fn build_chain(
    mem: &GuestMemory,
    table: u64,
    base: u64,
    total: u64,
    cuts: &[u64],
    write: bool,
) -> Chain {
    let mut bounds: Vec<u64> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < total)
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(total);
    let mut start = 0;
    let n = bounds.len();
    for (i, &end) in bounds.iter().enumerate() {
        let at = GuestAddress(table + 16 * i as u64);
        let last = i + 1 == n;
        let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
        mem.write_obj(base + start, at).unwrap();
        mem.write_obj((end - start) as u32, GuestAddress(at.0 + 8))
            .unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(if last { 0 } else { i as u16 + 1 }, GuestAddress(at.0 + 14))
            .unwrap();
        start = end;
    }
    let dir = if write {
        Direction::DeviceWrites
    } else {
        Direction::DeviceReads
    };
    Chain::walk(mem, GuestAddress(table), QSIZE, 0, dir).expect("harness chain is valid")
}

/// The harness's books.
struct Books {
    guest_initiated: bool,
    /// Credit the guest advertised last.
    g_buf_alloc: u32,
    g_fwd_cnt: Wrapping<u32>,
    /// RW bytes the connection sent the guest.
    dev_tx: Wrapping<u32>,
    /// Credit the connection advertised last.
    d_buf_alloc: u32,
    d_fwd_cnt: Wrapping<u32>,
    /// RW bytes the guest sent.
    g_tx: Wrapping<u32>,
    /// Bytes the host must read, in order (handshake reply, then the guest's accepted RW bytes).
    to_host: Vec<u8>,
    /// Bytes the host read.
    host_got: Vec<u8>,
    /// Bytes the host wrote (for host-initiated connections, after the prefix).
    host_wrote: Vec<u8>,
    /// What the guest must receive, in order, is a function of `host_wrote`; see `expected_to_guest`.
    prefix: Vec<u8>,
    guest_got: Vec<u8>,
    packets_out: usize,
    sent_shutdown_send: bool,
    guest_shut_rcv: bool,
    g_shut_send: bool,
    host_closed: bool,
    host_read_shut: bool,
    /// The body told the connection of a hang-up that did not happen (a spurious readiness):
    /// it may then rightly drop the guest's bytes as for a peer that stopped receiving.
    told_false_hangup: bool,
    guest_seq: u64,
    host_seq: u64,
}

impl Books {
    fn expected_to_guest(&self) -> Vec<u8> {
        let mut v = self.prefix.clone();
        v.extend_from_slice(&self.host_wrote);
        v
    }

    fn guest_credit_view(&self) -> u32 {
        self.d_buf_alloc
            .saturating_sub((self.g_tx - self.d_fwd_cnt).0)
    }
}

/// The fuzz body; see the module documentation of `fuzzing::csm`.
pub fn csm(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    let (dev_end, host_end) = super::socket_pair(setup & 0x40 != 0);
    let ms = super::timeout;
    let cfg = CsmConfig {
        buf_alloc: match inp.u8() % 4 {
            0 => 1 + u32::from(inp.u16()) % 4096,
            1 => 4096,
            2 => 64 * 1024,
            _ => 256 * 1024,
        },
        request_timeout: ms(inp.u8()),
        connect_timeout: ms(inp.u8()),
        linger: ms(inp.u8()),
        // A byte-stream model; SOCK_SEQPACKET is fuzzed through the device (`fuzzing::device`).
        seqpacket: false,
    };
    let base = Instant::now();
    let mut clock = Duration::ZERO;
    let mut b = Books {
        guest_initiated: setup & 1 == 0,
        g_buf_alloc: 0,
        g_fwd_cnt: Wrapping(0),
        dev_tx: Wrapping(0),
        d_buf_alloc: 0,
        d_fwd_cnt: Wrapping(0),
        g_tx: Wrapping(0),
        to_host: Vec::new(),
        host_got: Vec::new(),
        host_wrote: Vec::new(),
        prefix: Vec::new(),
        guest_got: Vec::new(),
        packets_out: 0,
        sent_shutdown_send: false,
        guest_shut_rcv: false,
        g_shut_send: false,
        host_closed: false,
        host_read_shut: false,
        told_false_hangup: false,
        guest_seq: 0,
        host_seq: 0,
    };
    let addr = Addr {
        local_cid: 2,
        local_port: LOCAL_PORT,
        peer_cid: GUEST_CID,
        peer_port: GUEST_PORT,
    };
    let mut host = Some(host_end);
    with_mem(|mem| {
        let mut conn = if b.guest_initiated {
            // Credit fields in this order from the input: buf_alloc, then fwd_cnt.
            let req = guest_header(op::REQUEST, 0, 0, inp.u32(), inp.u32());
            b.g_buf_alloc = req.buf_alloc;
            b.g_fwd_cnt = Wrapping(req.fwd_cnt);
            let connected = setup & 2 != 0;
            Connection::guest_initiated(dev_end, &req, connected, cfg, base)
        } else {
            let plen = usize::from(inp.u8() % 64);
            b.prefix = (0..plen as u64).map(|i| pattern(0x5a, i)).collect();
            let reply = (setup & 2 != 0).then(|| b"OK 1073741824\n".to_vec());
            if let Some(r) = &reply {
                b.to_host.extend_from_slice(r);
            }
            Connection::host_initiated(
                dev_end,
                SockType::Stream,
                addr,
                b.prefix.clone(),
                reply,
                cfg,
                base,
            )
        };
        assert_eq!(conn.addr(), addr);
        let mut was_killed = false;
        for _ in 0..MAX_STEPS {
            if inp.is_empty() {
                break;
            }
            let now = base + clock;
            let before = conn.state();
            match inp.u8() % 12 {
                0 | 1 => guest_packet(&mut inp, mem, &mut conn, &mut b, now),
                2 => fill_rx(&mut inp, mem, &mut conn, &mut b, now),
                3 => fill_rx_many(&mut inp, mem, &mut conn, &mut b, now),
                4 => {
                    let bits = inp.u8();
                    let r = if bits & 8 != 0 {
                        real_readiness(&conn)
                    } else {
                        let r = ready(
                            bits & 1 != 0,
                            bits & 2 != 0,
                            bits & 32 != 0 && bits & 64 != 0,
                            bits & 4 != 0 && bits & 16 != 0,
                        );
                        b.told_false_hangup |= r.hangup && !real_readiness(&conn).hangup;
                        r
                    };
                    conn.on_stream_ready(r, now);
                }
                5 => {
                    clock += Duration::from_millis(u64::from(inp.u16() % 3000));
                    conn.on_deadline(base + clock);
                }
                6 => host_write(&mut inp, host.as_ref(), &mut b),
                7 => host_read(&mut inp, host.as_mut(), &mut b),
                8 => match inp.u8() % 4 {
                    0 => {
                        if let Some(h) = &host {
                            let _ = h.shutdown(Shutdown::Write);
                        }
                    }
                    1 => {
                        if let Some(h) = &host {
                            let _ = h.shutdown(Shutdown::Read);
                            b.host_read_shut = true;
                        }
                    }
                    2 => {
                        host = None;
                        b.host_closed = true;
                    }
                    _ => {}
                },
                9 => {
                    // The well-behaved peer the muxer would be: flush what epoll says.
                    conn.on_stream_ready(real_readiness(&conn), now);
                    while conn.has_pending_rx() && b.packets_out < 4096 {
                        if !fill_rx_with(mem, &mut conn, &mut b, now, 4096, &[]) {
                            break;
                        }
                    }
                }
                10 => {
                    let _ = conn.interest();
                    let _ = conn.deadline();
                    let _ = conn.bytes();
                }
                _ => guest_honest_rw(&mut inp, mem, &mut conn, &mut b, now),
            }
            if was_killed {
                assert_eq!(conn.state(), State::Killed, "left Killed from {before:?}");
            }
            was_killed = conn.state() == State::Killed;
            check_prefixes(&b);
        }
        finish(mem, &mut conn, &mut b, host.as_mut(), base + clock);
    });
}

fn ready(readable: bool, writable: bool, hangup: bool, error: bool) -> Readiness {
    Readiness {
        readable,
        writable,
        hangup,
        error,
    }
}

/// Readiness as level-triggered epoll would report it for the connection's interest.
fn real_readiness(conn: &Connection<UnixStream>) -> Readiness {
    super::level_readiness(conn.stream().as_raw_fd(), conn.interest())
}

/// A packet with fuzzed op, flags, credit and length: anything a hostile guest may send for
/// this connection's addresses (the muxer already checked type, CIDs and `len` ≤ the chain).
fn guest_packet(
    inp: &mut Input,
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    now: Instant,
) {
    let op_ = inp.op();
    let flags = inp.flags();
    let credit_sel = inp.u8();
    let buf_alloc = match credit_sel % 4 {
        0 => b.g_buf_alloc,
        1 => inp.u32(),
        2 => 1 + u32::from(inp.u16()),
        _ => 256 * 1024,
    };
    let fwd_cnt = match (credit_sel >> 2) % 4 {
        0 => b.g_fwd_cnt.0,
        1 => inp.u32(),
        // Honest: everything received was consumed.
        _ => b.guest_got.len() as u32,
    };
    let len = if op_ == op::RW {
        (inp.u16() as usize) % (MAX_TX_PAYLOAD + 1)
    } else if inp.one_in(8) {
        usize::from(inp.u8())
    } else {
        0
    };
    let h = guest_header(op_, len, flags, buf_alloc, fwd_cnt);
    deliver(inp, mem, conn, b, &h, now);
}

/// A packet from the guest's end of the connection (its addresses, type STREAM).
fn guest_header(op_: u16, len: usize, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port: GUEST_PORT,
        dst_port: LOCAL_PORT,
        len: len as u32,
        type_: sock_type::STREAM,
        op: op_,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

/// An RW packet within the credit the connection advertised, with honest credit.
fn guest_honest_rw(
    inp: &mut Input,
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    now: Instant,
) {
    let credit = b.guest_credit_view() as usize;
    let len = (inp.u16() as usize).min(credit).min(MAX_TX_PAYLOAD);
    let h = guest_header(
        op::RW,
        len,
        0,
        b.g_buf_alloc.max(4096),
        b.guest_got.len() as u32,
    );
    let was = conn.state();
    deliver(inp, mem, conn, b, &h, now);
    if was == State::Established && !b.g_shut_send && b.packets_out > 0 {
        assert_ne!(
            conn.kill_reason(),
            Some(KillReason::CreditOverrun),
            "reset for overrun although {len} ≤ advertised credit {credit}"
        );
    }
}

fn deliver(
    inp: &mut Input,
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    h: &Header,
    now: Instant,
) {
    let len = h.len as usize;
    let mut hdr_payload = Vec::with_capacity(HEADER_LEN + len);
    hdr_payload.extend_from_slice(&h.encode());
    let seq0 = b.guest_seq;
    hdr_payload.extend((0..len as u64).map(|i| pattern(0xa5, seq0 + i)));
    mem.write_slice(&hdr_payload, GuestAddress(TX_BUF)).unwrap();
    let total = hdr_payload.len() as u64;
    let extra = u64::from(inp.u8() % 16);
    let cuts = [
        u64::from(inp.u16()) % (total + 1),
        u64::from(inp.u16()) % (total + 1),
        if inp.one_in(2) { HEADER_LEN as u64 } else { 0 },
    ];
    let chain = build_chain(mem, TX_TABLE, TX_BUF, total + extra, &cuts, false);
    let was = conn.state();
    let alive = was != State::Killed;
    conn.on_packet(h, mem, &chain, now);
    if alive && h.op != op::RST {
        b.g_buf_alloc = h.buf_alloc;
        b.g_fwd_cnt = Wrapping(h.fwd_cnt);
    }
    if h.op == op::SHUTDOWN && alive {
        if h.flags & shutdown::RCV != 0 {
            b.guest_shut_rcv = true;
        }
        if h.flags & shutdown::SEND != 0 {
            b.g_shut_send = true;
        }
    }
    if h.op == op::RW && was == State::Established && len > 0 {
        let refused = conn.state() == State::Killed
            && matches!(
                conn.kill_reason(),
                Some(KillReason::CreditOverrun | KillReason::Protocol)
            );
        if !refused {
            b.to_host.extend_from_slice(&hdr_payload[HEADER_LEN..]);
            b.guest_seq += len as u64;
            b.g_tx += Wrapping(len as u32);
        }
    }
}

fn host_write(inp: &mut Input, host: Option<&UnixStream>, b: &mut Books) {
    let n = usize::from(inp.u16() % 9000);
    let Some(h) = host else { return };
    let seq0 = b.host_seq;
    let data: Vec<u8> = (0..n as u64).map(|i| pattern(0x3c, seq0 + i)).collect();
    if let Ok(k) = super::send_nosignal(h, &data) {
        b.host_wrote.extend_from_slice(&data[..k]);
        b.host_seq += k as u64;
    }
}

fn host_read(inp: &mut Input, host: Option<&mut UnixStream>, b: &mut Books) {
    let n = 1 + usize::from(inp.u16() % 16384);
    let Some(h) = host else { return };
    let mut buf = vec![0u8; n];
    if let Ok(k) = h.read(&mut buf) {
        b.host_got.extend_from_slice(&buf[..k]);
    }
}

fn check_prefixes(b: &Books) {
    assert!(
        b.to_host.starts_with(&b.host_got),
        "host read {} bytes that are not a prefix of the {} the guest sent",
        b.host_got.len(),
        b.to_host.len()
    );
    let exp = b.expected_to_guest();
    assert!(
        exp.starts_with(&b.guest_got),
        "guest got {} bytes that are not a prefix of the {} the host wrote",
        b.guest_got.len(),
        exp.len()
    );
}

/// Ends the run: a live connection delivers everything it accepted once the host reads; a
/// killed one is done after at most one RX buffer (its RST).
fn finish(
    mem: &GuestMemory,
    conn: &mut Connection<UnixStream>,
    b: &mut Books,
    mut host: Option<&mut UnixStream>,
    now: Instant,
) {
    for _ in 0..1024 {
        if conn.state() != State::Established {
            break;
        }
        conn.on_stream_ready(ready(false, true, false, false), now);
        let Some(h) = host.as_deref_mut() else { break };
        if b.host_read_shut {
            break;
        }
        let mut buf = [0u8; 16384];
        match h.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => b.host_got.extend_from_slice(&buf[..k]),
            Err(_) => {
                if b.host_got.len() >= b.to_host.len() {
                    break;
                }
            }
        }
    }
    check_prefixes(b);
    if conn.state() == State::Established && host.is_some() && !b.host_read_shut {
        // The host still receives: every accepted byte reaches it, unless the body made the
        // connection believe in a hang-up; then the bytes it dropped are counted as dropped.
        let dropped = conn.dropped();
        assert!(
            dropped == 0 || b.told_false_hangup,
            "{dropped} guest bytes dropped while the host still receives"
        );
        assert_eq!(
            b.host_got.len() as u64 + dropped,
            b.to_host.len() as u64,
            "accepted guest bytes neither reached the host nor were counted as dropped"
        );
    }
    if conn.state() == State::Killed {
        for _ in 0..2 {
            if conn.is_done() {
                break;
            }
            fill_rx_with(mem, conn, b, now, 4096, &[]);
        }
        assert!(conn.is_done(), "killed connection never done");
        assert!(conn
            .fill_rx(
                mem,
                &build_chain(mem, RX_TABLE, RX_BUF, 4140, &[], true),
                now
            )
            .is_none());
    }
}
