//! `device`: the whole device — device thread, queues, CSM, muxer — driven through the simulated
//! Linux guest ([`SimGuest`]) with real Unix socket pairs ([`PairBackend`]) on the host side.
//!
//! Each input is a short program (at most [`MAX_STEPS`] steps) over a fresh device with small
//! budgets and timeouts: guest connects, sends (always within the device's credit, in fuzzed
//! descriptor layouts), receives, shutdowns and resets on tracked sockets; hostile packets with
//! every header field fuzzed (on their own ports, so they cannot corrupt the tracked books);
//! raw broken descriptor chains; host-initiated connections with fuzzed prefixes; host writes,
//! reads, half-closes and closes; backend refusals; waits that let timers fire; and, at most
//! once and last, an avail index that jumps ahead.
//!
//! Asserted: the simulated guest sees no violation (credit overrun, wrong used length, op before
//! RESPONSE, RW after SHUTDOWN(SEND), packet for another CID, ...); on every tracked connection
//! the host reads a prefix of what the guest sent and the guest reads a prefix of what the host
//! wrote; the device thread answers `connections()` and returns cleanly on reset (no panic, no
//! error, no hang).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::Input;
use crate::csm::connection::CsmConfig;
use crate::device::packet::{op, shutdown, sock_type, Header, MAX_PAYLOAD};
use crate::device::virtio::VirtioDevice;
use crate::device::DeviceConfig;
use crate::sim::{
    PairBackend, PairHost, RawDesc, SimGuest, SimSock, SockState, TxLayout, MEM_SIZE, QUEUE_SIZE,
    REGION_SPLIT,
};

/// Most steps per input.
pub const MAX_STEPS: usize = 32;
const GUEST: u64 = 3;
/// Ports the guest listens on; each gets at most one host-initiated connection per run.
const LISTEN: [u32; 3] = [100, 101, 102];
/// A port nobody listens on.
const NOT_LISTENING: u32 = 200;
/// First local port of tracked guest sockets.
const TRACKED_BASE: u32 = 50_000;
/// Hostile packets use source ports from here on, disjoint from everything tracked.
const RAW_BASE: u32 = 60_000;
/// Scratch guest memory for hostile chains, away from the simulated driver's buffers.
const SCRATCH: u64 = 0x300_0000;

/// The host end of one connection and what went through it.
struct HostConn {
    stream: Option<UnixStream>,
    /// The guest socket's port; `None` for hostile (untracked) connections.
    guest_port: Option<u32>,
    host_initiated: bool,
    prefix: Vec<u8>,
    wrote: Vec<u8>,
    got: Vec<u8>,
    read_shut: bool,
}

/// What a tracked guest socket sent and received.
#[derive(Default)]
struct Flow {
    sent: Vec<u8>,
    got: Vec<u8>,
}

struct Run {
    g: SimGuest,
    host: PairHost,
    conns: Vec<HostConn>,
    flows: BTreeMap<u32, Flow>,
    next_port: u32,
    listen_used: [bool; 3],
    host_seq: u64,
}

fn pattern(seed: u32, i: u64) -> u8 {
    (i as u8).wrapping_mul(29) ^ ((i >> 8) as u8).wrapping_mul(11) ^ seed as u8
}

fn ms(sel: u8) -> Duration {
    match sel % 3 {
        0 => Duration::from_millis(1),
        1 => Duration::from_millis(5),
        _ => Duration::from_secs(2),
    }
}

