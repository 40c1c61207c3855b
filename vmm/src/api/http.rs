//! A bounded HTTP/1.1 request parser (on httparse) and response formatter.

use httparse::Status;

/// Largest request head (request line + headers) accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path without the query string.
    pub path: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The `Accept` header, if any (as text; `GET /metrics` picks its format by it).
    pub accept: Option<String>,
}

/// The outcome of parsing a buffer that may hold only part of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request.
    Complete(Request),
    /// More bytes are needed.
    Partial,
}

/// Why a request was rejected; each maps to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Not valid HTTP/1.x (400).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request head is too large or has too many headers (431).
    #[error("request headers too large (limit {MAX_HEAD_BYTES} bytes, {MAX_HEADERS} headers)")]
    HeadersTooLarge,
    /// The body is too large (413).
    #[error("request body too large (limit {MAX_BODY_BYTES} bytes)")]
    BodyTooLarge,
    /// A transfer coding this server does not implement (501).
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    TransferEncoding,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadersTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::TransferEncoding => 501,
        }
    }
}

/// Parses `buf`, which holds the bytes received so far.
pub fn parse_request(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(HttpError::HeadersTooLarge)
        }
        Ok(Status::Partial) => return Ok(Parsed::Partial),
        Ok(Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(HttpError::HeadersTooLarge),
        Ok(Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadersTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target `{target}` is not a path"
        )));
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    let mut content_length: Option<usize> = None;
    let mut accept = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("accept") {
            accept = Some(String::from_utf8_lossy(h.value).into_owned());
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| HttpError::Malformed("invalid Content-Length".into()))?;
            // Anything too long to parse is certainly too large.
            let n = value
                .parse::<usize>()
                .map_err(|_| HttpError::BodyTooLarge)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(n);
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    let available = buf.len() - head_len;
    if available < body_len {
        return Ok(Parsed::Partial);
    }
    Ok(Parsed::Complete(Request {
        method,
        path,
        body: buf[head_len..head_len + body_len].to_vec(),
        accept,
    }))
}

/// The content type of JSON bodies.
pub const JSON: &str = "application/json";

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
    /// The `Allow` header of a 405.
    pub allow: Option<String>,
    /// The `Content-Type` of the body.
    pub content_type: &'static str,
}

impl Response {
    /// A response with a JSON body.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Self {
        let body = serde_json::to_string(value)
            .unwrap_or_else(|e| format!("{{\"error\":\"cannot serialize the response: {e}\"}}"));
        Response {
            status,
            body: Some(body),
            allow: None,
            content_type: JSON,
        }
    }

    /// A response without a body (204).
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            body: None,
            allow: None,
            content_type: JSON,
        }
    }

    /// A 200 response with a text body of type `content_type`.
    pub fn text(content_type: &'static str, body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
            allow: None,
            content_type,
        }
    }

    /// An error response with body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.into() }))
    }

    /// The bytes on the wire (`Connection: close`; one request per connection).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: vsock-vmm\r\nConnection: close\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        let body = self.body.as_deref().unwrap_or("");
        if self.body.is_some() {
            head.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }
}

/// The reason phrase for the status codes this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &[u8]) -> Request {
        match parse_request(raw).unwrap() {
            Parsed::Complete(r) => r,
            Parsed::Partial => panic!("partial"),
        }
    }

    #[test]
    fn parses_get_and_body() {
        let r = complete(b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("GET", "/api/v1/vmm.ping")
        );
        assert!(r.body.is_empty());
        let r = complete(b"PATCH /p HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}\r\nextra");
        assert_eq!(r.body, b"{}\r\n");
    }

    #[test]
    fn partial_until_head_and_body_arrive() {
        assert_eq!(
            parse_request(b"GET /p HTTP/1.1\r\nHo").unwrap(),
            Parsed::Partial
        );
        assert_eq!(
            parse_request(b"PUT /p HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\"").unwrap(),
            Parsed::Partial
        );
        assert_eq!(parse_request(b"").unwrap(), Parsed::Partial);
    }

    #[test]
    fn malformed() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /p HTTP/9.9\r\n\r\n",
            b"GET /p HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"GET /p HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
        ] {
            let err = parse_request(raw).unwrap_err();
            assert_eq!(
                err.status(),
                400,
                "{:?} gave {err:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn oversized() {
        let mut big_head = b"GET /p HTTP/1.1\r\nX-Pad: ".to_vec();
        big_head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(
            parse_request(&big_head).unwrap_err(),
            HttpError::HeadersTooLarge
        );
        big_head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&big_head).unwrap_err().status(), 431);

        let mut many = b"GET /p HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_request(&many).unwrap_err(),
            HttpError::HeadersTooLarge
        );

        let raw = format!(
            "PUT /p HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse_request(raw.as_bytes()).unwrap_err().status(), 413);
        let raw = "PUT /p HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(parse_request(raw.as_bytes()).unwrap_err().status(), 413);
    }

    #[test]
    fn transfer_encoding_is_refused() {
        let raw = b"PATCH /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_request(raw).unwrap_err().status(), 501);
    }

    #[test]
    fn response_bytes() {
        let r = Response::json(200, &serde_json::json!({"version": "1"}));
        let s = String::from_utf8(r.to_bytes()).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Content-Type: application/json\r\n"));
        assert!(s.ends_with("Content-Length: 15\r\n\r\n{\"version\":\"1\"}"));
        let mut r = Response::empty(405);
        r.allow = Some("GET".into());
        let s = String::from_utf8(r.to_bytes()).unwrap();
        assert!(s.contains("Allow: GET\r\n") && s.ends_with("Content-Length: 0\r\n\r\n"));
    }
}
