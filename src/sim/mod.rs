//! A simulated Linux guest for tests, fuzzing and benchmarks.
//!
//! [`SimGuest`] is the driver side of a virtio-vsock device over real guest memory
//! ([`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) with two regions, so buffers can straddle
//! them): it writes descriptor tables and avail rings, posts 4 KiB single-descriptor RX buffers
//! as Linux ≥ 6.2 does, sends TX packets as a header descriptor plus several data descriptors,
//! keeps the credit accounting of a Linux socket, kicks the device through its real kick
//! [`EventFd`]s and waits for its interrupt [`EventFd`]. [`PairBackend`] gives the device real Unix
//! socket pairs as host streams.

pub(crate) mod backend;
mod queue;
mod socket;

pub use backend::{PairBackend, PairHost};
pub use queue::{Buf, DriverQueue, RawDesc};
pub use socket::{SimSock, SockState};

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::Backend;
use crate::device::packet::{op, shutdown, sock_type, Header, HEADER_LEN, MAX_PAYLOAD};
use crate::device::virtio::{ActivateContext, EventFdInterrupt, GuestMemory, VirtioDevice};
use crate::device::{DeviceConfig, VsockDevice};

/// Size of the simulated guest memory.
pub const MEM_SIZE: u64 = 64 << 20;
/// Where the second memory region starts (TX buffers straddle it).
pub const REGION_SPLIT: u64 = 32 << 20;
/// Queue size the simulated driver uses.
pub const QUEUE_SIZE: u16 = 256;
/// Payload room of each RX buffer, as Linux posts them.
pub const RX_BUF_PAYLOAD: u32 = 4096;

const RX_BUFS: u64 = 0x10_0000;
const RX_STRIDE: u64 = 0x1040;
const TX_BUFS: u64 = 0x180_0000;
const TX_STRIDE: u64 = 0x1_1000;
const EVT_BUFS: u64 = 0x30_0000;

/// How the driver splits a TX packet into descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxLayout {
    /// Header and payload in one descriptor.
    Linear,
    /// A 44-byte header descriptor, then the payload in one descriptor.
    HeaderThenData,
    /// A header descriptor, then the payload cut into pieces of these sizes (the last piece
    /// takes the rest), like the fragments of a nonlinear skb.
    Fragments(Vec<u32>),
    /// The header itself split after this many bytes, then page-sized fragments (at most 17
    /// for 64 KiB, as Linux sends nonlinear skbs).
    SplitHeader(u32),
}

/// A simulated guest attached to one device.
pub struct SimGuest {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The guest's CID.
    pub cid: u64,
    /// RX queue (driver side).
    pub rxq: DriverQueue,
    /// TX queue (driver side).
    pub txq: DriverQueue,
    /// Event queue (driver side).
    pub evq: DriverQueue,
    kicks: Vec<EventFd>,
    irq: EventFd,
    /// Receive buffer size this guest advertises per socket.
    pub buf_alloc: u32,
    /// How TX packets are laid out.
    pub layout: TxLayout,
    /// Sockets by local port.
    pub socks: HashMap<u32, SimSock>,
    listening: Vec<u32>,
    accepted: VecDeque<u32>,
    next_port: u32,
    /// Interrupts seen.
    pub interrupts: u64,
    /// Every packet received, oldest first (the test may clear it).
    pub received: Vec<Header>,
    /// Rule breaks by the device that the guest noticed (must stay empty).
    pub violations: Vec<String>,
    /// Whether packets for unknown sockets are answered with RST, as Linux does (tests of a
    /// silent or hostile guest turn it off).
    pub answer_unknown: bool,
    rx_posted: usize,
}

