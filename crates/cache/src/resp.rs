//! RESP, the Redis protocol: requests (multibulk arrays of bulk strings, or inline
//! lines) parsed in place from a connection's read buffer, and replies written in RESP2
//! or RESP3.
//!
//! Parsing never allocates ahead of the bytes received: a declared bulk length is
//! checked against its limit, then waited for. A malformed request is an error with
//! Redis' own text; the connection answers it and closes, as Redis does.

use bytes::{Buf, Bytes, BytesMut};

/// Limits on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string (Redis' `proto-max-bulk-len`, default 512 MiB).
    pub max_bulk_bytes: usize,
    /// Most arguments of one command (Redis: 1,048,576).
    pub max_args: usize,
    /// Longest inline command line (Redis: 64 KiB).
    pub max_inline_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_args: 1024 * 1024,
            max_inline_bytes: 64 * 1024,
        }
    }
}

/// A request the protocol refuses (the connection is closed after the answer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn protocol(what: &str) -> ProtocolError {
    ProtocolError(format!("ERR Protocol error: {what}"))
}

/// Finds `\r\n` from `from`; the index of `\r`.
fn crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// Parses a decimal integer as Redis does for lengths (optional '-', digits only).
fn parse_len(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits
        .iter()
        .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    Some(if neg { -v } else { v })
}

/// Parses one request from the front of `buf`, consuming it: `Ok(None)` when it is
/// not complete yet (nothing consumed), `Ok(Some(args))` for a request (possibly
/// empty: a blank inline line, which is skipped).
pub fn parse(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_multibulk(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

fn parse_multibulk(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(end) = crlf(buf, 1) else {
        if buf.len() > limits.max_inline_bytes {
            return Err(protocol("too big mbulk count string"));
        }
        return Ok(None);
    };
    let n = parse_len(&buf[1..end]).ok_or_else(|| protocol("invalid multibulk length"))?;
    if n > limits.max_args as i64 {
        return Err(protocol("invalid multibulk length"));
    }
    if n <= 0 {
        buf.advance(end + 2);
        return Ok(Some(Vec::new()));
    }
    // Walk the bulks without consuming until all are here.
    let mut at = end + 2;
    let mut spans = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        match buf.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(&c) => {
                return Err(protocol(&format!("expected '$', got '{}'", c as char)));
            }
        }
        let Some(len_end) = crlf(buf, at + 1) else {
            if buf.len() - at > 32 {
                return Err(protocol("too big bulk count string"));
            }
            return Ok(None);
        };
        let len =
            parse_len(&buf[at + 1..len_end]).ok_or_else(|| protocol("invalid bulk length"))?;
        if len < 0 || len as usize > limits.max_bulk_bytes {
            return Err(protocol("invalid bulk length"));
        }
        let start = len_end + 2;
        let stop = start + len as usize;
        if buf.len() < stop + 2 {
            return Ok(None);
        }
        if &buf[stop..stop + 2] != b"\r\n" {
            return Err(protocol("invalid bulk string terminator"));
        }
        spans.push((start, stop));
        at = stop + 2;
    }
    let frame = buf.split_to(at).freeze();
    Ok(Some(
        spans.into_iter().map(|(s, e)| frame.slice(s..e)).collect(),
    ))
}

fn parse_inline(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline_bytes {
            return Err(protocol("too big inline request"));
        }
        return Ok(None);
    };
    if nl > limits.max_inline_bytes {
        return Err(protocol("too big inline request"));
    }
    let line = buf.split_to(nl + 1).freeze();
    let text = line.slice(..nl);
    let text = text.strip_suffix(b"\r").unwrap_or(&text);
    split_inline(text).map(Some)
}