/// The fuzz body; see the [module documentation](self).
pub fn device(data: &[u8]) {
    let mut inp = Input::new(data);
    let c = inp.u8();
    let mut cfg = DeviceConfig::new(GUEST);
    cfg.budget = [1, 2, 8, 256][usize::from(c & 3)];
    cfg.max_connections = [1, 3, 8, 1023][usize::from((c >> 2) & 3)];
    cfg.csm = CsmConfig {
        buf_alloc: [4096, 16 * 1024, 64 * 1024, 256 * 1024][usize::from((c >> 4) & 3)],
        request_timeout: ms(inp.u8()),
        connect_timeout: ms(inp.u8()),
        linger: ms(inp.u8()),
    };
    let (backend, host) = PairBackend::new();
    if c & 0x40 != 0 {
        host.set_socket_buffers(4096);
    }
    let (mut g, mut dev) = SimGuest::with_device(cfg, backend);
    g.buf_alloc =
        [4096, 64 * 1024, 256 * 1024, 1 + u32::from(inp.u16())][usize::from(inp.u8() & 3)];
    // A silent guest leaves hostile connections open instead of resetting them.
    g.answer_unknown = c & 0x80 == 0;
    for p in LISTEN {
        g.listen(p);
    }
    let mut run = Run {
        g,
        host,
        conns: Vec::new(),
        flows: BTreeMap::new(),
        next_port: TRACKED_BASE,
        listen_used: [false; 3],
        host_seq: 0,
    };
    let mut ring_broken = false;
    for _ in 0..MAX_STEPS {
        if inp.is_empty() {
            break;
        }
        ring_broken = run.step(&mut inp);
        run.collect();
        run.check();
        if ring_broken {
            break;
        }
    }
    // Let the device finish what is in flight, then look at everything once more.
    for _ in 0..8 {
        if !run.g.pump(Duration::from_millis(2)) {
            break;
        }
    }
    run.collect();
    run.read_all();
    run.check();
    if !ring_broken {
        // Every TX chain comes back, also the malformed ones (used length 0).
        let all = usize::from(QUEUE_SIZE);
        let back = run
            .g
            .pump_until(Duration::from_secs(2), |g| g.txq.free_descs() == all);
        assert!(
            back,
            "{} TX descriptors never returned",
            all - run.g.txq.free_descs()
        );
    }
    let t = Instant::now();
    let _ = dev.connections();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "device thread did not answer connections()"
    );
    assert!(dev.reset(), "device thread died (panic or error)");
}

impl Run {
    /// One step; returns `true` when it must be the last.
    fn step(&mut self, inp: &mut Input) -> bool {
        match inp.u8() % 16 {
            0 | 1 => self.connect(inp),
            2 | 3 => self.send(inp),
            4 => self.control(inp),
            5 => self.recv(inp),
            6 => {
                let d = Duration::from_millis(u64::from(inp.u8() % 3));
                self.g.pump(d);
            }
            7 => self.host_connect(inp),
            8 => self.host_write(inp),
            9 => self.host_read(inp),
            10 => self.host_close(inp),
            11 => self.hostile_packet(inp),
            12 => self.hostile_chain(inp),
            13 => std::thread::sleep(Duration::from_millis(u64::from(inp.u8() % 4))),
            14 => self.host.set_refuse(inp.one_in(2)),
            _ => {
                if inp.one_in(8) {
                    // Terminal: the driver's avail index runs ahead of the ring.
                    let idx = inp.u16() | 0x200;
                    let m = self.g.mem.clone();
                    self.g.txq.force_avail_idx(&m, idx);
                    self.g.kick(1);
                    self.g.pump(Duration::from_millis(2));
                    return true;
                }
                self.g.pump(Duration::ZERO);
            }
        }
        false
    }

    fn set_layout(&mut self, inp: &mut Input) {
        self.g.layout = match inp.u8() % 5 {
            0 => TxLayout::Linear,
            1 => TxLayout::HeaderThenData,
            2 => TxLayout::SplitHeader(1 + u32::from(inp.u8() % 43)),
            3 => TxLayout::Fragments(vec![1 + u32::from(inp.u16() % 5000)]),
            _ => TxLayout::Fragments(vec![
                1 + u32::from(inp.u8()),
                1 + u32::from(inp.u16() % 3000),
                1 + u32::from(inp.u8()),
            ]),
        };
    }

