//! vhost-device-vsock's spellings, so that its users switch by changing the binary name:
//! `--vm guest-cid=N,socket=S,uds-path=U[,tx-buffer-size=N][,queue-size=N][,groups=G]`, its
//! single-VM flags (`--guest-cid 3 --socket S --uds-path U`) and its `--config` YAML. The keys
//! mean what they mean there: `socket` is the vhost-user socket, `uds-path` the hybrid socket,
//! `tx-buffer-size` the buffer per connection the device advertises, and its defaults apply
//! (CID 3, 64 KiB, 1024). As there, a VM has no uplink. What we do not support is refused
//! with the spelling that does the same here.

use std::path::PathBuf;

use serde::Deserialize;
use vsock_router::config::VsockConfig;

use crate::cli::{queue_size_of, CliError, VmSpec};

/// vhost-device-vsock's group of every VM that names none.
pub const DEFAULT_GROUP: &str = "default";
/// vhost-device-vsock's defaults.
const DEFAULT_CID: u64 = 3;
const DEFAULT_TX_BUFFER_SIZE: u32 = 64 * 1024;
const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// vhost-device-vsock's flags for a single VM.
pub const SINGLE_VM_FLAGS: &[&str] = &[
    "--guest-cid",
    "--socket",
    "--uds-path",
    "--tx-buffer-size",
    "--queue-size",
    "--groups",
    "--forward-cid",
    "--forward-listen",
];

/// One VM's settings in vhost-device-vsock's terms.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    guest_cid: Option<u64>,
    socket: Option<PathBuf>,
    uds_path: Option<PathBuf>,
    tx_buffer_size: Option<u32>,
    queue_size: Option<u32>,
    groups: Option<String>,
    forward_cid: Option<u32>,
    forward_listen: Option<String>,
}

/// vhost-device-vsock's `--config` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    vms: Vec<Params>,
}

fn bad(msg: impl Into<String>) -> CliError {
    CliError::Other(msg.into())
}

/// `--vm KEYS` in vhost-device-vsock's spelling (`-` or `_` in key names).
pub fn parse_vm(raw: &str) -> Result<VmSpec, CliError> {
    let mut items = Vec::new();
    for item in raw.trim().split(',') {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| bad(format!("--vm: {item:?} is not key=value")))?;
        items.push((k.replace('_', "-"), v.to_string()));
    }
    params_of(&items, "--vm").and_then(|p| spec_of(p, "--vm"))
}

/// vhost-device-vsock's single-VM flags (names without the dashes).
pub fn parse_single(flags: &[(String, String)]) -> Result<VmSpec, CliError> {
    params_of(flags, "its flags").and_then(|p| spec_of(p, "--guest-cid/--socket/--uds-path"))
}

/// The `vms:` list of a vhost-device-vsock YAML file.
pub fn parse_config(text: &str) -> Result<Vec<VmSpec>, CliError> {
    let file: ConfigFile = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if file.vms.is_empty() {
        return Err(bad("`vms` is empty"));
    }
    file.vms
        .into_iter()
        .enumerate()
        .map(|(i, p)| spec_of(p, &format!("vms[{i}]")))
        .collect()
}

fn params_of(items: &[(String, String)], what: &str) -> Result<Params, CliError> {
    let mut p = Params::default();
    for (k, v) in items {
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("{what}: {k}={v}: expected a number")))
        };
        let dup = |set: bool| {
            if set {
                Err(bad(format!("{what}: {k} given twice")))
            } else {
                Ok(())
            }
        };
        match k.as_str() {
            "guest-cid" => {
                dup(p.guest_cid.is_some())?;
                p.guest_cid = Some(num(v)?);
            }
            "socket" => {
                dup(p.socket.is_some())?;
                p.socket = Some(v.into());
            }
            "uds-path" => {
                dup(p.uds_path.is_some())?;
                p.uds_path = Some(v.into());
            }
            "tx-buffer-size" => {
                dup(p.tx_buffer_size.is_some())?;
                let n = num(v)?;
                p.tx_buffer_size =
                    Some(u32::try_from(n).map_err(|_| {
                        bad(format!("{what}: tx-buffer-size={v}: at most 4294967295"))
                    })?);
            }
            "queue-size" => {
                dup(p.queue_size.is_some())?;
                p.queue_size = Some(num(v)?.min(u64::from(u32::MAX)) as u32);
            }
            "groups" => {
                dup(p.groups.is_some())?;
                p.groups = Some(v.clone());
            }
            "forward-cid" => p.forward_cid = Some(num(v)? as u32),
            "forward-listen" => p.forward_listen = Some(v.clone()),
            other => {
                return Err(bad(format!(
                    "{what}: unknown key {other:?} (known: guest-cid, socket, uds-path, \
                     tx-buffer-size, queue-size, groups)"
                )))
            }
        }
    }
    Ok(p)
}

