//! Fuzz target: see `seqcast_protocol::fuzz_checks::publish_body`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| seqcast_protocol::fuzz_checks::publish_body(data));
