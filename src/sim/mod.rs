//! A simulated Linux guest for tests, fuzzing and benchmarks.
//!
//! [`SimGuest`] is the driver side of a virtio-vsock device over real guest memory
//! ([`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) with two regions, so buffers can straddle
//! them): it writes descriptor tables and avail rings, posts 4 KiB single-descriptor RX buffers
//! as Linux ≥ 6.2 does (or split ones as Linux ≤ 6.1 does, [`RxLayout`], in `rx`), sends TX
//! packets as a header descriptor plus several data descriptors, keeps the credit accounting of
//! a Linux socket, kicks the device through its real kick [`EventFd`]s and waits for its
//! interrupt [`EventFd`]. [`PairBackend`] gives the device real Unix socket pairs as host
//! streams. The socket API of the guest (connect, send, recv, ...) is in
//! `sockets`.
//!
//! [`SimGuest::new_recycled`] and [`SimGuest::with_device_recycled`] take the guest memory from
//! a per-thread pool instead of mapping a fresh one (see `memory`), for fuzzing: a recycled
//! memory has its rings rewritten and every page the last guest and device wrote zeroed.

pub(crate) mod backend;
mod drive;
mod guards;
mod kick;
mod lifecycle;
mod memory;
mod queue;
mod rx;
mod seqpacket;
mod sink;
mod socket;
mod sockets;
#[cfg(feature = "vhost-user")]
pub mod vhost_user;

pub use backend::{socket_pair, PairBackend, PairHost};
pub use queue::{Buf, DriverQueue, RawDesc};
pub use rx::RxLayout;
pub use sink::Sink;
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
use crate::device::virtio::{ActivateContext, EventFdInterrupt, GuestMemory, VirtioDevice};
use crate::device::{DeviceConfig, VsockDevice};
use crate::wire::{Header, HEADER_LEN};

/// The features a Linux driver acknowledges: VERSION_1, EVENT_IDX and SEQPACKET.
pub const LINUX_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << crate::device::VIRTIO_VSOCK_F_SEQPACKET);

/// Size of the simulated guest memory.
pub const MEM_SIZE: u64 = 64 << 20;
/// Where the second memory region starts (TX buffers straddle it).
pub const REGION_SPLIT: u64 = 32 << 20;
/// Queue size the simulated driver uses.
pub const QUEUE_SIZE: u16 = 256;
/// Payload room of each RX buffer, as Linux posts them.
pub const RX_BUF_PAYLOAD: u32 = 4096;

const RX_BUFS: u64 = 0x10_0000;
/// Room of each RX buffer: header and payload.
const RX_BUF_LEN: u32 = HEADER_LEN as u32 + RX_BUF_PAYLOAD;
const RX_STRIDE: u64 = 0x1040;
const TX_BUFS: u64 = 0x180_0000;
/// Where in its 4 KiB page the guest writes every TX payload (each TX buffer starts on a page,
/// its payload right behind the 44-byte header). A source buffer at the same page offset copies
/// at full speed; one 1–63 bytes before it aliases modulo 4 KiB, which makes glibc's `memcpy`
/// many times slower on some machines (see `docs/performance.md`).
pub const TX_PAYLOAD_PAGE_OFFSET: usize = HEADER_LEN;
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
    /// How RX buffers are laid out (for the buffers posted from now on).
    pub rx_layout: RxLayout,
    /// For each RX chain head, the descriptor that holds its payload (the head itself when
    /// whole).
    rx_data: Vec<u16>,
    /// Sockets by local port.
    pub socks: HashMap<u32, SimSock>,
    listening: Vec<u32>,
    accepted: VecDeque<u32>,
    next_port: u32,
    /// Interrupts seen.
    pub interrupts: u64,
    /// Whether the guest kicks only when the device asked for it (EVENT_IDX `avail_event`, as
    /// Linux does), instead of after every TX packet and RX refill (the default).
    pub event_idx_kicks: bool,
    /// Kicks written to the device's kick fds by [`SimGuest::send_packet`] and
    /// [`SimGuest::fill_rx`].
    pub kicks_sent: u64,
    /// Kicks those skipped because the device had not asked for one
    /// ([`SimGuest::event_idx_kicks`]).
    pub kicks_skipped: u64,
    /// Every packet received, oldest first (the test may clear it).
    pub received: Vec<Header>,
    /// Rule breaks by the device that the guest noticed (must stay empty).
    pub violations: Vec<String>,
    /// Whether packets for unknown sockets are answered with RST, as Linux does (tests of a
    /// silent or hostile guest turn it off).
    pub answer_unknown: bool,
    /// Whether a socket answers the peer's SHUTDOWN(RCV|SEND) with RST even while it holds
    /// unread bytes (default). Linux answers at once only when nothing is unread; otherwise it
    /// resets when the application closes: turn this off to model that.
    pub reset_with_unread: bool,
    /// Runs the device when it has no thread of its own (see [`SimGuest::drive_with`]).
    driver: Option<Box<dyn drive::Drive>>,
    /// Sockets whose peer closed them (SHUTDOWN with both flags) and whose port a new
    /// connection from the same peer took since: Linux drops such a socket from its tables at
    /// once, while the application may still hold it.
    pub detached: Vec<SimSock>,
    rx_posted: usize,
    /// Where a recycled memory's written pages are marked (`None`: a fresh memory).
    marks: Option<memory::Marks>,
    /// Room for one RX payload while it is read.
    rx_buf: Vec<u8>,
}

