//! The device configuration and its Cloud Hypervisor–style option string:
//! `cid=3,socket=/run/vm3.vsock,fallback=1,uplink=unix:/tmp/p,registry=/run/vsock,listen=9000+9001`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::backend::uplink::UplinkSpec;
use crate::device::vsock::DEFAULT_MAX_CONNECTIONS;

/// Default receive buffer per connection (what we advertise as `buf_alloc`).
pub const DEFAULT_BUFFER_SIZE: u32 = 256 * 1024;

/// Default time a client of the hybrid socket or of the CID registry has to send its
/// `CONNECT` line (`handshake_timeout_ms`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = crate::backend::accept::DEFAULT_HANDSHAKE_TIMEOUT;

/// Bounds of `handshake_timeout_ms`, in milliseconds.
pub const HANDSHAKE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 10..=600_000;

/// Everything needed to build a vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 ..= u32::MAX - 1).
    pub cid: u64,
    /// The hybrid-vsock Unix socket: host clients connect here, guest connects to CID 2 port P
    /// go to `<socket>_P`.
    pub socket: PathBuf,
    /// `g2h_fallback`: CIDs nobody on this machine owns go to the uplink (default on).
    pub g2h_fallback: bool,
    /// The G2H uplink (default: `/dev/vsock` when it exists, else none).
    pub uplink: UplinkSpec,
    /// The CID registry directory shared with sibling VMMs.
    pub registry: Option<PathBuf>,
    /// Ports on which connections from the parent are accepted into the guest.
    pub listen: Vec<u32>,
    /// Live connections allowed.
    pub max_connections: usize,
    /// Receive buffer per connection.
    pub buffer_size: u32,
    /// How long a client of the hybrid socket or of the CID registry may take to send its
    /// `CONNECT` line before it is dropped (option `handshake_timeout_ms`, 10 ms to 10 min).
    pub handshake_timeout: Duration,
}

