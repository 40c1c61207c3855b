//! A tiny HTTP/1.1 client over a Unix socket (`vsock-vmm remote`, tests).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Body (JSON or empty).
    pub body: String,
}

impl Reply {
    /// The body parsed as JSON (`null` when empty).
    pub fn json(&self) -> io::Result<serde_json::Value> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&self.body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Sends raw request bytes and reads the whole response.
pub fn send_raw(socket: &Path, raw: &[u8]) -> io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    // The server may answer (e.g. 413) and close before reading everything; keep its answer.
    let write_result = stream.write_all(raw);
    let mut resp = Vec::new();
    let read_result = stream.take(1 << 20).read_to_end(&mut resp);
    if resp.is_empty() {
        write_result?;
        read_result?;
    }
    parse_reply(&resp)
}

/// Sends `method path` with an optional JSON body.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> io::Result<Reply> {
    let body = body.unwrap_or("");
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        raw.push_str("Content-Type: application/json\r\n");
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    send_raw(socket, raw.as_bytes())
}

fn parse_reply(resp: &[u8]) -> io::Result<Reply> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("truncated HTTP response")),
        Err(e) => return Err(bad(&format!("malformed HTTP response: {e}"))),
    };
    let status = parsed.code.ok_or_else(|| bad("no status code"))?;
    let body = String::from_utf8_lossy(&resp[head_len..]).into_owned();
    Ok(Reply { status, body })
}
