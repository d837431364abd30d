//! A `grpc-timeout` header value: parsed, and what parses survives being
//! formatted and parsed again without growing.
#![no_main]
use meshwork_resilience::timeout::{format_grpc_timeout, parse_grpc_timeout};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(d) = parse_grpc_timeout(text) {
        let again = format_grpc_timeout(d);
        match parse_grpc_timeout(&again) {
            Some(d2) => assert!(d2 <= d, "{text:?} -> {d:?} -> {again:?} -> {d2:?}"),
            None => panic!("{text:?} parsed as {d:?} but its formatting {again:?} does not parse"),
        }
    }
});
