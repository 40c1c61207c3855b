//! CID namespaces: a registry directory's mode, mirroring the kernel's `net.vsock.ns_mode`
//! (Linux 7.0).
//!
//! In the kernel two vsock endpoints reach each other when they are in the same network
//! namespace or both namespaces are `global`; vhost-vsock CIDs are per namespace in `local`
//! mode, and the virtio G2H transport refuses sockets of a `local` namespace, so from a local
//! namespace nothing goes up to the parent, fallback or not. A namespace's mode is set when it
//! is created and never changes.
//!
//! Here a CID registry directory is a namespace. Its mode lives in the file `<dir>/ns_mode`
//! (`global` or `local` and a newline), written once, atomically, by the first VMM that claims a
//! CID there (or `vsock-connect`, which only reads it). A directory without the file is
//! `global`, which is what registries were before modes existed.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The name of the mode file in a registry directory.
pub const MODE_FILE: &str = "ns_mode";

/// A CID namespace's mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NsMode {
    /// One CID space with the parent: siblings in the registry, and the G2H uplink for CIDs
    /// nobody here owns (with `g2h_fallback` on). Today's behaviour, and the default.
    #[default]
    Global,
    /// A CID space of its own: siblings only inside the registry, and no uplink at all (the
    /// kernel's G2H transport refuses sockets of a local namespace): a CID nobody here owns is
    /// refused whatever `g2h_fallback` says, and not one byte leaves.
    Local,
}

impl NsMode {
    /// Whether connections may take the G2H uplink (only from a `global` namespace).
    pub fn reaches_parent(self) -> bool {
        self == NsMode::Global
    }

    /// The mode's name, as written in options, the mode file and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NsMode::Global => "global",
            NsMode::Local => "local",
        }
    }
}

impl fmt::Display for NsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "global" => Ok(NsMode::Global),
            "local" => Ok(NsMode::Local),
            _ => Err(format!("`{s}` is not a namespace mode (global or local)")),
        }
    }
}

