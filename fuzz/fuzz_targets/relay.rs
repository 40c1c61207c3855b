//! Fuzz target `relay`: see `vsock_router::fuzzing::relay` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::relay(data));
