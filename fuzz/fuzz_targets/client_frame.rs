//! Fuzz target: see `seqcast_protocol::fuzz_checks::client_frame`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| seqcast_protocol::fuzz_checks::client_frame(data));
