//! A W3C `traceparent` value: parsed, and a parsed one continues the
//! trace with a header that parses again.
#![no_main]
use meshwork_telemetry::TraceContext;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(cx) = TraceContext::parse(text) {
        let next = cx.traceparent();
        let again = TraceContext::parse(&next);
        assert!(
            again.is_some(),
            "{text:?} continued as {next:?}, which does not parse"
        );
        assert_eq!(again.map(|c| c.trace_id), Some(cx.trace_id));
    }
});
