//! Request heads parsed in place, with RFC 9112's framing and Host rules.
//!
//! [`parse_request`] runs httparse over the read buffer, then checks what
//! httparse leaves to its caller: the body's framing (§6: one
//! `Content-Length` of digits only, no `Transfer-Encoding` beside it, a
//! `Transfer-Encoding` that ends in a single `chunked`, none in HTTP/1.0)
//! and the authority (§3.2: exactly one `Host` on HTTP/1.1, at most one on
//! HTTP/1.0, `host[:port]` only; an absolute-form target's authority wins
//! over `Host`, §3.2.2, and is what goes upstream). httparse itself refuses obs-fold,
//! control characters in values, non-token names, a space before the colon
//! and a malformed request line. The result keeps byte ranges into the
//! buffer, so the head can be forwarded by copying its bytes.

use std::mem::MaybeUninit;
use std::ops::Range;

/// Limits a head is parsed under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most bytes a head may take, final blank line included.
    pub max_head_bytes: usize,
    /// The most header lines.
    pub max_headers: usize,
}

impl Default for Limits {
    /// 16 KiB and 100 lines (hyper's header count; nginx's default head
    /// buffer is 1 KiB growing to 4 x 8 KiB).
    fn default() -> Self {
        Self {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// One header line: byte ranges of its name and of its value (optional
/// whitespace trimmed), and of the whole line with its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name.
    pub name: Range<usize>,
    /// The value, without surrounding whitespace.
    pub value: Range<usize>,
    /// The whole line, line ending included (what to leave out to drop it).
    pub line: Range<usize>,
}

/// A parsed request head; every range indexes the buffer it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes the head takes, final blank line included (the body follows).
    pub len: usize,
    /// The method.
    pub method: Range<usize>,
    /// The request target, as sent.
    pub target: Range<usize>,
    /// The target in origin form: `target` itself, or what follows the
    /// authority of an absolute-form target (empty, or starting with `?`,
    /// when it has no path: a `/` goes before it).
    pub path: Range<usize>,
    /// The authority the request is for: an absolute-form target's (RFC 9112
    /// §3.2.2: it wins over `Host`), else the `Host` value; `None` for
    /// HTTP/1.0 with neither.
    pub authority: Option<Range<usize>>,
    /// Whether the target was absolute-form (`http://host/path`): upstream,
    /// its authority replaces the `Host` value ([`write_request`]).
    pub absolute: bool,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// The header lines, in order.
    pub fields: Vec<Field>,
    /// How the body is delimited.
    pub framing: Framing,
    /// Index in `fields` of the one `Host` line, if any.
    pub host: Option<usize>,
    /// Whether the connection closes after this exchange (HTTP/1.0 without
    /// `keep-alive`, or `Connection: close`).
    pub close: bool,
    /// `Connection: upgrade` with an `Upgrade` line.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// A parsed request head read together with its buffer: what routing
/// looks at (method, path, query, authority, header lines), as slices.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    buf: &'a [u8],
    head: &'a RequestHead,
}

impl<'a> RequestView<'a> {
    /// `head` as parsed from `buf` (the same buffer, not since moved).
    pub fn new(buf: &'a [u8], head: &'a RequestHead) -> Self {
        Self { buf, head }
    }

    /// The parsed head.
    pub fn head(&self) -> &'a RequestHead {
        self.head
    }

