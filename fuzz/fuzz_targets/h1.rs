//! Arbitrary bytes through the gateway's HTTP/1 head parser and chunked
//! body follower.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshwork_gateway::fuzz::h1(data));