impl SimGuest {
    /// A guest with CID `cid` and the queues, kick fds and interrupt fd a transport would hand a
    /// device on activation.
    pub fn new(cid: u64) -> (SimGuest, ActivateContext) {
        SimGuest::build(cid, memory::fresh(), None)
    }

    /// As [`SimGuest::new`], over memfd-backed memory that a device in another thread or
    /// process can map (the guest of a vhost-user backend: see `sim::vhost_user`).
    pub fn new_shared(cid: u64) -> (SimGuest, ActivateContext) {
        SimGuest::build(cid, memory::shared(), None)
    }

    /// A second handle on the fd the guest waits on for interrupts (a vhost-user frontend
    /// hands it to the backend as the call fd of the RX and TX rings).
    pub fn interrupt_fd(&self) -> EventFd {
        self.irq.try_clone().expect("dup of the interrupt eventfd")
    }

    /// As [`SimGuest::new`], over a guest memory of this thread's pool: one that no guest or
    /// device holds any more, with every page they marked as written zeroed, or a fresh one.
    /// Whoever writes [`SimGuest::mem`] other than through the guest's methods must mark it
    /// ([`SimGuest::mark_written`]), or the next guest may read it.
    pub fn new_recycled(cid: u64) -> (SimGuest, ActivateContext) {
        let lease = memory::take();
        SimGuest::build(cid, lease.mem, Some(lease.marks))
    }