    /// The method's bytes.
    pub fn method(&self) -> &'a [u8] {
        &self.buf[self.head.method.clone()]
    }

    /// The target's path and query (after the first `?`, possibly empty),
    /// as `http::Uri` reads them: `/` for an absolute-form target without a
    /// path; `None` for a target `http::Uri` refuses (a character outside
    /// its tables, such as `<`, or bytes that are not UTF-8), which hyper
    /// answers 400.
    pub fn path_and_query(&self) -> Option<(&'a str, Option<&'a str>)> {
        let p = &self.buf[self.head.path.clone()];
        let (path, query) = match p.iter().position(|b| *b == b'?') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        let path_ok = |b: u8| matches!(b, 0x21 | b'"' | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7E | 0x80..);
        let query_ok = |b: u8| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E | 0x80..);
        if !path.iter().all(|&b| path_ok(b))
            || !query.is_none_or(|q| q.iter().all(|&b| query_ok(b)))
        {
            return None;
        }
        let path = std::str::from_utf8(path).ok()?;
        let query = match query {
            Some(q) => Some(std::str::from_utf8(q).ok()?),
            None => None,
        };
        Some((if path.is_empty() { "/" } else { path }, query))
    }

    /// The authority the request is for (the target's, else `Host`'s).
    pub fn authority(&self) -> Option<&'a str> {
        text(&self.buf[self.head.authority.clone()?])
    }

    /// The authority's host without its port, lower-cased (`[::1]:80` is
    /// `::1`): what routes match hosts against.
    pub fn host(&self) -> Option<std::borrow::Cow<'a, str>> {
        Some(lower_case(strip_port(self.authority()?)))
    }

    /// The values of the lines named `name` (any case), in order.
    pub fn values<'n>(&self, name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        let buf = self.buf;
        self.head
            .fields
            .iter()
            .filter(move |f| buf[f.name.clone()].eq_ignore_ascii_case(name))
            .map(move |f| &buf[f.value.clone()])
    }

    /// The first line named `name` as text (visible ASCII and tabs, as
    /// `http::HeaderValue::to_str` reads it): `None` if absent or not text.
    /// `Host` reads as the request's authority: an absolute-form target's
    /// wins over the line (RFC 9112 §3.2.2), as it does upstream.
    pub fn first_text(&self, name: &[u8]) -> Option<&'a str> {
        if self.head.absolute && name.eq_ignore_ascii_case(b"host") {
            return self.authority();
        }
        text(self.values(name).next()?)
    }
}

/// `host[:port]`'s host: an IPv6 literal without its brackets.
pub(crate) fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return h.split_once(']').map_or(h, |(a, _)| &a[1..]);
    }
    h.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(h, |(a, _)| a)
}

/// `s` in lower case, borrowed when it already is.
pub(crate) fn lower_case(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// `v` as text if it is visible ASCII, spaces and tabs only.
fn text(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Why a head is refused; [`HeadError::status`] is the answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// httparse refused the bytes (request line, a header line, a
    /// character).
    #[error("the request head is malformed: {0}")]
    Malformed(httparse::Error),
    /// Past [`Limits::max_head_bytes`].
    #[error("the request head is larger than the limit")]
    TooLarge,
    /// Past [`Limits::max_headers`].
    #[error("the request has more header lines than the limit")]
    TooManyHeaders,
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("the request has both Content-Length and Transfer-Encoding: send one")]
    BothLengths,
    /// More than one `Content-Length` line, even with equal values.
    #[error("the request has more than one Content-Length: send one")]
    SeveralLengths,
    /// A `Content-Length` that is not digits only, or past 2^63.
    #[error("the request's Content-Length is not a decimal number of bytes")]
    BadLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`.
    #[error("the request's Transfer-Encoding does not end with chunked")]
    NotChunked,
    /// `chunked` applied more than once (RFC 9112 §6.1 forbids it).
    #[error("the request's Transfer-Encoding applies chunked more than once")]
    ChunkedTwice,
    /// A line of the head ended by LF alone (copied upstream byte for byte,
    /// it would mix line endings another hop may read differently).
    #[error("a line of the request head ends with LF alone: end lines with CRLF")]
    BareLf,
    /// A `Transfer-Encoding` in an HTTP/1.0 request (§6.1: faulty framing).
    #[error("an HTTP/1.0 request cannot use Transfer-Encoding")]
    TransferEncodingInHttp10,
    /// HTTP/1.1 without `Host`.
    #[error("the request has no Host header (HTTP/1.1 requires one)")]
    NoHost,
    /// More than one `Host` line.
    #[error("the request has more than one Host header")]
    SeveralHosts,
    /// A `Host` that is not `host[:port]`.
    #[error("the Host header is not host[:port]")]
    BadHost,
    /// A target neither origin-form (`/path`) nor absolute-form with an
    /// `http` or `https` scheme (`*` and CONNECT's authority-form included:
    /// a reverse proxy serves neither), or with a fragment (`#`).
    #[error("the request target must be a path or an absolute http(s) URI")]
    BadTarget,
    /// An absolute-form target whose authority is not `host[:port]`
    /// (userinfo, an empty host, a bad port).
    #[error("the request target's authority is not host[:port]")]
    BadTargetAuthority,
}

impl HeadError {
    /// The status a server answers it with (the connection then closes).
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            _ => 400,
        }
    }
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: a HEAD request's answer, 1xx, 204 or 304. (After a 101,
    /// or a 2xx to CONNECT, the connection becomes a tunnel: the caller
    /// checks the status.)
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes (no length, or a
    /// `Transfer-Encoding` not ending in `chunked`); the connection is not
    /// reused.
    UntilClose,
}

