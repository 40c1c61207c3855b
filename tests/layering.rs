//! The library's folders depend one way (docs/architecture.md, "Layers"): every `crate::<module>`
//! path in the code of `src/` must go to a module of a lower layer, and no file of `src/` holds
//! more than [`MAX_CODE_LINES`] lines before its unit tests. A back edge or an oversized file
//! fails here, with the file and line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of lower layers only (its own layer's
/// other modules neither: they are siblings that must not know each other).
const LAYERS: &[&[&str]] = &[
    // Leaves: the wire format, the counters.
    &["wire", "stats"],
    // Virtqueue access: chain walk, iovecs, the TX packet view.
    &["vq"],
    // The system-call seam.
    &["sys"],
    // The host-stream trait and its readiness.
    &["stream"],
    // The backend seam: what the connection table asks of the world.
    &["seam"],
    // The connection state machine and table; the host backends.
    &["csm", "backend"],
    // The virtio device around the core.
    &["device"],
    // Option strings of the whole device; the device's vhost-user transport.
    &["config", "vhost_user"],
    // The router: implements the seam over the backends, builds a device.
    &["router"],
];

/// Modules for tests and fuzzing, which may use any layer (and nothing of the layers uses them).
const TOOLS: &[&str] = &["sim", "fuzzing"];

/// Lines of a file before its `#[cfg(test)]` module (code, comments and docs alike).
const MAX_CODE_LINES: usize = 600;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file of `src/` belongs to (`src/csm/muxer.rs` → `csm`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every `crate::<module>` a line of code names (comments are not dependencies).
fn crate_paths(line: &str) -> Vec<&str> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `vsock_crate::`, not ours
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        found.push(&rest[..end]);
    }
    found
}

/// Why `from` must not use `to`, or `None` when it may.
fn back_edge(from: &str, to: &str) -> Option<String> {
    if from == to || TOOLS.contains(&from) {
        return None;
    }
    if TOOLS.contains(&to) {
        return Some(format!("`{from}` uses the test tool `{to}`"));
    }
    match (layer_of(from), layer_of(to)) {
        (Some(f), Some(t)) if t < f => None,
        (Some(_), Some(_)) => Some(format!("`{from}` uses `{to}`, which is not below it")),
        (None, _) => Some(format!("`{from}` is in no layer: add it to LAYERS")),
        (_, None) => Some(format!("`{to}` is in no layer: add it to LAYERS")),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_files() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    (src, files)
}

/// The code of a file before its unit tests.
fn code_part(text: &str) -> &str {
    match text.find("\n#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    }
}

#[test]
fn modules_use_only_lower_layers() {
    let (src, files) = src_files();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for file in &files {
        // The crate root and the binaries are not part of the layers.
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        if from == "lib" || from == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in code_part(&text).lines().enumerate() {
            for to in crate_paths(line) {
                *edges.entry((from.clone(), to.to_string())).or_default() += 1;
                if let Some(why) = back_edge(&from, to) {
                    problems.push(format!(
                        "{}:{}: {why}: {}",
                        file.strip_prefix(&src).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "back edges (see docs/architecture.md, \"Layers\"):\n{}",
        problems.join("\n")
    );
    // The check saw the real dependencies (a parser that finds nothing would pass anything).
    assert!(
        edges.contains_key(&("csm".into(), "wire".into())),
        "{edges:?}"
    );
    assert!(
        edges.contains_key(&("device".into(), "csm".into())),
        "{edges:?}"
    );
    assert!(
        edges.contains_key(&("router".into(), "backend".into())),
        "{edges:?}"
    );
}

#[test]
fn no_source_file_is_oversized() {
    let (src, files) = src_files();
    let oversized: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let lines = code_part(&text).lines().count();
            (lines > MAX_CODE_LINES).then(|| {
                format!(
                    "{}: {lines} lines before its tests",
                    f.strip_prefix(&src).unwrap().display()
                )
            })
        })
        .collect();
    assert!(
        oversized.is_empty(),
        "files over {MAX_CODE_LINES} lines of code: split them by concern\n{}",
        oversized.join("\n")
    );
}

#[test]
fn the_checker_finds_back_edges() {
    assert_eq!(back_edge("csm", "wire"), None);
    assert_eq!(back_edge("router", "device"), None);
    assert_eq!(back_edge("sim", "router"), None);
    assert!(back_edge("csm", "device").is_some());
    assert!(back_edge("wire", "vq").is_some());
    assert!(
        back_edge("csm", "backend").is_some(),
        "siblings must not know each other"
    );
    assert!(back_edge("device", "sim").is_some());
    assert!(back_edge("device", "newthing").is_some());
    assert_eq!(
        crate_paths("use crate::csm::{a, b}; let x = crate::wire::Header::new(); // crate::device"),
        vec!["csm", "wire"]
    );
    assert_eq!(crate_paths("use vsock_crate::x;"), Vec::<&str>::new());
    assert_eq!(
        code_part("a\nb\n#[cfg(test)]\nmod tests {\n}\n"),
        "a\nb",
        "unit tests are not counted"
    );
}
