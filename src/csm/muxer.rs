//! The connection table: dispatches guest packets to connections, opens new ones through the
//! backend, and decides which connection fills the next RX buffer.
//!
//! Every change to a connection ends in [`Muxer::after_change`], the one place that removes a
//! finished connection, syncs its epoll interest, queues it for RX and arms its timer.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::connection::{Addr, Connection, CsmConfig, Interest, KillReason};
use crate::backend::{AcceptReply, Backend, ConnectRequest, Incoming, Refusal};
use crate::device::chain::Chain;
use crate::device::packet::{op, sock_type, Header, HEADER_LEN};
use crate::device::poller::{Poller, Ready, Token};
use crate::device::virtio::GuestMemory;
use crate::router::{Path, RouteInfo};
use crate::stats::Counters;

/// Most RSTs for unknown connections waiting for an RX buffer; more are dropped and counted.
pub const RST_QUEUE_CAP: usize = 256;

/// First device-side port for host-initiated connections (as Firecracker and Cloud Hypervisor).
pub const EPHEMERAL_FIRST: u32 = 1 << 30;
const EPHEMERAL_END: u32 = 1 << 31;

/// A live connection as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// Device-side port.
    pub local_port: u32,
    /// CID the guest talks to.
    pub local_cid: u64,
    /// The guest's CID.
    pub peer_cid: u64,
    /// The guest's port.
    pub peer_port: u32,
    /// The path taken.
    pub path: Path,
    /// Whether the uplink was taken by fallback (`VMADDR_FLAG_TO_HOST`).
    pub to_host: bool,
    /// Who opened it: `true` for the guest.
    pub guest_initiated: bool,
    /// State name.
    pub state: &'static str,
    /// Bytes guest → host.
    pub bytes_to_host: u64,
    /// Bytes host → guest.
    pub bytes_to_guest: u64,
}

type Key = (u64, u32, u32);

struct Entry<S> {
    conn: Connection<S>,
    route: RouteInfo,
    guest_initiated: bool,
    ephemeral: bool,
    registered: Option<Interest>,
    in_rxq: bool,
    armed: Option<Instant>,
}

struct Slot<S> {
    gen: u32,
    entry: Option<Entry<S>>,
}

/// The connections of one device.
pub struct Muxer<B: Backend> {
    guest_cid: u64,
    cfg: CsmConfig,
    max_conns: usize,
    slots: Vec<Slot<B::Stream>>,
    free: Vec<u32>,
    live: usize,
    index: HashMap<Key, u32>,
    rxq: VecDeque<(u32, u32)>,
    rsts: VecDeque<Header>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    ports_in_use: HashSet<u32>,
    next_port: u32,
    incoming: Vec<Incoming<B::Stream>>,
    backend: B,
    counters: Arc<Counters>,
}

impl<B: Backend> Muxer<B> {
    /// A table for the guest with CID `guest_cid`, holding at most `max_conns` connections.
    pub fn new(
        guest_cid: u64,
        cfg: CsmConfig,
        max_conns: usize,
        backend: B,
        counters: Arc<Counters>,
    ) -> Self {
        Muxer {
            guest_cid,
            cfg,
            max_conns,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            index: HashMap::new(),
            rxq: VecDeque::new(),
            rsts: VecDeque::with_capacity(RST_QUEUE_CAP),
            timers: BinaryHeap::new(),
            ports_in_use: HashSet::new(),
            next_port: EPHEMERAL_FIRST,
            incoming: Vec::new(),
            backend,
            counters,
        }
    }

