//! The machine's side of hybrid vsock (Firecracker / Cloud Hypervisor Unix sockets, as served by
//! `vhost-device-vsock` in `uds-path` mode) for tests whose TCG guests have a vhost-user
//! virtio-vsock device: accept what a guest sends to CID 2, and connect to a guest port.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Deterministic test data, the same bytes as `vr_pattern_file` in the guests: the decimal
/// numbers 0, 1, 2, ... one per line, cut to `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data` in lowercase hex, as `vr_sha256` prints it in the guests.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Accepts one connection on `listener` (bounded wait) and reads it to EOF.
pub fn accept_and_read(listener: &UnixListener, limit: Duration) -> Result<Vec<u8>, String> {
    accept_and_read_unless(listener, limit, &|| false)
}

/// [`accept_and_read`], giving up early (with an error) once `stop()` returns true, e.g. when
/// the guest that should connect has ended.
pub fn accept_and_read_unless(
    listener: &UnixListener,
    limit: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<u8>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(format!("no connection within {} s", limit.as_secs()));
                }
                if stop() {
                    return Err("stopped: the run ended".to_string());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    stream.read_to_end(&mut data).map_err(|e| e.to_string())?;
    Ok(data)
}

/// Host → guest: `CONNECT port` on the guest's `uds`, wait for `OK`, send `data`, shut the
/// write side and wait for the guest to close. Retries (bounded by `limit`, 0.3 s apart) while
/// the guest does not listen yet; the number of retries is printed. Returns the `OK` line.
pub fn connect_and_send(
    uds: &Path,
    port: u32,
    data: &[u8],
    limit: Duration,
) -> Result<String, String> {
    connect_and_send_unless(uds, port, data, limit, &|| false)
}

/// [`connect_and_send`], giving up early (with an error) once `stop()` returns true.
pub fn connect_and_send_unless(
    uds: &Path,
    port: u32,
    data: &[u8],
    limit: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    let mut last_err = String::new();
    let mut retries = 0u32;
    let report = |retries: u32, how: &str| {
        eprintln!(
            "[vsock-integration] connect_and_send {} port {port}: retries={retries}{how}",
            uds.display()
        )
    };
    while Instant::now() < deadline && !stop() {
        let attempt = || -> Result<String, String> {
            let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .map_err(|e| format!("write CONNECT: {e}"))?;
            let mut line = String::new();
            BufReader::new(&s)
                .read_line(&mut line)
                .map_err(|e| format!("read OK: {e}"))?;
            if !line.starts_with("OK ") {
                return Err(format!("no OK line (got {line:?})"));
            }
            s.write_all(data).map_err(|e| format!("write data: {e}"))?;
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            // Wait until the guest has everything and closes its side.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            Ok(line.trim().to_string())
        };
        match attempt() {
            Ok(ok) => {
                report(retries, "");
                return Ok(ok);
            }
            Err(e) => last_err = e,
        }
        retries += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    report(retries, " gave-up");
    Err(format!(
        "gave up after {} s and {retries} retries: {last_err}",
        limit.as_secs()
    ))
}