impl SimGuest {
    /// A guest with CID `cid` and the queues, kick fds and interrupt fd a transport would hand a
    /// device on activation.
    pub fn new(cid: u64) -> (SimGuest, ActivateContext) {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), REGION_SPLIT as usize),
            (
                GuestAddress(REGION_SPLIT),
                (MEM_SIZE - REGION_SPLIT) as usize,
            ),
        ])
        .expect("guest memory");
        let rxq = DriverQueue::new(&mem, QUEUE_SIZE, 0x1000, 0x2000, 0x3000);
        let txq = DriverQueue::new(&mem, QUEUE_SIZE, 0x4000, 0x5000, 0x6000);
        let evq = DriverQueue::new(&mem, QUEUE_SIZE, 0x7000, 0x8000, 0x9000);
        let mut queues = Vec::new();
        for dq in [&rxq, &txq, &evq] {
            let mut q = Queue::new(QUEUE_SIZE).expect("queue");
            q.set_size(QUEUE_SIZE);
            q.set_desc_table_address(Some(dq.desc.0 as u32), Some(0));
            q.set_avail_ring_address(Some(dq.avail.0 as u32), Some(0));
            q.set_used_ring_address(Some(dq.used.0 as u32), Some(0));
            q.set_ready(true);
            queues.push(q);
        }
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues,
            kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: Arc::new(EventFdInterrupt(irq.try_clone().unwrap())),
        };
        let mut g = SimGuest {
            mem,
            cid,
            rxq,
            txq,
            evq,
            kicks,
            irq,
            buf_alloc: 256 * 1024,
            layout: TxLayout::Fragments(vec![1000, 3000]),
            socks: HashMap::new(),
            listening: Vec::new(),
            accepted: VecDeque::new(),
            next_port: 50_000,
            interrupts: 0,
            received: Vec::new(),
            violations: Vec::new(),
            answer_unknown: true,
            rx_posted: 0,
        };
        g.post_event_buffers();
        g.fill_rx();
        g.rxq.want_interrupt(&g.mem);
        g.txq.want_interrupt(&g.mem);
        (g, ctx)
    }

    /// A guest plus an activated device with `backend`, negotiated like Linux does
    /// (VERSION_1 and EVENT_IDX).
    pub fn with_device<B: Backend + 'static>(
        cfg: DeviceConfig,
        backend: B,
    ) -> (SimGuest, VsockDevice<B>) {
        let (g, ctx) = SimGuest::new(cfg.guest_cid);
        let mut dev = VsockDevice::new(cfg, backend);
        dev.ack_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX))
            .expect("features");
        dev.activate(ctx).expect("activate");
        (g, dev)
    }

    fn post_event_buffers(&mut self) {
        for i in 0..8u64 {
            let b = Buf {
                addr: GuestAddress(EVT_BUFS + 8 * i),
                len: 4,
                write: true,
            };
            self.evq.add(&self.mem, &[b]);
        }
        self.kick(2);
    }

    /// Posts RX buffers until the queue is full (one writable descriptor of 44 + 4096 bytes
    /// each) and kicks the RX queue if any were added.
    pub fn fill_rx(&mut self) {
        let mut added = false;
        while self.rxq.free_descs() > 0 {
            // The buffer's place is derived from the descriptor index the queue hands out.
            let head = self.rxq.take_descs(1).expect("free descriptor checked")[0];
            let addr = RX_BUFS + RX_STRIDE * u64::from(head);
            self.rxq.write_desc(
                &self.mem,
                head,
                RawDesc {
                    addr,
                    len: HEADER_LEN as u32 + RX_BUF_PAYLOAD,
                    flags: 2,
                    next: 0,
                },
            );
            self.rxq.track(head, &[head]);
            self.rxq.publish(&self.mem, head);
            self.rx_posted += 1;
            added = true;
        }
        if added {
            self.kick(0);
        }
    }

    /// Notifies queue `q`.
    pub fn kick(&self, q: usize) {
        self.kicks[q].write(1).expect("kick");
    }

    /// Places a TX packet in guest memory laid out per [`SimGuest::layout`] and kicks.
    /// Waits (bounded) for free descriptors.
    pub fn send_packet(&mut self, h: &Header, payload: &[u8]) {
        let layout = self.layout.clone();
        let bufs_needed = 2 + match &layout {
            TxLayout::Fragments(v) => v.len(),
            TxLayout::SplitHeader(_) => payload.len() / 4096 + 1,
            _ => 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.txq.free_descs() < bufs_needed + 1 {
            assert!(
                Instant::now() < deadline,
                "device never returned TX buffers"
            );
            self.pump(Duration::from_millis(50));
        }
        let head = self.txq.peek_free().expect("checked");
        let base = TX_BUFS + TX_STRIDE * u64::from(head);
        let hdr = h.encode();
        self.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + HEADER_LEN as u64))
            .unwrap();
        let at = |off: u64, len: usize| Buf {
            addr: GuestAddress(base + off),
            len: len as u32,
            write: false,
        };
        let total = HEADER_LEN + payload.len();
        let mut bufs = Vec::new();
        match &layout {
            TxLayout::Linear => bufs.push(at(0, total)),
            TxLayout::HeaderThenData => {
                bufs.push(at(0, HEADER_LEN));
                if !payload.is_empty() {
                    bufs.push(at(HEADER_LEN as u64, payload.len()));
                }
            }
            TxLayout::Fragments(sizes) => {
                bufs.push(at(0, HEADER_LEN));
                let mut off = 0usize;
                for &s in sizes {
                    let n = (s as usize).min(payload.len() - off);
                    if n == 0 {
                        break;
                    }
                    bufs.push(at((HEADER_LEN + off) as u64, n));
                    off += n;
                }
                if off < payload.len() {
                    bufs.push(at((HEADER_LEN + off) as u64, payload.len() - off));
                }
            }
            TxLayout::SplitHeader(cut) => {
                let cut = (*cut as usize).clamp(1, HEADER_LEN - 1);
                bufs.push(at(0, cut));
                bufs.push(at(cut as u64, HEADER_LEN - cut));
                let mut off = 0;
                while off < payload.len() {
                    let n = 4096.min(payload.len() - off);
                    bufs.push(at((HEADER_LEN + off) as u64, n));
                    off += n;
                }
            }
        }
        let got = self.txq.add(&self.mem, &bufs).expect("descriptors checked");
        debug_assert_eq!(got, head);
        self.kick(1);
    }

    /// Waits up to `timeout` for an interrupt, then handles every used buffer. Returns whether
    /// anything was handled.
    pub fn pump(&mut self, timeout: Duration) -> bool {
        if !self.rxq.used_pending(&self.mem) && !self.txq.used_pending(&self.mem) {
            let mut pfd = libc::pollfd {
                fd: self.irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
        if self.irq.read().is_ok() {
            self.interrupts += 1;
        }
        let mut any = false;
        while self.txq.pop_used(&self.mem).is_some() {
            any = true;
        }
        let mut hdr = [0u8; HEADER_LEN];
        let mut payload = vec![0u8; RX_BUF_PAYLOAD as usize];
        while let Some((head, len)) = self.rxq.pop_used(&self.mem) {
            any = true;
            self.rx_posted -= 1;
            let addr = GuestAddress(RX_BUFS + RX_STRIDE * u64::from(head));
            if (len as usize) < HEADER_LEN {
                self.violations
                    .push(format!("RX used length {len} < header"));
                continue;
            }
            self.mem.read_slice(&mut hdr, addr).unwrap();
            let h = Header::decode(&hdr);
            let plen = len as usize - HEADER_LEN;
            if h.len as usize != plen {
                self.violations
                    .push(format!("RX used length {len} but header len {}", h.len));
            }
            let plen = plen.min(RX_BUF_PAYLOAD as usize);
            self.mem
                .read_slice(
                    &mut payload[..plen],
                    GuestAddress(addr.0 + HEADER_LEN as u64),
                )
                .unwrap();
            self.on_packet(&h, &payload[..plen]);
        }
        self.fill_rx();
        self.rxq.want_interrupt(&self.mem);
        self.txq.want_interrupt(&self.mem);
        any
    }

    /// Pumps until `done(self)` holds or `timeout` passes; returns whether it held.
    pub fn pump_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.pump((deadline - now).min(Duration::from_millis(20)));
        }
    }

    fn header(&self, s: &SimSock, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: s.peer_cid,
            src_port: s.local_port,
            dst_port: s.peer_port,
            len,
            type_: sock_type::STREAM,
            op,
            flags,
            buf_alloc: s.buf_alloc,
            fwd_cnt: s.fwd_cnt,
        }
    }

    fn send_ctl(&mut self, port: u32, op: u16, flags: u32) {
        let Some(s) = self.socks.get(&port) else {
            return;
        };
        let h = self.header(s, op, 0, flags);
        if let Some(s) = self.socks.get_mut(&port) {
            s.last_fwd_sent = s.fwd_cnt;
        }
        self.send_packet(&h, &[]);
    }

    fn on_packet(&mut self, h: &Header, payload: &[u8]) {
        if self.received.len() < 100_000 {
            self.received.push(*h);
        }
        if h.dst_cid != self.cid {
            self.violations.push(format!(
                "packet for CID {} reached guest {}",
                h.dst_cid, self.cid
            ));
            return;
        }
        let port = h.dst_port;
        let matches = self
            .socks
            .get(&port)
            .is_some_and(|s| s.peer_cid == h.src_cid && s.peer_port == h.src_port);
        if !matches {
            if h.op == op::REQUEST
                && self.listening.contains(&port)
                && !self.socks.contains_key(&port)
            {
                let mut s = SimSock::new(port, h.src_cid, h.src_port, self.buf_alloc);
                s.state = SockState::Established;
                s.update_credit(h);
                self.socks.insert(port, s);
                self.accepted.push_back(port);
                self.send_ctl(port, op::RESPONSE, 0);
            } else if h.op != op::RST && self.answer_unknown {
                // Linux answers packets for unknown sockets with RST.
                self.send_packet(&h.rst_reply(), &[]);
            }
            return;
        }
        let mut reply = None;
        {
            let s = self.socks.get_mut(&port).expect("checked");
            s.update_credit(h);
            match (s.state, h.op) {
                (_, op::RST) => s.state = SockState::Reset,
                (SockState::Connecting, op::RESPONSE) => s.state = SockState::Established,
                (SockState::Connecting, _) => {
                    // Linux in SYN_SENT answers anything else with RST and fails connect().
                    self.violations
                        .push(format!("op {} before RESPONSE on port {port}", h.op));
                    s.state = SockState::Reset;
                    reply = Some(op::RST);
                }
                (SockState::Established | SockState::Closing, op::RW) => {
                    if s.peer_shutdown & shutdown::SEND != 0 {
                        self.violations
                            .push(format!("RW after SHUTDOWN(SEND) on {port}"));
                    }
                    let buffered = s.rx.len() + payload.len();
                    if buffered > s.buf_alloc as usize {
                        self.violations.push(format!(
                            "device overran guest credit on {port}: {buffered} > {}",
                            s.buf_alloc
                        ));
                    }
                    s.rx.extend(payload);
                    s.rx_total += payload.len() as u64;
                }
                (_, op::SHUTDOWN) => {
                    s.peer_shutdown |= h.flags & shutdown::BOTH;
                    if s.peer_shutdown == shutdown::BOTH {
                        s.state = SockState::Reset;
                        reply = Some(op::RST);
                    }
                }
                (_, op::CREDIT_REQUEST) => reply = Some(op::CREDIT_UPDATE),
                (_, op::CREDIT_UPDATE) => {}
                (st, o) => self
                    .violations
                    .push(format!("unexpected op {o} in state {st:?} on {port}")),
            }
        }
        if let Some(o) = reply {
            self.send_ctl(port, o, 0);
        }
    }

    /// Listens on `port`: host-initiated REQUESTs to it are accepted.
    pub fn listen(&mut self, port: u32) {
        self.listening.push(port);
    }

    /// Waits for an accepted connection; returns its local port.
    pub fn accept(&mut self, timeout: Duration) -> Option<u32> {
        self.pump_until(timeout, |g| !g.accepted.is_empty());
        self.accepted.pop_front()
    }

    /// Connects to (`cid`, `port`); returns the local port, or the final state on failure.
    pub fn connect(&mut self, cid: u64, port: u32) -> Result<u32, SockState> {
        let local = self.next_port;
        self.next_port += 1;
        self.connect_from(local, cid, port)
    }

    /// Connects from a chosen local port.
    pub fn connect_from(&mut self, local: u32, cid: u64, port: u32) -> Result<u32, SockState> {
        let s = SimSock::new(local, cid, port, self.buf_alloc);
        self.socks.insert(local, s);
        self.send_ctl(local, op::REQUEST, 0);
        self.pump_until(Duration::from_secs(5), |g| {
            g.socks[&local].state != SockState::Connecting
        });
        match self.socks[&local].state {
            SockState::Established => Ok(local),
            st => {
                self.socks.remove(&local);
                Err(st)
            }
        }
    }

    /// Sends all of `data` on `port`, never beyond the device's credit.
    pub fn send(&mut self, port: u32, data: &[u8], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut off = 0;
        while off < data.len() {
            let s = self.socks.get(&port).ok_or("no such socket")?;
            if s.state != SockState::Established {
                return Err(format!("socket {port} is {:?}", s.state));
            }
            let credit = s.peer_credit() as usize;
            if credit == 0 {
                if Instant::now() > deadline {
                    return Err(format!("no credit on {port} after {timeout:?}"));
                }
                self.pump(Duration::from_millis(20));
                continue;
            }
            let n = credit.min(MAX_PAYLOAD as usize).min(data.len() - off);
            let h = self.header(s, op::RW, n as u32, 0);
            let s = self.socks.get_mut(&port).expect("checked");
            s.tx_cnt = s.tx_cnt.wrapping_add(n as u32);
            s.last_fwd_sent = s.fwd_cnt;
            self.send_packet(&h, &data[off..off + n]);
            off += n;
            self.pump(Duration::ZERO);
        }
        Ok(())
    }

    /// Takes up to `max` received bytes from `port`, and sends a credit update the way Linux
    /// does when the device's view of our free space gets low.
    pub fn recv(&mut self, port: u32, max: usize) -> Vec<u8> {
        let Some(s) = self.socks.get_mut(&port) else {
            return Vec::new();
        };
        let n = max.min(s.rx.len());
        let out: Vec<u8> = s.rx.drain(..n).collect();
        s.fwd_cnt = s.fwd_cnt.wrapping_add(n as u32);
        let free = s.buf_alloc - s.fwd_cnt.wrapping_sub(s.last_fwd_sent).min(s.buf_alloc);
        if n > 0 && free < MAX_PAYLOAD {
            self.send_ctl(port, op::CREDIT_UPDATE, 0);
        }
        out
    }

    /// Receives until `n` bytes arrived, end of stream, or `timeout`.
    pub fn recv_exact(&mut self, port: u32, n: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n && Instant::now() < deadline {
            let got = self.recv(port, n - out.len());
            if got.is_empty() {
                let eof = self.socks.get(&port).is_none_or(|s| s.eof());
                if eof {
                    break;
                }
                self.pump(Duration::from_millis(20));
            }
            out.extend(got);
        }
        out
    }

    /// Sends SHUTDOWN with `flags` on `port`.
    pub fn shutdown(&mut self, port: u32, flags: u32) {
        if let Some(s) = self.socks.get_mut(&port) {
            s.local_shutdown |= flags;
            s.state = if s.state == SockState::Established && flags == shutdown::BOTH {
                SockState::Closing
            } else {
                s.state
            };
        }
        self.send_ctl(port, op::SHUTDOWN, flags);
    }

    /// Closes `port` like Linux `close()`: SHUTDOWN(RCV|SEND), then waits (bounded) for the
    /// device's RST. Returns whether the RST came.
    pub fn close(&mut self, port: u32, timeout: Duration) -> bool {
        self.shutdown(port, shutdown::BOTH);
        let ok = self.pump_until(timeout, |g| {
            g.socks
                .get(&port)
                .is_none_or(|s| s.state == SockState::Reset)
        });
        self.socks.remove(&port);
        ok
    }

    /// RX buffers currently posted.
    pub fn rx_posted(&self) -> usize {
        self.rx_posted
    }
}