/// A bad option string. Every variant names the key and value at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A key this option does not know.
    UnknownKey(String),
    /// A key given twice.
    DuplicateKey(String),
    /// A `key` without `=value`, or an empty value.
    MissingValue(String),
    /// A required key is absent.
    Missing(&'static str),
    /// A key's value is wrong; the message says why.
    Invalid {
        /// The key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What was expected.
        why: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey(k) => write!(
                f,
                "unknown key `{k}` (known: cid, socket, fallback, uplink, registry, listen, \
                 max_connections, buffer_size, handshake_timeout_ms)"
            ),
            ConfigError::DuplicateKey(k) => write!(f, "key `{k}` given twice"),
            ConfigError::MissingValue(k) => write!(f, "key `{k}` needs a value (`{k}=...`)"),
            ConfigError::Missing(k) => write!(f, "missing required key `{k}`"),
            ConfigError::Invalid { key, value, why } => {
                write!(f, "invalid {key}=`{value}`: {why}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: &'static str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        why: why.into(),
    }
}

/// Parses a guest CID: a decimal number other than 0, 1, 2 (reserved) and below u32::MAX.
pub fn parse_cid(key: &'static str, v: &str) -> Result<u64, ConfigError> {
    let cid: u64 = decimal(v).ok_or_else(|| invalid(key, v, "not a decimal number"))?;
    if cid <= 2 {
        return Err(invalid(
            key,
            v,
            "CIDs 0, 1 and 2 are reserved (hypervisor, local, host)",
        ));
    }
    if cid >= u64::from(u32::MAX) {
        return Err(invalid(key, v, "CIDs are 32-bit and u32::MAX means any"));
    }
    Ok(cid)
}

/// A plain decimal number: digits only (no sign, no spaces), as the other parsers of the project.
fn decimal<T: FromStr>(v: &str) -> Option<T> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Parses a boolean switch: 0/1, on/off, true/false.
pub fn parse_switch(key: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "1" | "on" | "true" => Ok(true),
        "0" | "off" | "false" => Ok(false),
        _ => Err(invalid(key, v, "expected 0, 1, on, off, true or false")),
    }
}

fn parse_listen(v: &str) -> Result<Vec<u32>, ConfigError> {
    let mut ports = Vec::new();
    for p in v.split('+') {
        let port: u32 = decimal(p)
            .ok_or_else(|| invalid("listen", v, format!("`{p}` is not a port number")))?;
        if port == u32::MAX {
            return Err(invalid("listen", v, "port u32::MAX means any"));
        }
        if ports.contains(&port) {
            return Err(invalid("listen", v, format!("port {port} given twice")));
        }
        ports.push(port);
    }
    Ok(ports)
}

impl VsockConfig {
    /// A configuration with the defaults for everything but `cid` and `socket`.
    pub fn new(cid: u64, socket: impl Into<PathBuf>) -> Self {
        VsockConfig {
            cid,
            socket: socket.into(),
            g2h_fallback: true,
            uplink: default_uplink(),
            registry: None,
            listen: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            buffer_size: DEFAULT_BUFFER_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

fn default_uplink() -> UplinkSpec {
    if Path::new("/dev/vsock").exists() {
        UplinkSpec::Vsock(PathBuf::from("/dev/vsock"))
    } else {
        UplinkSpec::None
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut seen: Vec<&str> = Vec::new();
        let mut cid = None;
        let mut socket = None;
        let mut cfg = VsockConfig::new(0, "");
        let mut uplink = None;
        let mut listen_raw = "";
        for item in s.split(',') {
            if item.is_empty() {
                continue;
            }
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::MissingValue(item.to_string()))?;
            if v.is_empty() {
                return Err(ConfigError::MissingValue(k.to_string()));
            }
            if seen.contains(&k) {
                return Err(ConfigError::DuplicateKey(k.to_string()));
            }
            seen.push(k);
            match k {
                "cid" => cid = Some(parse_cid("cid", v)?),
                "socket" => socket = Some(PathBuf::from(v)),
                "fallback" => cfg.g2h_fallback = parse_switch("fallback", v)?,
                "uplink" => {
                    uplink = Some(
                        v.parse::<UplinkSpec>()
                            .map_err(|e| invalid("uplink", v, e.to_string()))?,
                    )
                }
                "registry" => cfg.registry = Some(PathBuf::from(v)),
                "listen" => {
                    cfg.listen = parse_listen(v)?;
                    listen_raw = v;
                }
                "max_connections" => {
                    cfg.max_connections = decimal(v)
                        .filter(|&n: &usize| (1..=65_536).contains(&n))
                        .ok_or_else(|| invalid("max_connections", v, "expected 1 to 65536"))?
                }
                "buffer_size" => {
                    cfg.buffer_size = decimal(v)
                        .filter(|&n: &u32| (4096..=(16 << 20)).contains(&n))
                        .ok_or_else(|| {
                            invalid("buffer_size", v, "expected 4096 to 16777216 bytes")
                        })?
                }
                "handshake_timeout_ms" => {
                    let ms = decimal(v)
                        .filter(|n: &u64| HANDSHAKE_TIMEOUT_MS.contains(n))
                        .ok_or_else(|| {
                            invalid(
                                "handshake_timeout_ms",
                                v,
                                "expected 10 to 600000 milliseconds",
                            )
                        })?;
                    cfg.handshake_timeout = Duration::from_millis(ms);
                }
                _ => return Err(ConfigError::UnknownKey(k.to_string())),
            }
        }
        cfg.cid = cid.ok_or(ConfigError::Missing("cid"))?;
        cfg.socket = socket.ok_or(ConfigError::Missing("socket"))?;
        if let Some(u) = uplink {
            cfg.uplink = u;
        }
        if !cfg.listen.is_empty() && cfg.uplink == UplinkSpec::None {
            return Err(invalid(
                "listen",
                listen_raw,
                "needs an uplink to listen on",
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        s.parse::<VsockConfig>().unwrap_err().to_string()
    }

    #[test]
    fn full_option_string() {
        let c: VsockConfig = "cid=3,socket=/run/vm3.vsock,fallback=1,uplink=unix:/tmp/p,\
                              registry=/run/vsock,listen=9000+9001"
            .parse()
            .unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.socket, PathBuf::from("/run/vm3.vsock"));
        assert!(c.g2h_fallback);
        assert_eq!(c.uplink, UplinkSpec::Unix(PathBuf::from("/tmp/p")));
        assert_eq!(c.registry, Some(PathBuf::from("/run/vsock")));
        assert_eq!(c.listen, vec![9000, 9001]);
        assert_eq!(c.max_connections, 1023);
    }

    #[test]
    fn defaults() {
        let c: VsockConfig = "cid=7,socket=/s,uplink=none".parse().unwrap();
        assert!(c.g2h_fallback, "fallback defaults to on, like the sysctl");
        assert!(c.listen.is_empty());
        assert_eq!(c.registry, None);
        assert_eq!(c.buffer_size, DEFAULT_BUFFER_SIZE);
        assert_eq!(c.handshake_timeout, Duration::from_secs(5));
    }

    #[test]
    fn handshake_timeout_in_milliseconds() {
        for (v, ms) in [
            ("10", 10),
            ("250", 250),
            ("5000", 5000),
            ("600000", 600_000),
        ] {
            let c: VsockConfig = format!("cid=3,socket=/s,uplink=none,handshake_timeout_ms={v}")
                .parse()
                .unwrap();
            assert_eq!(c.handshake_timeout, Duration::from_millis(ms), "{v}");
        }
        for v in [
            "0",
            "9",
            "600001",
            "+100",
            "1s",
            "-5",
            "99999999999999999999999",
        ] {
            let got = err(&format!("cid=3,socket=/s,handshake_timeout_ms={v}"));
            assert!(
                got.contains(&format!("invalid handshake_timeout_ms=`{v}`"))
                    && got.contains("10 to 600000 milliseconds"),
                "{v}: {got}"
            );
        }
    }

    #[test]
    fn fallback_spellings() {
        for (v, want) in [
            ("0", false),
            ("off", false),
            ("false", false),
            ("1", true),
            ("on", true),
            ("true", true),
        ] {
            let c: VsockConfig = format!("cid=3,socket=/s,uplink=none,fallback={v}")
                .parse()
                .unwrap();
            assert_eq!(c.g2h_fallback, want, "{v}");
        }
    }

    #[test]
    fn every_error_names_key_and_value() {
        let cases = [
            ("cid=3,socket=/s,colour=red", "unknown key `colour`"),
            ("cid=3,cid=4,socket=/s", "key `cid` given twice"),
            ("socket=/s", "missing required key `cid`"),
            ("cid=3", "missing required key `socket`"),
            ("cid=0,socket=/s", "invalid cid=`0`"),
            ("cid=1,socket=/s", "invalid cid=`1`"),
            (
                "cid=2,socket=/s",
                "invalid cid=`2`: CIDs 0, 1 and 2 are reserved",
            ),
            ("cid=4294967295,socket=/s", "invalid cid=`4294967295`"),
            ("cid=99999999999,socket=/s", "invalid cid=`99999999999`"),
            (
                "cid=three,socket=/s",
                "invalid cid=`three`: not a decimal number",
            ),
            ("cid=-3,socket=/s", "invalid cid=`-3`"),
            ("cid=+3,socket=/s", "invalid cid=`+3`"),
            (
                "cid=3,socket=/s,max_connections=+5",
                "invalid max_connections=`+5`",
            ),
            (
                "cid=3,socket=/s,uplink=none,listen=+9",
                "invalid listen=`+9`",
            ),
            ("cid=3,socket=/s,fallback=2", "invalid fallback=`2`"),
            ("cid=3,socket=/s,fallback=yes", "invalid fallback=`yes`"),
            (
                "cid=3,socket=/s,uplink=tcp:1.2.3.4",
                "invalid uplink=`tcp:1.2.3.4`",
            ),
            (
                "cid=3,socket=/s,uplink=none,listen=9000+x",
                "invalid listen=`9000+x`",
            ),
            (
                "cid=3,socket=/s,uplink=none,listen=1+1",
                "port 1 given twice",
            ),
            ("cid=3,socket=/s,uplink=none,listen=9000", "needs an uplink"),
            (
                "cid=3,socket=/s,max_connections=0",
                "invalid max_connections=`0`",
            ),
            ("cid=3,socket=/s,buffer_size=12", "invalid buffer_size=`12`"),
            ("cid=3,socket", "key `socket` needs a value"),
            ("cid=3,socket=", "key `socket` needs a value"),
        ];
        for (input, want) in cases {
            let got = err(input);
            assert!(got.contains(want), "{input}: got `{got}`, want `{want}`");
        }
    }
}
