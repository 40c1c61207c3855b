//! The device thread: one epoll loop over the queue kicks, the backend and every host stream.
//!
//! Each wake-up handles all ready fds, then drains the TX queue and fills the RX queue (each
//! within a budget so one busy connection cannot starve the rest), then raises at most one
//! interrupt — only if the driver asked for it (EVENT_IDX or the NO_INTERRUPT flag).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, Direction};
use super::packet::{Header, HEADER_LEN, MAX_PAYLOAD};
use super::poller::{Poller, Ready, Token};
use super::virtio::{GuestMemory, Interrupt, InterruptKind};
use crate::backend::Backend;
use crate::csm::muxer::{ConnInfo, Muxer};
use crate::stats::Counters;

/// Queue indexes of the vsock device.
pub const RX: usize = 0;
/// TX queue index.
pub const TX: usize = 1;
/// Event queue index.
pub const EVT: usize = 2;

/// Most packets handled per queue per wake-up before other fds get their turn.
pub const DEFAULT_BUDGET: usize = 256;

/// A request to the device thread.
pub enum ControlMsg {
    /// Stop and hand back the backend.
    Stop,
    /// Reply with a snapshot of the live connections.
    Connections(Sender<Vec<ConnInfo>>),
}

/// The way into a running device thread: a message queue and an fd that wakes it.
pub struct Control {
    msgs: Mutex<VecDeque<ControlMsg>>,
    wake: EventFd,
}

