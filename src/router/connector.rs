//! The production [`Backend`]: routes each new guest connection with [`decide`] and hands it to
//! the host Unix backend, the CID registry or the uplink; gathers host-initiated connections
//! from all of them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::control::Policy;
use super::decide::{decide, Decision, RouteCtx};
use super::{Path, RouteInfo};
use crate::backend::accept::HandshakeView;
use crate::backend::host::HostBackend;
use crate::backend::listen::ListenBackend;
use crate::backend::local::{LocalPeer, LocalPeers};
use crate::backend::namespace::NsMode;
use crate::backend::registry::{Registry, RegistryError};
use crate::backend::stream::SockStream;
use crate::backend::uplink::{Uplink, UplinkSpec};
use crate::backend::vsock::{af_vsock_forbidden, FORBID_ENV};
use crate::backend::{Backend, ConnectRequest, Framing, Incoming, Outgoing, Refusal};
use crate::config::VsockConfig;

/// Why the router could not be set up. Each message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The hybrid socket could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The CID could not be claimed in the registry.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// The uplink could not be set up.
    #[error("uplink {spec}: {source}")]
    Uplink {
        /// The uplink as configured.
        spec: String,
        /// The cause.
        source: io::Error,
    },
    /// The machine's own CID could not be read from the uplink's vsock device, so the check
    /// that the guest does not take it could not run.
    #[error(
        "uplink {spec}: cannot read this machine's CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID), which \
         a guest must not take: {source} (uplink=none if the guest needs no uplink)"
    )]
    ParentCidUnknown {
        /// The uplink as configured.
        spec: String,
        /// The cause.
        source: io::Error,
    },
    /// The guest CID is the parent machine's own CID.
    #[error("cid {0} is the parent machine's own CID (the kernel refuses it with EADDRINUSE)")]
    ParentCid(u64),
    /// `listen=` in a local CID namespace, which has no uplink to listen on.
    #[error(
        "listen={0}: the CID registry is a local namespace (ns_mode=local), which cannot use \
         the uplink that listen= accepts on"
    )]
    ListenInLocalNamespace(String),
    /// Setting up the poll set failed.
    #[error("cannot create the router's epoll set: {0}")]
    Epoll(io::Error),
    /// The device could not join its group of in-process siblings.
    #[error("cannot join the siblings of this process: {0}")]
    LocalPeers(io::Error),
}

/// Routes a device's connections.
pub struct Router {
    guest_cid: u64,
    ns_mode: NsMode,
    connect_timeout: Duration,
    policy: Arc<Policy>,
    host: HostBackend,
    registry: Option<Registry>,
    uplink: Option<Uplink>,
    listen: Option<ListenBackend>,
    /// Siblings in this process (`Router::with_local_peers`), reached without the registry's
    /// socket files.
    local: Option<LocalPeer>,
    epoll: Epoll,
}

