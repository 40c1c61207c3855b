//! The command line: `vsock-vmm [options]` to run a VM, `vsock-vmm remote ...` to talk to one.
//!
//! Parsing never touches KVM or the file system, so every bad option is reported (exit status 2)
//! before anything is created. Option groups use the library's shared
//! [`vsock_router::config::options::OptionParser`].

use std::path::PathBuf;

use vsock_router::config::options::{parse_size, parse_u32, OptionError, OptionParser};

use crate::vm::layout;

pub mod restore;

/// Exit status for command-line errors.
pub const USAGE_EXIT_CODE: i32 = 2;

/// The default guest command line; `--cmdline` is appended to it. `reboot=k` (as Firecracker's):
/// the guest reboots through the i8042 reset, so a triple fault is a crash, logged as one.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// The help text printed by `--help`.
pub const HELP: &str = "\
vsock-vmm: a small rust-vmm VMM with the vsock-router virtio-vsock device

USAGE:
    vsock-vmm --kernel PATH [OPTIONS]
    vsock-vmm --restore DIR [--vsock ...] [--memory size=SIZE] [--serial ...] [--api-socket PATH]
    vsock-vmm remote --api-socket PATH <ping|info|fallback on|off|connections|metrics|shutdown|
                                        pause|resume|snapshot DIR>

OPTIONS:
    --kernel PATH          Guest kernel: ELF vmlinux (booted through its PVH entry when it has
                           one, else its 64-bit entry) or bzImage (64-bit boot protocol).
                           Example: --kernel /var/lib/vsock/vmlinux
    --initramfs PATH       Initramfs loaded at the top of guest RAM.
                           Example: --initramfs /var/lib/vsock/initramfs.cpio.gz
    --cmdline STR          Appended to the default command line
                           \"console=ttyS0 reboot=k panic=1 pci=off\".
                           Example: --cmdline \"quiet tsc_early_khz=2300000\"
    --cpus boot=N          Number of vCPUs, 1 to 32 (default 1).
                           Example: --cpus boot=2
    --memory size=SIZE     Guest RAM with K/M/G suffix, 16M to 3G, a multiple of 4K
                           (default 256M). Example: --memory size=512M
    --serial tty|file=PATH|off
                           Where the guest's ttyS0 output goes (default tty = stdout).
                           Example: --serial file=/tmp/guest.log
    --vsock STR            The virtio-vsock device, parsed by vsock-router's VsockConfig:
                           cid=N,socket=PATH[,fallback=1][,uplink=...][,registry=DIR][,listen=...]
                             cid      guest CID, 3 to 4294967294
                             socket   hybrid socket: host clients send CONNECT <port>; guest
                                      connects to CID 2 port P reach PATH_P
                             fallback 1|0 (on|off): unowned CIDs go to the uplink (default 1)
                             uplink   none | /dev/vsock | unix:DIR (test stand-in: DIR/<cid>_<port>)
                                      (default /dev/vsock when it exists, else none)
                             registry DIR shared by sibling VMMs (CID ownership)
                             listen   P1+P2: parent connections to these ports open into the guest
                             max_connections (default 1023), buffer_size (default 262144)
                             handshake_timeout_ms  time a client of socket/registry has to
                                      send its CONNECT line, 10 to 600000 (default 5000)
                             request_timeout_ms  time the guest has to answer a host-initiated
                                      connection, 10 to 600000 (default 2000)
                             connect_timeout_ms  time a host-side connect (a sibling's answer
                                      included) may take, 10 to 600000 (default 2000)
                             busy_poll_us  the device thread polls this long before it sleeps,
                                      0 to 10000 (default 0, off; costs a CPU while it polls)
                           Example: --vsock cid=3,socket=/tmp/vm3.vsock,uplink=unix:/tmp/up,fallback=0
    --api-socket PATH      Serve the REST API (HTTP/1.1, JSON) on this Unix socket (mode 0600).
                           Example: --api-socket /tmp/vm3.api
    --log-level LEVEL      error|warn|info|debug|trace (default warn); logs go to stderr.
                           Example: --log-level info
    --log-format FORMAT    text|json (default text): json writes one object per line, with
                           the time and the fields of each record (a connection's path,
                           bytes, duration, ...).
                           Example: --log-format json
    --restore DIR          Resume the VM saved in DIR by PUT /api/v1/vm.snapshot (guest RAM,
                           vCPUs, irqchip, PIT, clock, serial, vsock device): the guest
                           continues where it was paused; its vsock connections are reset
                           (TRANSPORT_RESET), its listeners stay. Refused with --kernel,
                           --initramfs, --cmdline, --cpus (they are in the snapshot); --memory,
                           if given, must match the snapshot's. --vsock, if given, replaces the
                           saved vsock configuration: a clone with another CID and socket runs
                           beside the original (the guest reads its new CID).
                           Example: --restore /var/lib/vsock/snap1 --vsock cid=7,socket=/run/c7.vsock
    -h, --help             Print this help.
    -V, --version          Print the version.