impl Control {
    /// A new control channel.
    pub fn new() -> io::Result<Self> {
        Ok(Control {
            msgs: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Queues a message and wakes the thread.
    pub fn send(&self, msg: ControlMsg) -> io::Result<()> {
        self.msgs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(msg);
        self.wake.write(1)
    }

    fn take(&self) -> Option<ControlMsg> {
        self.msgs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }
}

/// Everything the device thread owns.
pub struct Worker<B: Backend> {
    pub(crate) mem: GuestMemory,
    pub(crate) queues: Vec<Queue>,
    pub(crate) kicks: Vec<EventFd>,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) control: Arc<Control>,
    pub(crate) muxer: Muxer<B>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) budget: usize,
}

impl<B: Backend> Worker<B> {
    /// Runs until told to stop; returns the backend so the device can be activated again.
    pub fn run(mut self) -> io::Result<B> {
        let mut poller = Poller::new(64)?;
        for (i, k) in self.kicks.iter().enumerate() {
            poller.add(k.as_raw_fd(), Token::Queue(i as u16), true, false)?;
        }
        poller.add(self.control.wake.as_raw_fd(), Token::Control, true, false)?;
        if let Some(fd) = self.muxer.backend().poll_fd() {
            poller.add(fd, Token::Backend, true, false)?;
        }
        let mut ready: Vec<Ready> = Vec::with_capacity(64);
        // Connections may have been offered before activation: look once.
        let mut tx_more = true;
        let mut rx_more = true;
        let mut backend_ready = true;
        loop {
            let now = Instant::now();
            let timeout = if tx_more || rx_more || backend_ready {
                0
            } else {
                match self.muxer.next_deadline() {
                    None => -1,
                    Some(d) => d
                        .saturating_duration_since(now)
                        .as_millis()
                        .saturating_add(1)
                        .min(60_000) as i32,
                }
            };
            ready.clear();
            poller.wait(timeout, |r| ready.push(r))?;
            let now = Instant::now();
            let mut tx_kick = tx_more;
            for r in ready.iter() {
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
                                ControlMsg::Stop => return Ok(self.muxer.into_backend()),
                                ControlMsg::Connections(reply) => {
                                    let _ = reply.send(self.muxer.snapshot());
                                }
                            }
                        }
                    }
                    Token::Backend => backend_ready = true,
                    Token::Conn { .. } => self.muxer.handle_conn_event(&poller, *r, now),
                }
            }
            if backend_ready {
                backend_ready = false;
                self.muxer.handle_backend(&poller, now);
            }
            self.muxer.handle_deadlines(&poller, now);
            tx_more = tx_kick && self.process_tx(&poller, now);
            rx_more = self.process_rx(&poller, now);
            self.notify();
        }
    }

    /// Drains the TX queue within the budget. Returns `true` when work was left for later.
    fn process_tx(&mut self, poller: &Poller, now: Instant) -> bool {
        let mem = &self.mem;
        let q = &mut self.queues[TX];
        let mut done = 0;
        loop {
            if q.event_idx_enabled() {
                let _ = q.disable_notification(mem);
            }
            while done < self.budget {
                let head = match q.iter(mem) {
                    Ok(mut it) => match it.next() {
                        Some(c) => c.head_index(),
                        None => break,
                    },
                    Err(_) => {
                        // The avail index ran ahead of the queue: the driver broke its ring.
                        Counters::inc(&self.counters.bad_avail_idx);
                        return false;
                    }
                };
                done += 1;
                Counters::inc(&self.counters.tx_packets);
                let table = GuestAddress(q.desc_table());
                if let Some((chain, h)) = parse_tx(mem, table, q.size(), head, &self.counters) {
                    self.muxer.handle_tx(poller, mem, &chain, &h, now);
                }
                // TX buffers are always returned, also after a parse error, with length 0.
                let _ = q.add_used(mem, head, 0);
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

    /// Fills RX buffers with pending packets within the budget. Returns `true` when work was
    /// left for later even though buffers may be available.
    fn process_rx(&mut self, poller: &Poller, now: Instant) -> bool {
        let mem = &self.mem;
        let q = &mut self.queues[RX];
        let mut done = 0;
        while self.muxer.has_rx_work() {
            if done >= self.budget {
                return true;
            }
            let head = match q.iter(mem) {
                Ok(mut it) => it.next().map(|c| c.head_index()),
                Err(_) => {
                    Counters::inc(&self.counters.bad_avail_idx);
                    return false;
                }
            };
            let Some(head) = head else {
                // Out of buffers: ask for a kick when the driver adds some, and look again in
                // case it did so meanwhile.
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => return false,
                }
            };
            let table = GuestAddress(q.desc_table());
            let chain = match Chain::walk(mem, table, q.size(), head, Direction::DeviceWrites) {
                Ok(c) if c.len() >= HEADER_LEN as u64 => c,
                _ => {
                    Counters::inc(&self.counters.malformed_chains);
                    let _ = q.add_used(mem, head, 0);
                    continue;
                }
            };
            match self.muxer.fill_rx(poller, mem, &chain, now) {
                Some(len) => {
                    let _ = q.add_used(mem, head, len);
                    Counters::inc(&self.counters.rx_packets);
                    done += 1;
                }
                None => {
                    // Nothing to send after all: put the buffer back for later.
                    q.go_to_previous_position();
                    return false;
                }
            }
        }
        false
    }

    /// Raises one interrupt if either data queue has new used buffers the driver wants to hear of.
    fn notify(&mut self) {
        let mut needed = false;
        for i in [RX, TX] {
            if let Ok(true) = self.queues[i].needs_notification(&self.mem) {
                needed = true;
            }
        }
        if needed {
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            let _ = self.interrupt.trigger(InterruptKind::UsedRing);
        }
    }
}

/// Checks a TX chain and copies its header out once. Counts and returns `None` for anything
/// malformed.
pub fn parse_tx(
    mem: &GuestMemory,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    counters: &Counters,
) -> Option<(Chain, Header)> {
    let chain = match Chain::walk(mem, table, queue_size, head, Direction::DeviceReads) {
        Ok(c) => c,
        Err(_) => {
            Counters::inc(&counters.malformed_chains);
            return None;
        }
    };
    let mut raw = [0u8; HEADER_LEN];
    if chain.read_at(mem, 0, &mut raw) != HEADER_LEN {
        Counters::inc(&counters.malformed_chains);
        return None;
    }
    let h = Header::decode(&raw);
    if h.len > MAX_PAYLOAD || u64::from(h.len) > chain.len() - HEADER_LEN as u64 {
        Counters::inc(&counters.malformed_chains);
        Counters::inc(&counters.bad_len);
        return None;
    }
    Some((chain, h))
}
