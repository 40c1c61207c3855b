//! The connections of one device: dispatches guest packets to connections, opens new ones
//! through the backend, and decides which connection fills the next RX buffer.
//!
//! The pieces live beside it: the slab with typed ids ([`super::table`]), the RX schedule with
//! its bounded RST queue ([`super::rxq`]), the deadlines ([`super::timers`]) and the device-side
//! ports ([`super::ports`]). Every change to a connection ends in `Muxer::after_change`, the
//! one place that removes a finished connection, notes that its stream may want other events,
//! queues it for RX and arms its timer. The noted interests are applied once per wake-up
//! ([`Muxer::flush_watch`], `muxer/interest.rs`) through the [`Watch`] the caller passes (the device's
//! epoll set).

mod interest;
mod tx_run;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::conn::Conn;
use super::connection::{Addr, Connection, CsmConfig, Interest, State};
use super::ports::Ports;
use super::relay::Relay;
use super::rxq::RxQueue;
use super::table::{ConnId, Key, Table};
use super::timers::Timers;
pub use super::types::ConnInfo;
use crate::seam::{
    AcceptReply, Backend, ConnectRequest, Framing, Incoming, Path, Refusal, RouteInfo, SockType,
};
use crate::stats::{Counters, RstReason, RstState};
use crate::stream::Readiness;
use crate::vq::{Chain, GuestMemory};
use crate::wire::line::ok_line;
use crate::wire::{op, sock_type, Header, HEADER_LEN};
pub use interest::Watch;
pub use tx_run::tx_run_len;

/// Most host-initiated connections held back until an older connection with the same
/// addresses is gone (see [`Muxer::handle_backend`]); more are refused.
pub const PARKED_CAP: usize = 64;

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The guest (a REQUEST on the TX queue).
    Guest,
    /// The host side; `ephemeral` when the device picked the port (given back at the end).
    Host { ephemeral: bool },
}

struct Entry<S> {
    conn: Conn<S>,
    route: RouteInfo,
    origin: Origin,
    watched: Option<Interest>,
    /// In `Muxer::noted`: its interest is compared at the end of the wake-up.
    noted: bool,
    in_rxq: bool,
    armed: Option<Instant>,
    /// When the connection was opened (for its log line).
    opened: Instant,
}

/// The connections of one device.
pub struct Muxer<B: Backend> {
    guest_cid: u64,
    cfg: CsmConfig,
    max_conns: usize,
    table: Table<Entry<B::Stream>>,
    rxq: RxQueue,
    timers: Timers,
    ports: Ports,
    incoming: Vec<Incoming<B::Stream>>,
    /// Host-initiated connections waiting for an older connection with their addresses (whose
    /// peer is hanging up) to be removed, with the time they give up.
    parked: Vec<(Addr, Incoming<B::Stream>, Instant)>,
    backend: B,
    counters: Arc<Counters>,
    /// Connections whose interest may have changed in this wake-up ([`Muxer::flush_watch`]).
    noted: Vec<ConnId>,
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
            table: Table::default(),
            rxq: RxQueue::default(),
            timers: Timers::default(),
            ports: Ports::default(),
            incoming: Vec::new(),
            parked: Vec::new(),
            backend,
            counters,
            noted: Vec::new(),
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
        self.table.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn queue_rst(&mut self, h: Header, reason: RstReason) {
        if self.rxq.push_rst(h) {
            self.counters.rst_sent(reason);
        } else {
            Counters::inc(&self.counters.rst_dropped);
        }
    }

