//! Routing and handlers. Every route is in `docs/api.yaml`, and a test checks both ways.

use std::sync::Arc;

use serde::Deserialize;

use super::control::VsockControl;
use super::http::{parse_request, HttpError, Parsed, Request, Response};

/// `GET` — liveness and version.
pub const PING: &str = "/api/v1/vmm.ping";
/// `GET` info, `PATCH` `g2h_fallback`.
pub const VSOCK: &str = "/api/v1/vsock";
/// `GET` — open connections.
pub const CONNECTIONS: &str = "/api/v1/vsock/connections";
/// `PUT` — shut the VMM down.
pub const SHUTDOWN: &str = "/api/v1/vm.shutdown";
/// `GET` — the vsock device's metrics in the Prometheus text format.
pub const METRICS: &str = "/metrics";

/// Every route and its methods.
pub const ROUTES: &[(&str, &[&str])] = &[
    (PING, &["GET"]),
    (VSOCK, &["GET", "PATCH"]),
    (CONNECTIONS, &["GET"]),
    (SHUTDOWN, &["PUT"]),
    (METRICS, &["GET"]),
];

/// What the handlers can reach.
#[derive(Clone, Default)]
pub struct ApiContext {
    /// The vsock device, when the VM has one.
    pub vsock: Option<Arc<dyn VsockControl>>,
    /// The VMs of a daemon that serves several (`vsock-routerd`), by CID: their routes are
    /// under `/api/v1/vms` ([`super::vms`]). `None` for a VMM of one VM.
    pub vms: Option<super::vms::Vms>,
}

/// What the server must do after sending the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Shut the VMM down.
    Shutdown,
}

/// The body of `PATCH /api/v1/vsock`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockPatch {
    g2h_fallback: bool,
}

/// Parses and routes one complete raw request. A pure function of its input and `ctx`,
/// for the fuzz target: bytes that do not form a whole request answer 400.
pub fn handle_request(raw: &[u8], ctx: &ApiContext) -> (Response, Action) {
    match parse_request(raw) {
        Ok(Parsed::Complete(req)) => route(&req, ctx),
        Ok(Parsed::Partial) => (Response::error(400, "incomplete request"), Action::None),
        Err(e) => (error_response(&e), Action::None),
    }
}

/// The response for a request the parser rejected.
pub fn error_response(e: &HttpError) -> Response {
    Response::error(e.status(), e.to_string())
}

/// Routes a parsed request.
pub fn route(req: &Request, ctx: &ApiContext) -> (Response, Action) {
    if let Some(vms) = &ctx.vms {
        if let Some(answer) = super::vms::route(req, vms) {
            return answer;
        }
    }
    let Some(&(path, methods)) = ROUTES.iter().find(|(p, _)| *p == req.path) else {
        return (
            Response::error(404, format!("no route {}", req.path)),
            Action::None,
        );
    };
    if !methods.contains(&req.method.as_str()) {
        let mut r = Response::error(405, format!("{} does not support {}", path, req.method));
        r.allow = Some(methods.join(", "));
        return (r, Action::None);
    }
    match (path, req.method.as_str()) {
        (PING, _) => (
            Response::json(
                200,
                &serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }),
            ),
            Action::None,
        ),
        (SHUTDOWN, _) => (Response::empty(204), Action::Shutdown),
        (VSOCK, "GET") => (
            with_vsock(ctx, |v| Response::json(200, &v.info())),
            Action::None,
        ),
        (VSOCK, _) => (with_vsock(ctx, |v| patch_vsock(v, &req.body)), Action::None),
        (CONNECTIONS, _) => (
            with_vsock(ctx, |v| Response::json(200, &v.connections())),
            Action::None,
        ),
        (METRICS, _) => (
            with_vsock(ctx, |v| {
                let (kind, body) = super::metrics::render(v, req.accept.as_deref());
                Response::text(kind, body)
            }),
            Action::None,
        ),
        _ => (Response::error(500, "route without handler"), Action::None),
    }
}

fn with_vsock(ctx: &ApiContext, f: impl FnOnce(&dyn VsockControl) -> Response) -> Response {
    match &ctx.vsock {
        Some(v) => f(v.as_ref()),
        None => Response::error(404, "this VM has no vsock device"),
    }
}

