//! A route document: parsed, compiled (no I/O), printed and read back.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshwork_gateway::fuzz::route_toml(data));
