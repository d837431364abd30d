//! RESP requests: whatever the bytes, the parser answers requests or a protocol
//! error without panicking, and feeding the same bytes in two pieces gives the same
//! requests as feeding them at once (nothing depends on where reads split).
#![no_main]
use bytes::BytesMut;
use meshwork_cache::resp::{Limits, parse};

fn all(chunks: &[&[u8]], limits: &Limits) -> (Vec<Vec<bytes::Bytes>>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match parse(&mut buf, limits) {
                Ok(Some(args)) => out.push(args),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_bulk_bytes: 1024,
        max_args: 64,
        max_inline_bytes: 256,
    };
    let (whole, failed) = all(&[data], &limits);
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let (split, split_failed) = all(&[&data[..cut], &data[cut..]], &limits);
    if !failed && !split_failed {
        assert_eq!(whole, split);
    }
});