    /// The backend, e.g. to register its poll fd.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Gives the backend back, closing every connection.
    pub fn into_backend(self) -> B {
        self.backend
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn queue_rst(&mut self, h: Header) {
        if self.rsts.len() >= RST_QUEUE_CAP {
            Counters::inc(&self.counters.rst_dropped);
            return;
        }
        self.rsts.push_back(h);
    }

    /// Handles one TX packet whose header was copied out and whose `len` was checked against
    /// the chain.
    pub fn handle_tx(
        &mut self,
        poller: &Poller,
        mem: &GuestMemory,
        chain: &Chain,
        h: &Header,
        now: Instant,
    ) {
        if h.src_cid != self.guest_cid {
            // Spoofed source: dropped unanswered, as vhost-vsock does.
            Counters::inc(&self.counters.spoofed_src);
            return;
        }
        if h.type_ != sock_type::STREAM {
            Counters::inc(&self.counters.bad_type);
            if h.op != op::RST {
                self.queue_rst(h.rst_reply());
            }
            return;
        }
        let key = (h.dst_cid, h.dst_port, h.src_port);
        if let Some(&slot) = self.index.get(&key) {
            if let Some(e) = self.slots[slot as usize].entry.as_mut() {
                e.conn.on_packet(h, mem, chain, now);
            }
            self.after_change(poller, slot);
            return;
        }
        match h.op {
            op::REQUEST => self.open_guest_conn(poller, h, now),
            op::RST => {}
            op::RESPONSE | op::SHUTDOWN | op::RW | op::CREDIT_UPDATE | op::CREDIT_REQUEST => {
                Counters::inc(&self.counters.unknown_conn);
                self.queue_rst(h.rst_reply());
            }
            _ => {
                Counters::inc(&self.counters.bad_op);
                self.queue_rst(h.rst_reply());
            }
        }
    }

    fn open_guest_conn(&mut self, poller: &Poller, h: &Header, now: Instant) {
        if self.live >= self.max_conns {
            Counters::inc(&self.counters.conn_limit);
            self.queue_rst(h.rst_reply());
            return;
        }
        let req = ConnectRequest {
            guest_cid: h.src_cid,
            guest_port: h.src_port,
            dst_cid: h.dst_cid,
            dst_port: h.dst_port,
        };
        match self.backend.connect(&req) {
            Ok(out) => {
                let c = match out.route.path {
                    Path::Host => &self.counters.path_host,
                    Path::Sibling => &self.counters.path_sibling,
                    Path::Uplink => &self.counters.path_uplink,
                };
                Counters::inc(c);
                let conn = Connection::guest_initiated(
                    out.stream,
                    h,
                    out.connected,
                    out.await_ok,
                    self.cfg,
                    now,
                );
                self.insert(poller, conn, out.route, true, false);
            }
            Err(Refusal::NoRoute) => {
                Counters::inc(&self.counters.path_refused);
                self.queue_rst(h.rst_reply());
            }
            Err(Refusal::ConnectFailed) => {
                Counters::inc(&self.counters.connect_failed);
                self.queue_rst(h.rst_reply());
            }
        }
    }

    fn insert(
        &mut self,
        poller: &Poller,
        conn: Connection<B::Stream>,
        route: RouteInfo,
        guest_initiated: bool,
        ephemeral: bool,
    ) {
        let a = conn.addr();
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize].entry = Some(Entry {
            conn,
            route,
            guest_initiated,
            ephemeral,
            registered: None,
            in_rxq: false,
            armed: None,
        });
        self.index
            .insert((a.local_cid, a.local_port, a.peer_port), slot);
        self.live += 1;
        self.after_change(poller, slot);
    }

