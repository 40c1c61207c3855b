//! The vsock device as a transport sees it.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::core::{Control, ControlMsg, DeviceCore, DEFAULT_BUDGET, EVT};
use super::lifecycle::{self, LifecycleError, ResetPolicy, RestoreError, SavedConn, VsockState};
use super::subscriber::{SharedCore, VsockSubscriber};
use super::virtio::{ActivateContext, ActivateError, FeatureError, VirtioDevice};
use crate::csm::muxer::{ConnInfo, Muxer};
use crate::csm::types::CsmConfig;
use crate::seam::Backend;
use crate::stats::Counters;

/// The virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// `VIRTIO_VSOCK_F_SEQPACKET`: the device serves SOCK_SEQPACKET connections (Linux acks it).
pub const VIRTIO_VSOCK_F_SEQPACKET: u32 = 1;

/// Queue size offered by default.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Default limit of live connections per device (Firecracker's).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1023;

/// Settings of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// Live connections allowed; more are refused with RST.
    pub max_connections: usize,
    /// Packets handled per queue per wake-up.
    pub budget: usize,
    /// Per-connection settings.
    pub csm: CsmConfig,
    /// Where the device runs once activated.
    pub run: RunMode,
    /// How long the device thread ([`RunMode::Thread`]) polls for work before it sleeps;
    /// zero (the default) sleeps at once. A loop of the VMM's own ([`RunMode::External`])
    /// decides for itself.
    pub busy_poll: Duration,
}

/// Where an activated device runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RunMode {
    /// Its own thread (the default; see [`super::worker`]).
    #[default]
    Thread,
    /// A loop of the VMM's own: after activation, add [`VsockDevice::subscriber`] to an
    /// event-manager loop (see [`super::subscriber`]), or wait on its
    /// [`poll_fd`](VsockSubscriber::poll_fd) and call its [`run_once`](VsockSubscriber::run_once).
    External,
}

impl DeviceConfig {
    /// Defaults for the guest with CID `guest_cid`.
    pub fn new(guest_cid: u64) -> Self {
        DeviceConfig {
            guest_cid,
            queue_size: DEFAULT_QUEUE_SIZE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            budget: DEFAULT_BUDGET,
            csm: CsmConfig::default(),
            run: RunMode::Thread,
            busy_poll: Duration::ZERO,
        }
    }
}

struct Running<B: Backend> {
    control: Arc<Control>,
    runner: Runner<B>,
}

enum Runner<B: Backend> {
    Thread(JoinHandle<io::Result<DeviceCore<B>>>),
    Shared(SharedCore<B>),
}

/// A cheap, cloneable, thread-safe view of a device for the VMM's API thread: counters and live
/// connections. It never blocks the device's data path: a connection snapshot is one message
/// to the device thread, answered between two batches of work.
#[derive(Clone)]
pub struct DeviceHandle {
    counters: Arc<Counters>,
    control: Arc<Mutex<Option<Arc<Control>>>>,
}

impl DeviceHandle {
    /// The device's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A snapshot of the live connections (empty while the device is not running).
    pub fn connections(&self) -> Vec<ConnInfo> {
        let control = self
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(control) = control else {
            return Vec::new();
        };
        let (tx, rx) = mpsc::channel();
        if control.send(ControlMsg::Connections(tx)).is_err() {
            return Vec::new();
        }
        rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default()
    }
}

/// A virtio-vsock device whose host side is the backend `B`.
///
/// Once activated, the device runs on its own thread (see [`super::worker`]); the transport
/// keeps this object to read the config space and to reset it.
pub struct VsockDevice<B: Backend + 'static> {
    cfg: DeviceConfig,
    queue_sizes: [u16; 3],
    acked: u64,
    backend: Option<B>,
    running: Option<Running<B>>,
    counters: Arc<Counters>,
    published: Arc<Mutex<Option<Arc<Control>>>>,
    legacy_ok: bool,
    /// A paused core: nothing runs it, so it touches neither guest memory nor the queues.
    paused: Option<DeviceCore<B>>,
    /// What a restored device does when it is activated.
    restored: Option<Restored>,
}

/// What a restored device owes its guest on activation.
struct Restored {
    next_port: u32,
    /// The saved connections, to reset one by one ([`ResetPolicy::ConnectionRst`]).
    resets: Vec<SavedConn>,
    /// Whether TRANSPORT_RESET is owed on the event queue.
    event: bool,
}

