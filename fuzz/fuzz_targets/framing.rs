//! Raw HTTP/1 connection bytes through the gateway's framing tracker.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshwork_gateway::fuzz::framing(data));