impl Router {
    /// Binds the hybrid socket, claims the CID in the registry, and sets up the uplink and its
    /// listeners, as `cfg` says. `policy` is read for every new connection.
    pub fn new(cfg: &VsockConfig, policy: Arc<Policy>) -> Result<Router, RouterError> {
        if let UplinkSpec::Vsock(_) = cfg.uplink {
            if af_vsock_forbidden() {
                return Err(RouterError::Uplink {
                    spec: cfg.uplink.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "AF_VSOCK is forbidden on this machine ({FORBID_ENV} is set): \
                             use uplink=none or uplink=unix:DIR"
                        ),
                    ),
                });
            }
            match Uplink::new(cfg.uplink.clone()).parent_cid() {
                Ok(Some(parent)) if u64::from(parent) == cfg.cid => {
                    return Err(RouterError::ParentCid(cfg.cid))
                }
                // VMADDR_CID_ANY: no G2H transport behind the device, so the uplink refuses
                // every connect; not an error for a VM that may never use it.
                Ok(Some(u32::MAX)) => log::warn!(
                    "uplink {}: the machine has no G2H vsock transport (its CID reads as -1): \
                     connections that take the uplink will fail",
                    cfg.uplink
                ),
                Ok(_) => {}
                Err(e) => {
                    return Err(RouterError::ParentCidUnknown {
                        spec: cfg.uplink.to_string(),
                        source: e,
                    })
                }
            }
        }
        // A guest cannot send a SEQPACKET message larger than the buffer the device advertises.
        let max_message = cfg.buffer_size as usize;
        let host = HostBackend::bind(&cfg.socket, cfg.handshake_timeout, max_message).map_err(
            |source| RouterError::Socket {
                path: cfg.socket.display().to_string(),
                source,
            },
        )?;
        let registry = match &cfg.registry {
            Some(dir) => Some(Registry::claim(
                dir,
                cfg.cid,
                cfg.ns_mode,
                cfg.handshake_timeout,
                max_message,
            )?),
            None => None,
        };
        let ns_mode = registry
            .as_ref()
            .map(Registry::mode)
            .or(cfg.ns_mode)
            .unwrap_or_default();
        if ns_mode == NsMode::Local && !cfg.listen.is_empty() {
            let ports: Vec<String> = cfg.listen.iter().map(u32::to_string).collect();
            return Err(RouterError::ListenInLocalNamespace(ports.join("+")));
        }
        let uplink_err = |source| RouterError::Uplink {
            spec: cfg.uplink.to_string(),
            source,
        };
        let uplink = match &cfg.uplink {
            UplinkSpec::None => None,
            spec => Some(Uplink::new(spec.clone()).with_max_message(max_message)),
        };
        let listen = if cfg.listen.is_empty() {
            None
        } else {
            Some(ListenBackend::new(&cfg.uplink, &cfg.listen).map_err(uplink_err)?)
        };
        let epoll = Epoll::new().map_err(RouterError::Epoll)?;
        let mut fds = vec![host.server().poll_fd(), host.seqpacket_server().poll_fd()];
        fds.extend(registry.as_ref().map(|r| r.server().poll_fd()));
        fds.extend(registry.as_ref().map(|r| r.seqpacket_server().poll_fd()));
        fds.extend(listen.as_ref().map(|l| l.poll_fd()));
        for fd in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(RouterError::Epoll)?;
        }
        Ok(Router {
            guest_cid: cfg.cid,
            ns_mode,
            connect_timeout: cfg.connect_timeout,
            policy,
            host,
            registry,
            uplink,
            listen,
            local: None,
            epoll,
        })
    }

    /// As [`Router::new`], and the device joins `peers`, the sibling devices of this process
    /// in the same CID namespace (the VMs of one `vsock-routerd` that share a registry): a
    /// connection to one of them is relayed over a socket pair handed over in memory, with the
    /// registry relay's semantics (`backend::local`). The registry, if any, still serves
    /// siblings in other processes.
    pub fn with_local_peers(
        cfg: &VsockConfig,
        policy: Arc<Policy>,
        peers: &LocalPeers,
    ) -> Result<Router, RouterError> {
        let mut r = Router::new(cfg, policy)?;
        let peer = peers.join(cfg.cid).map_err(RouterError::LocalPeers)?;
        r.epoll
            .ctl(
                ControlOperation::Add,
                peer.poll_fd(),
                EpollEvent::new(EventSet::IN, peer.poll_fd() as u64),
            )
            .map_err(RouterError::Epoll)?;
        r.local = Some(peer);
        Ok(r)
    }

    /// The CID namespace's mode: the registry's, else what the configuration asked for.
    pub fn ns_mode(&self) -> NsMode {
        self.ns_mode
    }

    /// The uplink, if one is configured.
    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref()
    }

    /// A live view of the host side's counters, to keep before the router goes into a device.
    pub fn stats(&self) -> RouterStats {
        RouterStats {
            host: self.host.server().view(),
            host_seqpacket: self.host.seqpacket_server().view(),
            registry: self.registry.as_ref().map(|r| r.server().view()),
            registry_seqpacket: self.registry.as_ref().map(|r| r.seqpacket_server().view()),
            uplink_attempts: self.uplink.as_ref().map(Uplink::attempt_counter),
            listen_paused: self
                .listen
                .as_ref()
                .map(ListenBackend::pause_counters)
                .unwrap_or_default(),
        }
    }
}