impl<B: Backend + 'static> VsockDevice<B> {
    /// Accepts a driver that does not ack VIRTIO_F_VERSION_1 (a legacy virtio transport), for a
    /// transport that translates the legacy layout itself (vhost-user: QEMU's legacy
    /// virtio-mmio, the default of `-M microvm`, hands over the same split rings). Only on a
    /// little-endian host, where a legacy guest's native byte order is the device's.
    pub fn accept_legacy_driver(&mut self) {
        self.legacy_ok = cfg!(target_endian = "little");
    }

    fn version_ok(&self, features: u64) -> bool {
        self.legacy_ok || features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// A device for the guest `cfg.guest_cid`, serving its host side with `backend`.
    pub fn new(cfg: DeviceConfig, backend: B) -> Self {
        VsockDevice {
            cfg,
            queue_sizes: [cfg.queue_size; 3],
            acked: 0,
            backend: Some(backend),
            running: None,
            counters: Arc::new(Counters::default()),
            published: Arc::new(Mutex::new(None)),
            legacy_ok: false,
            paused: None,
            restored: None,
        }
    }

    /// A device restored from `state` (see `docs/snapshot.md`), configured by `cfg` and serving
    /// its host side with a fresh `backend`, and the three queues the transport hands to
    /// [`VirtioDevice::activate`] (and restores its queue registers from). The acked features
    /// are the saved ones. `cfg.guest_cid` and the backend are the restorer's: a CID other
    /// than the saved one is a CID change, and the backend's sockets (the hybrid socket path)
    /// are whatever the restorer built it with, so a clone need not take the original's.
    ///
    /// On activation the device ends every saved connection by `policy`, and sends
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET when that is the policy, the CID changed, or the saved
    /// device still owed one; RX is
    /// then held back until the driver handled the event. TX is looked at without a kick, so a
    /// kick lost in the save costs nothing. The state is checked first and refused with the
    /// reason ([`RestoreError`]).
    pub fn restore(
        cfg: DeviceConfig,
        backend: B,
        state: &VsockState,
        policy: ResetPolicy,
    ) -> Result<(Self, Vec<Queue>), RestoreError> {
        let mut dev = VsockDevice::new(cfg, backend);
        let queues = lifecycle::check(state, &cfg, dev.avail_features(), dev.legacy_ok)?;
        dev.acked = state.acked_features;
        let event = policy == ResetPolicy::TransportReset
            || state.guest_cid != cfg.guest_cid
            || state.event_owed;
        dev.restored = Some(Restored {
            next_port: state.next_port,
            resets: if event {
                Vec::new()
            } else {
                state.connections.clone()
            },
            event,
        });
        Ok((dev, queues))
    }

    /// Pauses a running device: when this returns, the device touches neither guest memory
    /// nor the queues, and raises no interrupt; host streams stay open, unread, and new host
    /// connections wait in the backend. [`RunMode::Thread`]: the thread ends its wake-up and is
    /// joined. [`RunMode::External`]: the core leaves its subscriber, which leaves the event
    /// loop at its next event (add [`VsockDevice::subscriber`] again after
    /// [`VsockDevice::resume`]).
    pub fn pause(&mut self) -> Result<(), LifecycleError> {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let r = self.running.take().ok_or(LifecycleError::NotRunning)?;
        let core = match r.runner {
            Runner::Thread(thread) => {
                let _ = r.control.send(ControlMsg::Pause);
                match thread.join() {
                    Ok(Ok(core)) => Some(core),
                    Ok(Err(e)) => return Err(LifecycleError::Thread(e.to_string())),
                    Err(_) => return Err(LifecycleError::Thread("panicked".into())),
                }
            }
            Runner::Shared(core) => core.lock().unwrap_or_else(|p| p.into_inner()).take(),
        };
        self.paused = Some(core.ok_or(LifecycleError::NotRunning)?);
        Ok(())
    }

    /// Whether the device is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Runs a paused device again, where it stopped; it first looks at every queue once.
    pub fn resume(&mut self) -> Result<(), LifecycleError> {
        let mut core = self.paused.take().ok_or(LifecycleError::NotPaused)?;
        core.resumed()
            .map_err(|e| LifecycleError::Start(e.to_string()))?;
        let control = core.control();
        self.start(core, control)
            .map_err(|e| LifecycleError::Start(e.to_string()))
    }

    /// The state of a paused device, to restore it ([`VsockDevice::restore`]) here or in a
    /// clone. The device stays paused, its connections open: resumed, it goes on as before.
    pub fn save(&self) -> Result<VsockState, LifecycleError> {
        let core = self.paused.as_ref().ok_or(LifecycleError::NotPaused)?;
        Ok(core.save(self.acked))
    }

    fn start(&mut self, core: DeviceCore<B>, control: Arc<Control>) -> io::Result<()> {
        let busy_poll = self.cfg.busy_poll;
        let runner = match self.cfg.run {
            RunMode::Thread => Runner::Thread(
                std::thread::Builder::new()
                    .name(format!("vsock-{}", self.cfg.guest_cid))
                    .spawn(move || super::worker::run(core, busy_poll))?,
            ),
            RunMode::External => Runner::Shared(Arc::new(Mutex::new(Some(core)))),
        };
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(control.clone());
        self.running = Some(Running { control, runner });
        Ok(())
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// A handle for other threads (the VMM's API).
    pub fn handle(&self) -> DeviceHandle {
        DeviceHandle {
            counters: self.counters.clone(),
            control: self.published.clone(),
        }
    }

    /// A snapshot of the live connections (empty while the device is not running).
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.handle().connections()
    }

    /// Whether the device thread is running.
    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }

    /// The activated device as an event-manager subscriber ([`RunMode::External`] only;
    /// `None` before activation or in [`RunMode::Thread`]).
    pub fn subscriber(&self) -> Option<VsockSubscriber<B>> {
        match &self.running.as_ref()?.runner {
            Runner::Shared(core) => Some(VsockSubscriber::new(core.clone())),
            Runner::Thread(_) => None,
        }
    }

    /// Runs `f` on the running core of a [`RunMode::External`] device (`None` when it is not
    /// running or runs on its own thread). For a transport that drives the core itself.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut DeviceCore<B>) -> R) -> Option<R> {
        match &self.running.as_ref()?.runner {
            Runner::Shared(core) => core
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .map(f),
            Runner::Thread(_) => None,
        }
    }

    fn stop(&mut self) {
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(core) = self.paused.take() {
            self.backend = Some(core.into_backend());
        }
        let Some(r) = self.running.take() else {
            return;
        };
        match r.runner {
            Runner::Thread(thread) => {
                let _ = r.control.send(ControlMsg::Stop);
                match thread.join() {
                    Ok(Ok(core)) => self.backend = Some(core.into_backend()),
                    Ok(Err(e)) => log::error!("vsock device thread failed: {e}"),
                    Err(_) => log::error!("vsock device thread panicked"),
                }
            }
            Runner::Shared(core) => {
                let core = core.lock().unwrap_or_else(|p| p.into_inner()).take();
                self.backend = core.map(DeviceCore::into_backend);
            }
        }
    }
}

