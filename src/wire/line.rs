//! The handshake lines host-side clients send before their bytes flow: pure parsers, fuzzable.
//!
//! Three lines exist, all ASCII and ending with a single `\n`:
//!
//! - the hybrid-vsock line `CONNECT <port>\n` (Firecracker / Cloud Hypervisor), sent by a host
//!   program to the device's Unix socket to reach guest port `<port>`;
//! - the registry line `CONNECT <port> FROM <cid> <port>\n`, sent to a VMM's registry socket by
//!   a program on the machine (`vsock-connect`, as CID 2): a byte stream to our guest's
//!   `<port>`, answered `OK <port>\n` once the guest accepts;
//! - the registry line `RELAY <port> FROM <cid> <port>\n`, sent by a sibling VMM's device: its
//!   guest `<cid>`, port `<port>`, connects to our guest's `<port>`, and from then on the stream
//!   carries that connection's vsock packets both ways, framed (see `csm::relay`).
//!
//! The grammar is strict: `CONNECT`, `RELAY` and `FROM` are upper case; fields are separated by exactly
//! one space; no leading, trailing or doubled spaces, no `\r`; numbers are one or more ASCII
//! decimal digits (leading zeros allowed, no sign) and must fit in a `u32` (CIDs included); the
//! whole line, `\n` included, is at most [`MAX_LINE`] bytes. (Firecracker is laxer: it accepts
//! `connect` in any case and any whitespace; real clients such as `socat` send the strict form.)
//!
//! For the two `CONNECT` lines a reply `OK <port>\n` goes back once the guest accepts; it is
//! written by the device, not here.

use std::fmt;

/// The longest handshake line accepted, its `\n` included.
pub const MAX_LINE: usize = 64;

/// A parsed handshake line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// `CONNECT <port>\n`: a host program connects to guest port `port`.
    Connect {
        /// The guest port.
        port: u32,
    },
    /// `CONNECT <port> FROM <cid> <src_port>\n`: guest `cid` of a sibling VMM, port
    /// `src_port`, connects to our guest's port `port`.
    ConnectFrom {
        /// Our guest's port.
        port: u32,
        /// The sibling guest's CID.
        cid: u32,
        /// The sibling guest's port.
        src_port: u32,
    },
    /// `RELAY <port> FROM <cid> <src_port>\n`: a sibling VMM's device relays the connection of
    /// its guest `cid`, port `src_port`, to our guest's port `port`; framed packets follow.
    Relay {
        /// Our guest's port.
        port: u32,
        /// The sibling guest's CID.
        cid: u32,
        /// The sibling guest's port.
        src_port: u32,
    },
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Connect { port } => writeln!(f, "CONNECT {port}"),
            Line::ConnectFrom {
                port,
                cid,
                src_port,
            } => writeln!(f, "CONNECT {port} FROM {cid} {src_port}"),
            Line::Relay {
                port,
                cid,
                src_port,
            } => writeln!(f, "RELAY {port} FROM {cid} {src_port}"),
        }
    }
}

/// Which number of a line was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// The destination port after `CONNECT`.
    Port,
    /// The source CID after `FROM`.
    SourceCid,
    /// The source port after the CID.
    SourcePort,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Port => "port",
            Field::SourceCid => "source CID",
            Field::SourcePort => "source port",
        })
    }
}

