//! Fuzz target `tx_chain`: see `vsock_router::fuzzing::tx_chain` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router::fuzzing::tx_chain(data));