REMOTE:
    vsock-vmm remote --api-socket PATH ping            GET /api/v1/vmm.ping
    vsock-vmm remote --api-socket PATH info            GET /api/v1/vsock
    vsock-vmm remote --api-socket PATH fallback on     PATCH /api/v1/vsock {\"g2h_fallback\": true}
    vsock-vmm remote --api-socket PATH connections     GET /api/v1/vsock/connections
    vsock-vmm remote --api-socket PATH metrics         GET /metrics (Prometheus text)
    vsock-vmm remote --api-socket PATH shutdown        PUT /api/v1/vm.shutdown
    vsock-vmm remote --api-socket PATH pause           PUT /api/v1/vm.pause
    vsock-vmm remote --api-socket PATH resume          PUT /api/v1/vm.resume
    vsock-vmm remote --api-socket PATH snapshot DIR    PUT /api/v1/vm.snapshot {\"destination\": DIR}
                                                       (DIR made absolute; the VM must be paused)

The guest may write a byte V to I/O port 0xf4 to make the VMM exit with status V (debug exit).
Guest reboot (i8042 reset, triple fault) and shutdown end the VMM with status 0; a triple
fault is logged with the vCPU state (a crash, unless the guest was booted with reboot=t).
";

/// Why the command line was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// An option group (`--cpus`, `--memory`, `--serial`) was wrong.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// An argument that is not an option.
    #[error("unknown argument `{0}` (see --help)")]
    UnknownArgument(String),
    /// An option given as the last argument without its value.
    #[error("{0}: missing value")]
    MissingValue(String),
    /// An option given twice.
    #[error("{0}: given more than once")]
    Duplicate(String),
    /// A required option is missing.
    #[error("{0} is required")]
    Required(&'static str),
    /// A plain option value (not a key=value group) was wrong.
    #[error("{option}: invalid value `{value}`: {reason}")]
    InvalidValue {
        /// The option, with dashes.
        option: String,
        /// The value given.
        value: String,
        /// What was wrong.
        reason: String,
    },
}

/// Where the guest serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdout.
    Tty,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// Everything needed to run a VM, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initramfs: Option<PathBuf>,
    /// The full guest command line (default plus `--cmdline`), without the virtio-mmio device.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// The serial console's destination.
    pub serial: SerialMode,
    /// The raw `--vsock` value, parsed by [`crate::vsock::build_vsock`].
    pub vsock: Option<String>,
    /// The API socket path.
    pub api_socket: Option<PathBuf>,
    /// The log level.
    pub log_level: log::LevelFilter,
    /// `--log-format`.
    pub log_format: crate::logger::LogFormat,
}

/// A request of `vsock-vmm remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteRequest {
    /// `GET /api/v1/vmm.ping`.
    Ping,
    /// `GET /api/v1/vsock`.
    Info,
    /// `PATCH /api/v1/vsock` with `g2h_fallback`.
    Fallback(bool),
    /// `GET /api/v1/vsock/connections`.
    Connections,
    /// `GET /metrics`.
    Metrics,
    /// `PUT /api/v1/vm.shutdown`.
    Shutdown,
    /// `PUT /api/v1/vm.pause`.
    Pause,
    /// `PUT /api/v1/vm.resume`.
    Resume,
    /// `PUT /api/v1/vm.snapshot` into this (absolute) directory.
    Snapshot(PathBuf),
}