/// Why a handshake line was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The line (or the bytes so far) is longer than [`MAX_LINE`].
    TooLong(usize),
    /// The line does not end with `\n`, or has a `\n` before its end.
    NoNewline,
    /// The line does not start with the word `CONNECT` or `RELAY`.
    NotConnect(String),
    /// Two spaces in a row, or a space at the start or the end.
    ExtraSpace,
    /// The words after `CONNECT <port>` (`RELAY <port>`) are not `FROM <cid> <port>`.
    BadForm(usize),
    /// A number is not plain decimal digits.
    NotDecimal(Field, String),
    /// A number does not fit in a `u32`.
    TooLarge(Field, String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::TooLong(n) => {
                write!(f, "handshake line of {n} bytes is longer than {MAX_LINE}")
            }
            HandshakeError::NoNewline => f.write_str("handshake line does not end with a newline"),
            HandshakeError::NotConnect(w) => {
                write!(
                    f,
                    "handshake line starts with {w:?}, expected \"CONNECT\" or \"RELAY\""
                )
            }
            HandshakeError::ExtraSpace => {
                f.write_str("handshake line has a leading, trailing or doubled space")
            }
            HandshakeError::BadForm(n) => write!(
                f,
                "handshake line has {n} words, expected \"CONNECT <port>\", \
                 \"CONNECT <port> FROM <cid> <port>\" or \"RELAY <port> FROM <cid> <port>\""
            ),
            HandshakeError::NotDecimal(field, v) => {
                write!(f, "handshake {field} {v:?} is not a decimal number")
            }
            HandshakeError::TooLarge(field, v) => {
                write!(f, "handshake {field} {v} does not fit in 32 bits")
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

/// The reply `OK <port>\n` a device writes to a host client once the guest accepted its
/// connection; `port` is the device-side port the guest sees the client on.
pub fn ok_line(port: u32) -> String {
    format!("OK {port}\n")
}

/// The port of a reply line `OK <port>\n` (its `\n` included), read strictly: `OK`, one space,
/// one to ten decimal digits that fit in a `u32`; `None` for anything else.
pub fn parse_ok_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?.strip_suffix(b"\n")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The length of the first line in `buf`, its `\n` included, or `None` if `buf` holds no `\n`.
pub fn find_line(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|i| i + 1)
}

/// Whether `buf` (bytes received so far, no `\n` yet) can still become a valid line, so a
/// server can drop a client that sends garbage without waiting for its timeout.
pub fn is_viable_prefix(buf: &[u8]) -> bool {
    let viable = |head: &[u8]| {
        let n = buf.len().min(head.len());
        buf[..n] == head[..n]
            && buf[n..]
                .iter()
                .all(|b| b.is_ascii_digit() || b" FROM".contains(b))
    };
    buf.len() < MAX_LINE && (viable(b"CONNECT ") || viable(b"RELAY "))
}

fn show(word: &[u8]) -> String {
    word.escape_ascii().to_string()
}

fn number(field: Field, word: &[u8]) -> Result<u32, HandshakeError> {
    if word.is_empty() || !word.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::NotDecimal(field, show(word)));
    }
    let mut v: u32 = 0;
    for &d in word {
        v = v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u32::from(d - b'0')))
            .ok_or_else(|| HandshakeError::TooLarge(field, show(word)))?;
    }
    Ok(v)
}

