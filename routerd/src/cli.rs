//! The command line. Parsing touches no file and no socket: every bad option is reported
//! (exit status 2) before anything is created.

use std::path::PathBuf;

use vsock_router::config::options::{decimal, OptionError};
use vsock_router::config::VsockConfig;
use vsock_vmm::logger::LogFormat;

use crate::compat;

/// Exit status for command-line errors.
pub const USAGE_EXIT_CODE: i32 = 2;

/// Ring size the daemon offers by default (the frontend picks the size it uses, up to this).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// The help text printed by `--help`.
pub const HELP: &str = "\
vsock-routerd: vsock-router's virtio-vsock device as a vhost-user-vsock backend

USAGE:
    vsock-routerd --vsock KEYS [--vsock KEYS ...] [OPTIONS]
    vsock-routerd --vm KEYS [--vm KEYS ...] [OPTIONS]      (vhost-device-vsock's spelling)
    vsock-routerd --config FILE [OPTIONS]                  (vhost-device-vsock's YAML)

Each --vsock, --vm or entry of --config is one VM with its own vhost-user socket. The VMs of one
daemon are siblings: they reach each other by CID.

OPTIONS:
    --vsock KEYS           One VM: the keys of vsock-vmm's --vsock (cid, socket, fallback, uplink,
                           registry, ns_mode, listen, max_connections, buffer_size,
                           handshake_timeout_ms, request_timeout_ms, connect_timeout_ms), and
                             vhost-user  PATH: the vhost-user socket the VM's frontend connects to
                                         (required)
                             queue-size  largest ring the frontend may use, 1 to 32768, a power
                                         of two (default 1024)
                           VMs without registry= share the daemon's own private registry.
                           Example: --vsock cid=3,socket=/run/vm3.vsock,vhost-user=/run/vm3.vhost,uplink=none
    --vm KEYS              One VM, as vhost-device-vsock spells it:
                           guest-cid=N,socket=VHOST_USER_PATH,uds-path=HYBRID_PATH
                           [,tx-buffer-size=N][,queue-size=N][,groups=default]
                           Same meaning; no uplink (as vhost-device-vsock without forward-cid).
                           Example: --vm guest-cid=3,socket=/tmp/vhost3.socket,uds-path=/tmp/vm3.vsock
    --guest-cid N --socket PATH --uds-path PATH [--tx-buffer-size N] [--queue-size N]
    [--groups NAMES]       One VM, as vhost-device-vsock's single-VM flags.
    --config FILE          VMs from vhost-device-vsock's YAML file (a `vms:` list with guest_cid,
                           socket, uds_path, tx_buffer_size, queue_size, groups).
    --api-socket PATH      Serve the REST API (HTTP/1.1, JSON) on this Unix socket (mode 0600):
                           GET /api/v1/vms, and per VM /api/v1/vms/{cid}/vsock (GET, PATCH),
                           /api/v1/vms/{cid}/vsock/connections, /api/v1/vms/{cid}/metrics.
    --log-level LEVEL      error|warn|info|debug|trace (default warn); logs go to stderr.
    --log-format FORMAT    text|json (default text).
    -h, --help             Print this help.
    -V, --version          Print the version.
";

/// One VM of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Its router's configuration.
    pub vsock: VsockConfig,
    /// The vhost-user socket its frontend connects to.
    pub vhost_user: PathBuf,
    /// Largest ring the frontend may use.
    pub queue_size: u16,
    /// vhost-device-vsock's sibling groups (`default` when not given): every two VMs of one
    /// daemon must share one, since all of them are siblings here.
    pub groups: Vec<String>,
}

/// What the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The VMs, in the order given.
    pub vms: Vec<VmSpec>,
    /// Where the REST API is served.
    pub api_socket: Option<PathBuf>,
    /// Log level.
    pub log_level: log::LevelFilter,
    /// Log format.
    pub log_format: LogFormat,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// Serve VMs.
    Run(DaemonConfig),
}

/// A command-line error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An option's value is invalid.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// Something else (a missing value, an unknown argument, a conflict).
    #[error("{0}")]
    Other(String),
}

fn other(msg: impl Into<String>) -> CliError {
    CliError::Other(msg.into())
}

