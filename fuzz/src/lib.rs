//! Fuzz bodies that need crates outside `vsock-router`: the VMM's API parser and router.
//!
//! The `vsock-router` bodies live in `vsock_router::fuzzing` (so that plain `cargo test` runs
//! them over the corpus); this one lives here because `vsock-router` cannot depend on
//! `vsock-vmm`. `cargo test --manifest-path fuzz/Cargo.toml` runs it over `fuzz/corpus/api/`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use vsock_vmm::api::routes::{CONNECTIONS, METRICS, PING, ROUTES, SHUTDOWN, VSOCK};
use vsock_vmm::api::vms::VMS;
use vsock_vmm::api::{
    handle_request, Action, ApiContext, ConnectionInfo, VsockControl, VsockCounters, VsockInfo,
};

/// Status codes the API documents (`docs/api.yaml`, `docs/vmm.md`) that `handle_request` may
/// answer (408 comes from the server's read timeout, not from a request's bytes).
pub const DOCUMENTED: &[u16] = &[200, 204, 400, 404, 405, 413, 431, 501];

/// A device with fixed data and a real flag.
#[derive(Default)]
struct Fixed {
    fallback: AtomicBool,
}

impl VsockControl for Fixed {
    fn info(&self) -> VsockInfo {
        VsockInfo {
            cid: 3,
            socket: "/run/v.sock".into(),
            g2h_fallback: self.fallback.load(Ordering::Relaxed),
            uplink: Some("vsock:2".into()),
            registry: None,
            ns_mode: "global".into(),
            listen: None,
            counters: VsockCounters::default(),
        }
    }
    fn set_g2h_fallback(&self, enabled: bool) {
        self.fallback.store(enabled, Ordering::Relaxed);
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
            bytes_to_host: 1,
            bytes_to_guest: 2,
            sock_type: "seqpacket".into(),
            messages_to_host: 3,
            messages_to_guest: 4,
        }]
    }
}

fn contexts() -> &'static [ApiContext; 3] {
    static CTX: OnceLock<[ApiContext; 3]> = OnceLock::new();
    CTX.get_or_init(|| {
        let vm: Arc<dyn vsock_vmm::api::VsockControl> = Arc::new(Fixed::default());
        [
            ApiContext::default(),
            ApiContext {
                vsock: Some(Arc::new(Fixed::default())),
                vms: None,
            },
            // A daemon of two VMs (vsock-routerd's routes).
            ApiContext {
                vsock: None,
                vms: Some(Arc::new([(3, vm.clone()), (7, vm)].into_iter().collect())),
            },
        ]
    })
}

/// The `api` fuzz body: the first byte picks a VM with or without a vsock device, the rest is
/// the raw request. Asserts: no panic; the status is documented; only `PUT /api/v1/vm.shutdown`
/// shuts down (and answers 204); a 405 carries `Allow`; every body is JSON; the response
/// serializes with the right status line and `Content-Length`.
pub fn api(data: &[u8]) {
    let Some((&sel, raw)) = data.split_first() else {
        return;
    };
    let ctx = &contexts()[usize::from(sel % 3)];
    let (resp, action) = handle_request(raw, ctx);
    assert!(
        DOCUMENTED.contains(&resp.status),
        "undocumented status {}",
        resp.status
    );
    // The request line (httparse also ends lines and the head with a bare LF).
    let start = raw
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(raw.len());
    let rest = &raw[start..];
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = String::from_utf8_lossy(&rest[..end]);
    if action == Action::Shutdown {
        assert_eq!(resp.status, 204, "shutdown with status {}", resp.status);
        assert!(
            line.starts_with("PUT ") && line.contains(SHUTDOWN),
            "shutdown from {line:?}"
        );
    }
    if resp.status == 204 {
        assert!(resp.body.is_none(), "204 with a body");
    } else {
        let body = resp
            .body
            .as_deref()
            .expect("non-204 response without a body");
        let text = resp.content_type != "application/json";
        // `/metrics` answers in the Prometheus text format; everything else in JSON.
        let v: serde_json::Value = if text && resp.status == 200 && line.contains("/metrics") {
            serde_json::Value::Null
        } else {
            serde_json::from_str(body).expect("body is JSON")
        };
        if resp.status >= 400 {
            assert!(
                v.get("error").is_some_and(|e| e.is_string()),
                "error body {body}"
            );
        }
    }
    if resp.status == 405 {
        let allow = resp.allow.as_deref().expect("405 without Allow");
        assert!(ROUTES.iter().any(|(_, m)| m.join(", ") == allow));
    } else {
        assert!(resp.allow.is_none(), "Allow on a {}", resp.status);
    }
    if resp.status == 200 {
        // Only the GET routes answer 200.
        assert!(line.starts_with("GET "), "200 for {line:?}");
        assert!(
            [PING, VSOCK, CONNECTIONS, VMS, METRICS]
                .iter()
                .any(|p| line.contains(p)),
            "200 for {line:?}"
        );
    }
    let wire = resp.to_bytes();
    let expect = format!("HTTP/1.1 {} ", resp.status);
    assert!(wire.starts_with(expect.as_bytes()));
    let body_len = resp.body.as_deref().map_or(0, str::len);
    let tail = format!("Content-Length: {body_len}\r\n\r\n");
    let head_len = wire.len() - body_len;
    assert!(wire[..head_len].ends_with(tail.as_bytes()), "bad framing");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/api");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("api corpus") {
            let p = e.expect("entry").path();
            api(&std::fs::read(&p).expect("read"));
            n += 1;
        }
        assert!(n > 0);
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..500 {
            let mut v = b"\x01GET /api/v1/vsock HTTP/1.1\r\n".to_vec();
            for _ in 0..(x % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            api(&v);
        }
    }
}