/// Splits an inline line into arguments, with Redis' quoting rules (`"..."` with
/// escapes, `'...'` literal).
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let unbalanced = || protocol("unbalanced quotes in request");
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= line.len() {
            break;
        }
        let mut cur = Vec::new();
        match line[i] {
            b'"' => {
                i += 1;
                loop {
                    let c = *line.get(i).ok_or_else(unbalanced)?;
                    match c {
                        b'\\' => {
                            let e = *line.get(i + 1).ok_or_else(unbalanced)?;
                            let hex = |b: u8| (b as char).to_digit(16);
                            if e == b'x'
                                && let (Some(h), Some(l)) = (
                                    line.get(i + 2).and_then(|&b| hex(b)),
                                    line.get(i + 3).and_then(|&b| hex(b)),
                                )
                            {
                                cur.push((h * 16 + l) as u8);
                                i += 4;
                                continue;
                            }
                            cur.push(match e {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                b'b' => 8,
                                b'a' => 7,
                                other => other,
                            });
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            if line.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                                return Err(unbalanced());
                            }
                            break;
                        }
                        _ => {
                            cur.push(c);
                            i += 1;
                        }
                    }
                }
            }
            b'\'' => {
                i += 1;
                loop {
                    let c = *line.get(i).ok_or_else(unbalanced)?;
                    if c == b'\\' && line.get(i + 1) == Some(&b'\'') {
                        cur.push(b'\'');
                        i += 2;
                    } else if c == b'\'' {
                        i += 1;
                        if line.get(i).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return Err(unbalanced());
                        }
                        break;
                    } else {
                        cur.push(c);
                        i += 1;
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    cur.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(cur));
    }
    Ok(args)
}

/// A reply, written as RESP2 or RESP3.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Simple(&'static str),
    /// A simple string built at run time (`+...`).
    Status(String),
    /// `-ERR ...` (the text includes its prefix, `ERR`, `WRONGTYPE`...).
    Error(String),
    /// `:n`.
    Int(i64),
    /// `$n\r\n...`.
    Bulk(Bytes),
    /// The null bulk (RESP2 `$-1`, RESP3 `_`).
    Nil,
    /// The null array (RESP2 `*-1`, RESP3 `_`).
    NilArray,
    /// `*n` of replies.
    Array(Vec<Reply>),
    /// A RESP3 map (RESP2: a flat array of key, value, ...).
    Map(Vec<(Reply, Reply)>),
    /// A RESP3 set (RESP2: an array).
    Set(Vec<Reply>),
    /// A RESP3 double (RESP2: a bulk string), written as C's `%.17g` (Redis 7.0).
    Double(f64),
    /// `member, score`-like pairs: RESP2 a flat array, RESP3 an array of 2-arrays
    /// (`ZRANGE ... WITHSCORES`).
    Pairs(Vec<(Reply, Reply)>),
    /// A RESP3 boolean (RESP2: 1 or 0).
    Bool(bool),
    /// A RESP3 verbatim string (`=n\r\ntxt:...`; RESP2: a bulk string).
    Verbatim(String),
    /// A RESP3 push (`>n`; RESP2: an array): pub/sub messages and confirmations.
    Push(Vec<Reply>),
    /// Several replies to one command, one after the other (`SUBSCRIBE a b`).
    Many(Vec<Reply>),
    /// A reply already written, the same in both protocols (an array of bulk strings,
    /// written while the data is locked instead of a reference per element).
    Raw(Vec<u8>),
}

impl Reply {
    /// `-ERR {msg}`.
    pub fn err(msg: impl std::fmt::Display) -> Reply {
        Reply::Error(format!("ERR {msg}"))
    }

    /// A bulk string from anything that is bytes.
    pub fn bulk(b: impl Into<Bytes>) -> Reply {
        Reply::Bulk(b.into())
    }