/// Parses the arguments (without the program name).
pub fn parse_args(args: &[String]) -> Result<Command, CliError> {
    let mut vms = Vec::new();
    let mut api_socket = None;
    let mut log_level = None;
    let mut log_format = None;
    let mut single: Vec<(String, String)> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| other(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--vsock" => vms.push(parse_vsock(&value()?)?),
            "--vm" => vms.push(compat::parse_vm(&value()?)?),
            flag if compat::SINGLE_VM_FLAGS.contains(&flag) => {
                single.push((flag[2..].to_string(), value()?))
            }
            "--config" => {
                let path = value()?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| other(format!("--config {path}: {e}")))?;
                vms.extend(compat::parse_config(&text).map_err(|e| match e {
                    CliError::Other(m) => other(format!("--config {path}: {m}")),
                    e => e,
                })?);
            }
            "--api-socket" => set_once(&mut api_socket, arg, PathBuf::from(value()?))?,
            "--log-level" => {
                let v = value()?;
                let level =
                    vsock_vmm::cli::parse_log_level(&v).map_err(|e| other(e.to_string()))?;
                set_once(&mut log_level, arg, level)?
            }
            "--log-format" => {
                let v = value()?;
                let f = vsock_vmm::cli::parse_log_format(&v).map_err(|e| other(e.to_string()))?;
                set_once(&mut log_format, arg, f)?
            }
            other_arg => {
                return Err(other(format!(
                    "unknown argument {other_arg:?} (see --help)"
                )))
            }
        }
    }
    if !single.is_empty() {
        if !vms.is_empty() {
            return Err(other(
                "--guest-cid, --socket, --uds-path, --tx-buffer-size, --queue-size and --groups \
                 describe one VM: give them without --vsock, --vm or --config",
            ));
        }
        vms.push(compat::parse_single(&single)?);
    }
    if vms.is_empty() {
        return Err(other("no VM: give --vsock, --vm or --config (see --help)"));
    }
    check_unique(&vms)?;
    Ok(Command::Run(DaemonConfig {
        vms,
        api_socket,
        log_level: log_level.unwrap_or(log::LevelFilter::Warn),
        log_format: log_format.unwrap_or(LogFormat::Text),
    }))
}

fn set_once<T>(slot: &mut Option<T>, arg: &str, v: T) -> Result<(), CliError> {
    if slot.replace(v).is_some() {
        return Err(other(format!("{arg} given twice")));
    }
    Ok(())
}

/// Two VMs of one daemon may share neither a CID nor a socket.
fn check_unique(vms: &[VmSpec]) -> Result<(), CliError> {
    for (i, a) in vms.iter().enumerate() {
        for b in &vms[..i] {
            if a.vsock.cid == b.vsock.cid {
                return Err(other(format!("two VMs with CID {}", a.vsock.cid)));
            }
            for (what, x, y) in [
                ("vhost-user socket", &a.vhost_user, &b.vhost_user),
                ("hybrid socket", &a.vsock.socket, &b.vsock.socket),
            ] {
                if x == y {
                    return Err(other(format!("two VMs with the {what} {}", x.display())));
                }
            }
        }
        for b in &vms[..i] {
            if !a.groups.iter().any(|g| b.groups.contains(g)) {
                return Err(other(format!(
                    "CIDs {} and {} share no group: all VMs of one vsock-routerd are siblings; \
                     run one daemon per group instead",
                    b.vsock.cid, a.vsock.cid
                )));
            }
        }
        if a.vhost_user == a.vsock.socket {
            return Err(other(format!(
                "CID {}: the vhost-user socket and the hybrid socket are both {}",
                a.vsock.cid,
                a.vhost_user.display()
            )));
        }
    }
    Ok(())
}

