//! The device core: one epoll set over the queue kicks, the control channel, the backend and
//! every host stream, and what one wake-up does ([`DeviceCore::run_once`]). It runs in whatever
//! loop a VMM has: its own thread ([`super::worker`], Cloud Hypervisor style), an event-manager
//! loop ([`super::subscriber`], Firecracker style), or a test's or fuzzer's own thread.
//!
//! Each wake-up handles all ready fds, then drains the TX queue and fills the RX queue (each
//! within a budget so one busy connection cannot starve the rest), then raises at most one
//! interrupt — only if the driver asked for it (EVENT_IDX or the NO_INTERRUPT flag). What is
//! left for later is never left to chance: a wake eventfd in the set makes the next wait return
//! at once when work remains, and a timerfd fires at the earliest connection deadline, so an
//! outer loop that only waits for the core's fd misses nothing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub use super::control::{Control, ControlMsg};
use super::guest_warn::GuestWarnings;
use super::lifecycle::{EventGate, SavedConn, VsockState, STATE_VERSION};
use super::poller::{Poller, Ready, Token};
use super::virtio::Interrupt;
use crate::csm::muxer::{tx_run_len, ConnInfo, Muxer};
use crate::seam::Backend;
use crate::stats::Counters;
use crate::vq::{parse_tx, Chain, Direction, GuestMemory, TxError};
use crate::wire::{Header, HEADER_LEN};

/// Queue indexes of the vsock device.
pub const RX: usize = 0;
/// TX queue index.
pub const TX: usize = 1;
/// Event queue index.
pub const EVT: usize = 2;

/// Most packets handled per queue per wake-up before other fds get their turn.
pub const DEFAULT_BUDGET: usize = 256;

/// What a wake-up ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep running the core.
    Continue,
    /// A [`ControlMsg::Stop`] arrived: stop, and take the backend back
    /// ([`DeviceCore::into_backend`]).
    Stop,
    /// A [`ControlMsg::Pause`] arrived: the wake-up ended before any queue work; whoever runs
    /// the core stops calling it until the device resumes.
    Pause,
}

/// Where the core reads the time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clock {
    /// The monotonic clock: always, but for simulated runs.
    Monotonic,
    /// A clock that stands still until the loop running the core moves it on
    /// ([`DeviceCore::advance_clock`]); timers fire when it passes their deadline, never by
    /// themselves (see [`DeviceCore::use_manual_clock`]).
    Manual(Instant),
}

/// Everything a running device owns.
pub struct DeviceCore<B: Backend> {
    mem: GuestMemory,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    control: Arc<Control>,
    muxer: Muxer<B>,
    counters: Arc<Counters>,
    budget: usize,
    poller: Poller,
    ready: Vec<Ready>,
    /// Written when work is left for the next wake-up.
    again: EventFd,
    /// Fires at the earliest deadline.
    timer: TimerFd,
    timer_at: Option<Instant>,
    clock: Clock,
    warnings: GuestWarnings,
    tx_more: bool,
    backend_ready: bool,
    /// The TRANSPORT_RESET owed after a restore, and the RX gate it holds.
    gate: EventGate,
    /// The RX buffers of one fill (capacity [`RX_BATCH`], allocated once).
    rx_chains: Vec<Chain>,
    /// The well-formed packets of one TX batch (capacity [`TX_BATCH`], allocated once).
    tx_packets: Vec<(Chain, Header)>,
}