    /// Writes the reply for protocol version `proto` (2 or 3).
    pub fn write(&self, proto: u8, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let resp3 = proto >= 3;
        // Writing to a Vec cannot fail.
        let _ = match self {
            Reply::Simple(s) => {
                line(out, b'+', s);
                Ok(())
            }
            Reply::Status(s) => {
                line(out, b'+', s);
                Ok(())
            }
            Reply::Error(e) => {
                line(out, b'-', e);
                Ok(())
            }
            Reply::Int(n) => {
                head(out, b':', *n);
                Ok(())
            }
            Reply::Bulk(b) => {
                bulk(out, b);
                Ok(())
            }
            Reply::Raw(bytes) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
            Reply::Nil if resp3 => write!(out, "_\r\n"),
            Reply::Nil => write!(out, "$-1\r\n"),
            Reply::NilArray if resp3 => write!(out, "_\r\n"),
            Reply::NilArray => write!(out, "*-1\r\n"),
            Reply::Array(items) => {
                head(out, b'*', items.len() as i64);
                for i in items {
                    i.write(proto, out);
                }
                Ok(())
            }
            Reply::Push(items) => {
                let _ = write!(out, "{}{}\r\n", if resp3 { '>' } else { '*' }, items.len());
                for i in items {
                    i.write(proto, out);
                }
                Ok(())
            }
            Reply::Many(items) => {
                for i in items {
                    i.write(proto, out);
                }
                Ok(())
            }
            Reply::Set(items) => {
                let _ = write!(out, "{}{}\r\n", if resp3 { '~' } else { '*' }, items.len());
                for i in items {
                    i.write(proto, out);
                }
                Ok(())
            }
            Reply::Map(pairs) => {
                let _ = if resp3 {
                    write!(out, "%{}\r\n", pairs.len())
                } else {
                    write!(out, "*{}\r\n", pairs.len() * 2)
                };
                for (k, v) in pairs {
                    k.write(proto, out);
                    v.write(proto, out);
                }
                Ok(())
            }
            Reply::Pairs(pairs) => {
                let _ = write!(
                    out,
                    "*{}\r\n",
                    if resp3 { pairs.len() } else { pairs.len() * 2 }
                );
                for (a, b) in pairs {
                    if resp3 {
                        out.extend_from_slice(b"*2\r\n");
                    }
                    a.write(proto, out);
                    b.write(proto, out);
                }
                Ok(())
            }
            Reply::Double(d) => {
                let text = g17(*d);
                if resp3 {
                    write!(out, ",{text}\r\n")
                } else {
                    write!(out, "${}\r\n{text}\r\n", text.len())
                }
            }
            Reply::Bool(b) if resp3 => write!(out, "#{}\r\n", if *b { 't' } else { 'f' }),
            Reply::Bool(b) => write!(out, ":{}\r\n", i64::from(*b)),
            Reply::Verbatim(s) if resp3 => write!(out, "={}\r\ntxt:{s}\r\n", s.len() + 4),
            Reply::Verbatim(s) => write!(out, "${}\r\n{s}\r\n", s.len()),
        };
    }
}