/// `--vsock KEYS`: the daemon's own keys (`vhost-user`, `queue-size`) taken out, the rest is a
/// [`VsockConfig`].
pub fn parse_vsock(raw: &str) -> Result<VmSpec, CliError> {
    let mut vhost_user = None;
    let mut queue_size = None;
    let mut rest = Vec::new();
    for item in raw.split(',') {
        match item.split_once('=') {
            Some(("vhost-user", v)) => {
                if v.is_empty() {
                    return Err(OptionError::MissingValue {
                        option: "vsock",
                        key: "vhost-user".into(),
                    }
                    .into());
                }
                set_once(&mut vhost_user, "vsock: vhost-user", PathBuf::from(v))?;
            }
            Some(("queue-size", v)) => set_once(
                &mut queue_size,
                "vsock: queue-size",
                queue_size_of("vsock", v)?,
            )?,
            _ => rest.push(item),
        }
    }
    let vsock: VsockConfig = rest.join(",").parse()?;
    if !vsock.busy_poll.is_zero() {
        // The rings are served on vhost-user-backend's worker threads, which sleep in epoll.
        return Err(OptionError::Invalid {
            option: "vsock",
            key: "busy_poll_us".into(),
            value: vsock.busy_poll.as_micros().to_string(),
            why: "busy polling is a vsock-vmm device-thread option; vsock-routerd serves its \
                  rings on vhost-user-backend's threads, which do not poll"
                .into(),
        }
        .into());
    }
    let vhost_user = vhost_user.ok_or(OptionError::MissingKey {
        option: "vsock",
        key: "vhost-user".into(),
    })?;
    Ok(VmSpec {
        vsock,
        vhost_user,
        queue_size: queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
        groups: vec![compat::DEFAULT_GROUP.to_string()],
    })
}

/// A ring size: 1 to 32768, a power of two (the virtio split ring's rule).
pub fn queue_size_of(option: &'static str, v: &str) -> Result<u16, CliError> {
    let invalid = |why: &str| OptionError::Invalid {
        option,
        key: "queue-size".into(),
        value: v.into(),
        why: why.into(),
    };
    let n: u32 = decimal(v).map_err(|e| invalid(&e))?;
    if n == 0 || n > 32768 || !n.is_power_of_two() {
        return Err(invalid("expected a power of two from 1 to 32768").into());
    }
    Ok(n as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str]) -> DaemonConfig {
        match parse_args(&args(a)).unwrap() {
            Command::Run(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn err(a: &[&str]) -> String {
        parse_args(&args(a)).unwrap_err().to_string()
    }

    #[test]
    fn vsock_keys_and_our_own() {
        let c = run(&[
            "--vsock",
            "cid=5,socket=/r/vm5.vsock,vhost-user=/r/vm5.vhost,fallback=0,uplink=none,queue-size=256",
            "--api-socket",
            "/r/api",
        ]);
        let vm = &c.vms[0];
        assert_eq!(vm.vsock.cid, 5);
        assert!(!vm.vsock.g2h_fallback);
        assert_eq!(vm.vhost_user, PathBuf::from("/r/vm5.vhost"));
        assert_eq!(vm.queue_size, 256);
        assert_eq!(c.api_socket, Some(PathBuf::from("/r/api")));
    }

    #[test]
    fn errors_are_clear() {
        assert!(err(&[]).contains("no VM"));
        assert!(err(&["--vsock", "cid=5,socket=/a"]).contains("`vhost-user`"));
        assert!(err(&["--vsock", "cid=5,socket=/a,vhost-user=/b,bogus=1"]).contains("bogus"));
        assert!(
            err(&["--vsock", "cid=5,socket=/a,vhost-user=/b,queue-size=300"])
                .contains("power of two")
        );
        assert!(err(&["--vsock", "cid=5,socket=/a,vhost-user=/a"]).contains("both"));
        assert!(
            err(&["--vsock", "cid=5,socket=/a,vhost-user=/b,busy_poll_us=50"])
                .contains("busy polling is a vsock-vmm device-thread option")
        );
        let two = |x: &str, y: &str| {
            err(&[
                "--vsock",
                &format!("cid=5,socket=/a5,vhost-user={x}"),
                "--vsock",
                &format!("cid=6,socket=/a6,vhost-user={y}"),
            ])
        };
        assert!(two("/v", "/v").contains("vhost-user socket /v"));
        assert!(err(&[
            "--vsock",
            "cid=5,socket=/a,vhost-user=/v5",
            "--vsock",
            "cid=5,socket=/b,vhost-user=/v6"
        ])
        .contains("two VMs with CID 5"));
        assert!(err(&["--frobnicate"]).contains("unknown argument"));
        assert!(err(&["--api-socket"]).contains("needs a value"));
        assert!(err(&[
            "--guest-cid",
            "4",
            "--vm",
            "guest-cid=5,socket=/s,uds-path=/u"
        ])
        .contains("describe one VM"));
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_args(&args(&["--help"])).unwrap(), Command::Help);
        assert_eq!(parse_args(&args(&["-V"])).unwrap(), Command::Version);
    }
}
