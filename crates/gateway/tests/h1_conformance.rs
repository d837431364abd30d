//! Conformance of the HTTP/1.1 engine's parsers (`meshwork_gateway::h1`)
//! against RFC 9112: valid and invalid request heads, every framing and
//! Host rule, and chunked bodies, each fed whole and in every two-part
//! split (a parser's answer must not depend on how the bytes arrived).

use meshwork_gateway::h1::chunked::{ChunkError, Chunked, Piece};
use meshwork_gateway::h1::head::{
    Edits, Framing, HeadError, Limits, RequestHead, ResponseError, ResponseFraming, ResponseHead,
    parse_request, parse_response, write_request,
};

/// Parses `bytes` as a whole, and checks every proper prefix is either
/// incomplete or already the same error.
fn parse(bytes: &[u8]) -> Result<RequestHead, HeadError> {
    let whole = parse_request(bytes, Limits::default()).map(|h| h.expect("a complete head"));
    for cut in 0..bytes.len() {
        match parse_request(&bytes[..cut], Limits::default()) {
            Ok(None) => {}
            Ok(Some(h)) => panic!("a prefix of {cut} bytes parsed as a head: {h:?}"),
            Err(e) => assert_eq!(
                Err(e),
                whole.clone().map(|_| ()),
                "prefix {cut} of {:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }
    whole
}

fn refused(bytes: &str) -> HeadError {
    match parse(bytes.as_bytes()) {
        Err(e) => e,
        Ok(h) => panic!("accepted {bytes:?}: {h:?}"),
    }
}

#[test]
fn valid_heads_keep_their_bytes_and_say_their_framing() {
    let raw = b"POST /a?b=c HTTP/1.1\r\nHost: example.test:8080\r\nContent-Length: 5\r\nX-Empty:\r\nX-Pad:  v  \r\n\r\nhello";
    let h = parse(&raw[..raw.len() - 5]).unwrap();
    assert_eq!(h.len, raw.len() - 5);
    assert_eq!(&raw[h.method.clone()], b"POST");
    assert_eq!(&raw[h.target.clone()], b"/a?b=c");
    assert_eq!(h.minor, 1);
    assert_eq!(h.framing, Framing::Length(5));
    let host = &h.fields[h.host.unwrap()];
    assert_eq!(&raw[host.name.clone()], b"Host");
    assert_eq!(&raw[host.value.clone()], b"example.test:8080");
    assert_eq!(&raw[host.line.clone()], b"Host: example.test:8080\r\n");
    assert_eq!(&raw[h.fields[2].value.clone()], b"");
    assert_eq!(&raw[h.fields[3].value.clone()], b"v");
    assert!(!h.close && !h.upgrade && !h.expect_continue);
    // Dropping a line's range and keeping the rest is still a valid head.
    let mut edited = raw[..h.fields[2].line.start].to_vec();
    edited.extend_from_slice(&raw[h.fields[2].line.end..h.len]);
    let again = parse(&edited).unwrap();
    assert_eq!(again.fields.len(), 3);

    let h =
        parse(b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Chunked);
    let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Empty);
    let h = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(h.close, "HTTP/1.0 closes unless keep-alive");
    assert_eq!(h.host, None);
    let h = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
    assert!(!h.close);
    let h = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n").unwrap();
    assert!(h.close);
    let h =
        parse(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
    assert!(h.upgrade);
    let h =
        parse(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
            .unwrap();
    assert!(h.expect_continue);
    let h = parse(b"GET / HTTP/1.1\r\nHost: [::1]:65535\r\n\r\n").unwrap();
    assert!(h.host.is_some());
    // HTTP/1.0 has no upgrade and no 100-continue.
    let h = parse(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n").unwrap();
    assert!(!h.upgrade && !h.expect_continue);
    // Trailing whitespace before CRLF is not a bare LF.
    assert!(parse(b"GET / HTTP/1.1\r\nHost: a \r\nX: b\t\r\n\r\n").is_ok());
}

#[test]
fn every_framing_rule_is_enforced() {
    for (head, want) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::BothLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            HeadError::BothLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n",
            HeadError::SeveralLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\ncontent-length: 5\r\n\r\n",
            HeadError::SeveralLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n",
            HeadError::BadLength,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            HeadError::NotChunked,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            HeadError::NotChunked,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            HeadError::ChunkedTwice,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::ChunkedTwice,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: +4\r\n\r\n",
            HeadError::BothLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            HeadError::BothLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: x\r\n\r\n",
            HeadError::SeveralLengths,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            HeadError::NotChunked,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
            HeadError::NotChunked,
        ),
        (
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            HeadError::TransferEncodingInHttp10,
        ),
    ] {
        assert_eq!(refused(head), want, "{head:?}");
    }
    let h = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    assert_eq!(h.framing, Framing::Chunked, "codings listed over two lines");
    let h =
        parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000000000012\r\n\r\n")
            .unwrap();
    assert_eq!(
        h.framing,
        Framing::Length(12),
        "leading zeros, as hyper reads them"
    );
}

#[test]
fn every_host_rule_is_enforced() {
    for (head, want) in [
        ("GET / HTTP/1.1\r\n\r\n", HeadError::NoHost),
        ("GET http://a/ HTTP/1.1\r\n\r\n", HeadError::NoHost),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            HeadError::SeveralHosts,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            HeadError::SeveralHosts,
        ),
        (
            "GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            HeadError::SeveralHosts,
        ),
        ("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", HeadError::BadHost),
        ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", HeadError::BadHost),
        ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", HeadError::BadHost),
        ("GET / HTTP/1.1\r\nHost: a:port\r\n\r\n", HeadError::BadHost),
        (
            "GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n",
            HeadError::BadHost,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a:65536\r\n\r\n",
            HeadError::BadHost,
        ),
        ("GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", HeadError::BadHost),
        ("GET / HTTP/1.1\r\nHost:\r\n\r\n", HeadError::BadHost),
    ] {
        assert_eq!(refused(head), want, "{head:?}");
    }
}

/// RFC 9112 §3.2.2: an absolute-form target's authority wins over `Host`;
/// upstream the target is origin-form and the authority is the Host value,
/// so routing and the upstream see one authority.
#[test]
fn absolute_form_targets_win_over_host_and_go_upstream_in_origin_form() {
    for (raw, authority, upstream) in [
        (
            "GET http://a.test:81/p?q HTTP/1.1\r\nHost: other\r\nX: 1\r\n\r\n",
            "a.test:81",
            "GET /p?q HTTP/1.1\r\nX: 1\r\nHost: a.test:81\r\n\r\n",
        ),
        (
            "GET HTTPS://a.test HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "a.test",
            "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
        (
            "GET http://a.test?q=1 HTTP/1.0\r\n\r\n",
            "a.test",
            "GET /?q=1 HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
        (
            "GET /p HTTP/1.1\r\nHost: b.test\r\n\r\n",
            "b.test",
            "GET /p HTTP/1.1\r\nHost: b.test\r\n\r\n",
        ),
        (
            "GET http://[::1]:8080/x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "[::1]:8080",
            "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        ),
        (
            "OPTIONS http://a.test:81 HTTP/1.1\r\nHost: a.test:81\r\n\r\n",
            "a.test:81",
            "OPTIONS * HTTP/1.1\r\nHost: a.test:81\r\n\r\n",
        ),
    ] {
        let h = parse(raw.as_bytes()).unwrap();
        assert_eq!(
            h.authority.clone().map(|r| &raw[r]),
            Some(authority),
            "{raw:?}"
        );
        assert_eq!(h.absolute, raw.contains("://"));
        let mut out = Vec::new();
        write_request(raw.as_bytes(), &h, &Edits::default(), &mut out).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), upstream);
    }
    // A Host rewrite replaces the authority either way; a second Host
    // beside the client's line is still refused.
    let raw = b"GET http://a.test/p HTTP/1.1\r\nHost: other\r\n\r\n";
    let h = parse(raw).unwrap();
    let mut out = Vec::new();
    let host: &[(&[u8], &[u8])] = &[(b"Host", b"up.internal")];
    let edits = Edits {
        drop: &[0],
        add: host,
        ..Edits::default()
    };
    write_request(raw, &h, &edits, &mut out).unwrap();
    assert_eq!(out, b"GET /p HTTP/1.1\r\nHost: up.internal\r\n\r\n");
    let edits = Edits {
        add: host,
        ..Edits::default()
    };
    assert!(write_request(raw, &h, &edits, &mut Vec::new()).is_err());

    for (head, want) in [
        (
            "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTarget,
        ),
        (
            "GET http://a/#x HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTarget,
        ),
        ("GET /p#x HTTP/1.1\r\nHost: a\r\n\r\n", HeadError::BadTarget),
        (
            "GET http:/a HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTarget,
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTarget,
        ),
        (
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            HeadError::BadTarget,
        ),
        (
            "GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTargetAuthority,
        ),
        (
            "GET http:///p HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTargetAuthority,
        ),
        (
            "GET http://a:99999/ HTTP/1.1\r\nHost: a\r\n\r\n",
            HeadError::BadTargetAuthority,
        ),
        // Host rules still hold beside an absolute-form target (§3.2).
        (
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            HeadError::SeveralHosts,
        ),
        (
            "GET http://a/ HTTP/1.1\r\nHost: a b\r\n\r\n",
            HeadError::BadHost,
        ),
    ] {
        assert_eq!(refused(head), want, "{head:?}");
        assert_eq!(want.status(), 400);
    }
}

#[test]
fn malformed_lines_and_characters_are_refused() {
    for head in [
        // obs-fold (RFC 9112 §5.2: a server must refuse or replace it).
        "GET / HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n",
        // Whitespace between the name and the colon (§5.1).
        "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        // Whitespace before the first header line.
        "GET / HTTP/1.1\r\n Host: a\r\n\r\n",
        // No colon.
        "GET / HTTP/1.1\r\nHost: a\r\nNo-Colon\r\n\r\n",
        // Control characters in a value, a name and the target.
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX\x7f: a\r\n\r\n",
        "GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
        // Request line: a bad version, a missing target, a bad method.
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1x\r\nHost: a\r\n\r\n",
        "GET HTTP/1.1\r\nHost: a\r\n\r\n",
        "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        match refused(head) {
            HeadError::Malformed(_) => {}
            other => panic!("{head:?} refused as {other:?}, not as malformed"),
        }
    }
    // A bare LF anywhere (httparse reads it as a line end; copied upstream
    // byte for byte it would mix line endings).
    for head in [
        "GET / HTTP/1.1\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nX: 1 \n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\n\n",
        "GET / HTTP/1.0\n\n",
    ] {
        assert_eq!(refused(head), HeadError::BareLf, "{head:?}");
    }
}

#[test]
fn limits_hold_however_the_head_arrives() {
    let limits = Limits {
        max_head_bytes: 64,
        max_headers: 3,
    };
    let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
    long.resize(80, b'v');
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_request(&long, limits), Err(HeadError::TooLarge));
    assert_eq!(parse_request(&long[..70], limits), Err(HeadError::TooLarge));
    assert_eq!(parse_request(&long[..40], limits), Ok(None));
    let many = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    assert_eq!(parse_request(many, limits), Err(HeadError::TooManyHeaders));
    assert_eq!(HeadError::TooManyHeaders.status(), 431);
    assert_eq!(HeadError::BothLengths.status(), 400);
}

#[test]
fn heads_are_written_upstream_by_copying_with_edits_spliced() {
    let raw = b"GET /old?q=1 HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\nX-A: 1\r\nKeep-Alive: timeout=5\r\nX-B:  2 \r\n\r\n";
    let h = parse(raw).unwrap();
    // Every subset of lines dropped: the output parses, keeps the others
    // byte for byte and in order, and ends with the added lines.
    for mask in 0u32..(1 << h.fields.len()) {
        let drop: Vec<usize> = (0..h.fields.len())
            .filter(|i| mask & (1 << i) != 0)
            .collect();
        if drop.contains(&0) {
            continue; // HTTP/1.1 needs its Host
        }
        let mut out = Vec::new();
        let add: &[(&[u8], &[u8])] = &[
            (b"X-Forwarded-For", b"127.0.0.1"),
            (b"Via", b"1.0 meshwork"),
        ];
        write_request(
            raw,
            &h,
            &Edits {
                target: Some(b"/new?q=1"),
                drop: &drop,
                add,
            },
            &mut out,
        )
        .unwrap();
        let w = parse(&out).unwrap();
        assert_eq!(&out[w.target.clone()], b"/new?q=1");
        assert_eq!(w.minor, 1);
        let kept: Vec<&[u8]> = (0..h.fields.len())
            .filter(|i| !drop.contains(i))
            .map(|i| &raw[h.fields[i].line.clone()])
            .collect();
        let got: Vec<&[u8]> = w.fields.iter().map(|f| &out[f.line.clone()]).collect();
        assert_eq!(&got[..kept.len()], &kept[..], "drop {drop:?}");
        assert_eq!(
            got[kept.len()..],
            [
                &b"X-Forwarded-For: 127.0.0.1\r\n"[..],
                b"Via: 1.0 meshwork\r\n"
            ]
        );
    }
    let mut out = Vec::new();
    write_request(raw, &h, &Edits::default(), &mut out).unwrap();
    assert_eq!(&out[..21], b"GET /old?q=1 HTTP/1.1");
    assert_eq!(
        &out[21..],
        &raw[21..],
        "no edits: the same bytes, on HTTP/1.1"
    );
    for bad in [
        Edits {
            target: Some(b"/a b"),
            ..Edits::default()
        },
        Edits {
            target: Some(b""),
            ..Edits::default()
        },
        Edits {
            add: &[(b"X Y", b"1")],
            ..Edits::default()
        },
        Edits {
            add: &[(b"", b"1")],
            ..Edits::default()
        },
        Edits {
            add: &[(b"X", b"1\r\nSmuggled: yes")],
            ..Edits::default()
        },
        Edits {
            add: &[(b"X", b" padded")],
            ..Edits::default()
        },
        // The framing and the authority stay unambiguous.
        Edits {
            add: &[(b"host", b"b.test")],
            ..Edits::default()
        },
        Edits {
            drop: &[0],
            ..Edits::default()
        },
    ] {
        let mut out = Vec::new();
        assert!(write_request(raw, &h, &bad, &mut out).is_err(), "{bad:?}");
        assert!(out.is_empty(), "nothing written for {bad:?}");
    }
}

/// Parses a response whole (to a GET, or a HEAD when `head`), checking
/// every proper prefix is incomplete or the same error.
fn response(bytes: &str, head: bool) -> Result<ResponseHead, ResponseError> {
    let bytes = bytes.as_bytes();
    let whole = parse_response(bytes, Limits::default(), head).map(|h| h.expect("complete"));
    for cut in 0..bytes.len() {
        match parse_response(&bytes[..cut], Limits::default(), head) {
            Ok(None) => {}
            Ok(Some(h)) => panic!("a prefix of {cut} bytes parsed: {h:?}"),
            Err(e) => assert_eq!(Err(e), whole.clone().map(|_| ())),
        }
    }
    whole
}

#[test]
fn framing_lines_cannot_be_dropped_or_doubled() {
    let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
    let h = parse(raw).unwrap();
    let mut out = Vec::new();
    let drop_cl = Edits {
        drop: &[1],
        ..Edits::default()
    };
    assert!(write_request(raw, &h, &drop_cl, &mut out).is_err());
    let second = Edits {
        add: &[(b"content-length", b"2")],
        ..Edits::default()
    };
    assert!(write_request(raw, &h, &second, &mut out).is_err());
    assert!(out.is_empty());
    // Replacing the Host is a drop and an add.
    let rehost = Edits {
        drop: &[0],
        add: &[(b"Host", b"b.test")],
        ..Edits::default()
    };
    write_request(raw, &h, &rehost, &mut out).unwrap();
    assert_eq!(
        out,
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\nHost: b.test\r\n\r\n"
    );
}

#[test]
fn response_framing_follows_section_6_3() {
    let framing = |r: &str, head: bool| response(r, head).map(|h| (h.framing, h.close));
    use ResponseFraming::*;
    for (resp, head, want) in [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n",
            false,
            (Length(13), false),
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
            (Empty, false),
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            (Chunked, false),
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            false,
            (UntilClose, true),
        ),
        ("HTTP/1.1 200 OK\r\n\r\n", false, (UntilClose, true)),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n",
            true,
            (Empty, false),
        ),
        (
            "HTTP/1.1 204 No Content\r\nContent-Length: 13\r\n\r\n",
            false,
            (Empty, false),
        ),
        (
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            (Empty, false),
        ),
        ("HTTP/1.1 100 Continue\r\n\r\n", false, (Empty, false)),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
            false,
            (Length(1), true),
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            (Length(1), true),
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n",
            false,
            (Length(1), false),
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: close, keep-alive\r\n\r\n",
            false,
            (Length(1), true),
        ),
        (
            "HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n",
            false,
            (Length(1), true),
        ),
    ] {
        assert_eq!(framing(resp, head), Ok(want), "{resp:?} head={head}");
    }
    for (resp, want) in [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ResponseError::BothLengths,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            ResponseError::SeveralLengths,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            ResponseError::BadLength,
        ),
        (
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            ResponseError::TransferEncodingInHttp10,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            ResponseError::ChunkedTwice,
        ),
    ] {
        assert_eq!(response(resp, false).map(|_| ()), Err(want), "{resp:?}");
    }
    for resp in [
        "HTTP/1.1 2000 OK\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        "HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
        "HTTP/2 200 OK\r\n\r\n",
    ] {
        assert!(
            matches!(response(resp, false), Err(ResponseError::Malformed(_))),
            "{resp:?}"
        );
    }
    let raw = "HTTP/1.1 200 OK\r\nX-Upstream: a\r\nContent-Length: 2\r\n\r\nhi";
    let h = response(&raw[..raw.len() - 2], false).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(
        &raw.as_bytes()[h.fields[0].line.clone()],
        b"X-Upstream: a\r\n"
    );
    assert_eq!(h.len, raw.len() - 2);
}