impl<B: Backend + 'static> Drop for VsockDevice<B> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<B: Backend + 'static> VirtioDevice for VsockDevice<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_SEQPACKET)
    }

    fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        let unoffered = features & !self.avail_features();
        if unoffered != 0 {
            return Err(FeatureError::Unoffered(unoffered));
        }
        if !self.version_ok(features) {
            return Err(FeatureError::NoVersion1);
        }
        self.acked = features;
        Ok(())
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cid = self.cfg.guest_cid.to_le_bytes();
        match (offset, data.len()) {
            (0, 8) => data.copy_from_slice(&cid),
            (0, 4) => data.copy_from_slice(&cid[..4]),
            (4, 4) => data.copy_from_slice(&cid[4..]),
            _ => {}
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        Counters::inc(&self.counters.config_writes);
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.running.is_some() || self.paused.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if !self.version_ok(self.acked) {
            return Err(ActivateError::FeaturesNotNegotiated);
        }
        if ctx.queues.len() != 3 || !(ctx.kicks.len() == 3 || ctx.kicks.is_empty()) {
            return Err(ActivateError::QueueCount {
                expected: 3,
                queues: ctx.queues.len(),
                kicks: ctx.kicks.len(),
            });
        }
        let mut queues = ctx.queues;
        let event_idx = self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for (i, q) in queues.iter_mut().enumerate() {
            // The event queue may be left unset (a vhost-user frontend that keeps it); the
            // device never touches an event queue that is not ready.
            let optional = i == super::core::EVT && !q.ready();
            if !optional && !q.is_valid(&ctx.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            q.set_event_idx(event_idx);
        }
        let event_owed = self.restored.as_ref().is_some_and(|r| r.event);
        if event_owed && !queues[EVT].ready() {
            // TRANSPORT_RESET is owed and there is no event queue to carry it.
            return Err(ActivateError::InvalidQueue(EVT));
        }
        let backend = self.backend.take().ok_or(ActivateError::AlreadyActive)?;
        let control = match Control::new() {
            Ok(c) => Arc::new(c),
            Err(e) => {
                self.backend = Some(backend);
                return Err(ActivateError::Worker(e));
            }
        };
        let csm = CsmConfig {
            seqpacket: self.acked & (1 << VIRTIO_VSOCK_F_SEQPACKET) != 0,
            ..self.cfg.csm
        };
        let muxer = Muxer::new(
            self.cfg.guest_cid,
            csm,
            self.cfg.max_connections,
            backend,
            self.counters.clone(),
        );
        let mut core = DeviceCore::new(
            ctx.mem,
            queues,
            ctx.kicks,
            ctx.interrupt,
            control.clone(),
            muxer,
            self.counters.clone(),
            self.cfg.budget,
        )
        .map_err(ActivateError::Worker)?;
        if let Some(r) = self.restored.take() {
            core.restart(r.next_port, &r.resets, r.event);
        }
        self.start(core, control).map_err(ActivateError::Worker)
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked = 0;
        self.restored = None;
        self.backend.is_some()
    }
}
