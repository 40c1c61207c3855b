//! The routes of a daemon that serves several VMs (`vsock-routerd`): each VM's vsock routes of
//! a single VM's VMM, under `/api/v1/vms/{cid}`, and the list of VMs. Every route is in
//! `docs/routerd-api.yaml`, and a test checks both ways.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::control::VsockControl;
use super::http::{Request, Response};
use super::routes::{self, Action, ApiContext};

/// The VMs by CID.
pub type Vms = Arc<BTreeMap<u64, Arc<dyn VsockControl>>>;

/// `GET` — every VM's vsock info, by CID.
pub const VMS: &str = "/api/v1/vms";
/// Prefix of one VM's routes.
const VM_PREFIX: &str = "/api/v1/vms/";

/// One VM's routes, after `/api/v1/vms/{cid}`, and the single-VM route each stands for.
pub const VM_ROUTES: &[(&str, &str)] = &[
    ("/vsock", routes::VSOCK),
    ("/vsock/connections", routes::CONNECTIONS),
    ("/metrics", routes::METRICS),
];

/// Every route of the daemon and its methods, with `{cid}` for a VM's CID.
pub fn daemon_routes() -> Vec<(String, Vec<&'static str>)> {
    let mut out = vec![
        (routes::PING.to_string(), vec!["GET"]),
        (routes::SHUTDOWN.to_string(), vec!["PUT"]),
        (VMS.to_string(), vec!["GET"]),
    ];
    for (suffix, single) in VM_ROUTES {
        let methods = routes::ROUTES
            .iter()
            .find(|(p, _)| p == single)
            .map(|(_, m)| m.to_vec())
            .unwrap_or_default();
        out.push((format!("{VM_PREFIX}{{cid}}{suffix}"), methods));
    }
    out
}

/// Answers the VM routes; `None` for a path that is not one of them (the single-VM routing
/// answers it: ping, shutdown, or 404).
pub fn route(req: &Request, vms: &Vms) -> Option<(Response, Action)> {
    if req.path == VMS {
        if req.method != "GET" {
            let mut r = Response::error(405, format!("{VMS} does not support {}", req.method));
            r.allow = Some("GET".into());
            return Some((r, Action::None));
        }
        let all: BTreeMap<String, _> = vms.iter().map(|(c, v)| (c.to_string(), v.info())).collect();
        return Some((Response::json(200, &all), Action::None));
    }
    if let Some((suffix, _)) = VM_ROUTES.iter().find(|(_, single)| *single == req.path) {
        let msg = format!("this daemon serves several VMs: {VM_PREFIX}{{cid}}{suffix}");
        return Some((Response::error(404, msg), Action::None));
    }
    let rest = req.path.strip_prefix(VM_PREFIX)?;
    let (cid, suffix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some(single) = VM_ROUTES
        .iter()
        .find(|(s, _)| *s == suffix)
        .map(|(_, p)| *p)
    else {
        return Some((
            Response::error(404, format!("no route {}", req.path)),
            Action::None,
        ));
    };
    let Some(vsock) = cid.parse::<u64>().ok().and_then(|c| vms.get(&c)) else {
        return Some((
            Response::error(404, format!("no VM with CID {cid:?} here")),
            Action::None,
        ));
    };
    let ctx = ApiContext {
        vsock: Some(vsock.clone()),
        vms: None,
    };
    let mut inner = req.clone();
    inner.path = single.to_string();
    Some(routes::route(&inner, &ctx))
}