    fn alloc_port(&mut self) -> Option<u32> {
        for _ in 0..1024 {
            let p = self.next_port;
            self.next_port = if p + 1 >= EPHEMERAL_END {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            if self.ports_in_use.insert(p) {
                return Some(p);
            }
        }
        None
    }

    /// Runs the backend and offers the guest every connection it has ready.
    pub fn handle_backend(&mut self, poller: &Poller, now: Instant) {
        let mut incoming = std::mem::take(&mut self.incoming);
        self.backend.process(now, &mut incoming);
        for inc in incoming.drain(..) {
            if self.live >= self.max_conns {
                Counters::inc(&self.counters.conn_limit);
                continue;
            }
            let (port, ephemeral) = match inc.src_port {
                Some(p) => (p, false),
                None => match self.alloc_port() {
                    Some(p) => (p, true),
                    None => {
                        Counters::inc(&self.counters.conn_limit);
                        continue;
                    }
                },
            };
            let addr = Addr {
                local_cid: inc.src_cid,
                local_port: port,
                peer_cid: self.guest_cid,
                peer_port: inc.guest_port,
            };
            if self
                .index
                .contains_key(&(addr.local_cid, addr.local_port, addr.peer_port))
            {
                Counters::inc(&self.counters.protocol_error);
                if ephemeral {
                    self.ports_in_use.remove(&port);
                }
                continue;
            }
            let reply = match inc.reply {
                AcceptReply::None => None,
                AcceptReply::HybridOk => Some(format!("OK {port}\n").into_bytes()),
            };
            Counters::inc(&self.counters.incoming);
            let conn =
                Connection::host_initiated(inc.stream, addr, inc.prefix, reply, self.cfg, now);
            self.insert(poller, conn, inc.route, false, ephemeral);
        }
        self.incoming = incoming;
    }

    /// Handles readiness of a connection's host stream.
    pub fn handle_conn_event(&mut self, poller: &Poller, ready: Ready, now: Instant) {
        let Token::Conn { slot, gen } = ready.token else {
            return;
        };
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.gen & 0x7fff_ffff != gen {
            return;
        }
        if let Some(e) = s.entry.as_mut() {
            e.conn.on_stream_ready(ready, now);
            self.after_change(poller, slot);
        }
    }

    /// The earliest deadline of any connection or of the backend.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(Reverse((t, slot, gen))) = self.timers.peek().copied() {
            let live = self.slots.get(slot as usize).is_some_and(|s| {
                s.gen == gen && s.entry.as_ref().is_some_and(|e| e.armed == Some(t))
            });
            if live {
                break;
            }
            self.timers.pop();
        }
        let conn = self.timers.peek().map(|Reverse((t, _, _))| *t);
        match (conn, self.backend.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires every deadline that passed.
    pub fn handle_deadlines(&mut self, poller: &Poller, now: Instant) {
        if self.backend.next_deadline().is_some_and(|d| d <= now) {
            self.handle_backend(poller, now);
        }
        while let Some(Reverse((t, slot, gen))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let s = &mut self.slots[slot as usize];
            if s.gen != gen {
                continue;
            }
            if let Some(e) = s.entry.as_mut() {
                if e.armed == Some(t) {
                    e.armed = None;
                    e.conn.on_deadline(now);
                    self.after_change(poller, slot);
                }
            }
        }
    }

    /// Whether any connection (or an RST for an unknown one) waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Fills the RX buffer `chain` with the next packet owed to the guest, serving connections
    /// round robin. Returns the used length, or `None` when nothing was written.
    pub fn fill_rx(
        &mut self,
        poller: &Poller,
        mem: &GuestMemory,
        chain: &Chain,
        now: Instant,
    ) -> Option<u32> {
        if chain.len() < HEADER_LEN as u64 {
            return None;
        }
        if let Some(h) = self.rsts.pop_front() {
            chain.write_at(mem, 0, &h.encode());
            return Some(HEADER_LEN as u32);
        }
        for _ in 0..self.rxq.len() {
            let Some((slot, gen)) = self.rxq.pop_front() else {
                break;
            };
            let s = &mut self.slots[slot as usize];
            if s.gen != gen {
                continue;
            }
            let Some(e) = s.entry.as_mut() else {
                continue;
            };
            e.in_rxq = false;
            let written = e.conn.fill_rx(mem, chain, now);
            self.after_change(poller, slot);
            if written.is_some() {
                return written;
            }
        }
        None
    }

    /// The one place that acts on a connection's new state.
    fn after_change(&mut self, poller: &Poller, slot: u32) {
        let s = &mut self.slots[slot as usize];
        let gen = s.gen;
        let Some(e) = s.entry.as_mut() else {
            return;
        };
        let fd = e.conn.stream().as_raw_fd();
        if e.conn.is_done() {
            if e.registered.is_some() {
                let _ = poller.remove(fd);
            }
            let e = s.entry.take().expect("entry present");
            s.gen = s.gen.wrapping_add(1) & 0x7fff_ffff;
            let a = e.conn.addr();
            self.index.remove(&(a.local_cid, a.local_port, a.peer_port));
            if e.ephemeral {
                self.ports_in_use.remove(&a.local_port);
            }
            self.free.push(slot);
            self.live -= 1;
            self.count_kill(e.conn.kill_reason());
            return;
        }
        let token = Token::Conn { slot, gen };
        let want = e.conn.interest();
        if e.registered != Some(want) {
            let res = match (e.registered, want.is_none()) {
                (Some(_), true) => poller.remove(fd),
                (None, true) => Ok(()),
                (None, false) => poller.add(fd, token, want.read, want.write),
                (Some(_), false) => poller.modify(fd, token, want.read, want.write),
            };
            match res {
                Ok(()) => e.registered = (!want.is_none()).then_some(want),
                Err(_) => {
                    e.conn.kill(KillReason::HostError, true);
                    e.registered = None;
                }
            }
        }
        if e.conn.has_pending_rx() && !e.in_rxq {
            e.in_rxq = true;
            self.rxq.push_back((slot, gen));
        }
        let deadline = e.conn.deadline();
        if deadline != e.armed {
            e.armed = deadline;
            if let Some(t) = deadline {
                self.timers.push(Reverse((t, slot, gen)));
            }
        }
    }

    fn count_kill(&self, reason: Option<KillReason>) {
        let c = &self.counters;
        let counter = match reason {
            Some(KillReason::CreditOverrun) => &c.credit_overrun,
            Some(KillReason::Protocol) => &c.protocol_error,
            Some(KillReason::ConnectFailed) => &c.connect_failed,
            Some(KillReason::Timeout) => &c.timeouts,
            Some(KillReason::HostError) => &c.host_error,
            Some(KillReason::GuestReset) | Some(KillReason::Closed) | None => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of every live connection.
    pub fn snapshot(&self) -> Vec<ConnInfo> {
        self.slots
            .iter()
            .filter_map(|s| s.entry.as_ref())
            .map(|e| {
                let a = e.conn.addr();
                let (to_host, to_guest) = e.conn.bytes();
                ConnInfo {
                    local_port: a.local_port,
                    local_cid: a.local_cid,
                    peer_cid: a.peer_cid,
                    peer_port: a.peer_port,
                    path: e.route.path,
                    to_host: e.route.to_host,
                    guest_initiated: e.guest_initiated,
                    state: e.conn.state().name(),
                    bytes_to_host: to_host,
                    bytes_to_guest: to_guest,
                }
            })
            .collect()
    }
}