/// A parsed response head; ranges index the buffer it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes the head takes, final blank line included.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// The header lines, in order.
    pub fields: Vec<Field>,
    /// How the body is delimited.
    pub framing: ResponseFraming,
    /// Whether the connection cannot carry another request afterwards.
    pub close: bool,
}

/// Why an upstream's response head is refused (the client gets a 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// httparse refused the bytes.
    #[error("the upstream's response head is malformed: {0}")]
    Malformed(httparse::Error),
    /// Past the head size or header count limit.
    #[error("the upstream's response head is larger than the limit")]
    TooLarge,
    /// Both `Content-Length` and `Transfer-Encoding` (a proxy that picked one
    /// would frame differently from another hop).
    #[error("the upstream sent both Content-Length and Transfer-Encoding")]
    BothLengths,
    /// More than one `Content-Length` line.
    #[error("the upstream sent more than one Content-Length")]
    SeveralLengths,
    /// A `Content-Length` that is not a decimal number.
    #[error("the upstream's Content-Length is not a decimal number of bytes")]
    BadLength,
    /// `Transfer-Encoding` in an HTTP/1.0 response.
    #[error("the upstream sent Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    /// `chunked` applied more than once: a client decoding it once would
    /// find a different end than one that follows the close.
    #[error("the upstream's Transfer-Encoding applies chunked more than once")]
    ChunkedTwice,
}

/// Parses the response head at the start of `buf`, answering a request
/// whose method was HEAD when `head_request`: `Ok(None)` while incomplete
/// and within the limits.
pub fn parse_response(
    buf: &[u8],
    limits: Limits,
    head_request: bool,
) -> Result<Option<ResponseHead>, ResponseError> {
    with_slots(limits.max_headers, |slots| {
        response_in(buf, limits, head_request, slots)
    })
}