fn patch_vsock(vsock: &dyn VsockControl, body: &[u8]) -> Response {
    // Require a JSON object: serde would also accept `[true]` for a one-field struct. Then
    // parse the bytes themselves, not the `Value` (which keeps the last of duplicate keys), so
    // an ambiguous `{"g2h_fallback": true, "g2h_fallback": false}` is refused.
    let parsed = serde_json::from_slice::<serde_json::Value>(body).and_then(|v| {
        if v.is_object() {
            serde_json::from_slice::<VsockPatch>(body)
        } else {
            Err(serde::de::Error::custom("the body is not a JSON object"))
        }
    });
    match parsed {
        Ok(patch) => {
            vsock.set_g2h_fallback(patch.g2h_fallback);
            Response::empty(204)
        }
        Err(e) => Response::error(400, format!("expected {{\"g2h_fallback\": bool}}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::control::{ConnectionInfo, VsockCounters, VsockInfo};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A control surface with fixed data and a real flag.
    #[derive(Default)]
    struct Fixed {
        fallback: AtomicBool,
    }

    impl VsockControl for Fixed {
        fn info(&self) -> VsockInfo {
            VsockInfo {
                cid: 3,
                socket: "/tmp/v".into(),
                g2h_fallback: self.fallback.load(Ordering::SeqCst),
                uplink: None,
                registry: Some("/run/reg".into()),
                ns_mode: "global".into(),
                listen: None,
                counters: VsockCounters {
                    host: 2,
                    ..Default::default()
                },
            }
        }
        fn set_g2h_fallback(&self, enabled: bool) {
            self.fallback.store(enabled, Ordering::SeqCst);
        }
        fn connections(&self) -> Vec<ConnectionInfo> {
            vec![ConnectionInfo {
                local_cid: 2,
                local_port: 52,
                peer_cid: 3,
                peer_port: 1024,
                path: "host".into(),
                to_host: false,
                initiator: "guest".into(),
                state: "established".into(),
                bytes_to_host: 5,
                bytes_to_guest: 7,
                sock_type: "seqpacket".into(),
                messages_to_host: 1,
                messages_to_guest: 2,
            }]
        }
    }

    fn ctx() -> (ApiContext, Arc<Fixed>) {
        let fixed = Arc::new(Fixed::default());
        (
            ApiContext {
                vsock: Some(fixed.clone()),
                vms: None,
            },
            fixed,
        )
    }

    fn req(method: &str, path: &str, body: &str) -> Vec<u8> {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn call(
        ctx: &ApiContext,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value, Action) {
        let (r, a) = handle_request(&req(method, path, body), ctx);
        let v = r
            .body
            .as_deref()
            .map(|b| serde_json::from_str(b).unwrap())
            .unwrap_or(serde_json::Value::Null);
        (r.status, v, a)
    }

    #[test]
    fn ping() {
        let (s, v, a) = call(&ApiContext::default(), "GET", PING, "");
        assert_eq!((s, a), (200, Action::None));
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn info_and_patch() {
        let (c, fixed) = ctx();
        let (s, v, _) = call(&c, "GET", VSOCK, "");
        assert_eq!(s, 200);
        assert_eq!(v["cid"], 3);
        assert_eq!(v["g2h_fallback"], false);
        assert_eq!(v["uplink"], serde_json::Value::Null);
        assert_eq!(v["registry"], "/run/reg");
        assert_eq!(v["counters"]["host"], 2);
        let (s, v, _) = call(&c, "PATCH", VSOCK, r#"{"g2h_fallback": true}"#);
        assert_eq!((s, v), (204, serde_json::Value::Null));
        assert!(fixed.fallback.load(Ordering::SeqCst));
        let (_, v, _) = call(&c, "GET", VSOCK, "");
        assert_eq!(v["g2h_fallback"], true);
    }

    #[test]
    fn patch_rejects_other_fields_and_types() {
        let (c, fixed) = ctx();
        for body in [
            r#"{"g2h_fallback": "yes"}"#,
            r#"{"g2h_fallback": 1}"#,
            r#"{"g2h_fallback": true, "cid": 4}"#,
            r#"{"cid": 4}"#,
            r#"{}"#,
            r#"[true]"#,
            r#"{"g2h_fallback": tru"#,
            r#"{"g2h_fallback": true, "g2h_fallback": false}"#,
            "",
        ] {
            let (s, v, _) = call(&c, "PATCH", VSOCK, body);
            assert_eq!(s, 400, "{body}");
            assert!(
                v["error"].as_str().unwrap().contains("g2h_fallback"),
                "{body}: {v}"
            );
        }
        assert!(!fixed.fallback.load(Ordering::SeqCst));
    }

    #[test]
    fn connections() {
        let (c, _) = ctx();
        let (s, v, _) = call(&c, "GET", CONNECTIONS, "");
        assert_eq!(s, 200);
        assert_eq!(v[0]["local_port"], 52);
        assert_eq!(v[0]["peer_port"], 1024);
        assert_eq!(v[0]["to_host"], false);
        assert_eq!(v[0]["path"], "host");
        assert_eq!(v[0]["type"], "seqpacket");
        assert_eq!(v[0]["messages_to_guest"], 2);
    }

    #[test]
    fn shutdown() {
        let (s, v, a) = call(&ApiContext::default(), "PUT", SHUTDOWN, "");
        assert_eq!((s, v, a), (204, serde_json::Value::Null, Action::Shutdown));
    }

    #[test]
    fn vsock_routes_without_device_are_404() {
        let c = ApiContext::default();
        for (m, p) in [("GET", VSOCK), ("PATCH", VSOCK), ("GET", CONNECTIONS)] {
            let (s, v, _) = call(&c, m, p, r#"{"g2h_fallback": true}"#);
            assert_eq!(s, 404);
            assert_eq!(v["error"], "this VM has no vsock device");
        }
    }

    #[test]
    fn unknown_path_and_wrong_method() {
        let (c, _) = ctx();
        assert_eq!(call(&c, "GET", "/api/v1/nothing", "").0, 404);
        assert_eq!(call(&c, "GET", "/", "").0, 404);
        let (r, a) = handle_request(&req("DELETE", VSOCK, ""), &c);
        assert_eq!((r.status, a), (405, Action::None));
        assert_eq!(r.allow.as_deref(), Some("GET, PATCH"));
        assert_eq!(call(&c, "GET", SHUTDOWN, "").0, 405);
        assert_eq!(call(&c, "POST", PING, "").0, 405);
    }

    #[test]
    fn parser_errors_map_to_status() {
        let c = ApiContext::default();
        assert_eq!(handle_request(b"NOT HTTP\r\n\r\n", &c).0.status, 400);
        assert_eq!(
            handle_request(b"GET /api/v1/vmm.ping HTTP/1.1\r\n", &c)
                .0
                .status,
            400
        );
        let big = format!("PATCH {VSOCK} HTTP/1.1\r\nContent-Length: 100000\r\n\r\n");
        assert_eq!(handle_request(big.as_bytes(), &c).0.status, 413);
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 10_000));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(handle_request(&head, &c).0.status, 431);
    }
}
