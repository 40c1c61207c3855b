//! `device`: the whole device — its core, queues, CSM, muxer — driven through the simulated
//! Linux guest ([`SimGuest`]) with real Unix socket pairs ([`PairBackend`]) on the host side.
//!
//! Each input is a short program (at most [`MAX_STEPS`] steps) over a fresh device with small
//! budgets and timeouts: guest connects, sends (always within the device's credit, in fuzzed
//! descriptor layouts), receives, shutdowns and resets on tracked sockets; hostile packets with
//! every header field fuzzed (on their own ports, so they cannot corrupt the tracked books);
//! raw broken descriptor chains; host-initiated connections with fuzzed prefixes; host writes,
//! reads, half-closes and closes; backend refusals; waits that let timers fire (with the device
//! running, or late); and, at most once and last, an avail index that jumps ahead.
//!
//! The device runs without a thread of its own (`RunMode::External`): the simulated guest runs
//! its core in the fuzzing thread whenever it waits for the device. Its clock is manual: where
//! the guest waits, it runs the device until it is idle and then moves the device's clock
//! straight to its next deadline, so waits for timers (up to past the 2 s timeouts) cost no
//! real time and what fires depends on the input alone, not on the machine's speed. The guest
//! memory is one per thread, recycled from input to input ([`SimGuest::with_device_recycled`]).
//!
//! Asserted: the simulated guest sees no violation (credit overrun, wrong used length, op before
//! RESPONSE, RW after SHUTDOWN(SEND), packet for another CID, ...); the device wrote nothing
//! past an RX buffer (the guard bytes between them are intact); on every tracked connection
//! the host reads a prefix of what the guest sent and the guest reads a prefix of what the host
//! wrote; the device answers `connections()`, its core still runs, and it resets cleanly (no
//! panic, no error, no hang).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

mod hostile;

use super::Input;
use crate::csm::connection::CsmConfig;
use crate::device::core::Flow as CoreFlow;
use crate::device::virtio::VirtioDevice;
use crate::device::{DeviceConfig, RunMode};
use crate::sim::{PairBackend, PairHost, SimGuest, SimSock, SockState, TxLayout, QUEUE_SIZE};
use crate::wire::{op, shutdown, sock_type, Header, MAX_PAYLOAD};

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
    /// A SOCK_SEQPACKET socket pair: every read takes one whole message.
    seqpacket: bool,
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

/// `pattern(seed, i)` for the `n` bytes `i = from..from + n`, made from a copy of the seedless
/// pattern (which repeats every 64 KiB) with the seed XORed in eight bytes at a time: a loop
/// per byte is slow under coverage instrumentation.
fn pattern_bytes(seed: u32, from: u64, n: usize) -> Vec<u8> {
    const PERIOD: usize = 1 << 16;
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| (0..2 * PERIOD as u64).map(|i| pattern(0, i)).collect());
    let mut out = Vec::with_capacity(n);
    let mut at = (from % PERIOD as u64) as usize;
    while out.len() < n {
        let k = (n - out.len()).min(base.len() - at);
        out.extend_from_slice(&base[at..at + k]);
        at = (at + k) % PERIOD;
    }
    let mask = u64::from_ne_bytes([seed as u8; 8]);
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes((&*w).try_into().expect("eight bytes")) ^ mask;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for b in words.into_remainder() {
        *b ^= seed as u8;
    }
    out
}

/// Whether the bytes of `parts`, in order, begin the bytes of `of`: `starts_with` over the two
/// concatenations, without making them.
fn is_prefix(parts: &[&[u8]], of: &[&[u8]]) -> bool {
    let mut parts = parts.iter().copied();
    let mut of = of.iter().copied();
    let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
    loop {
        if x.is_empty() {
            match parts.next() {
                Some(p) => x = p,
                None => return true,
            }
            continue;
        }
        if y.is_empty() {
            match of.next() {
                Some(p) => y = p,
                None => return false,
            }
            continue;
        }
        let n = x.len().min(y.len());
        if x[..n] != y[..n] {
            return false;
        }
        x = &x[n..];
        y = &y[n..];
    }
}

/// How long a wait of the program lasts, on the device's manual clock: under a millisecond,
/// one or two (the shortest timeouts), or past every timeout.
fn wait(sel: u8) -> Duration {
    match sel % 4 {
        0 => Duration::from_micros(500),
        1 => Duration::from_millis(1),
        2 => Duration::from_millis(2),
        _ => Duration::from_secs(3),
    }
}

fn ms(sel: u8) -> Duration {
    match sel % 3 {
        0 => Duration::from_millis(1),
        1 => Duration::from_millis(5),
        _ => Duration::from_secs(2),
    }
}

/// The fuzz body; see the module documentation of `fuzzing::device`.
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
        ..CsmConfig::default()
    };
    let (backend, host) = PairBackend::new();
    if c & 0x40 != 0 {
        host.set_socket_buffers(4096);
    }
    // No device thread: the device runs in this thread whenever the guest waits for it, so a
    // run is deterministic in its order of events and costs no thread start and join.
    cfg.run = RunMode::External;
    // One guest memory per thread, recycled: its rings rewritten and whatever the last input
    // wrote zeroed, so an input sees the memory a fresh mapping would show.
    let (mut g, mut dev) = SimGuest::with_device_recycled(cfg, backend);
    let core = dev.subscriber().expect("an external-mode device");
    // On a manual clock: waits for timers cost nothing, and which ones fire depends on the
    // input alone.
    g.drive_with(dev.subscriber().expect("an external-mode device"), true);
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
    // Let the device finish what is in flight (it runs in this thread: no need to wait), then
    // look at everything once more.
    for _ in 0..8 {
        if !run.g.pump(Duration::ZERO) {
            break;
        }
    }
    run.collect();
    run.read_all();
    run.check();
    // The device wrote only into the RX buffers the guest posted.
    if let Err(e) = run.g.guards_intact() {
        panic!("{e}");
    }
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
    let _ = core.connections();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the device did not answer connections()"
    );
    assert_eq!(
        core.run_once(0).expect("the device failed"),
        CoreFlow::Continue
    );
    assert!(dev.reset(), "the device could not be reset");
}