    fn header(s: &SimSock, cid: u64, op_: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: cid,
            dst_cid: s.peer_cid,
            src_port: s.local_port,
            dst_port: s.peer_port,
            len,
            type_: sock_type::STREAM,
            op: op_,
            flags,
            buf_alloc: s.buf_alloc,
            fwd_cnt: s.fwd_cnt,
        }
    }

    /// The tracked socket the input picks, if any.
    fn pick(&self, inp: &mut Input) -> Option<u32> {
        let ports: Vec<u32> = self.g.socks.keys().copied().collect();
        if ports.is_empty() {
            return None;
        }
        let mut ports = ports;
        ports.sort_unstable();
        Some(ports[inp.below(ports.len() as u32) as usize])
    }

    fn connect(&mut self, inp: &mut Input) {
        let dst_port = 1 + inp.below(4);
        let dst_cid = if inp.one_in(8) {
            u64::from(inp.u32())
        } else {
            2
        };
        if self.next_port >= RAW_BASE {
            return;
        }
        let local = self.next_port;
        self.next_port += 1;
        let s = SimSock::new(local, dst_cid, dst_port, self.g.buf_alloc);
        let h = Self::header(&s, self.g.cid, op::REQUEST, 0, 0);
        self.g.socks.insert(local, s);
        self.flows.insert(local, Flow::default());
        self.g.send_packet(&h, &[]);
        self.g.pump(Duration::ZERO);
    }

    fn send(&mut self, inp: &mut Input) {
        self.set_layout(inp);
        let want = usize::from(inp.u16());
        let Some(port) = self.pick(inp) else { return };
        let cid = self.g.cid;
        let Some(s) = self.g.socks.get_mut(&port) else {
            return;
        };
        if s.state != SockState::Established || s.local_shutdown & shutdown::SEND != 0 {
            return;
        }
        let n = want.min(s.peer_credit() as usize).min(MAX_PAYLOAD as usize);
        if n == 0 {
            return;
        }
        let flow = self.flows.entry(port).or_default();
        let seq0 = flow.sent.len() as u64;
        let payload: Vec<u8> = (0..n as u64).map(|i| pattern(port, seq0 + i)).collect();
        flow.sent.extend_from_slice(&payload);
        let h = Self::header(s, cid, op::RW, n as u32, 0);
        s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
        s.last_fwd_sent = s.fwd_cnt;
        self.g.send_packet(&h, &payload);
        self.g.pump(Duration::ZERO);
    }

    /// A control packet on a tracked socket: honest addresses and credit, fuzzed op and flags.
    fn control(&mut self, inp: &mut Input) {
        let sel = inp.u8();
        let flags = if inp.one_in(4) {
            inp.u32()
        } else {
            u32::from(inp.u8() % 4)
        };
        let Some(port) = self.pick(inp) else { return };
        match sel % 6 {
            0 => {
                // SHUTDOWN with any flags (the device keeps only RCV|SEND).
                self.g.shutdown(port, flags & shutdown::BOTH);
            }
            1 => {
                let Some(s) = self.g.socks.get(&port) else {
                    return;
                };
                let h = Self::header(s, self.g.cid, op::RST, 0, 0);
                // The guest forgets the socket, as Linux does; late packets get an RST back.
                self.g.socks.remove(&port);
                self.g.send_packet(&h, &[]);
            }
            _ => {
                let op_ = [
                    op::CREDIT_UPDATE,
                    op::CREDIT_REQUEST,
                    op::RESPONSE,
                    op::INVALID,
                ][usize::from(sel % 4)];
                let op_ = if sel >= 250 { 8 + u16::from(sel) } else { op_ };
                let Some(s) = self.g.socks.get(&port) else {
                    return;
                };
                let h = Self::header(s, self.g.cid, op_, 0, flags);
                self.g.send_packet(&h, &[]);
            }
        }
        self.g.pump(Duration::ZERO);
    }

    fn recv(&mut self, inp: &mut Input) {
        let n = 1 + usize::from(inp.u16());
        let Some(port) = self.pick(inp) else { return };
        let got = self.g.recv(port, n);
        self.flows
            .entry(port)
            .or_default()
            .got
            .extend_from_slice(&got);
    }

    fn host_connect(&mut self, inp: &mut Input) {
        let k = inp.below(4) as usize;
        let plen = usize::from(inp.u8() % 80);
        let (port, tracked) = if k < LISTEN.len() {
            if self.listen_used[k] {
                return;
            }
            self.listen_used[k] = true;
            (LISTEN[k], true)
        } else {
            (NOT_LISTENING, false)
        };
        let prefix: Vec<u8> = (0..plen as u64).map(|i| pattern(port ^ 0x77, i)).collect();
        let stream = self.host.connect(port, &prefix);
        let _ = stream.set_nonblocking(true);
        self.conns.push(HostConn {
            stream: Some(stream),
            guest_port: tracked.then_some(port),
            host_initiated: true,
            prefix,
            wrote: Vec::new(),
            got: Vec::new(),
            read_shut: false,
        });
        self.g.pump(Duration::ZERO);
    }

    fn pick_conn(&mut self, inp: &mut Input) -> Option<&mut HostConn> {
        let k = inp.u8() as usize;
        if self.conns.is_empty() {
            return None;
        }
        let n = self.conns.len();
        Some(&mut self.conns[k % n])
    }

    fn host_write(&mut self, inp: &mut Input) {
        let n = usize::from(inp.u16() % 12_000);
        let seed = self.host_seq;
        let Some(c) = self.pick_conn(inp) else { return };
        let Some(s) = &c.stream else { return };
        let data: Vec<u8> = (0..n as u64)
            .map(|i| pattern(0x1234, seed + c.wrote.len() as u64 + i))
            .collect();
        if let Ok(k) = super::send_nosignal(s, &data) {
            c.wrote.extend_from_slice(&data[..k]);
        }
        self.host_seq += 1;
        self.g.pump(Duration::ZERO);
    }

    fn host_read(&mut self, inp: &mut Input) {
        let n = 1 + usize::from(inp.u16() % 32_768);
        let Some(c) = self.pick_conn(inp) else { return };
        let Some(s) = c.stream.as_mut() else { return };
        let mut buf = vec![0u8; n];
        if let Ok(k) = s.read(&mut buf) {
            c.got.extend_from_slice(&buf[..k]);
        }
    }

    fn host_close(&mut self, inp: &mut Input) {
        let how = inp.u8() % 3;
        let Some(c) = self.pick_conn(inp) else { return };
        match how {
            0 => {
                if let Some(s) = &c.stream {
                    let _ = s.shutdown(Shutdown::Write);
                }
            }
            1 => {
                if let Some(s) = &c.stream {
                    let _ = s.shutdown(Shutdown::Read);
                    c.read_shut = true;
                }
            }
            _ => c.stream = None,
        }
        self.g.pump(Duration::ZERO);
    }

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
            op: match inp.u8() {
                x if x < 240 => u16::from(x % 8),
                _ => inp.u16(),
            },
            flags: if inp.one_in(4) {
                inp.u32()
            } else {
                u32::from(inp.u8() % 4)
            },
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

    fn hostile_packet(&mut self, inp: &mut Input) {
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
    fn hostile_chain(&mut self, inp: &mut Input) {
        let n = 1 + inp.below(4) as usize;
        if self.g.txq.free_descs() < n + 20 {
            return;
        }
        let h = Self::raw_header(inp).encode();
        let m = self.g.mem.clone();
        m.write_slice(&h, GuestAddress(SCRATCH)).expect("scratch");
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

    /// Picks up the host ends of new guest-initiated connections.
    fn collect(&mut self) {
        while let Some((req, stream)) = self.host.accept(Duration::ZERO) {
            let _ = stream.set_nonblocking(true);
            let tracked = req.guest_cid == GUEST
                && (TRACKED_BASE..RAW_BASE).contains(&req.guest_port)
                && self.flows.contains_key(&req.guest_port);
            self.conns.push(HostConn {
                stream: Some(stream),
                guest_port: tracked.then_some(req.guest_port),
                host_initiated: false,
                prefix: Vec::new(),
                wrote: Vec::new(),
                got: Vec::new(),
                read_shut: false,
            });
        }
    }

    fn read_all(&mut self) {
        for c in self.conns.iter_mut() {
            let Some(s) = c.stream.as_mut() else { continue };
            let mut buf = [0u8; 16 * 1024];
            for _ in 0..64 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => c.got.extend_from_slice(&buf[..k]),
                }
            }
        }
    }

    fn check(&self) {
        let empty = Flow::default();
        assert!(
            self.g.violations.is_empty(),
            "guest saw violations: {:?}",
            self.g.violations
        );
        for c in &self.conns {
            let Some(port) = c.guest_port else { continue };
            let flow = self.flows.get(&port).unwrap_or(&empty);
            // Host-initiated: the device first writes `OK <port>\n`.
            let got: &[u8] = if c.host_initiated {
                match c.got.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        assert!(c.got.starts_with(b"OK "), "bad handshake reply");
                        &c.got[nl + 1..]
                    }
                    None => {
                        assert!(b"OK 4294967295\n".len() > c.got.len());
                        &[]
                    }
                }
            } else {
                &c.got
            };
            assert!(
                flow.sent.starts_with(got),
                "host read {} bytes on guest port {port} that the guest did not send in order",
                got.len()
            );
            let mut expect = c.prefix.clone();
            expect.extend_from_slice(&c.wrote);
            let mut guest_got = flow.got.clone();
            if let Some(s) = self.g.socks.get(&port) {
                guest_got.extend(s.rx.iter());
            }
            assert!(
                expect.starts_with(&guest_got),
                "guest port {port} received {} bytes the host did not write in order",
                guest_got.len()
            );
        }
    }
}
