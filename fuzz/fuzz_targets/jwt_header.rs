//! An `Authorization` header against a route's JWT check.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshwork_gateway::fuzz::jwt_header(data));
