//! Fuzz target `handshake`: see `vsock_router::fuzzing::handshake` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::handshake(data));