impl Run {
    /// One step; returns `true` when it must be the last.
    fn step(&mut self, inp: &mut Input) -> bool {
        match inp.u8() % 16 {
            0 | 1 => self.connect(inp),
            2 | 3 => self.send(inp),
            4 => self.control(inp),
            5 => self.recv(inp),
            // The device runs while time passes, until it answers.
            6 => {
                self.g.pump(wait(inp.u8()));
            }
            7 => self.host_connect(inp),
            8 => self.host_write(inp),
            9 => self.host_read(inp),
            10 => self.host_close(inp),
            11 => self.hostile_packet(inp),
            12 => self.hostile_chain(inp),
            // Time passes while the device does not run (a late device thread).
            13 => self.g.let_time_pass(wait(inp.u8())),
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
            type_: s.sock_type,
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
        let mut s = SimSock::new(local, dst_cid, dst_port, self.g.buf_alloc);
        if dst_port == 4 {
            // Port 4 is opened as SOCK_SEQPACKET (the device relays its messages whole).
            s.sock_type = sock_type::SEQPACKET;
        }
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
        let payload = pattern_bytes(port, seq0, n);
        flow.sent.extend_from_slice(&payload);
        // SOCK_SEQPACKET: fuzzed EOM and EOR (EOR alone included) from the length's low bits.
        let flags = if s.sock_type == sock_type::SEQPACKET {
            (want & 3) as u32
        } else {
            0
        };
        let h = Self::header(s, cid, op::RW, n as u32, flags);
        s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
        s.last_fwd_sent = s.fwd_cnt;
        self.g.send_packet(&h, &payload);
        self.g.pump(Duration::ZERO);
    }

    /// A control packet on a tracked socket: honest addresses and credit, fuzzed op and flags.
    fn control(&mut self, inp: &mut Input) {
        let sel = inp.u8();
        let flags = inp.flags();
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
        // One in eight is SOCK_SEQPACKET, which has no prefix (its handshake is a message).
        let seqpacket = plen >= 70;
        let prefix = pattern_bytes(port ^ 0x77, 0, if seqpacket { 0 } else { plen });
        let stream = if seqpacket {
            self.host.connect_seq(port)
        } else {
            self.host.connect(port, &prefix)
        };
        let _ = stream.set_nonblocking(true);
        self.conns.push(HostConn {
            stream: Some(stream),
            guest_port: tracked.then_some(port),
            host_initiated: true,
            prefix,
            wrote: Vec::new(),
            got: Vec::new(),
            read_shut: false,
            seqpacket,
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
        let data = pattern_bytes(0x1234, seed + c.wrote.len() as u64, n);
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
        // A message is read whole or its rest is lost: room for the longest one.
        let mut buf = vec![0u8; if c.seqpacket { 512 * 1024 } else { n }];
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
                seqpacket: req.sock_type == crate::seam::SockType::Seqpacket,
            });
        }
    }

    fn read_all(&mut self) {
        for c in self.conns.iter_mut() {
            let Some(s) = c.stream.as_mut() else { continue };
            let mut buf = vec![0u8; if c.seqpacket { 512 * 1024 } else { 16 * 1024 }];
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
            let unread = self.g.socks.get(&port).map(|s| s.rx.as_slices());
            let (a, b) = unread.unwrap_or_default();
            assert!(
                is_prefix(&[&flow.got, a, b], &[&c.prefix, &c.wrote]),
                "guest port {port} received {} bytes the host did not write in order",
                flow.got.len() + a.len() + b.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_bytes_are_the_pattern() {
        for (seed, from, n) in [
            (0, 0, 0),
            (7, 3, 1),
            (0x1234, 65_530, 20),
            (50_001, 1, 65_536),
        ] {
            let slow: Vec<u8> = (0..n as u64).map(|i| pattern(seed, from + i)).collect();
            assert_eq!(pattern_bytes(seed, from, n), slow, "{seed} {from} {n}");
        }
        let far = 3 * 65_536 + 17;
        let slow: Vec<u8> = (0..100).map(|i| pattern(9, far + i)).collect();
        assert_eq!(pattern_bytes(9, far, 100), slow);
    }

    #[test]
    fn is_prefix_is_starts_with_of_the_concatenations() {
        type Pieces<'a> = &'a [&'a [u8]];
        let cases: &[(Pieces, Pieces)] = &[
            (&[], &[]),
            (&[b""], &[]),
            (&[b"ab", b"", b"c"], &[b"a", b"bcd"]),
            (&[b"abc"], &[b"ab"]),
            (&[b"abd"], &[b"", b"abc"]),
            (&[b"a", b"b"], &[b"ab"]),
            (&[b"x"], &[b"", b""]),
            (&[b""], &[b"zz"]),
        ];
        for (parts, of) in cases {
            let (p, o) = (parts.concat(), of.concat());
            assert_eq!(is_prefix(parts, of), o.starts_with(&p), "{p:?} {o:?}");
        }
    }
}
