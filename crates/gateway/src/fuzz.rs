//! Entry points for the fuzz targets in `fuzz/` (feature `fuzz`, not part
//! of the API): each takes arbitrary bytes and must never panic, hang or
//! allocate without bound, whatever they are.

use http::header::{self, HeaderMap, HeaderValue};

use crate::auth::Auth;
use crate::route::compile::{self, Resolved};
use crate::route::model::{AuthConfig, JwtConfig, RouteSet};

/// A route document as `meshwork gateway apply` reads it: parsed, then
/// compiled with nothing resolved (no DNS, no files), then printed back.
pub fn route_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(set) = RouteSet::from_toml(text) else {
        return;
    };
    let _ = compile::plan(&set, &Resolved::default());
    if let Ok(again) = set.to_toml() {
        // What we print, we read back.
        if let Err(e) = RouteSet::from_toml(&again) {
            panic!("the printed route set does not parse: {e}\n{again}");
        }
    }
}

/// Raw bytes of an HTTP/1 connection through the framing tracker: it never
/// panics or grows past its head limit, and its verdicts do not depend on
/// how the bytes were split into reads (the first two bytes choose a cut).
pub fn framing(data: &[u8]) {
    use std::sync::Arc;

    use crate::framing::{FramingTracker, FramingVerdict};

    let verdicts = |reads: &mut dyn Iterator<Item = &[u8]>| {
        let verdict = Arc::new(FramingVerdict::default());
        let mut tracker = FramingTracker::new(1024, 16, verdict.clone());
        for read in reads {
            tracker.feed(read);
        }
        (0..8).map(|i| verdict.fault(i)).collect::<Vec<_>>()
    };
    let whole = verdicts(&mut std::iter::once(data));
    let cut = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])) % (data.len() + 1),
        _ => 0,
    };
    let (head, tail) = data.split_at(cut);
    let split = verdicts(&mut [head, tail].into_iter());
    assert_eq!(whole, split, "verdicts changed with a read cut at {cut}");
    if data.len() <= 4096 {
        let bytewise = verdicts(&mut data.chunks(1));
        assert_eq!(whole, bytewise, "verdicts changed with one-byte reads");
    }
}

/// Arbitrary bytes as a request head and as a chunked body for the h1
/// parsers: no panic; a parsed head's ranges lie inside it, in order, and
/// its own bytes parse to the same head; a chunked body's data, end and
/// error do not depend on how the bytes were split into reads.
pub fn h1(data: &[u8]) {
    use crate::h1::chunked::{Chunked, Piece};
    use crate::h1::head::{
        Edits, Limits, ResponseFraming, parse_request, parse_response, write_request,
    };

    let limits = Limits {
        max_head_bytes: 4096,
        max_headers: 32,
    };
    if let Ok(Some(h)) = parse_request(data, limits) {
        assert!(h.len <= data.len());
        assert!(h.method.end <= h.target.start && h.target.end <= h.len);
        assert!(h.target.start <= h.path.start && h.path.end == h.target.end);
        let mut at = h.target.end;
        for f in &h.fields {
            assert!(at <= f.line.start && f.name.start == f.line.start);
            assert!(f.name.end <= f.value.start && f.value.end <= f.line.end);
            at = f.line.end;
        }
        assert!(at <= h.len);
        // Written back (as HTTP/1.1) with the last line dropped: still a
        // head, one line shorter, when it keeps a Host and its framing, in
        // origin form and for the same authority.
        let framing_line = |i: usize| {
            let name = &data[h.fields[i].name.clone()];
            name.eq_ignore_ascii_case(b"host")
                || name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"transfer-encoding")
        };
        let drop: Vec<usize> = h.fields.len().checked_sub(1).into_iter().collect();
        if h.host.is_some() && !drop.iter().any(|i| framing_line(*i)) {
            let mut out = Vec::new();
            let edits = Edits {
                drop: &drop,
                ..Edits::default()
            };
            if write_request(data, &h, &edits, &mut out).is_ok() {
                let again = parse_request(
                    &out,
                    Limits {
                        max_head_bytes: 8192,
                        ..limits
                    },
                );
                let fields = again.as_ref().map(|a| a.as_ref().map(|a| a.fields.len()));
                assert!(
                    matches!(fields, Ok(Some(n)) if n + drop.len() == h.fields.len()),
                    "the written head does not parse back: {fields:?}"
                );
                if let Ok(Some(a)) = &again {
                    assert!(!a.absolute);
                    assert_eq!(
                        a.authority.clone().map(|r| &out[r]),
                        h.authority.clone().map(|r| &data[r])
                    );
                }
            }
        }
        assert_eq!(parse_request(&data[..h.len], limits), Ok(Some(h)));
    }
    if let Ok(Some(r)) = parse_response(data, limits, data.len().is_multiple_of(2)) {
        assert!(r.len <= data.len() && r.fields.iter().all(|f| f.line.end <= r.len));
        assert!(r.framing != ResponseFraming::UntilClose || r.close);
    }
    let follow = |reads: &mut dyn Iterator<Item = &[u8]>| {
        let mut c = Chunked::new(64, 256);
        let mut out = Vec::new();
        let mut used = 0usize;
        for mut read in reads {
            while !read.is_empty() {
                match c.next(read) {
                    Ok(Piece::Data(n)) => {
                        out.extend_from_slice(&read[..n]);
                        read = &read[n..];
                        used += n;
                    }
                    Ok(Piece::Framing(n)) => {
                        assert!(n > 0, "no progress");
                        read = &read[n..];
                        used += n;
                    }
                    Ok(Piece::End(n)) => return Ok((out, used + n)),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok((out, usize::MAX))
    };
    let whole = follow(&mut std::iter::once(data));
    let cut = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let (a, b) = data.split_at(cut);
    assert_eq!(whole, follow(&mut [a, b].into_iter()), "cut at {cut}");
}

/// An `Authorization` header against a route's JWT (HS256) and API-key
/// checks.
pub fn jwt_header(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let cfg = AuthConfig {
        jwt: Some(JwtConfig {
            secret: Some("fuzz-secret".into()),
            ..JwtConfig::default()
        }),
        api_keys: None,
    };
    let Ok(auth) = Auth::compile(&cfg, &Resolved::default()) else {
        panic!("the fuzz target's own auth settings do not compile");
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value.clone());
    let _ = auth.check(&mut headers);
    let mut headers = HeaderMap::new();
    if let Ok(bearer) = HeaderValue::from_bytes(&[b"Bearer ", value.as_bytes()].concat()) {
        headers.insert(header::AUTHORIZATION, bearer);
        let _ = auth.check(&mut headers);
    }
}
