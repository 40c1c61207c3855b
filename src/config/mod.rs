//! The device configuration and its Cloud Hypervisor–style option string:
//! `cid=3,socket=/run/vm3.vsock,fallback=1,uplink=unix:/tmp/p,registry=/run/vsock,listen=9000+9001`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub mod options;

use self::options::decimal;
pub use self::options::{parse_switch, OptionError, OptionParser};
use crate::backend::namespace::NsMode;
use crate::backend::uplink::UplinkSpec;
use crate::device::vsock::DEFAULT_MAX_CONNECTIONS;
use crate::wire::Cid;

/// Default receive buffer per connection (what we advertise as `buf_alloc`).
pub const DEFAULT_BUFFER_SIZE: u32 = 256 * 1024;

/// Default time a client of the hybrid socket or of the CID registry has to send its
/// `CONNECT` line (`handshake_timeout_ms`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = crate::backend::accept::DEFAULT_HANDSHAKE_TIMEOUT;

/// Bounds of `handshake_timeout_ms`, in milliseconds.
pub const HANDSHAKE_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 10..=600_000;

/// Default time the guest has to answer a host-initiated REQUEST (`request_timeout_ms`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = crate::csm::connection::DEFAULT_REQUEST_TIMEOUT;

/// Default time a host-side connect (or a sibling's answer) may take (`connect_timeout_ms`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = crate::csm::connection::DEFAULT_CONNECT_TIMEOUT;

/// Bounds of `request_timeout_ms` and `connect_timeout_ms`, in milliseconds.
pub const CONN_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 10..=600_000;

/// Most time the device thread may poll before it sleeps (`busy_poll_us`), in microseconds.
pub const BUSY_POLL_US: std::ops::RangeInclusive<u64> = 0..=10_000;

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
    /// The CID namespace mode asked for (`ns_mode`): `None` takes the registry's (`global`
    /// without a registry or for a new one). `local` means no uplink at all.
    pub ns_mode: Option<NsMode>,
    /// Ports on which connections from the parent are accepted into the guest.
    pub listen: Vec<u32>,
    /// Live connections allowed.
    pub max_connections: usize,
    /// Receive buffer per connection.
    pub buffer_size: u32,
    /// How long a client of the hybrid socket or of the CID registry may take to send its
    /// `CONNECT` line before it is dropped (option `handshake_timeout_ms`, 10 ms to 10 min).
    pub handshake_timeout: Duration,
    /// How long the guest may take to answer a host-initiated REQUEST before the connection is
    /// reset (option `request_timeout_ms`, 10 ms to 10 min, default 2 s).
    pub request_timeout: Duration,
    /// How long a host-side connect for a guest REQUEST may take, a sibling's answer included,
    /// before the guest gets an RST (option `connect_timeout_ms`, 10 ms to 10 min, default 2 s).
    pub connect_timeout: Duration,
    /// How long the device thread polls for work without sleeping before it waits (option
    /// `busy_poll_us`, 0 to 10 ms; default 0, off): lower latency for a CPU of its own.
    pub busy_poll: Duration,
}

/// A bad option string: the shared parser's error, which names the key and value at fault.
pub type ConfigError = OptionError;

/// The keys of `--vsock`.
pub const KEYS: &[&str] = &[
    "cid",
    "socket",
    "fallback",
    "uplink",
    "registry",
    "ns_mode",
    "listen",
    "max_connections",
    "buffer_size",
    "handshake_timeout_ms",
    "request_timeout_ms",
    "connect_timeout_ms",
    "busy_poll_us",
];

/// Parses a guest CID: a decimal number other than 0, 1, 2 (reserved) and below u32::MAX.
pub fn parse_cid(v: &str) -> Result<u64, String> {
    let cid: u64 = decimal(v)?;
    if Cid(cid) <= Cid::HOST {
        return Err("CIDs 0, 1 and 2 are reserved (hypervisor, local, host)".to_string());
    }
    if !Cid(cid).is_guest() {
        return Err("CIDs are 32-bit and u32::MAX means any".to_string());
    }
    Ok(cid)
}

/// A number within `range`, or why not.
fn in_range<T: FromStr + PartialOrd + fmt::Display>(
    v: &str,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<T, String> {
    let why = || format!("expected {} to {}{unit}", range.start(), range.end());
    let n: T = decimal(v).map_err(|_| why())?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(why())
    }
}

/// Parses a duration option given in whole milliseconds within `range`.
fn millis(range: std::ops::RangeInclusive<u64>) -> impl Fn(&str) -> Result<Duration, String> {
    move |v| in_range(v, range.clone(), " milliseconds").map(Duration::from_millis)
}

