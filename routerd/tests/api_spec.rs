//! docs/routerd-api.yaml and the daemon's routes agree both ways, and a running daemon answers
//! every documented operation with a documented status.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vsock_vmm::api::client::request;
use vsock_vmm::api::vms::daemon_routes;

fn operations() -> Vec<(String, String, BTreeSet<u16>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/routerd-api.yaml");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut ops = Vec::new();
    for (p, item) in doc["paths"].as_mapping().unwrap() {
        for (m, op) in item.as_mapping().unwrap() {
            let m = m.as_str().unwrap();
            if m == "parameters" {
                continue;
            }
            let statuses = op["responses"]
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().parse().unwrap())
                .collect();
            ops.push((p.as_str().unwrap().to_string(), m.to_uppercase(), statuses));
        }
    }
    ops
}

#[test]
fn document_matches_the_routes() {
    let documented: BTreeSet<(String, String)> =
        operations().into_iter().map(|(p, m, _)| (p, m)).collect();
    let served: BTreeSet<(String, String)> = daemon_routes()
        .into_iter()
        .flat_map(|(p, ms)| ms.into_iter().map(move |m| (p.clone(), m.to_string())))
        .collect();
    assert_eq!(documented, served);
}

#[test]
fn a_running_daemon_answers_every_documented_operation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let api = d.join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsock-routerd"))
        .arg("--vsock")
        .arg(format!(
            "cid=41,socket={},vhost-user={},uplink=none",
            d.join("vm.vsock").display(),
            d.join("vm.vhost").display()
        ))
        .arg("--api-socket")
        .arg(&api)
        .env("VSOCK_ROUTER_FORBID_AF_VSOCK", "1")
        // Its private registry inside the test's directory, also if it is killed.
        .env("TMPDIR", d)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !api.exists() {
        assert!(Instant::now() < until, "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut ops = operations();
    ops.sort_by_key(|(p, _, _)| p.ends_with("vm.shutdown"));
    for (path, method, statuses) in ops {
        for cid in ["41", "42"] {
            let p = path.replace("{cid}", cid);
            let body = (method == "PATCH").then_some(r#"{"g2h_fallback": false}"#);
            let r = request(&api, &method, &p, body).unwrap();
            assert!(
                statuses.contains(&r.status),
                "{method} {p}: {} not in {statuses:?}: {}",
                r.status,
                r.body
            );
            let expect_found = cid == "41" || !path.contains("{cid}");
            assert_eq!(r.status != 404, expect_found, "{method} {p}: {}", r.status);
            if !path.contains("{cid}") {
                break;
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon did not stop after PUT /api/v1/vm.shutdown");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !d.join("vm.vhost").exists() && !api.exists(),
        "sockets left behind"
    );
}
