//! The VM lifecycle routes of `vsock-vmm`: pause, resume, snapshot. Served before the routes
//! of [`super::routes`] when the server has a [`VmLifecycle`] (`vsock-vmm` always has; a
//! daemon without VMs of its own has none). Every route is in `docs/api.yaml`.

use std::path::PathBuf;

use serde::Deserialize;

use super::http::{Request, Response};

/// `PUT` — pause the vCPUs.
pub const PAUSE: &str = "/api/v1/vm.pause";
/// `PUT` — resume paused vCPUs.
pub const RESUME: &str = "/api/v1/vm.resume";
/// `PUT` `{"destination": DIR}` — snapshot a paused VM into DIR.
pub const SNAPSHOT: &str = "/api/v1/vm.snapshot";

/// The lifecycle routes and their methods.
pub const LIFECYCLE_ROUTES: &[(&str, &[&str])] =
    &[(PAUSE, &["PUT"]), (RESUME, &["PUT"]), (SNAPSHOT, &["PUT"])];

/// A refused or failed lifecycle request: the HTTP status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleError {
    /// 409 for a request the VM's state does not allow, 400 for one the VM cannot do,
    /// 500 for a failure.
    pub status: u16,
    /// The reason, for the client.
    pub message: String,
}

/// What the lifecycle routes reach: implemented by the VMM over its vCPUs and devices.
pub trait VmLifecycle: Send + Sync {
    /// Pauses the VM (409 if paused).
    fn pause(&self) -> Result<(), LifecycleError>;
    /// Resumes the VM (409 if not paused).
    fn resume(&self) -> Result<(), LifecycleError>;
    /// Writes a snapshot of the paused VM to `destination` (409 if running).
    fn snapshot(&self, destination: PathBuf) -> Result<(), LifecycleError>;
}

/// The body of `PUT /api/v1/vm.snapshot`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    destination: PathBuf,
}

/// Answers the lifecycle routes; `None` for another path.
pub fn route(req: &Request, vm: &dyn VmLifecycle) -> Option<Response> {
    let &(path, methods) = LIFECYCLE_ROUTES.iter().find(|(p, _)| *p == req.path)?;
    if !methods.contains(&req.method.as_str()) {
        let mut r = Response::error(405, format!("{path} does not support {}", req.method));
        r.allow = Some(methods.join(", "));
        return Some(r);
    }
    let result = match path {
        PAUSE => vm.pause(),
        RESUME => vm.resume(),
        _ => match parse_snapshot(&req.body) {
            Ok(dest) => vm.snapshot(dest),
            Err(r) => return Some(r),
        },
    };
    Some(match result {
        Ok(()) => Response::empty(204),
        Err(e) => Response::error(e.status, e.message),
    })
}

fn parse_snapshot(body: &[u8]) -> Result<PathBuf, Response> {
    let bad = |e: String| {
        Response::error(
            400,
            format!("expected {{\"destination\": \"absolute directory path\"}}: {e}"),
        )
    };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("the body is not a JSON object".into()));
    }
    let req: SnapshotRequest = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if !req.destination.is_absolute() {
        return Err(bad(format!(
            "`{}` is not an absolute path",
            req.destination.display()
        )));
    }
    Ok(req.destination)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{parse_request, Parsed};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl VmLifecycle for Recorder {
        fn pause(&self) -> Result<(), LifecycleError> {
            self.0.lock().unwrap().push("pause".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), LifecycleError> {
            Err(LifecycleError {
                status: 409,
                message: "the VM is not paused".into(),
            })
        }
        fn snapshot(&self, destination: PathBuf) -> Result<(), LifecycleError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("snapshot {}", destination.display()));
            Ok(())
        }
    }

    fn call(vm: &Recorder, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let Ok(Parsed::Complete(req)) = parse_request(raw.as_bytes()) else {
            panic!("bad test request");
        };
        route(&req, vm).map(|r| (r.status, r.body.unwrap_or_default()))
    }

    #[test]
    fn routes_statuses_and_bodies() {
        let vm = Recorder::default();
        assert_eq!(call(&vm, "PUT", PAUSE, "").unwrap().0, 204);
        let (s, body) = call(&vm, "PUT", RESUME, "").unwrap();
        assert_eq!(s, 409);
        assert!(body.contains("not paused"), "{body}");
        let (s, _) = call(&vm, "PUT", SNAPSHOT, r#"{"destination": "/tmp/snap"}"#).unwrap();
        assert_eq!(s, 204);
        assert_eq!(call(&vm, "GET", PAUSE, "").unwrap().0, 405);
        assert!(call(&vm, "GET", "/api/v1/vsock", "").is_none());
        for body in [
            "",
            "[]",
            r#"{"destination": 3}"#,
            r#"{"destination": "relative/dir"}"#,
            r#"{"destination": "/a", "x": 1}"#,
            r#"{}"#,
        ] {
            let (s, text) = call(&vm, "PUT", SNAPSHOT, body).unwrap();
            assert_eq!(s, 400, "{body}");
            assert!(text.contains("destination"), "{body}: {text}");
        }
        assert_eq!(
            *vm.0.lock().unwrap(),
            vec!["pause".to_string(), "snapshot /tmp/snap".to_string()]
        );
    }
}
