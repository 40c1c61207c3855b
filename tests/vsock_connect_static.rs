//! `vsock-connect` builds as a static executable, so it can be copied into a guest.

use std::path::Path;
use std::process::Command;

#[test]
fn vsock_connect_builds_statically() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target/static");
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "--bin",
            "vsock-connect",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "static build failed");
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release/vsock-connect");
    // A static executable has no program interpreter (no PT_INTERP, type 3, in its headers).
    let elf = std::fs::read(&bin).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let phentsize = u16::from_le_bytes(elf[0x36..0x38].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(elf[0x38..0x3a].try_into().unwrap()) as usize;
    let interp = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    });
    assert!(!interp, "vsock-connect is dynamically linked");
    let out = Command::new(&bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("vsock-connect"));
}