/// `vsock-vmm remote` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteArgs {
    /// The API socket of the running VMM.
    pub api_socket: PathBuf,
    /// What to ask.
    pub request: RemoteRequest,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run a VM.
    Run(Box<VmConfig>),
    /// Restore a VM from a snapshot and run it.
    Restore(Box<restore::RestoreConfig>),
    /// Talk to a running VMM.
    Remote(RemoteArgs),
    /// Print the help.
    Help,
    /// Print the version.
    Version,
}

/// Maximum number of vCPUs (the MP table and the IOAPIC ID leave room for more; 32 keeps the
/// boot-time tables small).
pub const MAX_CPUS: u32 = 32;
/// Minimum guest RAM.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// Parses the arguments after the program name.
pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Command, CliError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    if args.first() == Some(&"remote") {
        return parse_remote(&args[1..]).map(Command::Remote);
    }
    let mut kernel = None;
    let mut initramfs = None;
    let mut extra_cmdline: Option<String> = None;
    let mut cpus = None;
    let mut memory = None;
    let mut serial = None;
    let mut vsock = None;
    let mut api_socket = None;
    let mut log_level = None;
    let mut log_format = None;
    let mut restore_dir = None;
    let mut it = args.iter();
    while let Some(&arg) = it.next() {
        match arg {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => set_once(&mut kernel, arg, value(&mut it, arg)?)?,
            "--initramfs" => set_once(&mut initramfs, arg, value(&mut it, arg)?)?,
            "--cmdline" => set_once(&mut extra_cmdline, arg, value(&mut it, arg)?.to_string())?,
            "--cpus" => set_once(&mut cpus, arg, parse_cpus(value(&mut it, arg)?)?)?,
            "--memory" => set_once(&mut memory, arg, parse_memory(value(&mut it, arg)?)?)?,
            "--serial" => set_once(&mut serial, arg, parse_serial(value(&mut it, arg)?)?)?,
            "--vsock" => set_once(&mut vsock, arg, value(&mut it, arg)?.to_string())?,
            "--api-socket" => set_once(&mut api_socket, arg, value(&mut it, arg)?)?,
            "--restore" => set_once(&mut restore_dir, arg, value(&mut it, arg)?)?,
            "--log-level" => set_once(&mut log_level, arg, parse_log_level(value(&mut it, arg)?)?)?,
            "--log-format" => set_once(
                &mut log_format,
                arg,
                parse_log_format(value(&mut it, arg)?)?,
            )?,
            other => return Err(CliError::UnknownArgument(other.to_string())),
        }
    }
    if let Some(dir) = restore_dir {
        let boot_options = [
            ("--kernel", kernel.is_some()),
            ("--initramfs", initramfs.is_some()),
            ("--cmdline", extra_cmdline.is_some()),
            ("--cpus", cpus.is_some()),
        ];
        return restore::config(
            dir,
            &boot_options,
            vsock,
            restore::Common {
                memory,
                serial: serial.unwrap_or(SerialMode::Tty),
                api_socket: api_socket
                    .map(|p| non_empty_path("--api-socket", p))
                    .transpose()?,
                log_level: log_level.unwrap_or(log::LevelFilter::Warn),
                log_format: log_format.unwrap_or_default(),
            },
        )
        .map(|c| Command::Restore(Box::new(c)));
    }
    let kernel: &str = kernel.ok_or(CliError::Required("--kernel"))?;
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if let Some(extra) = extra_cmdline {
        if extra.bytes().any(|b| b == 0 || !b.is_ascii()) {
            return Err(CliError::InvalidValue {
                option: "--cmdline".into(),
                value: extra,
                reason: "must be printable ASCII".into(),
            });
        }
        if !extra.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(extra.trim());
        }
    }
    Ok(Command::Run(Box::new(VmConfig {
        kernel: non_empty_path("--kernel", kernel)?,
        initramfs: initramfs
            .map(|p| non_empty_path("--initramfs", p))
            .transpose()?,
        cmdline,
        cpus: cpus.unwrap_or(1),
        memory_bytes: memory.unwrap_or(DEFAULT_MEMORY),
        serial: serial.unwrap_or(SerialMode::Tty),
        vsock,
        api_socket: api_socket
            .map(|p| non_empty_path("--api-socket", p))
            .transpose()?,
        log_level: log_level.unwrap_or(log::LevelFilter::Warn),
        log_format: log_format.unwrap_or_default(),
    })))
}