/// Runs a chunked body through the follower in reads of `step` bytes:
/// (the data, the bytes the body took), `usize::MAX` for the latter while
/// the body has not ended, or the error.
fn follow(bytes: &[u8], step: usize) -> Result<(Vec<u8>, usize), ChunkError> {
    let mut c = Chunked::new(16, 64);
    let (mut data, mut at) = (Vec::new(), 0);
    while at < bytes.len() {
        let end = (at + step).min(bytes.len());
        let mut read = &bytes[at..end];
        while !read.is_empty() {
            match c.next(read)? {
                Piece::Data(n) => {
                    data.extend_from_slice(&read[..n]);
                    read = &read[n..];
                    at += n;
                }
                Piece::Framing(n) => {
                    read = &read[n..];
                    at += n;
                }
                Piece::End(n) => return Ok((data, at + n)),
            }
        }
    }
    assert!(!c.is_done());
    Ok((data, usize::MAX))
}

/// The same answer for every read size.
fn follow_all(bytes: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
    let first = follow(bytes, bytes.len().max(1));
    for step in 1..bytes.len() {
        assert_eq!(
            follow(bytes, step),
            first,
            "reads of {step} bytes: {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    first
}

#[test]
fn chunked_bodies_follow_the_grammar() {
    let body = b"5\r\nhello\r\nA;name=v;x\r\n0123456789\r\n0\r\nTrailer-One: 1\r\nT2:\r\n\r\nGET / HTTP/1.1";
    let (data, used) = follow_all(body).unwrap();
    assert_eq!(data, b"hello0123456789");
    assert_eq!(&body[used..], b"GET / HTTP/1.1");
    let (data, used) = follow_all(b"0\r\n\r\n").unwrap();
    assert!(data.is_empty());
    assert_eq!(used, 5);
    let (data, _) = follow_all(b"1 ;ext\r\nx\r\n0\r\n\r\n").unwrap();
    assert_eq!(data, b"x");
    let (data, _) = follow_all(b"00000000000000f\r\n0123456789abcde\r\n0\r\n\r\n").unwrap();
    assert_eq!(data.len(), 15);
}

#[test]
fn bad_chunked_bodies_are_refused() {
    for (body, want) in [
        (&b"\r\n"[..], ChunkError::BadSize),
        (b"-1\r\n", ChunkError::BadSize),
        (b"+1\r\n", ChunkError::BadSize),
        (b" 1\r\n", ChunkError::BadSize),
        (b"0x1\r\n", ChunkError::BadSize),
        (b"g\r\n", ChunkError::BadSize),
        (b"1000000000000000\r\n", ChunkError::BadSize),
        (b"1 \r\n", ChunkError::BadExtension),
        (b"1;a\x01\r\n", ChunkError::BadExtension),
        (b"1;aaaaaaaaaaaaaaaaaaaaaaa\r\n", ChunkError::BadExtension),
        (b"1\nx\r\n", ChunkError::BadLineEnd),
        (b"1\rx", ChunkError::BadLineEnd),
        (b"1\r\nxy\r\n", ChunkError::BadLineEnd),
        (b"1\r\nx\n0\r\n\r\n", ChunkError::BadLineEnd),
        (b"0\r\n\n", ChunkError::BadTrailer),
        (b"0\r\nNoColon\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\n: v\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\n folded: v\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\nA b: v\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\nA: \x01\r\n\r\n", ChunkError::BadTrailer),
        (b"0\r\nA: v\r\r\n", ChunkError::BadLineEnd),
    ] {
        assert_eq!(
            follow_all(body).map(|_| ()),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    let mut long = b"0\r\nA: ".to_vec();
    long.resize(100, b'v');
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(
        follow_all(&long).map(|_| ()),
        Err(ChunkError::BadTrailer),
        "trailers past the limit"
    );
}