fn parse_listen(v: &str) -> Result<Vec<u32>, String> {
    let mut ports = Vec::new();
    for p in v.split('+') {
        let port: u32 = decimal(p).map_err(|_| format!("`{p}` is not a port number"))?;
        if port == u32::MAX {
            return Err("port u32::MAX means any".to_string());
        }
        if ports.contains(&port) {
            return Err(format!("port {port} given twice"));
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
            ns_mode: None,
            listen: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            buffer_size: DEFAULT_BUFFER_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            busy_poll: Duration::ZERO,
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
        let p = OptionParser::new("vsock", KEYS, &[]).parse(s)?;
        let mut cfg = VsockConfig::new(p.required("cid", parse_cid)?, "");
        cfg.socket = p.required("socket", |v| Ok(PathBuf::from(v)))?;
        if let Some(f) = p.convert("fallback", parse_switch)? {
            cfg.g2h_fallback = f;
        }
        if let Some(u) = p.convert("uplink", |v| {
            v.parse::<UplinkSpec>().map_err(|e| e.to_string())
        })? {
            cfg.uplink = u;
        }
        cfg.registry = p.convert("registry", |v| Ok(PathBuf::from(v)))?;
        cfg.ns_mode = p.convert("ns_mode", |v| v.parse::<NsMode>())?;
        cfg.listen = p.convert("listen", parse_listen)?.unwrap_or_default();
        if let Some(n) = p.convert("max_connections", |v| in_range(v, 1..=65_536, ""))? {
            cfg.max_connections = n;
        }
        if let Some(n) = p.convert("buffer_size", |v| in_range(v, 4096..=(16 << 20), " bytes"))? {
            cfg.buffer_size = n;
        }
        let timeouts = [
            (
                "handshake_timeout_ms",
                HANDSHAKE_TIMEOUT_MS,
                &mut cfg.handshake_timeout,
            ),
            (
                "request_timeout_ms",
                CONN_TIMEOUT_MS,
                &mut cfg.request_timeout,
            ),
            (
                "connect_timeout_ms",
                CONN_TIMEOUT_MS,
                &mut cfg.connect_timeout,
            ),
        ];
        for (key, range, slot) in timeouts {
            if let Some(t) = p.convert(key, millis(range))? {
                *slot = t;
            }
        }
        if let Some(us) = p.convert("busy_poll_us", |v| {
            in_range(v, BUSY_POLL_US, " microseconds")
        })? {
            cfg.busy_poll = Duration::from_micros(us);
        }
        if !cfg.listen.is_empty() && cfg.uplink == UplinkSpec::None {
            return Err(p.invalid(
                "listen",
                p.get("listen").unwrap_or_default(),
                "needs an uplink to listen on",
            ));
        }
        if !cfg.listen.is_empty() && cfg.ns_mode == Some(NsMode::Local) {
            return Err(p.invalid(
                "listen",
                p.get("listen").unwrap_or_default(),
                "listens on the uplink, which a local CID namespace (ns_mode=local) cannot use",
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
        assert_eq!(c.ns_mode, None);
        for (v, want) in [("global", NsMode::Global), ("local", NsMode::Local)] {
            let c: VsockConfig = format!("cid=3,socket=/s,registry=/r,ns_mode={v}")
                .parse()
                .unwrap();
            assert_eq!(c.ns_mode, Some(want));
        }
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
    fn busy_poll_in_microseconds() {
        let c: VsockConfig = "cid=3,socket=/s,uplink=none".parse().unwrap();
        assert_eq!(c.busy_poll, Duration::ZERO, "off by default");
        for (v, us) in [("0", 0), ("50", 50), ("10000", 10_000)] {
            let c: VsockConfig = format!("cid=3,socket=/s,uplink=none,busy_poll_us={v}")
                .parse()
                .unwrap();
            assert_eq!(c.busy_poll, Duration::from_micros(us), "{v}");
        }
        for v in ["10001", "-1", "1ms", ""] {
            let got = err(&format!("cid=3,socket=/s,uplink=none,busy_poll_us={v}"));
            assert!(got.contains("busy_poll_us"), "{v}: {got}");
        }
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
    fn request_and_connect_timeouts_in_milliseconds() {
        let c: VsockConfig = "cid=3,socket=/s,uplink=none".parse().unwrap();
        assert_eq!(
            c.request_timeout,
            Duration::from_secs(2),
            "kernel/Firecracker default"
        );
        assert_eq!(
            c.connect_timeout,
            Duration::from_secs(2),
            "kernel/Firecracker default"
        );
        let c: VsockConfig =
            "cid=3,socket=/s,uplink=none,request_timeout_ms=30000,connect_timeout_ms=10"
                .parse()
                .unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_millis(10));
        for key in ["request_timeout_ms", "connect_timeout_ms"] {
            for v in ["0", "9", "600001", "2s", "-1", "+5"] {
                let got = err(&format!("cid=3,socket=/s,{key}={v}"));
                assert!(
                    got.contains(&format!("invalid {key}=`{v}`"))
                        && got.contains("10 to 600000 milliseconds"),
                    "{key}={v}: {got}"
                );
            }
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
                "cid=3,socket=/s,ns_mode=Local",
                "invalid ns_mode=`Local`: `Local` is not a namespace mode (global or local)",
            ),
            (
                "cid=3,socket=/s,uplink=unix:/u,ns_mode=local,listen=9000",
                "a local CID namespace (ns_mode=local) cannot use",
            ),
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