    /// Handles one TX packet whose header was copied out and whose `len` was checked against
    /// the chain.
    pub fn handle_tx(
        &mut self,
        w: &impl Watch,
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
        let served =
            h.type_ == sock_type::STREAM || (h.type_ == sock_type::SEQPACKET && self.cfg.seqpacket);
        if !served {
            // A type that does not exist, or SOCK_SEQPACKET for a driver that did not
            // acknowledge VIRTIO_VSOCK_F_SEQPACKET.
            Counters::inc(&self.counters.bad_type);
            if h.op != op::RST {
                self.queue_rst(h.rst_reply(), RstReason::Invalid);
            }
            return;
        }
        let key = Key {
            cid: h.dst_cid,
            port: h.dst_port,
            guest_port: h.src_port,
        };
        let found = self.table.find(&key);
        if h.op == op::RST {
            let state = match found.and_then(|id| self.table.get(id)) {
                None => RstState::Unknown,
                Some(e) if e.conn.state() == State::LocalInit => RstState::Handshake,
                Some(_) => RstState::Open,
            };
            self.counters.rst_received(state);
        }
        if let Some(id) = found {
            if let Some(e) = self.table.get_mut(id) {
                e.conn.on_packet(h, mem, chain, now);
            }
            self.after_change(w, id, now);
            return;
        }
        match h.op {
            op::REQUEST => self.open_guest_conn(w, h, now),
            op::RST => {}
            op::RESPONSE | op::SHUTDOWN | op::RW | op::CREDIT_UPDATE | op::CREDIT_REQUEST => {
                Counters::inc(&self.counters.unknown_conn);
                self.queue_rst(h.rst_reply(), RstReason::UnknownConn);
            }
            _ => {
                Counters::inc(&self.counters.bad_op);
                self.queue_rst(h.rst_reply(), RstReason::Invalid);
            }
        }
    }

    fn open_guest_conn(&mut self, w: &impl Watch, h: &Header, now: Instant) {
        if self.table.len() >= self.max_conns {
            Counters::inc(&self.counters.conn_limit);
            self.queue_rst(h.rst_reply(), RstReason::ConnLimit);
            return;
        }
        let req = ConnectRequest {
            guest_cid: h.src_cid,
            guest_port: h.src_port,
            dst_cid: h.dst_cid,
            dst_port: h.dst_port,
            sock_type: SockType::from_wire(h.type_).unwrap_or_default(),
        };
        match self.backend.connect(&req) {
            Ok(out) => {
                let c = match out.route.path {
                    Path::Host => &self.counters.path_host,
                    Path::Sibling => &self.counters.path_sibling,
                    Path::Uplink => &self.counters.path_uplink,
                };
                Counters::inc(c);
                log::debug!(
                    "vsock: guest {}:{} -> {}:{} routed to {}{}",
                    h.src_cid,
                    h.src_port,
                    h.dst_cid,
                    h.dst_port,
                    out.route.path.name(),
                    if out.route.to_host {
                        " (g2h fallback)"
                    } else {
                        ""
                    }
                );
                let conn = match out.framing {
                    Framing::Bytes => Conn::Stream(Connection::guest_initiated(
                        out.stream,
                        h,
                        out.connected,
                        self.cfg,
                        now,
                    )),
                    Framing::Packets => Conn::Relay(Relay::requested(out.stream, h, self.cfg, now)),
                };
                self.insert(w, conn, out.route, Origin::Guest, now);
            }
            Err(Refusal::NoRoute) => {
                log::debug!(
                    "vsock: guest {}:{} -> {}:{} refused: no route (a reserved CID, strict mode, no uplink or a local CID namespace)",
                    h.src_cid,
                    h.src_port,
                    h.dst_cid,
                    h.dst_port
                );
                Counters::inc(&self.counters.path_refused);
                self.queue_rst(h.rst_reply(), RstReason::Refused);
            }
            Err(Refusal::ConnectFailed) => {
                log::info!(
                    "vsock: guest {}:{} -> {}:{} refused: the host-side connect failed",
                    h.src_cid,
                    h.src_port,
                    h.dst_cid,
                    h.dst_port
                );
                Counters::inc(&self.counters.connect_failed);
                self.queue_rst(h.rst_reply(), RstReason::ConnectFailed);
            }
        }
    }

    fn insert(
        &mut self,
        w: &impl Watch,
        conn: Conn<B::Stream>,
        route: RouteInfo,
        origin: Origin,
        now: Instant,
    ) {
        let key = Key::of(&conn.addr());
        let id = self.table.insert(
            key,
            Entry {
                conn,
                route,
                origin,
                watched: None,
                noted: false,
                in_rxq: false,
                armed: None,
                opened: now,
            },
        );
        self.after_change(w, id, now);
    }

