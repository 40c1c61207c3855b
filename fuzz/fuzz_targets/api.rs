//! Fuzz target `api`: see `vsock_router_fuzz::api` and `docs/security.md`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vsock_router_fuzz::api(data));
