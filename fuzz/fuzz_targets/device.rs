//! Fuzz target `device`: see `vsock_router::fuzzing::device` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::device(data));
