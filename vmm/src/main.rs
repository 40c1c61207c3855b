//! `vsock-vmm`: see `vsock-vmm --help`.

use std::process::ExitCode;

use vsock_vmm::api::client;
use vsock_vmm::cli::{self, Command, RemoteArgs, RemoteRequest, USAGE_EXIT_CODE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::parse_args(&args) {
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            0
        }
        Ok(Command::Version) => {
            println!("vsock-vmm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Remote(remote)) => run_remote(&remote),
        Ok(Command::Run(config)) => {
            vsock_vmm::logger::init(config.log_level, config.log_format);
            finish(vsock_vmm::vmm::run(&config))
        }
        Ok(Command::Restore(config)) => {
            vsock_vmm::logger::init(config.log_level, config.log_format);
            finish(vsock_vmm::vmm::restore(&config))
        }
        Err(e) => {
            eprintln!("vsock-vmm: error: {e}");
            USAGE_EXIT_CODE
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn finish(result: Result<i32, vsock_vmm::vmm::Failure>) -> i32 {
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("vsock-vmm: error: {}", failure.message);
            failure.code
        }
    }
}

fn run_remote(remote: &RemoteArgs) -> i32 {
    let snapshot_body;
    let (method, path, body) = match &remote.request {
        RemoteRequest::Ping => ("GET", "/api/v1/vmm.ping", None),
        RemoteRequest::Info => ("GET", "/api/v1/vsock", None),
        RemoteRequest::Connections => ("GET", "/api/v1/vsock/connections", None),
        RemoteRequest::Metrics => ("GET", "/metrics", None),
        RemoteRequest::Shutdown => ("PUT", "/api/v1/vm.shutdown", None),
        RemoteRequest::Pause => ("PUT", "/api/v1/vm.pause", None),
        RemoteRequest::Resume => ("PUT", "/api/v1/vm.resume", None),
        RemoteRequest::Snapshot(dir) => {
            snapshot_body = serde_json::json!({ "destination": dir }).to_string();
            ("PUT", "/api/v1/vm.snapshot", Some(snapshot_body.as_str()))
        }
        RemoteRequest::Fallback(on) => (
            "PATCH",
            "/api/v1/vsock",
            Some(if *on {
                r#"{"g2h_fallback":true}"#
            } else {
                r#"{"g2h_fallback":false}"#
            }),
        ),
    };
    match client::request(&remote.api_socket, method, path, body) {
        Ok(reply) if (200..300).contains(&reply.status) => {
            match reply.json() {
                Ok(serde_json::Value::Null) => println!("{{\"status\":{}}}", reply.status),
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(reply.body)),
                Err(_) => print!("{}", reply.body),
            }
            0
        }
        Ok(reply) => {
            eprintln!("vsock-vmm remote: HTTP {}: {}", reply.status, reply.body);
            1
        }
        Err(e) => {
            eprintln!(
                "vsock-vmm remote: cannot reach {}: {e}",
                remote.api_socket.display()
            );
            1
        }
    }
}