fn value<'a>(it: &mut std::slice::Iter<'_, &'a str>, option: &str) -> Result<&'a str, CliError> {
    it.next()
        .copied()
        .ok_or_else(|| CliError::MissingValue(option.to_string()))
}

fn set_once<T>(slot: &mut Option<T>, option: &str, value: T) -> Result<(), CliError> {
    if slot.replace(value).is_some() {
        return Err(CliError::Duplicate(option.to_string()));
    }
    Ok(())
}

pub(crate) fn non_empty_path(option: &str, value: &str) -> Result<PathBuf, CliError> {
    if value.is_empty() {
        return Err(CliError::InvalidValue {
            option: option.to_string(),
            value: value.to_string(),
            reason: "empty path".into(),
        });
    }
    Ok(PathBuf::from(value))
}

/// Parses `--cpus boot=N`.
pub fn parse_cpus(input: &str) -> Result<u8, CliError> {
    let p = OptionParser::new("cpus", &["boot"], &[]).parse(input)?;
    let n = p.required("boot", parse_u32)?;
    if n == 0 || n > MAX_CPUS {
        return Err(p
            .invalid(
                "boot",
                p.get("boot").unwrap_or_default(),
                format!("must be 1 to {MAX_CPUS}"),
            )
            .into());
    }
    Ok(n as u8)
}

/// Parses `--memory size=SIZE`.
pub fn parse_memory(input: &str) -> Result<u64, CliError> {
    let p = OptionParser::new("memory", &["size"], &[]).parse(input)?;
    let size = p.required("size", parse_size)?;
    let raw = p.get("size").unwrap_or_default();
    if size < MIN_MEMORY {
        return Err(p.invalid("size", raw, "must be at least 16M").into());
    }
    if size > layout::MAX_RAM_SIZE {
        return Err(p
            .invalid(
                "size",
                raw,
                "must be at most 3G (RAM lives below the 32-bit MMIO gap)",
            )
            .into());
    }
    if size % 4096 != 0 {
        return Err(p.invalid("size", raw, "must be a multiple of 4K").into());
    }
    Ok(size)
}

/// Parses `--serial tty|file=PATH|off`.
pub fn parse_serial(input: &str) -> Result<SerialMode, CliError> {
    let p = OptionParser::new("serial", &["file"], &["tty", "off"]).parse(input)?;
    let chosen = ["tty", "off", "file"]
        .iter()
        .filter(|k| p.is_set(k))
        .count();
    if chosen != 1 {
        return Err(OptionError::Malformed {
            option: "serial",
            item: input.to_string(),
        }
        .into());
    }
    if p.is_set("tty") {
        Ok(SerialMode::Tty)
    } else if p.is_set("off") {
        Ok(SerialMode::Off)
    } else {
        let path = p.required("file", |v| {
            if v.is_empty() {
                Err("empty path".to_string())
            } else {
                Ok(PathBuf::from(v))
            }
        })?;
        Ok(SerialMode::File(path))
    }
}

/// Parses `--log-format`.
pub fn parse_log_format(input: &str) -> Result<crate::logger::LogFormat, CliError> {
    match input {
        "text" => Ok(crate::logger::LogFormat::Text),
        "json" => Ok(crate::logger::LogFormat::Json),
        other => Err(CliError::InvalidValue {
            option: "--log-format".into(),
            value: other.to_string(),
            reason: "expected text or json".into(),
        }),
    }
}

/// Parses `--log-level`.
pub fn parse_log_level(input: &str) -> Result<log::LevelFilter, CliError> {
    match input {
        "error" => Ok(log::LevelFilter::Error),
        "warn" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        other => Err(CliError::InvalidValue {
            option: "--log-level".into(),
            value: other.to_string(),
            reason: "expected error, warn, info, debug or trace".into(),
        }),
    }
}