    /// Runs the backend and offers the guest every connection it has ready.
    ///
    /// A newcomer whose addresses are those of a live connection is normally refused. But when
    /// that connection's peer is hanging up, the newcomer is the peer connecting again from the
    /// same port right after its close (the kernel frees a port as soon as the close is
    /// answered), and the old connection's close — which travels on its own socket — has not
    /// been read yet: the newcomer waits (bounded) until the old connection is gone, so the
    /// guest sees the close before the new REQUEST, as on one kernel.
    pub fn handle_backend(&mut self, w: &impl Watch, now: Instant) {
        let mut incoming = std::mem::take(&mut self.incoming);
        self.backend.process(now, &mut incoming);
        for inc in incoming.drain(..) {
            if self.table.len() >= self.max_conns {
                Counters::inc(&self.counters.conn_limit);
                continue;
            }
            if inc.sock_type == SockType::Seqpacket && !self.cfg.seqpacket {
                log::info!(
                    "vsock: a SOCK_SEQPACKET connection to guest port {} refused: the guest's \
                     driver did not acknowledge VIRTIO_VSOCK_F_SEQPACKET",
                    inc.guest_port
                );
                Counters::inc(&self.counters.bad_type);
                continue;
            }
            let (port, ephemeral) = match inc.src_port {
                Some(p) => (p, false),
                None => match self.ports.alloc() {
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
            if let Some(id) = self.table.find(&Key::of(&addr)) {
                let hanging_up = self.table.get(id).is_some_and(|e| e.conn.peer_hanging_up());
                if hanging_up && self.parked.len() < PARKED_CAP {
                    self.parked
                        .push((addr, inc, now + self.cfg.request_timeout));
                } else {
                    Counters::inc(&self.counters.protocol_error);
                }
                if ephemeral {
                    self.ports.free(port);
                }
                continue;
            }
            self.admit(w, addr, inc, ephemeral, now);
        }
        self.incoming = incoming;
        let before = self.parked.len();
        self.parked.retain(|(_, _, until)| *until > now);
        for _ in self.parked.len()..before {
            Counters::inc(&self.counters.timeouts);
        }
    }

    /// Offers the guest the host-initiated connection `inc` at `addr`.
    fn admit(
        &mut self,
        w: &impl Watch,
        addr: Addr,
        inc: Incoming<B::Stream>,
        ephemeral: bool,
        now: Instant,
    ) {
        Counters::inc(&self.counters.incoming);
        let conn = match inc.framing {
            Framing::Bytes => {
                let reply = match inc.reply {
                    AcceptReply::None => None,
                    AcceptReply::HybridOk => Some(ok_line(addr.local_port).into_bytes()),
                };
                Conn::Stream(Connection::host_initiated(
                    inc.stream,
                    inc.sock_type,
                    addr,
                    inc.prefix,
                    reply,
                    self.cfg,
                    now,
                ))
            }
            Framing::Packets => {
                Conn::Relay(Relay::offered(inc.stream, addr, inc.prefix, self.cfg, now))
            }
        };
        self.insert(w, conn, inc.route, Origin::Host { ephemeral }, now);
    }

    /// Admits the parked newcomer waiting for `addr`, now that its predecessor is gone.
    fn unpark(&mut self, w: &impl Watch, addr: Addr, now: Instant) {
        let Some(i) = self.parked.iter().position(|(a, _, _)| *a == addr) else {
            return;
        };
        let (addr, inc, _) = self.parked.remove(i);
        if self.table.len() >= self.max_conns {
            Counters::inc(&self.counters.conn_limit);
            return;
        }
        self.admit(w, addr, inc, false, now);
    }

    /// Handles readiness of connection `id`'s host stream (a stale id is ignored).
    pub fn handle_ready(&mut self, w: &impl Watch, id: ConnId, ready: Readiness, now: Instant) {
        if let Some(e) = self.table.get_mut(id) {
            e.conn.on_ready(ready, now);
            self.after_change(w, id, now);
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The earliest deadline of any connection, parked newcomer or of the backend.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        let table = &self.table;
        let conn = self
            .timers
            .next(|id, t| table.get(id).is_some_and(|e| e.armed == Some(t)));
        let parked = self.parked.iter().map(|(_, _, until)| *until).min();
        [conn, self.backend.next_deadline(), parked]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires every deadline that passed.
    pub fn handle_deadlines(&mut self, w: &impl Watch, now: Instant) {
        let parked_expired = self.parked.iter().any(|(_, _, until)| *until <= now);
        if parked_expired || self.backend.next_deadline().is_some_and(|d| d <= now) {
            self.handle_backend(w, now);
        }
        while let Some((t, id)) = self.timers.pop_due(now) {
            let Some(e) = self.table.get_mut(id) else {
                continue;
            };
            if e.armed == Some(t) {
                e.armed = None;
                e.conn.on_deadline(now);
                self.after_change(w, id, now);
            }
        }
    }

    /// Whether any connection (or an RST for an unknown one) waits for an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Fills RX buffers from the front of `chains` with what is owed to the guest: queued RSTs
    /// first, one buffer each, else the next connection in round robin that has something,
    /// which may fill several with one read of its host stream. Returns how many buffers were
    /// used (`lens[i]` the bytes written into `chains[i]`); 0 when nothing was written.
    pub fn fill_rx(
        &mut self,
        w: &impl Watch,
        mem: &GuestMemory,
        chains: &[Chain],
        lens: &mut [u32],
        now: Instant,
    ) -> usize {
        // Only the buffers in front that can hold a header (the device passes no others).
        let whole = chains.iter().take(lens.len());
        let n = whole.take_while(|c| c.len() >= HEADER_LEN as u64).count();
        let chains = &chains[..n];
        let mut used = 0;
        for chain in chains {
            let Some(h) = self.rxq.pop_rst() else {
                break;
            };
            // Counted by reason when queued (`queue_rst`).
            chain.write_at(mem, 0, &h.encode());
            lens[used] = HEADER_LEN as u32;
            used += 1;
        }
        if used > 0 || chains.is_empty() {
            return used;
        }
        for _ in 0..self.rxq.turns() {
            let Some(id) = self.rxq.pop() else {
                break;
            };
            let Some(e) = self.table.get_mut(id) else {
                continue;
            };
            e.in_rxq = false;
            let used = e.conn.fill_rx_many(mem, chains, lens, now);
            self.after_change(w, id, now);
            if used > 0 {
                return used;
            }
        }
        0
    }

    /// The one place that acts on a connection's new state.
    fn after_change(&mut self, w: &impl Watch, id: ConnId, now: Instant) {
        let Some(e) = self.table.get_mut(id) else {
            return;
        };
        let stalls = e.conn.take_credit_stalls();
        if stalls > 0 {
            self.counters
                .credit_stalls
                .fetch_add(stalls, Ordering::Relaxed);
        }
        if e.conn.is_done() {
            // Closing the stream (dropping the entry) takes it out of the epoll set.
            let e = self.table.remove(id).expect("entry present");
            let a = e.conn.addr();
            if let Origin::Host { ephemeral: true } = e.origin {
                self.ports.free(a.local_port);
            }
            super::conn_log::count_end(&self.counters, &e.conn);
            super::conn_log::ended(
                &e.conn,
                e.route,
                matches!(e.origin, Origin::Host { .. }),
                now.saturating_duration_since(e.opened),
            );
            drop(e);
            if !self.parked.is_empty() {
                self.unpark(w, a, now);
            }
            return;
        }
        if e.conn.has_pending_rx() && !e.in_rxq {
            e.in_rxq = true;
            self.rxq.push(id);
        }
        let deadline = e.conn.deadline();
        if deadline != e.armed {
            e.armed = deadline;
            if let Some(t) = deadline {
                self.timers.arm(id, t);
            }
        }
        self.note_interest(id);
    }

    /// Where the allocator of device-side ports searches next (for a save).
    pub fn port_cursor(&self) -> u32 {
        self.ports.cursor()
    }

    /// A restored table: the port allocator where the save left it, and the RSTs `resets`
    /// owed for connections the guest had with the saved device, before any other RX (the
    /// caller bounds them by the connection limit).
    pub fn restart(&mut self, next_port: u32, resets: impl Iterator<Item = Header>) {
        self.ports.set_cursor(next_port);
        for h in resets {
            self.rxq.push_reset(h);
            self.counters.rst_sent(RstReason::Reset);
        }
    }

    /// A snapshot of every live connection.
    pub fn snapshot(&self) -> Vec<ConnInfo> {
        self.table
            .iter()
            .map(|(_, e)| {
                let a = e.conn.addr();
                let (to_host, to_guest) = e.conn.bytes();
                let (messages_to_host, messages_to_guest) = e.conn.messages();
                ConnInfo {
                    sock_type: e.conn.sock_type(),
                    local_port: a.local_port,
                    local_cid: a.local_cid,
                    peer_cid: a.peer_cid,
                    peer_port: a.peer_port,
                    path: e.route.path,
                    to_host: e.route.to_host,
                    guest_initiated: e.origin == Origin::Guest,
                    state: e.conn.state().name(),
                    bytes_to_host: to_host,
                    bytes_to_guest: to_guest,
                    messages_to_host,
                    messages_to_guest,
                }
            })
            .collect()
    }
}
