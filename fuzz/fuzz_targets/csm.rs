//! Fuzz target `csm`: see `vsock_router::fuzzing::csm` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::csm(data));
