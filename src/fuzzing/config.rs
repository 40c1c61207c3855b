//! `config`: the device option string (`cid=3,socket=/run/vm3.vsock,fallback=1,...`) as an
//! operator, a script or a management plane passes it to the VMM.
//!
//! Asserted: [`VsockConfig::from_str`] never panics; it refuses every string with an empty item, an unknown,
//! duplicate or valueless key or without `cid` and `socket`; an accepted configuration is within
//! the documented bounds (CID 3 ..= u32::MAX − 1, unique listen ports below u32::MAX and only with
//! an uplink, 1 ..= 65536 connections, 4 KiB ..= 16 MiB buffers, handshake, request and
//! connect timeouts of 10 ms ..= 10 min in whole milliseconds) and prints back to an option
//! string that parses to the same value; numbers are plain decimal digits (no sign); every error
//! prints and names its key.

use std::str::FromStr;

use crate::config::{ConfigError, VsockConfig, KEYS};

/// Whether the string is well formed as key=value items: no empty item, known keys, each once,
/// each with a value, `cid` and `socket` present. Values are not checked.
fn well_formed(s: &str) -> bool {
    let mut seen: Vec<&str> = Vec::new();
    for item in s.split(',') {
        let Some((k, v)) = item.split_once('=') else {
            return false;
        };
        if v.is_empty() || !KEYS.contains(&k) || seen.contains(&k) {
            return false;
        }
        seen.push(k);
    }
    seen.contains(&"cid") && seen.contains(&"socket")
}

/// Whether every number of the string is plain decimal digits (no sign, no space).
fn plain_numbers(s: &str) -> bool {
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    s.split(',')
        .filter_map(|i| i.split_once('='))
        .all(|(k, v)| match k {
            "cid"
            | "max_connections"
            | "buffer_size"
            | "handshake_timeout_ms"
            | "request_timeout_ms"
            | "connect_timeout_ms" => digits(v),
            "listen" => v.split('+').all(digits),
            _ => true,
        })
}

/// The option string of a configuration, every key spelled out.
fn to_option_string(c: &VsockConfig) -> String {
    let mut s = format!(
        "cid={},socket={},fallback={},uplink={},max_connections={},buffer_size={},\
         handshake_timeout_ms={},request_timeout_ms={},connect_timeout_ms={}",
        c.cid,
        c.socket.display(),
        u8::from(c.g2h_fallback),
        c.uplink,
        c.max_connections,
        c.buffer_size,
        c.handshake_timeout.as_millis(),
        c.request_timeout.as_millis(),
        c.connect_timeout.as_millis()
    );
    if let Some(r) = &c.registry {
        s.push_str(&format!(",registry={}", r.display()));
    }
    if let Some(m) = c.ns_mode {
        s.push_str(&format!(",ns_mode={m}"));
    }
    if !c.listen.is_empty() {
        let ports: Vec<String> = c.listen.iter().map(u32::to_string).collect();
        s.push_str(&format!(",listen={}", ports.join("+")));
    }
    if !c.busy_poll.is_zero() {
        s.push_str(&format!(",busy_poll_us={}", c.busy_poll.as_micros()));
    }
    s
}

/// The fuzz body; see the module documentation of `fuzzing::config`.
pub fn config(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let parsed = VsockConfig::from_str(&s);
    let c = match parsed {
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            if let ConfigError::Invalid { key, .. } = &e {
                assert!(
                    KEYS.contains(&key.as_str()),
                    "invalid value of unknown key {key}"
                );
                assert!(msg.contains(key), "{msg:?} does not name {key}");
            }
            return;
        }
        Ok(c) => c,
    };
    assert!(well_formed(&s), "accepted a malformed option string {s:?}");
    assert!(
        plain_numbers(&s),
        "accepted a number that is not plain digits: {s:?}"
    );
    assert!((3..u64::from(u32::MAX)).contains(&c.cid), "cid {}", c.cid);
    assert!(!c.socket.as_os_str().is_empty(), "empty socket path");
    assert!((1..=65_536).contains(&c.max_connections));
    assert!((4096..=16 << 20).contains(&c.buffer_size));
    for (what, t) in [
        ("handshake", c.handshake_timeout),
        ("request", c.request_timeout),
        ("connect", c.connect_timeout),
    ] {
        let ms = t.as_millis();
        assert!(
            (10..=600_000).contains(&ms) && t.subsec_nanos() % 1_000_000 == 0,
            "{what} timeout {t:?}"
        );
    }
    for (i, p) in c.listen.iter().enumerate() {
        assert_ne!(*p, u32::MAX, "listen on the any-port");
        assert!(!c.listen[..i].contains(p), "listen port {p} twice");
    }
    if !c.listen.is_empty() {
        assert_ne!(
            c.uplink,
            crate::backend::uplink::UplinkSpec::None,
            "listen without uplink"
        );
    }
    let canon = to_option_string(&c);
    assert_eq!(
        VsockConfig::from_str(&canon).as_ref(),
        Ok(&c),
        "{s:?} does not round-trip through {canon:?}"
    );
}