    fn build(
        cid: u64,
        mem: GuestMemory,
        marks: Option<memory::Marks>,
    ) -> (SimGuest, ActivateContext) {
        // The rings are written whole, whatever a recycled memory held.
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
            rx_layout: RxLayout::Whole,
            rx_data: rx::whole_chains(),
            socks: HashMap::new(),
            listening: Vec::new(),
            accepted: VecDeque::new(),
            next_port: 50_000,
            interrupts: 0,
            event_idx_kicks: false,
            kicks_sent: 0,
            kicks_skipped: 0,
            received: Vec::new(),
            violations: Vec::new(),
            answer_unknown: true,
            reset_with_unread: true,
            driver: None,
            detached: Vec::new(),
            rx_posted: 0,
            marks,
            rx_buf: vec![0; rx::SCRATCH_LEN],
        };
        g.write_guards();
        g.post_event_buffers();
        g.fill_rx();
        g.rxq.want_interrupt(&g.mem);
        g.txq.want_interrupt(&g.mem);
        (g, ctx)
    }

    /// A guest plus an activated device with `backend`, negotiated like Linux does
    /// ([`LINUX_FEATURES`]: VERSION_1, EVENT_IDX and SEQPACKET).
    pub fn with_device<B: Backend + 'static>(
        cfg: DeviceConfig,
        backend: B,
    ) -> (SimGuest, VsockDevice<B>) {
        SimGuest::activate(SimGuest::new(cfg.guest_cid), cfg, backend, LINUX_FEATURES)
    }

    /// As [`SimGuest::with_device`], acknowledging only `features` (a driver that does not
    /// know SOCK_SEQPACKET, say).
    pub fn with_device_features<B: Backend + 'static>(
        cfg: DeviceConfig,
        backend: B,
        features: u64,
    ) -> (SimGuest, VsockDevice<B>) {
        SimGuest::activate(SimGuest::new(cfg.guest_cid), cfg, backend, features)
    }

    /// As [`SimGuest::with_device`], over a recycled guest memory (see
    /// [`SimGuest::new_recycled`]).
    pub fn with_device_recycled<B: Backend + 'static>(
        cfg: DeviceConfig,
        backend: B,
    ) -> (SimGuest, VsockDevice<B>) {
        SimGuest::activate(
            SimGuest::new_recycled(cfg.guest_cid),
            cfg,
            backend,
            LINUX_FEATURES,
        )
    }

    fn activate<B: Backend + 'static>(
        (g, ctx): (SimGuest, ActivateContext),
        cfg: DeviceConfig,
        backend: B,
        features: u64,
    ) -> (SimGuest, VsockDevice<B>) {
        let mut dev = VsockDevice::new(cfg, backend);
        dev.ack_features(features).expect("features");
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

    /// Marks `[addr, addr + len)` of a recycled memory as written, so that it is zeroed before
    /// the memory's next guest (nothing to do for a fresh memory). The guest marks what it and
    /// the device write through its queues; direct writes to [`SimGuest::mem`] need this.
    pub fn mark_written(&self, addr: GuestAddress, len: usize) {
        if let Some(m) = &self.marks {
            m.mark(addr.0, len as u64);
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
        let old_idx = self.txq.avail_idx();
        let base = TX_BUFS + TX_STRIDE * u64::from(head);
        let hdr = h.encode();
        self.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + HEADER_LEN as u64))
            .unwrap();
        self.mark_written(GuestAddress(base), HEADER_LEN + payload.len());
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
        self.notify(1, old_idx);
    }

    /// Waits up to `timeout` for an interrupt, then handles every used buffer. Returns whether
    /// anything was handled.
    pub fn pump(&mut self, timeout: Duration) -> bool {
        if let Some(drive) = self.driver.as_mut() {
            // No device thread: run the device until it has answered, or the time is up.
            let (rxq, txq, mem) = (&self.rxq, &self.txq, &self.mem);
            drive::run_for(drive.as_mut(), timeout, || {
                rxq.used_pending(mem) || txq.used_pending(mem)
            });
        } else if !self.rxq.used_pending(&self.mem) && !self.txq.used_pending(&self.mem) {
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            let _ = crate::sys::poll_one(self.irq.as_raw_fd(), libc::POLLIN, ms);
        }
        if self.irq.read().is_ok() {
            self.interrupts += 1;
        }
        let mut any = false;
        while self.txq.pop_used(&self.mem).is_some() {
            any = true;
        }
        any |= self.pop_rx();
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
        let deadline = self.now() + timeout;
        loop {
            if done(self) {
                return true;
            }
            let now = self.now();
            if now >= deadline {
                return false;
            }
            self.pump((deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// RX buffers currently posted.
    pub fn rx_posted(&self) -> usize {
        self.rx_posted
    }
}

/// Where the RX buffer of descriptor `head` lies.
fn rx_buf_addr(head: u16) -> GuestAddress {
    GuestAddress(RX_BUFS + RX_STRIDE * u64::from(head))
}

impl Drop for SimGuest {
    /// Marks in a recycled memory what the device may have written that the guest never read.
    fn drop(&mut self) {
        let Some(marks) = self.marks.take() else {
            return;
        };
        marks.mark(EVT_BUFS, 8 * 8);
        // `self.mem` is the one clone the guest holds; any other is a device's or a test's.
        let device_alive = marks.shared_beyond(1);
        let mut unread = 0;
        while let Some((head, _)) = self.rxq.pop_used(&self.mem) {
            marks.mark(rx_buf_addr(head).0, u64::from(RX_BUF_LEN));
            let data = self.rx_data[usize::from(head)];
            if data != head {
                marks.mark(rx_buf_addr(data).0, u64::from(RX_BUF_LEN));
            }
            unread += 1;
            if unread > QUEUE_SIZE {
                break;
            }
        }
        if device_alive || unread > QUEUE_SIZE {
            // It may still write, or wrote more than the ring holds: every RX buffer.
            marks.mark(RX_BUFS, RX_STRIDE * u64::from(QUEUE_SIZE));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::device::RunMode;

    fn read(mem: &GuestMemory, at: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    /// A recycled guest over an in-thread device: connects, sends and receives a little.
    fn one_run(unmarked: u64) -> GuestMemory {
        let mut cfg = DeviceConfig::new(3);
        cfg.run = RunMode::External;
        let (backend, host) = PairBackend::new();
        let (mut g, mut dev) = SimGuest::with_device_recycled(cfg, backend);
        g.drive_with(dev.subscriber().expect("external mode"), false);
        let t = Duration::from_secs(5);
        let port = g.connect(2, 7).expect("connected");
        let (_, mut stream) = host.accept(t).expect("host end");
        g.send(port, &[0x5a; 3000], t).unwrap();
        let mut got = vec![0u8; 3000];
        stream.read_exact(&mut got).unwrap();
        stream.write_all(&[0xa5; 2000]).unwrap();
        assert_eq!(g.recv_exact(port, 2000, t), vec![0xa5; 2000]);
        // Written behind the guest's back, and marked (the first) or not (the second).
        g.mem
            .write_slice(&[0xcc; 4], GuestAddress(0x300_0000))
            .unwrap();
        g.mark_written(GuestAddress(0x300_0000), 4);
        g.mem
            .write_slice(&[0xdd; 4], GuestAddress(unmarked))
            .unwrap();
        assert!(g.violations.is_empty(), "{:?}", g.violations);
        let mem = g.mem.clone();
        assert!(dev.reset());
        drop(g);
        mem
    }

    #[test]
    fn a_write_past_an_rx_buffer_is_seen() {
        let (g, _ctx) = SimGuest::new(3);
        assert_eq!(g.guards_intact(), Ok(()));
        let past = rx_buf_addr(7).0 + u64::from(RX_BUF_LEN) + 3;
        g.mem.write_slice(&[0], GuestAddress(past)).unwrap();
        let err = g.guards_intact().expect_err("a written gap");
        assert!(err.contains("past RX buffer 7"), "{err}");
    }

    #[test]
    fn a_write_past_a_split_chains_header_descriptor_is_seen() {
        let (g, _ctx) = SimGuest::new(3);
        g.write_header_guard(9);
        assert!(g.header_guard_intact(9));
        let past = rx_buf_addr(9).0 + HEADER_LEN as u64;
        g.mem.write_slice(&[0], GuestAddress(past)).unwrap();
        assert!(!g.header_guard_intact(9));
    }

    #[test]
    fn a_recycled_guest_sees_zeros_where_the_last_one_wrote() {
        let unmarked = REGION_SPLIT + 0x10_0000;
        let first = one_run(unmarked);
        let tx = read(&first, TX_BUFS, HEADER_LEN + 3000);
        assert!(tx.contains(&0x5a), "the TX payload was in memory");
        let rx = (0..u64::from(QUEUE_SIZE)).any(|h| {
            read(&first, RX_BUFS + RX_STRIDE * h + 44, 4)
                .iter()
                .all(|&b| b == 0xa5)
        });
        assert!(rx, "the RX payload was in memory");
        drop(first);
        let (g, _ctx) = SimGuest::new_recycled(3);
        assert_eq!(
            read(&g.mem, unmarked, 4),
            vec![0xdd; 4],
            "the same memory, recycled (unmarked pages are kept)"
        );
        let rx_zeroed = (0..QUEUE_SIZE).all(|h| {
            let buf = read(&g.mem, rx_buf_addr(h).0, RX_BUF_LEN as usize);
            buf.iter().all(|&b| b == 0)
        });
        assert!(rx_zeroed, "RX buffers zeroed");
        assert_eq!(
            g.guards_intact(),
            Ok(()),
            "the gaps hold the guard bytes again"
        );
        let tx_area = read(&g.mem, TX_BUFS, 4 * TX_STRIDE as usize);
        assert!(tx_area.iter().all(|&b| b == 0), "TX buffers zeroed");
        assert_eq!(
            read(&g.mem, 0x300_0000, 4),
            vec![0; 4],
            "marked page zeroed"
        );
        // The rings are as a fresh guest writes them: compare with one.
        let (fresh, _ctx) = SimGuest::new(3);
        assert_eq!(read(&g.mem, 0, 0xa000), read(&fresh.mem, 0, 0xa000));
        assert_eq!(g.rx_posted(), usize::from(QUEUE_SIZE));
    }

    #[test]
    fn a_guest_whose_device_lives_on_marks_every_rx_buffer() {
        let (backend, _host) = PairBackend::new();
        let (g, dev) = SimGuest::with_device_recycled(DeviceConfig::new(3), backend);
        let mem = g.mem.clone();
        drop(g);
        // The device thread could still write any RX buffer.
        let last = rx_buf_addr(QUEUE_SIZE - 1).0 + u64::from(RX_BUF_LEN) - 1;
        mem.write_slice(&[0xee], GuestAddress(last)).unwrap();
        drop(dev);
        drop(mem);
        let (g, _ctx) = SimGuest::new_recycled(3);
        assert_eq!(read(&g.mem, last, 1), vec![0]);
    }
}
