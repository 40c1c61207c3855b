//! The device as a vhost-user-vsock backend: the vhost-user transport of the same
//! [`VsockDevice`], CSM and router that `vsock-vmm` puts behind virtio-mmio.
//!
//! rust-vmm's vhost-user-backend crate speaks the protocol (features, memory table, vring
//! set-up, kick and call fds) and runs one worker thread that waits on the kick fds. The
//! [`VhostUserVsock`] adapter drives the device through the [`VirtioDevice`] calls a transport
//! makes, in [`RunMode::External`]: when the RX and TX rings are started and enabled it
//! activates the device on copies of the rings' state, with no kick fds of its own (the library
//! reads them and the adapter hands each kick on), puts the device core's epoll fd into the
//! worker's epoll set, and runs the core there. GET_VRING_BASE, RESET_DEVICE and a frontend that
//! goes away stop the device, and the rings' positions go back to the library first, so that the
//! frontend reads where the device stopped. A frontend that hands over two queues (QEMU keeps the
//! event queue) or three (crosvm, Cloud Hypervisor) both work: the device never writes an event
//! queue that was not started.
//!
//! [`serve`] runs one VM's vhost-user socket: one frontend at a time, any number in turn.

mod backend;
mod call;
mod serve;

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{ShutdownHandle, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::core::{Flow, RX, TX};
use crate::device::virtio::{ActivateContext, VirtioDevice};
use crate::device::{DeviceConfig, DeviceHandle, RunMode, VsockDevice};
use crate::seam::Backend;

pub use serve::{serve, ServeError};

/// Queues the backend declares (rx, tx, event); a frontend may start only the first two.
pub const NUM_QUEUES: usize = 3;

/// The worker-epoll token of the device core's fd (tokens up to [`NUM_QUEUES`] are the
/// library's: one per queue and its exit event).
const CORE_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// The adapter as the vhost-user library holds it.
pub type SharedVsock<B> = Arc<VhostUserVsock<B>>;

type Handler<B> = VringEpollHandler<SharedVsock<B>>;

/// One VM's vsock device behind a vhost-user socket. See the [module documentation](self).
pub struct VhostUserVsock<B: Backend + 'static> {
    /// What the device offers (besides VHOST_USER_F_PROTOCOL_FEATURES).
    features: u64,
    /// The config space: the guest's CID, little endian.
    config: [u8; 8],
    queue_size: u16,
    state: Mutex<State<B>>,
    /// Set by [`VhostUserVsock::shutdown`].
    shut_down: AtomicBool,
    /// The socket [`serve`] listens on (to wake its accept at shutdown).
    socket: Mutex<Option<PathBuf>>,
}

/// What the protocol thread and the worker thread share, one at a time.
struct State<B: Backend + 'static> {
    device: VsockDevice<B>,
    /// The features the frontend acked (VHOST_USER_F_PROTOCOL_FEATURES included).
    acked: u64,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// The library's rings, kept while the device runs: their positions are written back when
    /// it stops, and their call fds carry its interrupts.
    vrings: Vec<VringRwLock>,
    /// Which rings the device was activated on (the event ring may be left out).
    started: [bool; NUM_QUEUES],
    /// The worker whose epoll set holds the core's fd while the device runs.
    handler: Option<Weak<Handler<B>>>,
    core_fd: Option<RawFd>,
    exit: Option<(EventConsumer, EventNotifier)>,
    /// Ends the connection of the frontend being served.
    frontend: Option<ShutdownHandle>,
}