fn spec_of(p: Params, what: &str) -> Result<VmSpec, CliError> {
    if p.forward_cid.is_some() || p.forward_listen.is_some() {
        return Err(bad(format!(
            "{what}: forward-cid and forward-listen (vhost-device-vsock's vsock backend) are not \
             supported: use --vsock with fallback=1 (connections to CIDs nobody here owns go to \
             the parent's /dev/vsock) and listen=P1+P2 (the parent's connections to those ports)"
        )));
    }
    let vhost_user = p
        .socket
        .ok_or_else(|| bad(format!("{what}: missing `socket` (the vhost-user socket)")))?;
    let uds = p.uds_path.ok_or_else(|| {
        bad(format!(
            "{what}: missing `uds-path` (the hybrid socket of host services)"
        ))
    })?;
    let cid = p.guest_cid.unwrap_or(DEFAULT_CID);
    let buffer = p.tx_buffer_size.unwrap_or(DEFAULT_TX_BUFFER_SIZE);
    let uds_text = uds
        .to_str()
        .filter(|s| !s.contains(','))
        .ok_or_else(|| bad(format!("{what}: uds-path must be UTF-8 without commas")))?;
    let vsock: VsockConfig =
        format!("cid={cid},socket={uds_text},uplink=none,buffer_size={buffer}")
            .parse()
            .map_err(|e: vsock_router::config::ConfigError| bad(format!("{what}: {e}")))?;
    let queue_size = match p.queue_size {
        Some(n) => queue_size_of("vm", &n.to_string())?,
        None => DEFAULT_QUEUE_SIZE,
    };
    let groups = p
        .groups
        .map(|g| g.split('+').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|| vec![DEFAULT_GROUP.to_string()]);
    if groups.iter().any(String::is_empty) {
        return Err(bad(format!("{what}: an empty group name")));
    }
    Ok(VmSpec {
        vsock,
        vhost_user,
        queue_size,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{parse_args, Command};

    #[test]
    fn vm_spelling_means_what_it_means_there() {
        let vm = parse_vm("guest-cid=4,socket=/t/vhost4.socket,uds-path=/t/vm4.vsock").unwrap();
        assert_eq!(vm.vsock.cid, 4);
        assert_eq!(vm.vhost_user, PathBuf::from("/t/vhost4.socket"));
        assert_eq!(vm.vsock.socket, PathBuf::from("/t/vm4.vsock"));
        assert_eq!(vm.vsock.buffer_size, 64 * 1024);
        assert_eq!(vm.queue_size, 1024);
        assert_eq!(
            vm.vsock.uplink,
            vsock_router::backend::uplink::UplinkSpec::None
        );
        let vm = parse_vm("guest_cid=9,socket=/s,uds_path=/u,tx_buffer_size=32768,queue_size=128")
            .unwrap();
        assert_eq!(
            (vm.vsock.cid, vm.vsock.buffer_size, vm.queue_size),
            (9, 32768, 128)
        );
        // The default CID is vhost-device-vsock's.
        assert_eq!(parse_vm("socket=/s,uds-path=/u").unwrap().vsock.cid, 3);
    }

    #[test]
    fn vm_spelling_errors() {
        let e = |s: &str| parse_vm(s).unwrap_err().to_string();
        assert!(e("guest-cid=4,uds-path=/u").contains("missing `socket`"));
        assert!(e("guest-cid=4,socket=/s").contains("missing `uds-path`"));
        assert!(e("guest-cid=4,socket=/s,forward-cid=1").contains("fallback=1"));
        assert!(e("guest-cid=x,socket=/s,uds-path=/u").contains("expected a number"));
        assert!(e("guest-cid=2,socket=/s,uds-path=/u").contains("cid"));
        assert!(e("guest-cid=4,socket=/s,uds-path=/u,color=red").contains("unknown key"));
        assert!(e("guest-cid=4,socket=/s,uds-path=/u,queue-size=1000").contains("power of two"));
        assert!(e("guest-cid=4,socket=/s,uds-path=/u,groups=a+").contains("empty group"));
        assert!(e("guest-cid,socket=/s").contains("not key=value"));
    }

    #[test]
    fn single_vm_flags_and_groups() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let Command::Run(c) = parse_args(&a(&[
            "--guest-cid",
            "7",
            "--socket",
            "/s",
            "--uds-path",
            "/u",
            "--groups",
            "x+y",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.vms[0].vsock.cid, 7);
        assert_eq!(c.vms[0].groups, ["x", "y"]);
        // Groups that overlap are one group of siblings; groups that do not are refused.
        let two = |g1: &str, g2: &str| {
            parse_args(&a(&[
                "--vm",
                &format!("guest-cid=3,socket=/s3,uds-path=/u3,groups={g1}"),
                "--vm",
                &format!("guest-cid=4,socket=/s4,uds-path=/u4,groups={g2}"),
            ]))
        };
        assert!(two("a+b", "b").is_ok());
        assert!(two("a", "b")
            .unwrap_err()
            .to_string()
            .contains("share no group"));
    }

    #[test]
    fn config_file() {
        let vms = parse_config(
            "vms:\n  - guest_cid: 4\n    socket: /t/vhost4.socket\n    uds_path: /t/vm4.vsock\n    \
             tx_buffer_size: 65536\n    queue_size: 1024\n    groups: group1+groupA\n  \
             - guest_cid: 5\n    socket: /t/vhost5.socket\n    uds_path: /t/vm5.vsock\n",
        )
        .unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].groups, ["group1", "groupA"]);
        assert_eq!(vms[1].vsock.socket, PathBuf::from("/t/vm5.vsock"));
        assert!(parse_config("vms: []").is_err());
        let e = parse_config(
            "vms:\n  - guest_cid: 4\n    socket: /s\n    uds_path: /u\n    speed: 9\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("speed"), "{e}");
    }
}
