//! The production [`Backend`]: routes each new guest connection with [`decide`] and hands it to
//! the host Unix backend, the CID registry or the uplink; gathers host-initiated connections
//! from all of them.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::control::Policy;
use super::decide::{decide, Decision, RouteCtx};
use super::{Path, RouteInfo};
use crate::backend::host::HostBackend;
use crate::backend::listen::ListenBackend;
use crate::backend::registry::{Registry, RegistryError};
use crate::backend::stream::SockStream;
use crate::backend::uplink::{Uplink, UplinkSpec};
use crate::backend::vsock::{af_vsock_forbidden, FORBID_ENV};
use crate::backend::{Backend, ConnectRequest, Incoming, Outgoing, Refusal};
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
    /// The guest CID is the parent machine's own CID.
    #[error("cid {0} is the parent machine's own CID (the kernel refuses it with EADDRINUSE)")]
    ParentCid(u64),
    /// Setting up the poll set failed.
    #[error("cannot create the router's epoll set: {0}")]
    Epoll(io::Error),
}

/// Routes a device's connections.
pub struct Router {
    guest_cid: u64,
    policy: Arc<Policy>,
    host: HostBackend,
    registry: Option<Registry>,
    uplink: Option<Uplink>,
    listen: Option<ListenBackend>,
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
            let probe = Uplink::new(cfg.uplink.clone());
            if let Ok(Some(parent)) = probe.parent_cid() {
                if u64::from(parent) == cfg.cid {
                    return Err(RouterError::ParentCid(cfg.cid));
                }
            }
        }
        let host = HostBackend::bind(&cfg.socket, cfg.handshake_timeout).map_err(|source| {
            RouterError::Socket {
                path: cfg.socket.display().to_string(),
                source,
            }
        })?;
        let registry = match &cfg.registry {
            Some(dir) => Some(Registry::claim(dir, cfg.cid, cfg.handshake_timeout)?),
            None => None,
        };
        let uplink_err = |source| RouterError::Uplink {
            spec: cfg.uplink.to_string(),
            source,
        };
        let uplink = match &cfg.uplink {
            UplinkSpec::None => None,
            spec => Some(Uplink::new(spec.clone())),
        };
        let listen = if cfg.listen.is_empty() {
            None
        } else {
            Some(ListenBackend::new(&cfg.uplink, &cfg.listen).map_err(uplink_err)?)
        };
        let epoll = Epoll::new().map_err(RouterError::Epoll)?;
        let mut fds = vec![host.poll_fd()];
        fds.extend(registry.as_ref().map(|r| r.poll_fd()));
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
            policy,
            host,
            registry,
            uplink,
            listen,
            epoll,
        })
    }

    /// The uplink, if one is configured.
    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref()
    }
}

impl Backend for Router {
    type Stream = SockStream;

    fn connect(&mut self, req: &ConnectRequest) -> Result<Outgoing<SockStream>, Refusal> {
        let ctx = RouteCtx {
            own_cid: Some(self.guest_cid),
            g2h_fallback: self.policy.g2h_fallback(),
            uplink: self.uplink.is_some(),
        };
        let registry = self.registry.as_ref();
        let decision = decide(req.dst_cid, &ctx, |c| registry.is_some_and(|r| r.owns(c)));
        let (res, path, await_ok) = match decision {
            Decision::Refuse(_) => return Err(Refusal::NoRoute),
            Decision::Host => (self.host.connect(req.dst_port), Path::Host, false),
            Decision::Sibling => {
                let r = self.registry.as_ref().ok_or(Refusal::NoRoute)?;
                let res = r
                    .connect(req.dst_cid, req.dst_port, req.guest_cid, req.guest_port)
                    .map(|s| (s, true));
                (res, Path::Sibling, true)
            }
            Decision::Uplink => {
                let u = self.uplink.as_ref().ok_or(Refusal::NoRoute)?;
                (u.connect(req.dst_cid, req.dst_port), Path::Uplink, false)
            }
        };
        let (stream, connected) = res.map_err(|_| Refusal::ConnectFailed)?;
        Ok(Outgoing {
            stream,
            connected,
            await_ok,
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
        self.host.process(now, out);
        if let Some(r) = self.registry.as_mut() {
            r.process(now, out);
        }
        if let Some(l) = self.listen.as_mut() {
            l.process(now, out);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.host.next_deadline(),
            self.registry.as_ref().and_then(|r| r.next_deadline()),
            self.listen.as_ref().and_then(|l| l.next_deadline()),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