fn response_in<'b>(
    buf: &'b [u8],
    limits: Limits,
    head_request: bool,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut resp = httparse::Response::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head_bytes => {
            return Err(ResponseError::TooLarge);
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(ResponseError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ResponseError::TooLarge),
        Err(e) => return Err(ResponseError::Malformed(e)),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else {
        return Err(ResponseError::Malformed(httparse::Error::Status));
    };
    let mut fields = Vec::with_capacity(resp.headers.len());
    let (mut close_token, mut keep_alive) = (false, false);
    for h in resp.headers.iter() {
        let (name, value, line, _) = ranges(buf, len, h);
        if h.name.eq_ignore_ascii_case("connection") {
            for token in buf[value.clone()].split(|b| *b == b',').map(trim) {
                close_token |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        fields.push(Field { name, value, line });
    }
    // `close` anywhere wins over `keep-alive` anywhere.
    let close = close_token || (minor == 0 && !keep_alive);
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        ResponseFraming::Empty
    } else {
        match framing(minor, resp.headers) {
            Ok(Framing::Empty) if has_length(resp.headers) => ResponseFraming::Empty,
            Ok(Framing::Empty) => ResponseFraming::UntilClose,
            Ok(Framing::Length(n)) => ResponseFraming::Length(n),
            Ok(Framing::Chunked) => ResponseFraming::Chunked,
            // Unlike a request, a response may end its codings with
            // something else: then it runs until the close (§6.3 rule 4).
            Err(HeadError::NotChunked) => ResponseFraming::UntilClose,
            Err(HeadError::BothLengths) => return Err(ResponseError::BothLengths),
            Err(HeadError::SeveralLengths) => return Err(ResponseError::SeveralLengths),
            Err(HeadError::TransferEncodingInHttp10) => {
                return Err(ResponseError::TransferEncodingInHttp10);
            }
            Err(HeadError::ChunkedTwice) => return Err(ResponseError::ChunkedTwice),
            Err(_) => return Err(ResponseError::BadLength),
        }
    };
    Ok(Some(ResponseHead {
        len,
        status,
        minor,
        fields,
        close: close || framing == ResponseFraming::UntilClose,
        framing,
    }))
}

fn has_length(headers: &[httparse::Header<'_>]) -> bool {
    headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("content-length"))
}

/// The name, trimmed value and whole-line ranges of `h` in `buf`, whose
/// head is `len` bytes, and whether the line ends with CRLF.
fn ranges(
    buf: &[u8],
    len: usize,
    h: &httparse::Header<'_>,
) -> (Range<usize>, Range<usize>, Range<usize>, bool) {
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let name = at(h.name.as_bytes());
    let value = at(trim(h.value));
    // The raw value runs to the line's end; the line ends at the LF.
    let raw_end = at(h.value).end;
    let line_end = buf[raw_end..len]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(len, |i| raw_end + i + 1);
    let line = name.start..line_end;
    // (httparse leaves trailing whitespace out of the value.)
    let crlf = line_end >= 2 && buf[line_end - 2] == b'\r' && buf[line_end - 1] == b'\n';
    (name, value, line, crlf)
}

/// Slots for httparse on the stack up to this many lines.
const STACK_HEADERS: usize = 100;

/// Parses the request head at the start of `buf`: `Ok(None)` while it is
/// incomplete and still within the limits.
pub fn parse_request(buf: &[u8], limits: Limits) -> Result<Option<RequestHead>, HeadError> {
    with_slots(limits.max_headers, |slots| request_in(buf, limits, slots))
}

/// Runs `f` with `max` uninitialised httparse slots: on the stack up to
/// [`STACK_HEADERS`] (httparse writes the ones it fills, so no per-request
/// memset), on the heap past it.
fn with_slots<'b, R>(
    max: usize,
    f: impl FnOnce(&mut [MaybeUninit<httparse::Header<'b>>]) -> R,
) -> R {
    let mut stack = [const { MaybeUninit::<httparse::Header<'b>>::uninit() }; STACK_HEADERS];
    if max <= STACK_HEADERS {
        return f(&mut stack[..max]);
    }
    let mut heap = Vec::with_capacity(max);
    heap.resize_with(max, MaybeUninit::uninit);
    f(&mut heap)
}

fn request_in<'b>(
    buf: &'b [u8],
    limits: Limits,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<RequestHead>, HeadError> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head_bytes => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    let minor = req.version.unwrap_or(1);
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    // A complete parse always has both; refuse rather than assume.
    let (Some(m), Some(t)) = (req.method, req.path) else {
        return Err(HeadError::Malformed(httparse::Error::Token));
    };
    let (method, target) = (at(m.as_bytes()), at(t.as_bytes()));
    let (target_authority, path) = split_target(buf, target.clone())?;
    let framing = framing(minor, req.headers)?;
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut host = None;
    let (mut close, mut keep_alive, mut conn_upgrade, mut has_upgrade, mut expect_continue) =
        (false, false, false, false, false);
    for h in req.headers.iter() {
        let (name, value, line, crlf) = ranges(buf, len, h);
        if !crlf {
            return Err(HeadError::BareLf);
        }
        let n = h.name.as_bytes();
        let v = &buf[value.clone()];
        if n.eq_ignore_ascii_case(b"host") {
            if host.is_some() {
                return Err(HeadError::SeveralHosts);
            }
            if !is_host_port(v) {
                return Err(HeadError::BadHost);
            }
            host = Some(fields.len());
        } else if n.eq_ignore_ascii_case(b"connection") {
            for token in v.split(|b| *b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    conn_upgrade = true;
                }
            }
        } else if n.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade = true;
        } else if n.eq_ignore_ascii_case(b"expect") {
            expect_continue |= v.eq_ignore_ascii_case(b"100-continue");
        }
        fields.push(Field { name, value, line });
    }
    // The request line ends where the first line (or the blank one) starts.
    let first = fields.first().map_or(len - 2, |f| f.line.start);
    if first < 2 || buf[first - 2..first] != *b"\r\n" || buf[len - 2..len] != *b"\r\n" {
        return Err(HeadError::BareLf);
    }
    if host.is_none() && minor == 1 {
        return Err(HeadError::NoHost);
    }
    let absolute = target_authority.is_some();
    let authority = target_authority.or_else(|| host.map(|i| fields[i].value.clone()));
    Ok(Some(RequestHead {
        len,
        method,
        target,
        path,
        authority,
        absolute,
        minor,
        fields,
        framing,
        host,
        close: close || (minor == 0 && !keep_alive),
        // HTTP/1.0 has neither (RFC 9110 §7.8, §10.1.1).
        upgrade: minor == 1 && conn_upgrade && has_upgrade,
        expect_continue: minor == 1 && expect_continue,
    }))
}

/// Splits a request target into an absolute-form target's authority and
/// the target's origin-form part (RFC 9112 §3.2), or refuses it.
fn split_target(
    buf: &[u8],
    target: Range<usize>,
) -> Result<(Option<Range<usize>>, Range<usize>), HeadError> {
    let t = &buf[target.clone()];
    // A request target has no fragment (RFC 9112 §3.2).
    if t.contains(&b'#') {
        return Err(HeadError::BadTarget);
    }
    if t.first() == Some(&b'/') {
        return Ok((None, target));
    }
    let scheme = [&b"http://"[..], b"https://"]
        .into_iter()
        .find(|s| t.len() >= s.len() && t[..s.len()].eq_ignore_ascii_case(s))
        .ok_or(HeadError::BadTarget)?;
    let rest = &t[scheme.len()..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let start = target.start + scheme.len();
    if !is_host_port(&rest[..end]) {
        return Err(HeadError::BadTargetAuthority);
    }
    Ok((Some(start..start + end), start + end..target.end))
}

/// The body framing a request's header lines announce (RFC 9112 §6), or
/// why it is refused. `minor` is the HTTP/1 minor version.
pub fn framing(minor: u8, headers: &[httparse::Header<'_>]) -> Result<Framing, HeadError> {
    // Every line is seen before deciding, so that both lengths are refused
    // as such whatever their order or validity.
    let mut length: Option<&[u8]> = None;
    let mut lengths = 0usize;
    let mut encoded = false;
    let mut final_chunked = false;
    let mut chunked_seen = 0usize;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            length = Some(trim(h.value));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
            for coding in h.value.split(|b| *b == b',').map(trim) {
                if coding.is_empty() {
                    continue;
                }
                final_chunked = coding.eq_ignore_ascii_case(b"chunked");
                chunked_seen += usize::from(final_chunked);
            }
        }
    }
    if encoded && lengths > 0 {
        return Err(HeadError::BothLengths);
    }
    if lengths > 1 {
        return Err(HeadError::SeveralLengths);
    }
    if encoded {
        return if minor == 0 {
            Err(HeadError::TransferEncodingInHttp10)
        } else if chunked_seen > 1 {
            Err(HeadError::ChunkedTwice)
        } else if !final_chunked {
            Err(HeadError::NotChunked)
        } else {
            Ok(Framing::Chunked)
        };
    }
    match length.map(parse_length) {
        None | Some(Some(0)) => Ok(Framing::Empty),
        Some(Some(n)) => Ok(Framing::Length(n)),
        Some(None) => Err(HeadError::BadLength),
    }
}

/// `1*DIGIT` (leading zeros allowed, as hyper allows them), at most
/// 2^63 - 1 (what a signed 64-bit peer can also hold).
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let digits = &v[v.iter().position(|d| *d != b'0').unwrap_or(v.len())..];
    if digits.len() > 19 {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    (n <= i64::MAX as u64).then_some(n)
}

/// `v` without optional whitespace (SP, HTAB) around it.
pub(crate) fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Whether `v` is `host[:port]`: a reg-name or IPv4 (unreserved,
/// sub-delims and `%` escapes), or a bracketed IPv6 literal, then an
/// optional port of 1 to 5 digits up to 65535. No userinfo, path, spaces or empty
/// host. Checked without allocating (it runs on every request).
pub fn is_host_port(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &v[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        (&v[..=close], &v[close + 1..])
    } else {
        match v.iter().position(|b| *b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &v[v.len()..]),
        }
    };
    let host_ok = host.first() == Some(&b'[')
        || (!host.is_empty()
            && host.iter().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'%'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b';'
                            | b'='
                    )
            }));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        Some(_) => false,
    };
    host_ok && port_ok
}