/// Writes `<kind><n>\r\n` (a length or an integer) without the formatting machinery.
pub fn head(out: &mut Vec<u8>, kind: u8, n: i64) {
    out.push(kind);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes `<kind><text>\r\n`.
fn line(out: &mut Vec<u8>, kind: u8, text: &str) {
    out.push(kind);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes one bulk string (the same in RESP2 and RESP3).
pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    head(out, b'$', b.len() as i64);
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// A double as Redis prints it (`inf`, `-inf`, `nan`, else the shortest form that
/// reads back the same, with no trailing `.0`).
/// C's `printf("%.17g", d)`, as Redis 7.0 writes a score: 17 significant digits,
/// trailing zeros dropped, exponent form below 1e-4 and from 1e17.
pub fn g17(d: f64) -> String {
    if d.is_nan() {
        return "nan".into();
    }
    if d.is_infinite() {
        return if d > 0.0 { "inf" } else { "-inf" }.into();
    }
    if d == 0.0 {
        return if d.is_sign_negative() { "-0" } else { "0" }.into();
    }
    fn trim(s: &str) -> &str {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s
        }
    }
    let sci = format!("{d:.16e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        let prec = (16 - exp) as usize;
        trim(&format!("{d:.prec$}")).to_string()
    }
}

/// A float as Redis' `INCRBYFLOAT` writes it: an integer without a point, else the
/// shortest text that reads back the same.
pub fn format_double(d: f64) -> String {
    if d.is_nan() {
        "nan".into()
    } else if d.is_infinite() {
        if d > 0.0 { "inf".into() } else { "-inf".into() }
    } else if d == d.trunc() && d.abs() < 1e17 {
        format!("{}", d as i64)
    } else {
        format!("{d}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse(&mut BytesMut::from(input), &Limits::default())
    }

    #[test]
    fn multibulk_inline_partial_and_pipelined() {
        assert_eq!(
            one(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n").unwrap(),
            Some(vec![Bytes::from("GET"), Bytes::from("k")])
        );
        assert_eq!(one(b"*2\r\n$3\r\nGET\r\n$1\r\n").unwrap(), None);
        assert_eq!(one(b"*2\r\n$3\r\nGE").unwrap(), None);
        assert_eq!(
            one(b"set k \"a b\\x41\" 'c\\'d'\r\n").unwrap(),
            Some(vec![
                Bytes::from("set"),
                Bytes::from("k"),
                Bytes::from("a bA"),
                Bytes::from("c'd")
            ])
        );
        let mut b = BytesMut::from(&b"PING\r\n*1\r\n$4\r\nPING\r\n"[..]);
        let l = Limits::default();
        assert_eq!(parse(&mut b, &l).unwrap().unwrap().len(), 1);
        assert_eq!(parse(&mut b, &l).unwrap().unwrap().len(), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn malformed_requests_get_redis_errors() {
        let e = |input: &[u8]| one(input).unwrap_err().0;
        assert_eq!(e(b"*x\r\n"), "ERR Protocol error: invalid multibulk length");
        assert_eq!(
            e(b"*1\r\n+x\r\n"),
            "ERR Protocol error: expected '$', got '+'"
        );
        assert_eq!(
            e(b"*1\r\n$-5\r\n"),
            "ERR Protocol error: invalid bulk length"
        );
        assert_eq!(
            e(b"*1\r\n$999999999999\r\n"),
            "ERR Protocol error: invalid bulk length"
        );
        assert_eq!(
            e(b"set \"a\r\n"),
            "ERR Protocol error: unbalanced quotes in request"
        );
        let big = vec![b'a'; 70 * 1024];
        assert_eq!(e(&big), "ERR Protocol error: too big inline request");
    }

    #[test]
    fn replies_in_both_protocols() {
        let w = |r: Reply, p| {
            let mut out = Vec::new();
            r.write(p, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(w(Reply::Nil, 2), "$-1\r\n");
        assert_eq!(w(Reply::Nil, 3), "_\r\n");
        let m = Reply::Map(vec![(Reply::bulk("a"), Reply::Int(1))]);
        assert_eq!(w(m.clone(), 2), "*2\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(w(m, 3), "%1\r\n$1\r\na\r\n:1\r\n");
        assert_eq!(w(Reply::Double(1.5), 3), ",1.5\r\n");
        assert_eq!(w(Reply::Double(3.0), 2), "$1\r\n3\r\n");
        let p = Reply::Pairs(vec![(Reply::bulk("m"), Reply::Double(1.1))]);
        assert_eq!(
            w(p.clone(), 2),
            "*2\r\n$1\r\nm\r\n$18\r\n1.1000000000000001\r\n"
        );
        assert_eq!(w(p, 3), "*1\r\n*2\r\n$1\r\nm\r\n,1.1000000000000001\r\n");
        for (d, s) in [
            (0.1, "0.10000000000000001"),
            (1e17, "1e+17"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.0001, "0.0001"),
            (0.00001, "1.0000000000000001e-05"),
            (-2.5, "-2.5"),
            (99999999999999999.0, "1e+17"),
            (1234.0, "1234"),
        ] {
            assert_eq!(g17(d), s, "{d}");
        }
    }
}