/// A live, thread-safe view of a [`Router`]'s host-side counters: the handshakes of the hybrid
/// sockets and of the registry sockets (stream and seqpacket each), the uplink's connect
/// attempts, the `listen=` listeners' accept pauses.
#[derive(Clone, Debug)]
pub struct RouterStats {
    /// The hybrid socket's handshakes.
    pub host: HandshakeView,
    /// The hybrid seqpacket socket's (`<socket>_seqpacket`) handshakes.
    pub host_seqpacket: HandshakeView,
    /// The registry socket's (sibling) handshakes, with a registry.
    pub registry: Option<HandshakeView>,
    /// The registry seqpacket socket's (programs') handshakes, with a registry.
    pub registry_seqpacket: Option<HandshakeView>,
    /// Connect attempts on the uplink, with one.
    pub uplink_attempts: Option<Arc<AtomicU64>>,
    /// Accept pauses of each `listen=` listener.
    pub listen_paused: Vec<Arc<AtomicU64>>,
}

impl RouterStats {
    /// Connect attempts on the uplink (0 without one).
    pub fn uplink_attempts(&self) -> u64 {
        self.uplink_attempts
            .as_ref()
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Accept pauses of the `listen=` listeners, summed.
    pub fn listen_paused(&self) -> u64 {
        self.listen_paused
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }
}

impl Backend for Router {
    type Stream = SockStream;

    fn connect(&mut self, req: &ConnectRequest) -> Result<Outgoing<SockStream>, Refusal> {
        let ctx = RouteCtx {
            own_cid: Some(self.guest_cid),
            g2h_fallback: self.policy.g2h_fallback(),
            uplink: self.uplink.is_some(),
            ns_mode: self.ns_mode,
        };
        let (registry, local) = (self.registry.as_ref(), self.local.as_ref());
        let decision = decide(req.dst_cid, &ctx, |c| {
            local.is_some_and(|l| l.owns(c)) || registry.is_some_and(|r| r.owns(c))
        });
        let (res, path, framing) = match decision {
            Decision::Refuse(_) => return Err(Refusal::NoRoute),
            Decision::Host => (
                self.host.connect(req.dst_port, req.sock_type),
                Path::Host,
                Framing::Bytes,
            ),
            Decision::Sibling => {
                let local = self.local.as_ref().and_then(|l| {
                    l.relay(req.dst_cid, req.dst_port, req.guest_cid, req.guest_port)
                });
                let res = match local {
                    Some(res) => res,
                    None => self
                        .registry
                        .as_ref()
                        .ok_or(Refusal::NoRoute)?
                        .connect_relay(req.dst_cid, req.dst_port, req.guest_cid, req.guest_port),
                };
                (res.map(|s| (s, true)), Path::Sibling, Framing::Packets)
            }
            Decision::Uplink => {
                let u = self.uplink.as_ref().ok_or(Refusal::NoRoute)?;
                let res = u.connect(
                    req.dst_cid,
                    req.dst_port,
                    self.connect_timeout,
                    req.sock_type,
                );
                (res, Path::Uplink, Framing::Bytes)
            }
        };
        let (stream, connected) = res.map_err(|_| Refusal::ConnectFailed)?;
        Ok(Outgoing {
            stream,
            connected,
            framing,
            route: RouteInfo {
                path,
                to_host: path == Path::Uplink,
            },
        })
    }

    fn poll_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process(&mut self, now: Instant, out: &mut Vec<Incoming<SockStream>>) {
        // Level-triggered: empty the ready list; the components do the real work.
        let mut evs = [EpollEvent::default(); 8];
        let _ = self.epoll.wait(0, &mut evs);
        self.host.server_mut().process(now, out);
        self.host.seqpacket_server_mut().process(now, out);
        if let Some(r) = self.registry.as_mut() {
            r.server_mut().process(now, out);
            r.seqpacket_server_mut().process(now, out);
        }
        if let Some(l) = self.listen.as_mut() {
            l.process(now, out);
        }
        if let Some(l) = self.local.as_ref() {
            l.process(out);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.host.server().next_deadline(),
            self.host.seqpacket_server().next_deadline(),
            self.registry
                .as_ref()
                .and_then(|r| r.server().next_deadline()),
            self.registry
                .as_ref()
                .and_then(|r| r.seqpacket_server().next_deadline()),
            self.listen.as_ref().and_then(|l| l.next_deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