/// Edits applied while a request head is copied upstream
/// ([`write_request`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Edits<'a> {
    /// A new request target (a rewritten path), or the client's.
    pub target: Option<&'a [u8]>,
    /// Indexes in [`RequestHead::fields`] of lines to leave out.
    pub drop: &'a [usize],
    /// Lines to add after the kept ones, as (name, value).
    pub add: &'a [(&'a [u8], &'a [u8])],
}

/// An added line or target that would break the head it is written into.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot write {0} into a request head: it is empty or has characters HTTP/1.1 does not allow there"
)]
pub struct InvalidEdit(pub String);

/// Writes the request `head` (parsed from `buf`) into `out` with `edits`:
/// the request line (method, origin-form target, `HTTP/1.1`), every kept
/// header line copied byte for byte in runs, the added lines, the blank
/// line. An absolute-form target's authority goes upstream as the `Host`
/// value (the client's `Host` line, if kept, is left out for it). Nothing
/// is written when an edit is invalid: a bad target, name or value, a
/// dropped `Content-Length`/`Transfer-Encoding` line, an added framing or
/// `Host` line beside a kept one, or a result without exactly one `Host`.
pub fn write_request(
    buf: &[u8],
    head: &RequestHead,
    edits: &Edits<'_>,
    out: &mut Vec<u8>,
) -> Result<(), InvalidEdit> {
    if let Some(t) = edits.target
        && (t.is_empty() || !t.iter().all(|b| b.is_ascii_graphic()))
    {
        return Err(InvalidEdit(format!(
            "the target {:?}",
            String::from_utf8_lossy(t)
        )));
    }
    for (name, value) in edits.add {
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(InvalidEdit(format!(
                "the name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if value
            .iter()
            .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
            || value.first().is_some_and(|b| matches!(b, b' ' | b'\t'))
            || value.last().is_some_and(|b| matches!(b, b' ' | b'\t'))
        {
            return Err(InvalidEdit(format!(
                "the value of {:?}",
                String::from_utf8_lossy(name)
            )));
        }
    }
    // The framing and the authority stay unambiguous: the body keeps the
    // framing it was parsed with, and the head leaves with exactly one Host.
    let named = |f: &Field, n: &[u8]| buf[f.name.clone()].eq_ignore_ascii_case(n);
    let added_host = edits
        .add
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(b"host"));
    // An absolute-form target's authority, written as the Host line unless
    // the edits bring their own (in place of the client's).
    let target_host = match &head.authority {
        Some(a) if head.absolute && !added_host => Some(&buf[a.clone()]),
        _ => None,
    };
    let replaced = |i: usize| target_host.is_some() && head.host == Some(i);
    let mut hosts = usize::from(target_host.is_some());
    for (i, f) in head.fields.iter().enumerate() {
        let dropped = edits.drop.contains(&i) || replaced(i);
        if dropped && (named(f, b"content-length") || named(f, b"transfer-encoding")) {
            return Err(InvalidEdit("a drop of the body's framing line".into()));
        }
        hosts += usize::from(!dropped && named(f, b"host"));
    }
    for (name, _) in edits.add {
        let kept = |n: &[u8]| {
            head.fields
                .iter()
                .enumerate()
                .any(|(i, f)| !edits.drop.contains(&i) && !replaced(i) && named(f, n))
        };
        for n in [&b"content-length"[..], b"transfer-encoding", b"host"] {
            if name.eq_ignore_ascii_case(n) && kept(n) {
                return Err(InvalidEdit(format!(
                    "a second {:?} line",
                    String::from_utf8_lossy(name)
                )));
            }
        }
        hosts += usize::from(name.eq_ignore_ascii_case(b"host"));
    }
    if hosts != 1 {
        return Err(InvalidEdit(format!(
            "{hosts} Host lines (HTTP/1.1 needs one)"
        )));
    }
    out.extend_from_slice(&buf[head.method.clone()]);
    out.push(b' ');
    match edits.target {
        Some(t) => out.extend_from_slice(t),
        None => {
            let path = &buf[head.path.clone()];
            if head.absolute && path.is_empty() && buf[head.method.clone()] == *b"OPTIONS" {
                // `OPTIONS http://a` asks about the server (RFC 9112 §3.2.4).
                out.push(b'*');
            } else {
                if path.first() != Some(&b'/') {
                    out.push(b'/');
                }
                out.extend_from_slice(path);
            }
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Kept lines are copied in runs between the dropped ones.
    let mut run: Option<Range<usize>> = None;
    for (i, f) in head.fields.iter().enumerate() {
        if edits.drop.contains(&i) || replaced(i) {
            if let Some(r) = run.take() {
                out.extend_from_slice(&buf[r]);
            }
            continue;
        }
        run = Some(match run {
            Some(r) if r.end == f.line.start => r.start..f.line.end,
            Some(r) => {
                out.extend_from_slice(&buf[r]);
                f.line.clone()
            }
            None => f.line.clone(),
        });
    }
    if let Some(r) = run {
        out.extend_from_slice(&buf[r]);
    }
    if let Some(a) = target_host {
        out.extend_from_slice(b"Host: ");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in edits.add {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// RFC 9110 token characters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
