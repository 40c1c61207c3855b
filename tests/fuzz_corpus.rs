//! Every fuzz body over the checked-in corpus (`fuzz/corpus/<target>/`) and over a few hundred
//! deterministic pseudo-random inputs, so plain `cargo test` exercises the code the fuzzers run
//! without cargo-fuzz. Minimized inputs of bugs found by fuzzing live here too.

use std::path::PathBuf;

use vsock_router::fuzzing::{XorShift, TARGETS};

/// Pseudo-random inputs per target (the device target is slower: fewer).
fn random_runs(target: &str) -> usize {
    match target {
        "device" => 40,
        _ => 300,
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn run_target(name: &str) {
    let (_, body) = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz body {name}"));
    let dir = corpus_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("corpus file");
        eprintln!("{name}: {}", f.display());
        body(&data);
    }
    let mut rng = XorShift::new(0x5eed ^ name.len() as u64);
    for _ in 0..random_runs(name) {
        let len = (rng.next_u64() % 600) as usize;
        let data = rng.bytes(len);
        body(&data);
    }
}

#[test]
fn every_target_has_a_test_here() {
    let here = ["tx_chain", "device", "csm", "relay", "handshake", "config"];
    for (name, _) in TARGETS {
        assert!(here.contains(name), "add a #[test] for fuzz body {name}");
    }
}

#[test]
fn tx_chain_corpus() {
    run_target("tx_chain");
}

#[test]
fn device_corpus() {
    run_target("device");
}

#[test]
fn csm_corpus() {
    run_target("csm");
}

#[test]
fn handshake_corpus() {
    run_target("handshake");
}

#[test]
fn config_corpus() {
    run_target("config");
}

#[test]
fn relay_corpus() {
    run_target("relay");
}