/// Parses one handshake line, its terminating `\n` included (as delimited by [`find_line`]).
pub fn parse_line(line: &[u8]) -> Result<Line, HandshakeError> {
    if line.len() > MAX_LINE {
        return Err(HandshakeError::TooLong(line.len()));
    }
    let body = match line.split_last() {
        Some((b'\n', body)) if !body.contains(&b'\n') => body,
        _ => return Err(HandshakeError::NoNewline),
    };
    if body.is_empty() {
        return Err(HandshakeError::NotConnect(String::new()));
    }
    let mut words = [&[][..]; 5];
    let mut count = 0;
    for w in body.split(|&b| b == b' ') {
        if w.is_empty() {
            return Err(HandshakeError::ExtraSpace);
        }
        if count < words.len() {
            words[count] = w;
        }
        count += 1;
    }
    let relay = match words[0] {
        b"CONNECT" => false,
        b"RELAY" => true,
        w => return Err(HandshakeError::NotConnect(show(w))),
    };
    match count {
        2 if !relay => Ok(Line::Connect {
            port: number(Field::Port, words[1])?,
        }),
        5 if words[2] == b"FROM" => {
            let port = number(Field::Port, words[1])?;
            let cid = number(Field::SourceCid, words[3])?;
            let src_port = number(Field::SourcePort, words[4])?;
            Ok(if relay {
                Line::Relay {
                    port,
                    cid,
                    src_port,
                }
            } else {
                Line::ConnectFrom {
                    port,
                    cid,
                    src_port,
                }
            })
        }
        n => Err(HandshakeError::BadForm(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HandshakeError as E;

    #[test]
    fn valid_lines() {
        assert_eq!(
            parse_line(b"CONNECT 5000\n"),
            Ok(Line::Connect { port: 5000 })
        );
        assert_eq!(parse_line(b"CONNECT 0\n"), Ok(Line::Connect { port: 0 }));
        assert_eq!(parse_line(b"CONNECT 007\n"), Ok(Line::Connect { port: 7 }));
        assert_eq!(
            parse_line(b"CONNECT 4294967295\n"),
            Ok(Line::Connect { port: u32::MAX })
        );
        assert_eq!(
            parse_line(b"CONNECT 80 FROM 5 1073741824\n"),
            Ok(Line::ConnectFrom {
                port: 80,
                cid: 5,
                src_port: 1 << 30
            })
        );
        assert_eq!(
            parse_line(b"RELAY 80 FROM 5 1024\n"),
            Ok(Line::Relay {
                port: 80,
                cid: 5,
                src_port: 1024
            })
        );
        assert_eq!(
            parse_line(b"CONNECT 4294967295 FROM 4294967295 4294967295\n"),
            Ok(Line::ConnectFrom {
                port: u32::MAX,
                cid: u32::MAX,
                src_port: u32::MAX
            })
        );
    }

    #[test]
    fn display_round_trips() {
        for l in [
            Line::Connect { port: 1 },
            Line::ConnectFrom {
                port: 2,
                cid: 3,
                src_port: 4,
            },
            Line::Relay {
                port: 5,
                cid: 6,
                src_port: 7,
            },
        ] {
            assert_eq!(parse_line(l.to_string().as_bytes()), Ok(l));
        }
    }

    #[test]
    fn invalid_lines() {
        let cases: &[(&[u8], HandshakeError)] = &[
            (b"", E::NoNewline),
            (b"CONNECT 5", E::NoNewline),
            (b"CONNECT 5\n\n", E::NoNewline),
            (b"CONNECT 5\r\n", E::NotDecimal(Field::Port, "5\\r".into())),
            (b"\n", E::NotConnect(String::new())),
            (b"connect 5\n", E::NotConnect("connect".into())),
            (b"\xff\x00\n", E::NotConnect("\\xff\\x00".into())),
            (b"CONNECT\n", E::BadForm(1)),
            (b"CONNECT  5\n", E::ExtraSpace),
            (b" CONNECT 5\n", E::ExtraSpace),
            (b"CONNECT 5 \n", E::ExtraSpace),
            (b"CONNECT\t5\n", E::NotConnect("CONNECT\\t5".into())),
            (b"CONNECT +5\n", E::NotDecimal(Field::Port, "+5".into())),
            (b"CONNECT -5\n", E::NotDecimal(Field::Port, "-5".into())),
            (b"CONNECT 0x10\n", E::NotDecimal(Field::Port, "0x10".into())),
            (
                b"CONNECT 4294967296\n",
                E::TooLarge(Field::Port, "4294967296".into()),
            ),
            (
                b"CONNECT 99999999999999999999\n",
                E::TooLarge(Field::Port, "99999999999999999999".into()),
            ),
            (b"CONNECT 5 6\n", E::BadForm(3)),
            (b"CONNECT 5 FROM 3\n", E::BadForm(4)),
            (b"CONNECT 5 from 3 4\n", E::BadForm(5)),
            (b"CONNECT 5 FROM 3 4 5\n", E::BadForm(6)),
            (
                b"CONNECT 5 FROM x 4\n",
                E::NotDecimal(Field::SourceCid, "x".into()),
            ),
            (
                b"CONNECT 5 FROM 4294967296 4\n",
                E::TooLarge(Field::SourceCid, "4294967296".into()),
            ),
            (
                b"CONNECT 5 FROM 3 +4\n",
                E::NotDecimal(Field::SourcePort, "+4".into()),
            ),
            (b"CONNECT 5 FROM  3 4\n", E::ExtraSpace),
            (b"RELAY 5\n", E::BadForm(2)),
            (b"RELAY\n", E::BadForm(1)),
            (b"relay 5 FROM 3 4\n", E::NotConnect("relay".into())),
            (b"RELAY 5 FROM 3 4 5\n", E::BadForm(6)),
            (
                b"RELAY 5 FROM 3 x\n",
                E::NotDecimal(Field::SourcePort, "x".into()),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_line(line).as_ref(),
                Err(want),
                "{}",
                line.escape_ascii()
            );
        }
        let long = format!("CONNECT {}\n", "0".repeat(MAX_LINE));
        assert_eq!(parse_line(long.as_bytes()), Err(E::TooLong(MAX_LINE + 9)));
        // Exactly MAX_LINE bytes is fine.
        let max = format!("CONNECT {}1\n", "0".repeat(MAX_LINE - 10));
        assert_eq!(max.len(), MAX_LINE);
        assert_eq!(parse_line(max.as_bytes()), Ok(Line::Connect { port: 1 }));
    }

    #[test]
    fn ok_lines_print_and_parse_strictly() {
        assert_eq!(ok_line(1 << 30), "OK 1073741824\n");
        assert_eq!(parse_ok_line(ok_line(7).as_bytes()), Some(7));
        assert_eq!(parse_ok_line(b"OK 4294967295\n"), Some(u32::MAX));
        for bad in [
            &b"OK 4294967296\n"[..],
            b"OK \n",
            b"OK 12",
            b"ok 12\n",
            b"OK  12\n",
            b"OK 12 \n",
            b"OK +1\n",
            b"KO 1\n",
            b"OK 00000000001\n",
        ] {
            assert_eq!(parse_ok_line(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let e = parse_line(b"CONNECT +5\n").unwrap_err().to_string();
        assert_eq!(e, "handshake port \"+5\" is not a decimal number");
        let e = parse_line(b"CONNECT 1 FROM 99999999999 2\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "handshake source CID 99999999999 does not fit in 32 bits"
        );
    }

    #[test]
    fn find_line_and_prefixes() {
        assert_eq!(find_line(b""), None);
        assert_eq!(find_line(b"CONNECT 5"), None);
        assert_eq!(find_line(b"CONNECT 5\nhello"), Some(10));
        assert_eq!(find_line(b"\n"), Some(1));
        assert!(is_viable_prefix(b""));
        assert!(is_viable_prefix(b"CONN"));
        assert!(is_viable_prefix(b"CONNECT 12 FROM 3"));
        assert!(is_viable_prefix(b"REL"));
        assert!(is_viable_prefix(b"RELAY 12 FROM 3 4"));
        assert!(!is_viable_prefix(b"RELAX"));
        assert!(!is_viable_prefix(b"GET / HTTP/1.1"));
        assert!(!is_viable_prefix(b"\x00\xff"));
        assert!(!is_viable_prefix(b"CONNECT 1x"));
        assert!(!is_viable_prefix(&[b'0'; MAX_LINE]));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every short byte string over an alphabet that hits the
        // interesting paths.
        let alphabet: &[u8] = b"CONFRM 09\n\xff";
        let mut buf = Vec::new();
        for len in 0..5u32 {
            for mut i in 0..alphabet.len().pow(len) {
                buf.clear();
                for _ in 0..len {
                    buf.push(alphabet[i % alphabet.len()]);
                    i /= alphabet.len();
                }
                let _ = parse_line(&buf);
                let _ = is_viable_prefix(&buf);
                let _ = find_line(&buf);
            }
        }
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
                let _ = parse_line(&bytes);
                let _ = is_viable_prefix(&bytes);
                if let Some(n) = find_line(&bytes) {
                    prop_assert_eq!(bytes[n - 1], b'\n');
                }
            }

            #[test]
            fn valid_lines_round_trip(port: u32, cid: u32, src_port: u32, from: bool) {
                let line = if from {
                    Line::ConnectFrom { port, cid, src_port }
                } else {
                    Line::Connect { port }
                };
                let text = line.to_string();
                prop_assert!(text.len() <= MAX_LINE);
                prop_assert_eq!(parse_line(text.as_bytes()), Ok(line));
                // Every proper prefix of a valid line is viable.
                for i in 0..text.len() - 1 {
                    prop_assert!(is_viable_prefix(&text.as_bytes()[..i]));
                }
            }
        }
    }
}