/// Why a registry's namespace mode could not be read or set.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    /// The registry was created with another mode than the one asked for.
    #[error(
        "CID registry {} is a {have} namespace, but ns_mode={want} was asked for \
         (a namespace's mode is fixed when it is created; use another registry directory)",
        dir.display()
    )]
    Mismatch {
        /// The registry directory.
        dir: PathBuf,
        /// Its mode.
        have: NsMode,
        /// The mode asked for.
        want: NsMode,
    },
    /// The mode file holds something else than a mode.
    #[error("{}: {why}", path.display())]
    Corrupt {
        /// The mode file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Reading or writing the mode file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The mode of the registry `dir`: what its mode file says, `global` without one.
pub fn read_mode(dir: &Path) -> Result<NsMode, NsError> {
    let path = dir.join(MODE_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse_file(&path, &text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(NsMode::Global),
        Err(source) => Err(NsError::Io { path, source }),
    }
}

fn parse_file(path: &Path, text: &str) -> Result<NsMode, NsError> {
    let corrupt = |why: String| NsError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let line = text
        .strip_suffix('\n')
        .ok_or_else(|| corrupt("not one line ending in a newline".into()))?;
    line.parse().map_err(corrupt)
}

/// Settles the mode of the registry `dir` (which exists) for a VMM that joins it: with `want`,
/// the registry must have that mode, or gets it when it has none yet (the file is written
/// complete under a temporary name and linked into place, so a racing VMM either sees the whole
/// file or creates its own first and then compares); without `want`, the registry's mode is
/// taken as it is. Returns the registry's mode.
pub fn settle(dir: &Path, want: Option<NsMode>) -> Result<NsMode, NsError> {
    let have = match fs::symlink_metadata(dir.join(MODE_FILE)) {
        Ok(_) => Some(read_mode(dir)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(NsError::Io {
                path: dir.join(MODE_FILE),
                source,
            })
        }
    };
    let have = match (have, want) {
        (Some(have), _) => have,
        (None, None) => return Ok(NsMode::Global),
        (None, Some(want)) => create(dir, want)?,
    };
    match want {
        Some(want) if want != have => Err(NsError::Mismatch {
            dir: dir.to_path_buf(),
            have,
            want,
        }),
        _ => Ok(have),
    }
}

/// Writes `<dir>/ns_mode` with `mode` unless it exists; returns the mode the file then holds.
fn create(dir: &Path, mode: NsMode) -> Result<NsMode, NsError> {
    let path = dir.join(MODE_FILE);
    // Unique per process and call: racing threads of one process must not share it.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{MODE_FILE}.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| NsError::Io { path: p, source }
    };
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(format!("{mode}\n").as_bytes()))
        .map_err(io_err(&tmp));
    let linked = written.and_then(|()| match fs::hard_link(&tmp, &path) {
        Ok(()) => Ok(mode),
        // Another VMM was first: its file counts.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_mode(dir),
        Err(source) => Err(NsError::Io {
            path: path.clone(),
            source,
        }),
    });
    let _ = fs::remove_file(&tmp);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [NsMode::Global, NsMode::Local] {
            assert_eq!(m.to_string().parse::<NsMode>(), Ok(m));
        }
        assert!("Local".parse::<NsMode>().is_err());
        assert!("".parse::<NsMode>().is_err());
        assert!(NsMode::Global.reaches_parent());
        assert!(!NsMode::Local.reaches_parent());
        assert_eq!(NsMode::default(), NsMode::Global);
    }

    #[test]
    fn a_registry_without_a_mode_file_is_global_and_stays_without_one() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_mode(d.path()).unwrap(), NsMode::Global);
        assert_eq!(settle(d.path(), None).unwrap(), NsMode::Global);
        assert!(!d.path().join(MODE_FILE).exists());
    }

    #[test]
    fn the_first_mode_asked_for_is_fixed() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            settle(d.path(), Some(NsMode::Local)).unwrap(),
            NsMode::Local
        );
        assert_eq!(
            fs::read_to_string(d.path().join(MODE_FILE)).unwrap(),
            "local\n"
        );
        // Joining without a mode takes the registry's; with the same mode is fine.
        assert_eq!(settle(d.path(), None).unwrap(), NsMode::Local);
        assert_eq!(
            settle(d.path(), Some(NsMode::Local)).unwrap(),
            NsMode::Local
        );
        let e = settle(d.path(), Some(NsMode::Global)).unwrap_err();
        assert!(matches!(e, NsError::Mismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("is a local namespace") && msg.contains("ns_mode=global"),
            "{msg}"
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_global_registry_refuses_local() {
        let d = tempfile::tempdir().unwrap();
        settle(d.path(), Some(NsMode::Global)).unwrap();
        assert!(settle(d.path(), Some(NsMode::Local)).is_err());
        assert_eq!(settle(d.path(), None).unwrap(), NsMode::Global);
    }

    #[test]
    fn a_corrupt_mode_file_is_an_error_that_names_it() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "local", "locale\n", "global\nlocal\n"] {
            fs::write(d.path().join(MODE_FILE), bad).unwrap();
            let e = settle(d.path(), None).unwrap_err();
            assert!(matches!(e, NsError::Corrupt { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains(MODE_FILE), "{e}");
        }
    }

    #[test]
    fn racing_creators_agree_on_one_mode() {
        for _ in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().to_path_buf();
            let threads: Vec<_> = [NsMode::Local, NsMode::Global]
                .into_iter()
                .map(|m| {
                    let dir = dir.clone();
                    std::thread::spawn(move || (m, settle(&dir, Some(m))))
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let fixed = read_mode(&dir).unwrap();
            for (m, r) in results {
                match r {
                    Ok(got) => assert_eq!((m, got), (fixed, fixed)),
                    Err(NsError::Mismatch { have, want, .. }) => {
                        assert_eq!((have, want), (fixed, m))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}