fn parse_remote(args: &[&str]) -> Result<RemoteArgs, CliError> {
    let mut api_socket = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(&arg) = it.next() {
        match arg {
            "--api-socket" => set_once(&mut api_socket, arg, value(&mut it, arg)?)?,
            other if other.starts_with('-') => {
                return Err(CliError::UnknownArgument(other.to_string()))
            }
            other => words.push(other),
        }
    }
    let api_socket = non_empty_path(
        "--api-socket",
        api_socket.ok_or(CliError::Required("--api-socket"))?,
    )?;
    let request = match words.as_slice() {
        ["ping"] => RemoteRequest::Ping,
        ["info"] => RemoteRequest::Info,
        ["connections"] => RemoteRequest::Connections,
        ["metrics"] => RemoteRequest::Metrics,
        ["shutdown"] => RemoteRequest::Shutdown,
        ["fallback", "on"] => RemoteRequest::Fallback(true),
        ["fallback", "off"] => RemoteRequest::Fallback(false),
        ["pause"] => RemoteRequest::Pause,
        ["resume"] => RemoteRequest::Resume,
        ["snapshot", dir] => RemoteRequest::Snapshot(restore::absolute("remote snapshot", dir)?),
        ["snapshot"] => return Err(CliError::Required("remote snapshot: the directory")),
        ["fallback", other] => {
            return Err(CliError::InvalidValue {
                option: "remote fallback".into(),
                value: other.to_string(),
                reason: "expected on or off".into(),
            })
        }
        [] => {
            return Err(CliError::Required(
                "a remote request (ping, info, fallback, connections, metrics, shutdown, pause, \
                 resume, snapshot)",
            ))
        }
        other => return Err(CliError::UnknownArgument(other.join(" "))),
    };
    Ok(RemoteArgs {
        api_socket,
        request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> VmConfig {
        match parse_args(args).unwrap() {
            Command::Run(cfg) => *cfg,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        parse_args(args).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let cfg = run(&["--kernel", "/k"]);
        assert_eq!(cfg.kernel, PathBuf::from("/k"));
        assert_eq!(cfg.cpus, 1);
        assert_eq!(cfg.memory_bytes, 256 << 20);
        assert_eq!(cfg.serial, SerialMode::Tty);
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert_eq!(cfg.vsock, None);
        assert_eq!(cfg.api_socket, None);
        assert_eq!(cfg.log_level, log::LevelFilter::Warn);
    }

    #[test]
    fn every_option() {
        let cfg = run(&[
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            " quiet ",
            "--cpus",
            "boot=2",
            "--memory",
            "size=1G",
            "--serial",
            "file=/tmp/s",
            "--vsock",
            "cid=3,socket=/tmp/v",
            "--api-socket",
            "/tmp/a",
            "--log-level",
            "debug",
            "--log-format",
            "json",
        ]);
        assert_eq!(cfg.initramfs, Some(PathBuf::from("/i")));
        assert_eq!(cfg.cmdline, format!("{DEFAULT_CMDLINE} quiet"));
        assert_eq!(cfg.cpus, 2);
        assert_eq!(cfg.memory_bytes, 1 << 30);
        assert_eq!(cfg.serial, SerialMode::File("/tmp/s".into()));
        assert_eq!(cfg.vsock.as_deref(), Some("cid=3,socket=/tmp/v"));
        assert_eq!(cfg.api_socket, Some(PathBuf::from("/tmp/a")));
        assert_eq!(cfg.log_level, log::LevelFilter::Debug);
        assert_eq!(cfg.log_format, crate::logger::LogFormat::Json);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(&["--help"]).unwrap(), Command::Help);
        assert_eq!(
            parse_args(&["--kernel", "/k", "-h"]).unwrap(),
            Command::Help
        );
        assert_eq!(parse_args(&["-V"]).unwrap(), Command::Version);
        for option in [
            "--kernel",
            "--initramfs",
            "--cmdline",
            "--cpus",
            "--memory",
            "--serial",
            "--vsock",
            "--api-socket",
            "--log-level",
            "--log-format",
        ] {
            assert!(
                HELP.contains(&format!("Example: {option}")),
                "{option} has no example"
            );
        }
    }

    #[test]
    fn errors_name_option_key_and_value() {
        let k = ["--kernel", "/k"];
        let with = |extra: &[&str]| {
            let mut v = k.to_vec();
            v.extend_from_slice(extra);
            err(&v)
        };
        assert_eq!(err(&[]), "--kernel is required");
        assert_eq!(err(&["--kernel"]), "--kernel: missing value");
        assert_eq!(with(&["--kernel", "/x"]), "--kernel: given more than once");
        assert_eq!(
            with(&["--bogus"]),
            "unknown argument `--bogus` (see --help)"
        );
        assert_eq!(
            with(&["--cpus", "boot=0"]),
            "--cpus: invalid boot=`0`: must be 1 to 32"
        );
        assert_eq!(
            with(&["--cpus", "boot=33"]),
            "--cpus: invalid boot=`33`: must be 1 to 32"
        );
        assert_eq!(
            with(&["--cpus", "boot=x"]),
            "--cpus: invalid boot=`x`: expected a decimal integer"
        );
        assert_eq!(
            with(&["--cpus", "max=2"]),
            "--cpus: unknown key `max` (known keys: boot)"
        );
        assert_eq!(
            with(&["--memory", "size=1M"]),
            "--memory: invalid size=`1M`: must be at least 16M"
        );
        assert_eq!(
            with(&["--memory", "size=4G"]),
            "--memory: invalid size=`4G`: must be at most 3G (RAM lives below the 32-bit MMIO gap)"
        );
        assert_eq!(
            with(&["--memory", "size=16777217"]),
            "--memory: invalid size=`16777217`: must be a multiple of 4K"
        );
        assert_eq!(
            with(&["--memory", "size=lots"]),
            "--memory: invalid size=`lots`: expected a number with an optional K, M or G suffix"
        );
        assert_eq!(
            with(&["--memory", "256M"]),
            "--memory: malformed item `256M` (expected key=value)"
        );
        assert_eq!(
            with(&["--serial", "pty"]),
            "--serial: unknown key `pty` (known keys: file, tty, off)"
        );
        assert_eq!(
            with(&["--serial", "tty,off"]),
            "--serial: malformed item `tty,off` (expected key=value)"
        );
        assert_eq!(
            with(&["--serial", "file="]),
            "--serial: key `file` needs a value (`file=...`)"
        );
        assert_eq!(
            with(&["--log-level", "loud"]),
            "--log-level: invalid value `loud`: expected error, warn, info, debug or trace"
        );
        assert_eq!(
            with(&["--log-format", "xml"]),
            "--log-format: invalid value `xml`: expected text or json"
        );
        assert_eq!(
            with(&["--api-socket", ""]),
            "--api-socket: invalid value ``: empty path"
        );
        assert_eq!(
            with(&["--cmdline", "caf\u{e9}"]),
            "--cmdline: invalid value `caf\u{e9}`: must be printable ASCII"
        );
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("tty").unwrap(), SerialMode::Tty);
        assert_eq!(parse_serial("off").unwrap(), SerialMode::Off);
        assert_eq!(
            parse_serial("file=/x").unwrap(),
            SerialMode::File(PathBuf::from("/x"))
        );
    }

    #[test]
    fn remote() {
        let r = |a: &[&str]| match parse_args(a).unwrap() {
            Command::Remote(r) => r,
            other => panic!("{other:?}"),
        };
        fn with(extra: &[&'static str]) -> Vec<&'static str> {
            let mut v = vec!["remote", "--api-socket", "/s"];
            v.extend_from_slice(extra);
            v
        }
        assert_eq!(r(&with(&["ping"])).request, RemoteRequest::Ping);
        assert_eq!(r(&with(&["info"])).request, RemoteRequest::Info);
        assert_eq!(
            r(&with(&["connections"])).request,
            RemoteRequest::Connections
        );
        assert_eq!(r(&with(&["metrics"])).request, RemoteRequest::Metrics);
        assert_eq!(r(&with(&["shutdown"])).request, RemoteRequest::Shutdown);
        assert_eq!(
            r(&with(&["fallback", "on"])).request,
            RemoteRequest::Fallback(true)
        );
        assert_eq!(
            r(&with(&["fallback", "off"])).request,
            RemoteRequest::Fallback(false)
        );
        assert_eq!(r(&with(&["ping"])).api_socket, PathBuf::from("/s"));
        assert_eq!(
            err(&with(&["fallback", "maybe"])),
            "remote fallback: invalid value `maybe`: expected on or off"
        );
        assert_eq!(err(&["remote", "ping"]), "--api-socket is required");
        assert_eq!(
            err(&with(&["reboot"])),
            "unknown argument `reboot` (see --help)"
        );
        assert_eq!(err(&with(&["--x"])), "unknown argument `--x` (see --help)");
    }
}