impl<B: Backend> DeviceCore<B> {
    /// A core over activated queues (`kicks[i]` signals queue `i`; with no kick fds, the loop
    /// running the core hands kicks on by [`DeviceCore::kicked`]), ready to run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<dyn Interrupt>,
        control: Arc<Control>,
        muxer: Muxer<B>,
        counters: Arc<Counters>,
        budget: usize,
    ) -> io::Result<Self> {
        let poller = Poller::new(64)?;
        for (i, k) in kicks.iter().enumerate() {
            poller.add(k.as_raw_fd(), Token::Queue(i as u16), true, false)?;
        }
        poller.add(control.wake.as_raw_fd(), Token::Control, true, false)?;
        if let Some(fd) = muxer.backend().poll_fd() {
            poller.add(fd, Token::Backend, true, false)?;
        }
        let again = EventFd::new(libc::EFD_NONBLOCK)?;
        poller.add(again.as_raw_fd(), Token::Again, true, false)?;
        let timer = TimerFd::new().map_err(io::Error::from)?;
        poller.add(timer.as_raw_fd(), Token::Timer, true, false)?;
        // Connections may have been offered before activation, and the driver may have queued
        // buffers before it kicked: look once at everything.
        again.write(1)?;
        let warnings = GuestWarnings::new(muxer.guest_cid(), &counters);
        Ok(DeviceCore {
            mem,
            queues,
            kicks,
            interrupt,
            control,
            muxer,
            counters,
            budget: budget.max(1),
            poller,
            ready: Vec::with_capacity(64),
            again,
            timer,
            timer_at: None,
            clock: Clock::Monotonic,
            warnings,
            tx_more: true,
            backend_ready: true,
            gate: EventGate::Open,
            rx_chains: Vec::with_capacity(RX_BATCH),
            tx_packets: Vec::with_capacity(TX_BATCH),
        })
    }

    /// The fd to wait on (readable whenever [`DeviceCore::run_once`] has something to do).
    pub fn poll_fd(&self) -> RawFd {
        self.poller.as_raw_fd()
    }

    /// Hands on a kick of queue `q` that the transport read from its kick fd itself (a core
    /// built without kick fds); the next [`DeviceCore::run_once`] serves it.
    pub fn kicked(&mut self, q: usize) {
        if q == TX {
            self.tx_more = true;
        }
    }

    /// Where each queue stands: `(next_avail, next_used)` in queue order, for a transport that
    /// must report the ring positions when it stops the device (vhost-user's GET_VRING_BASE).
    pub fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.queues
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }

    /// The core's control channel.
    pub(crate) fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Where each queue stands, whole (configuration and positions), for a save.
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(Queue::state).collect()
    }

    /// What a save of this core holds; the device adds the acked features.
    pub(crate) fn save(&self, acked_features: u64) -> VsockState {
        VsockState {
            version: STATE_VERSION,
            guest_cid: self.muxer.guest_cid(),
            acked_features,
            queues: self.queue_states().into_iter().map(Into::into).collect(),
            next_port: self.muxer.port_cursor(),
            connections: self.muxer.snapshot().iter().map(SavedConn::from).collect(),
            event_owed: self.gate != EventGate::Open,
        }
    }

    /// Sets a restored core on its way: the port allocator where the save left it, the RSTs
    /// owed for `resets` (the saved connections, when that is the policy), and with `event`
    /// the TRANSPORT_RESET owed on the event queue, RX held until the driver handled it.
    pub(crate) fn restart(&mut self, next_port: u32, resets: &[SavedConn], event: bool) {
        let cid = self.muxer.guest_cid();
        let rsts = resets.iter().map(|c| super::lifecycle::rst_for(c, cid));
        self.muxer.restart(next_port, rsts);
        if event {
            self.gate = EventGate::Owed;
        }
    }

    /// Called when the device resumes: the core looks at every queue once more (a kick may have
    /// come while it was paused), as after activation.
    pub(crate) fn resumed(&mut self) -> io::Result<()> {
        self.tx_more = true;
        self.again.write(1)
    }

    /// Replaces the guest memory (the frontend's memory table changed while the device ran);
    /// the queues keep their guest addresses.
    pub fn set_memory(&mut self, mem: GuestMemory) {
        self.mem = mem;
    }

    /// A snapshot of the live connections.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.muxer.snapshot()
    }

    /// Puts the core on a manual clock, from the present instant on: time then moves only by
    /// [`DeviceCore::advance_clock`], and deadlines fire in the first wake-up after the clock
    /// passed them, no longer by the timerfd. For a loop that simulates time (the fuzzer's, a
    /// test's): waits for timers cost nothing, and a run is the same at any machine speed.
    pub fn use_manual_clock(&mut self) -> io::Result<()> {
        if self.clock == Clock::Monotonic {
            self.clock = Clock::Manual(Instant::now());
            self.timer.clear().map_err(io::Error::from)?;
        }
        Ok(())
    }

    /// Moves a manual clock on by `by` (nothing on the monotonic clock); the next
    /// [`DeviceCore::run_once`] fires what fell due.
    pub fn advance_clock(&mut self, by: Duration) {
        if let Clock::Manual(t) = &mut self.clock {
            *t += by;
        }
    }

    /// The core's time: the manual clock's, or the monotonic clock's.
    pub fn now(&self) -> Instant {
        match self.clock {
            Clock::Monotonic => Instant::now(),
            Clock::Manual(t) => t,
        }
    }

    /// The earliest deadline of any connection or of the backend, as of the last wake-up.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timer_at
    }

    /// Gives the backend back, closing every connection.
    pub fn into_backend(self) -> B {
        self.muxer.into_backend()
    }

    /// One wake-up: waits up to `timeout_ms` (0: not at all, -1: until something happens) for
    /// any fd of the core, then does all the work that is ready; see the module documentation.
    pub fn run_once(&mut self, timeout_ms: i32) -> io::Result<Flow> {
        self.run_polled(Duration::ZERO, timeout_ms)
    }

    /// [`DeviceCore::run_once`], but before it sleeps it polls its fds without blocking for up
    /// to `spin` (busy polling: a kick or a host byte is seen without the wake-up of a sleeping
    /// thread, at the price of a CPU kept busy meanwhile). A zero `spin` sleeps at once.
    pub fn run_polled(&mut self, spin: Duration, timeout_ms: i32) -> io::Result<Flow> {
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        let mut waited = Ok(0);
        if !spin.is_zero() {
            let start = Instant::now();
            loop {
                waited = self.poller.wait(0, |r| ready.push(r));
                if !matches!(waited, Ok(0)) || start.elapsed() >= spin {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        if matches!(waited, Ok(0)) {
            waited = self.poller.wait(timeout_ms, |r| ready.push(r));
        }
        let started = Instant::now();
        let flow = waited.and_then(|_| self.work(&ready));
        Counters::inc(&self.counters.wakeups);
        let busy = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.counters.busy_ns.fetch_add(busy, Ordering::Relaxed);
        self.ready = ready;
        flow
    }

    fn work(&mut self, ready: &[Ready]) -> io::Result<Flow> {
        let now = self.now();
        let mut tx_kick = std::mem::take(&mut self.tx_more);
        for r in ready {
            match r.token {
                Token::Queue(q) => {
                    let _ = self.kicks[q as usize].read();
                    if q as usize == TX {
                        tx_kick = true;
                    }
                }
                Token::Control => {
                    let _ = self.control.wake.read();
                    while let Some(msg) = self.control.take() {
                        match msg {
                            ControlMsg::Stop => return Ok(Flow::Stop),
                            ControlMsg::Pause => return Ok(Flow::Pause),
                            ControlMsg::Connections(reply) => {
                                let _ = reply.send(self.muxer.snapshot());
                            }
                        }
                    }
                }
                Token::Backend => self.backend_ready = true,
                Token::Again => {
                    let _ = self.again.read();
                }
                Token::Timer => {
                    let _ = self.timer.wait();
                    self.timer_at = None;
                }
                Token::Conn(id) => self.muxer.handle_ready(&self.poller, id, r.readiness, now),
            }
        }
        if std::mem::take(&mut self.backend_ready) {
            self.muxer.handle_backend(&self.poller, now);
        }
        self.muxer.handle_deadlines(&self.poller, now);
        self.tx_more = tx_kick && self.process_tx(now);
        let rx_open = self.gate.step(
            &self.mem,
            &mut self.queues[EVT],
            &*self.interrupt,
            &self.counters,
        );
        let rx_more = rx_open && self.process_rx(now);
        self.notify();
        let reset = self.muxer.flush_watch(&self.poller, now);
        if self.tx_more || rx_more || reset {
            self.again.write(1)?;
        }
        self.arm_timer(now)?;
        self.warnings.check(&self.counters, now);
        Ok(Flow::Continue)
    }

    /// Points the timerfd at the earliest deadline (1 ms late rather than early); on a manual
    /// clock, only notes it.
    fn arm_timer(&mut self, now: Instant) -> io::Result<()> {
        let next = self.muxer.next_deadline();
        if next == self.timer_at {
            return Ok(());
        }
        self.timer_at = next;
        if self.clock != Clock::Monotonic {
            return Ok(());
        }
        let r = match next {
            None => self.timer.clear(),
            Some(t) => {
                let d = t.saturating_duration_since(now) + Duration::from_millis(1);
                self.timer.reset(d, None)
            }
        };
        r.map_err(io::Error::from)
    }

    /// Drains the TX queue within the budget, up to [`TX_BATCH`] packets at a time: RW packets
    /// of one stream connection that come one after the other go to the host in one write
    /// ([`tx_run_len`]), and the batch's buffers go back to the driver after it. Returns `true`
    /// when work was left for later.
    fn process_tx(&mut self, now: Instant) -> bool {
        let mem = &self.mem;
        let q = &mut self.queues[TX];
        let packets = &mut self.tx_packets;
        let mut heads = [0u16; TX_BATCH];
        let mut done = 0;
        loop {
            if q.event_idx_enabled() {
                let _ = q.disable_notification(mem);
            }
            while done < self.budget {
                let want = (self.budget - done).min(TX_BATCH);
                let popped = match pop_heads(q, mem, &mut heads[..want]) {
                    Ok(n) => n,
                    Err(()) => {
                        // The avail index ran ahead of the queue: the driver broke its ring.
                        Counters::inc(&self.counters.bad_avail_idx);
                        return false;
                    }
                };
                if popped == 0 {
                    break;
                }
                done += popped;
                self.counters
                    .tx_packets
                    .fetch_add(popped as u64, Ordering::Relaxed);
                let table = GuestAddress(q.desc_table());
                packets.clear();
                packets.extend(
                    heads[..popped]
                        .iter()
                        .filter_map(|&h| checked_tx(mem, table, q.size(), h, &self.counters)),
                );
                let mut rest = &packets[..];
                while !rest.is_empty() {
                    let (run, after) = rest.split_at(tx_run_len(rest));
                    self.muxer.handle_tx_run(&self.poller, mem, run, now);
                    rest = after;
                }
                // TX buffers are always returned, also after a parse error, with length 0;
                // only now, when no write reads them any more.
                for &head in &heads[..popped] {
                    let _ = q.add_used(mem, head, 0);
                }
            }
            if done >= self.budget {
                return true;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                _ => return false,
            }
        }
    }

    /// Fills RX buffers with pending packets within the budget, up to [`RX_BATCH`] buffers per
    /// fill (one host read for a connection's bytes). Returns `true` when work was left for
    /// later even though buffers may be available.
    fn process_rx(&mut self, now: Instant) -> bool {
        let mem = &self.mem;
        let q = &mut self.queues[RX];
        let chains = &mut self.rx_chains;
        let mut lens = [0u32; RX_BATCH];
        let mut heads = [0u16; RX_BATCH];
        let mut done = 0;
        while self.muxer.has_rx_work() {
            if done >= self.budget {
                return true;
            }
            let want = (self.budget - done).min(RX_BATCH);
            let popped = match pop_heads(q, mem, &mut heads[..want]) {
                Ok(n) => n,
                Err(()) => {
                    Counters::inc(&self.counters.bad_avail_idx);
                    return false;
                }
            };
            if popped == 0 {
                // Out of buffers: ask for a kick when the driver adds some, and look again in
                // case it did so meanwhile.
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => {
                        Counters::inc(&self.counters.rx_queue_full);
                        return false;
                    }
                }
            }
            // The batch is the well-formed buffers in front; a malformed one ends it (and is
            // answered as such when it comes first).
            let table = GuestAddress(q.desc_table());
            chains.clear();
            for &head in &heads[..popped] {
                match Chain::walk(mem, table, q.size(), head, Direction::DeviceWrites) {
                    Ok(c) if c.len() >= HEADER_LEN as u64 => chains.push(c),
                    _ => break,
                }
            }
            if chains.is_empty() {
                Counters::inc(&self.counters.malformed_chains);
                let _ = q.add_used(mem, heads[0], 0);
                give_back(q, popped - 1);
                continue;
            }
            let used = self
                .muxer
                .fill_rx(&self.poller, mem, chains, &mut lens, now);
            for (chain, &len) in chains.iter().zip(&lens).take(used) {
                let _ = q.add_used(mem, chain.head(), len);
                Counters::inc(&self.counters.rx_packets);
            }
            done += used;
            // The buffers not used go back, for later.
            give_back(q, popped - used);
            if used == 0 {
                // Nothing to send after all.
                return false;
            }
        }
        false
    }

    /// Raises one interrupt if either data queue has new used buffers the driver wants to hear of
    /// (one per queue named, where the transport has a notifier per queue).
    fn notify(&mut self) {
        let mut queues = 0u32;
        for i in [RX, TX] {
            if let Ok(true) = self.queues[i].needs_notification(&self.mem) {
                queues |= 1 << i;
            }
        }
        if queues != 0 {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            let _ = self.interrupt.signal_used(queues);
        }
    }
}

/// TX packets taken from the ring at a time: the longest run one host write may carry (the
/// iovecs of a write cover at most [`crate::vq::MAX_IOVECS`] guest ranges; what is past them
/// waits in the connection's buffer).
pub const TX_BATCH: usize = 16;

/// RX buffers one fill may use: 16 of the 4 KiB buffers Linux posts hold 64 KiB, the most one
/// packet may carry, in one `readv`.
pub const RX_BATCH: usize = 16;

/// Takes up to `heads.len()` chains from the available ring of `q`, their head indexes into
/// `heads`; returns how many, or `Err` when the avail index ran ahead of the queue.
fn pop_heads(q: &mut Queue, mem: &GuestMemory, heads: &mut [u16]) -> Result<usize, ()> {
    let it = q.iter(mem).map_err(|_| ())?;
    Ok(heads
        .iter_mut()
        .zip(it)
        .map(|(h, c)| *h = c.head_index())
        .count())
}

/// Returns the last `n` buffers taken from the available ring of `q` to it, unused.
fn give_back(q: &mut Queue, n: usize) {
    for _ in 0..n {
        q.go_to_previous_position();
    }
}

/// Checks a TX chain and copies its header out once ([`parse_tx`]); counts and returns `None`
/// for anything malformed.
fn checked_tx(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    counters: &Counters,
) -> Option<(Chain, Header)> {
    match parse_tx(mem, table, queue_size, head) {
        Ok(p) => Some(p),
        Err(e) => {
            Counters::inc(&counters.malformed_chains);
            if let TxError::BadLen(_) = e {
                Counters::inc(&counters.bad_len);
            }
            None
        }
    }
}
