//! `vsock-vmm --restore DIR`: the options a restore takes and those it refuses.

use std::path::{Path, PathBuf};

use super::{non_empty_path, CliError, SerialMode};

/// A restore, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// `--memory`, if given: must equal the snapshot's memory size.
    pub memory_bytes: Option<u64>,
    /// The serial console's destination.
    pub serial: SerialMode,
    /// The API socket path.
    pub api_socket: Option<PathBuf>,
    /// `--vsock`, if given: the vsock device's configuration instead of the saved one (another
    /// CID, another hybrid socket: a clone beside the original).
    pub vsock: Option<String>,
    /// The log level.
    pub log_level: log::LevelFilter,
    /// `--log-format`.
    pub log_format: crate::logger::LogFormat,
}

/// The options a restore shares with a boot.
#[derive(Debug)]
pub(super) struct Common {
    pub(super) memory: Option<u64>,
    pub(super) serial: SerialMode,
    pub(super) api_socket: Option<PathBuf>,
    pub(super) log_level: log::LevelFilter,
    pub(super) log_format: crate::logger::LogFormat,
}

/// `--restore DIR` with the other options: the boot options (name, given) are refused;
/// `--vsock` replaces the saved vsock configuration (checked against the snapshot when read).
pub(super) fn config(
    dir: &str,
    boot_options: &[(&str, bool)],
    vsock: Option<String>,
    common: Common,
) -> Result<RestoreConfig, CliError> {
    if let Some((name, _)) = boot_options.iter().find(|(_, given)| *given) {
        return Err(CliError::InvalidValue {
            option: (*name).to_string(),
            value: "(given)".into(),
            reason: "not allowed with --restore: the snapshot holds the booted guest".into(),
        });
    }
    Ok(RestoreConfig {
        dir: non_empty_path("--restore", dir)?,
        memory_bytes: common.memory,
        serial: common.serial,
        api_socket: common.api_socket,
        vsock,
        log_level: common.log_level,
        log_format: common.log_format,
    })
}

/// `dir` made absolute against the current directory (the VMM may run elsewhere).
pub(super) fn absolute(option: &str, dir: &str) -> Result<PathBuf, CliError> {
    let path = non_empty_path(option, dir)?;
    if path.is_absolute() {
        return Ok(path);
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(Path::new(dir)))
        .map_err(|e| CliError::InvalidValue {
            option: option.into(),
            value: dir.into(),
            reason: format!("cannot make it absolute: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use crate::cli::{parse_args, Command, RemoteRequest};

    fn err(args: &[&str]) -> String {
        parse_args(args).unwrap_err().to_string()
    }

    #[test]
    fn restore_options() {
        let Ok(Command::Restore(c)) = parse_args(&[
            "--restore",
            "/s",
            "--memory",
            "size=64M",
            "--api-socket",
            "/a",
        ]) else {
            panic!("not a restore");
        };
        assert_eq!(c.dir.to_str(), Some("/s"));
        assert_eq!(c.memory_bytes, Some(64 << 20));
        assert_eq!(c.api_socket.as_deref().and_then(|p| p.to_str()), Some("/a"));
        let Ok(Command::Restore(c)) = parse_args(&["--restore", "/s"]) else {
            panic!("not a restore");
        };
        assert_eq!(c.memory_bytes, None);
        for opt in [
            ["--kernel", "/k"],
            ["--initramfs", "/i"],
            ["--cmdline", "quiet"],
            ["--cpus", "boot=2"],
        ] {
            let e = err(&["--restore", "/s", opt[0], opt[1]]);
            assert!(e.starts_with(opt[0]) && e.contains("--restore"), "{e}");
        }
        let Ok(Command::Restore(c)) =
            parse_args(&["--restore", "/s", "--vsock", "cid=7,socket=/v,uplink=none"])
        else {
            panic!("not a restore");
        };
        assert_eq!(c.vsock.as_deref(), Some("cid=7,socket=/v,uplink=none"));
        assert!(err(&["--restore"]).contains("missing value"));
        assert!(err(&["--restore", ""]).contains("--restore"));
    }

    #[test]
    fn remote_lifecycle_requests() {
        let remote = |words: &[&str]| {
            let mut args = vec!["remote", "--api-socket", "/a"];
            args.extend_from_slice(words);
            match parse_args(&args) {
                Ok(Command::Remote(r)) => Ok(r.request),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(remote(&["pause"]), Ok(RemoteRequest::Pause));
        assert_eq!(remote(&["resume"]), Ok(RemoteRequest::Resume));
        assert_eq!(
            remote(&["snapshot", "/snap"]),
            Ok(RemoteRequest::Snapshot("/snap".into()))
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            remote(&["snapshot", "rel"]),
            Ok(RemoteRequest::Snapshot(cwd.join("rel")))
        );
        assert!(remote(&["snapshot"]).unwrap_err().contains("directory"));
        assert!(remote(&["snapshot", "/a", "/b"]).is_err());
    }
}
