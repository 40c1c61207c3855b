//! `handshake`: the host-side handshake lines (`CONNECT <port>\n` from a local client of the
//! hybrid socket, `CONNECT <port> FROM <cid> <port>\n` from a program and
//! `RELAY <port> FROM <cid> <port>\n` from a sibling device over the registry socket).
//!
//! Asserted: [`parse_line`] never panics and agrees with an independent reading of the strict
//! grammar (same verdict, same numbers); an accepted line prints back (`Display`) to a canonical
//! line of at most [`MAX_LINE`] bytes that parses to the same value; every proper prefix of an
//! accepted line is a viable prefix (a server never drops a client in the middle of a valid
//! line); and [`find_line`] delimits exactly the first line.

use crate::wire::line::{find_line, is_viable_prefix, parse_line, Line, MAX_LINE};

/// The strict grammar, read a second way: `None` when the line is invalid.
fn oracle(line: &[u8]) -> Option<Line> {
    if line.len() > MAX_LINE {
        return None;
    }
    let body = std::str::from_utf8(line.strip_suffix(b"\n")?).ok()?;
    if body.contains('\n') {
        return None;
    }
    let num = |w: &str| -> Option<u32> {
        if w.is_empty() || !w.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = w.trim_start_matches('0');
        if digits.len() > 10 {
            return None;
        }
        u32::try_from(digits.parse::<u64>().unwrap_or(0)).ok()
    };
    let words: Vec<&str> = body.split(' ').collect();
    match words.as_slice() {
        ["CONNECT", p] => Some(Line::Connect { port: num(p)? }),
        ["CONNECT", p, "FROM", c, s] => Some(Line::ConnectFrom {
            port: num(p)?,
            cid: num(c)?,
            src_port: num(s)?,
        }),
        ["RELAY", p, "FROM", c, s] => Some(Line::Relay {
            port: num(p)?,
            cid: num(c)?,
            src_port: num(s)?,
        }),
        _ => None,
    }
}

/// The fuzz body; see the module documentation of `fuzzing::handshake`.
pub fn handshake(data: &[u8]) {
    assert_eq!(
        find_line(data),
        data.iter().position(|&b| b == b'\n').map(|i| i + 1)
    );
    check(data);
    // The first line alone, as a server delimits it.
    if let Some(n) = find_line(data) {
        if n != data.len() {
            check(&data[..n]);
        }
    }
}

fn check(line: &[u8]) {
    let parsed = parse_line(line);
    assert_eq!(
        parsed.as_ref().ok(),
        oracle(line).as_ref(),
        "parse_line({:?}) = {parsed:?}",
        line.escape_ascii().to_string()
    );
    if let Err(e) = &parsed {
        // Every error prints.
        let _ = e.to_string();
        return;
    }
    let l = parsed.expect("checked");
    let canon = l.to_string();
    assert!(
        canon.len() <= MAX_LINE,
        "canonical line too long: {canon:?}"
    );
    assert!(canon.len() <= line.len());
    assert_eq!(
        parse_line(canon.as_bytes()),
        Ok(l),
        "{canon:?} does not round-trip"
    );
    for k in 0..line.len() {
        assert!(
            is_viable_prefix(&line[..k]),
            "prefix {:?} of a valid line is not viable",
            line[..k].escape_ascii().to_string()
        );
    }
}
