//! Fuzz target `config`: see `vsock_router::fuzzing::config` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::config(data));