impl<B: Backend + 'static> VhostUserVsock<B> {
    /// The adapter for a device with `cfg` (its run mode is set to [`RunMode::External`]: the
    /// library's worker thread runs it) over `backend`.
    pub fn new(mut cfg: DeviceConfig, backend: B) -> SharedVsock<B> {
        cfg.run = RunMode::External;
        let mut device = VsockDevice::new(cfg, backend);
        // The frontend's transport may be legacy (QEMU's `-M microvm` virtio-mmio by default):
        // the rings it hands over are the same.
        device.accept_legacy_driver();
        let mut config = [0u8; 8];
        device.read_config(0, &mut config);
        Arc::new(VhostUserVsock {
            features: device.avail_features(),
            config,
            queue_size: cfg.queue_size,
            state: Mutex::new(State {
                device,
                acked: 0,
                mem: None,
                vrings: Vec::new(),
                started: [false; NUM_QUEUES],
                handler: None,
                core_fd: None,
                exit: None,
                frontend: None,
            }),
            shut_down: AtomicBool::new(false),
            socket: Mutex::new(None),
        })
    }

    /// Ends [`serve`]: the connected frontend's connection (its device stops, as when it goes
    /// away) and the accept of the next one. `serve` then removes its socket and returns.
    pub fn shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        if let Some(h) = self.lock().frontend.take() {
            h.shutdown();
        }
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(path) = socket {
            // Wakes an accept with a frontend that leaves at once.
            let _ = std::os::unix::net::UnixStream::connect(path);
        }
    }

    fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::SeqCst)
    }

    fn set_socket(&self, path: &Path) {
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    }

    /// A handle on the device for an API thread (counters, live connections).
    pub fn handle(&self) -> DeviceHandle {
        self.lock().device.handle()
    }

    /// Whether the device runs (a frontend started its rings).
    pub fn is_active(&self) -> bool {
        self.lock().device.is_active()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: Backend + 'static> State<B> {
    /// Prepares for a new frontend connection served by a new worker: a fresh exit event (the
    /// last worker's fired) and the worker's epoll handler.
    fn attach(&mut self) -> io::Result<()> {
        self.exit = Some(new_event_consumer_and_notifier(
            EventFlag::NONBLOCK | EventFlag::CLOEXEC,
        )?);
        Ok(())
    }

    fn set_handler(&mut self, handler: Weak<Handler<B>>) {
        self.handler = Some(handler);
    }

    /// The frontend went away: stop the device and forget what the connection set up.
    fn detach(&mut self) {
        self.stop("the frontend disconnected");
        self.acked = 0;
        self.mem = None;
        self.handler = None;
        self.exit = None;
    }

    /// Activates the device when the frontend has everything in place: features, memory, and
    /// the RX and TX rings started and enabled.
    fn try_activate(&mut self, vrings: &[VringRwLock]) {
        if self.device.is_active() || vrings.len() < 2 {
            return;
        }
        let Some(mem) = self.mem.as_ref().map(|m| (*m.memory()).clone()) else {
            return;
        };
        let usable = |v: &VringRwLock| {
            let s = v.get_ref();
            s.get_queue().ready() && s.is_enabled()
        };
        if !usable(&vrings[RX]) || !usable(&vrings[TX]) {
            return;
        }
        let features = self.acked & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if let Err(e) = self.device.ack_features(features) {
            log::warn!("vhost-user: features {features:#x}: {e}");
            return;
        }
        let mut queues = Vec::with_capacity(NUM_QUEUES);
        let mut started = [false; NUM_QUEUES];
        for (i, vring) in vrings.iter().take(NUM_QUEUES).enumerate() {
            started[i] = usable(vring);
            queues.push(copy_queue(vring, started[i]));
        }
        while queues.len() < NUM_QUEUES {
            queues.push(copy_queue(&vrings[RX], false));
        }
        let vrings: Vec<VringRwLock> = vrings.to_vec();
        let ctx = ActivateContext {
            mem,
            queues,
            kicks: Vec::new(),
            interrupt: Arc::new(call::CallFds {
                vrings: vrings.clone(),
            }),
        };
        if let Err(e) = self.device.activate(ctx) {
            log::warn!("vhost-user: cannot start the device: {e}");
            return;
        }
        let core_fd = self.device.with_core(|c| c.poll_fd());
        let handler = self.handler.as_ref().and_then(Weak::upgrade);
        match (core_fd, handler) {
            (Some(fd), Some(h)) => {
                if let Err(e) = h.register_listener(fd, EventSet::IN, u64::from(CORE_EVENT)) {
                    log::error!("vhost-user: cannot watch the device: {e}");
                    self.device.reset();
                    return;
                }
                self.core_fd = Some(fd);
            }
            _ => {
                log::error!("vhost-user: no worker to run the device on");
                self.device.reset();
                return;
            }
        }
        self.vrings = vrings;
        self.started = started;
        log::info!(
            "vhost-user: device started (features {features:#x}, {} queues)",
            started.iter().filter(|s| **s).count()
        );
    }

    /// Stops the device, writing the rings' positions back to the library first.
    fn stop(&mut self, why: &str) {
        if !self.device.is_active() {
            return;
        }
        if let Some(positions) = self.device.with_core(|c| c.queue_positions()) {
            for (i, (avail, used)) in positions.into_iter().enumerate() {
                if let (true, Some(vring)) = (self.started[i], self.vrings.get(i)) {
                    vring.set_queue_next_avail(avail);
                    vring.set_queue_next_used(used);
                }
            }
        }
        if let (Some(fd), Some(h)) = (
            self.core_fd.take(),
            self.handler.as_ref().and_then(Weak::upgrade),
        ) {
            let _ = h.unregister_listener(fd, EventSet::IN, u64::from(CORE_EVENT));
        }
        self.device.reset();
        self.vrings.clear();
        self.started = [false; NUM_QUEUES];
        log::info!("vhost-user: device stopped: {why}");
    }

    /// Runs one round of the device's work (nothing waits: the worker's epoll said it is due).
    fn run(&mut self) {
        match self.device.with_core(|c| c.run_once(0)) {
            None | Some(Ok(Flow::Continue | Flow::Pause)) => {}
            Some(Ok(Flow::Stop)) => self.stop("stopped"),
            Some(Err(e)) => {
                log::error!("vhost-user: the device failed: {e}");
                self.stop("failed");
            }
        }
    }
}

/// A queue of the device's own with the ring's configuration and positions (a not-ready queue
/// of the ring's size when `started` is false).
fn copy_queue(vring: &VringRwLock, started: bool) -> Queue {
    let s = vring.get_ref();
    let q = s.get_queue();
    let mut out = Queue::new(q.max_size()).expect("a ring's own maximum size is valid");
    if !started {
        return out;
    }
    out.set_size(q.size());
    let (desc, avail, used) = (q.desc_table(), q.avail_ring(), q.used_ring());
    out.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    out.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    out.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    out.set_next_avail(q.next_avail());
    out.set_next_used(q.next_used());
    out.set_ready(true);
    out
}
