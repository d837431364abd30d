//! Request framing checked on the raw bytes of an HTTP/1 connection.
//!
//! hyper settles an ambiguous request quietly: with both `Content-Length`
//! and `Transfer-Encoding` it drops the length, frames by chunks and closes
//! the connection afterwards, and the handler cannot tell it happened. A
//! proxy must refuse such a request instead (RFC 9112 §6.1: a server *may*
//! process it, an intermediary that forwards it re-framed is how request
//! smuggling gets through). So every byte the connection reads also passes
//! through a [`FramingTracker`]: it parses each request head (httparse, the
//! parser hyper itself uses), follows the body by its framing to find the
//! next head, and numbers the heads. A head with both lengths, with a
//! `Transfer-Encoding` whose final coding is not `chunked`, or with
//! conflicting `Content-Length` values marks its number in the shared
//! [`FramingVerdict`]; the request handler, numbering the requests hyper
//! hands it in the same order, answers that one 400 and closes the
//! connection before anything is forwarded.
//!
//! Invariants: the tracker only reads (it never changes a byte hyper sees);
//! it goes quiet (`Off`) on anything it cannot follow (HTTP/2's preface, a
//! head past the size limit, malformed chunk framing), every such case being
//! one hyper refuses itself or one that is not HTTP/1 at all; and after a
//! refused head nothing more is tracked, since the connection is closed.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Why a request's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FramingFault {
    /// Both `Content-Length` and `Transfer-Encoding`.
    BothLengths = 1,
    /// A `Transfer-Encoding` whose final coding is not `chunked`.
    NotChunked = 2,
    /// Several `Content-Length` values that disagree.
    ConflictingLengths = 3,
}

impl FramingFault {
    /// The message answered with the 400.
    pub(crate) fn message(self) -> &'static str {
        match self {
            FramingFault::BothLengths => {
                "the request has both Content-Length and Transfer-Encoding: send one"
            }
            FramingFault::NotChunked => "the request's Transfer-Encoding does not end with chunked",
            FramingFault::ConflictingLengths => {
                "the request has Content-Length values that disagree"
            }
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FramingFault::BothLengths),
            2 => Some(FramingFault::NotChunked),
            3 => Some(FramingFault::ConflictingLengths),
            _ => None,
        }
    }
}

/// The first refused request of a connection, shared by the tracker (which
/// reads ahead of hyper) and the request handler.
#[derive(Debug)]
pub(crate) struct FramingVerdict {
    first_bad: AtomicU64,
    fault: AtomicU8,
}

impl Default for FramingVerdict {
    fn default() -> Self {
        Self {
            first_bad: AtomicU64::new(u64::MAX),
            fault: AtomicU8::new(0),
        }
    }
}

impl FramingVerdict {
    fn refuse(&self, index: u64, fault: FramingFault) {
        self.fault.store(fault as u8, Ordering::Release);
        self.first_bad.store(index, Ordering::Release);
    }

    /// The fault of request number `index` (0-based, HTTP/1 requests of
    /// this connection in order), if its head was refused. Requests after a
    /// refused one are refused too (none should come: the connection
    /// closes).
    pub(crate) fn fault(&self, index: u64) -> Option<FramingFault> {
        if index < self.first_bad.load(Ordering::Acquire) {
            return None;
        }
        FramingFault::from_u8(self.fault.load(Ordering::Acquire))
    }
}

/// Where the tracker is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Inside a chunked body.
    Chunk(Chunk),
    /// Not following the stream any more.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The chunk-size line: the size so far, and whether an extension began.
    Size { size: u64, ext: bool },
    /// This many data bytes left in the chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines: characters on the current line.
    Trailer { line: usize },
}

/// The most header lines a head may have for the tracker to follow it
/// without allocating (hyper's default limit is 100).
const STACK_HEADERS: usize = 100;

/// Follows the requests of one HTTP/1 connection (see the module docs).
#[derive(Debug)]
pub(crate) struct FramingTracker {
    state: State,
    /// A head split across reads, kept until it is complete.
    partial: Vec<u8>,
    /// Number of the request whose head comes next.
    index: u64,
    max_head_bytes: usize,
    max_headers: usize,
    verdict: Arc<FramingVerdict>,
}

impl FramingTracker {
    /// A tracker for heads up to `max_head_bytes` with up to `max_headers`
    /// lines (past either, hyper refuses the request itself).
    pub(crate) fn new(
        max_head_bytes: usize,
        max_headers: usize,
        verdict: Arc<FramingVerdict>,
    ) -> Self {
        Self {
            state: State::Head,
            partial: Vec::new(),
            index: 0,
            max_head_bytes,
            max_headers,
            verdict,
        }
    }

    /// Feeds bytes just read from the client, in order.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return,
                State::Head => bytes = self.head(bytes),
                State::Body(left) => {
                    let n = left.min(bytes.len() as u64);
                    bytes = &bytes[n as usize..];
                    self.state = if n == left {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::Chunk(c) => bytes = self.chunk(c, bytes),
            }
        }
    }

    /// Consumes head bytes; returns what follows the head (or nothing).
    fn head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let before = self.partial.len();
        let parsed = if before == 0 {
            self.parse(bytes)
        } else {
            let room = self.max_head_bytes.saturating_sub(before);
            let take = bytes.len().min(room.max(1));
            self.partial.extend_from_slice(&bytes[..take]);
            let buf = std::mem::take(&mut self.partial);
            let r = self.parse(&buf);
            self.partial = buf;
            r
        };
        match parsed {
            Parsed::Partial => {
                if before == 0 && bytes.len() < self.max_head_bytes {
                    self.partial.extend_from_slice(bytes);
                }
                if before == 0 && bytes.len() >= self.max_head_bytes
                    || self.partial.len() >= self.max_head_bytes
                {
                    // Past the limit: hyper refuses it (431); nothing to follow.
                    self.state = State::Off;
                    self.partial = Vec::new();
                }
                &[]
            }
            Parsed::Complete(len) => {
                self.partial.clear();
                let used = len.saturating_sub(before).min(bytes.len());
                &bytes[used..]
            }
            Parsed::Invalid => {
                self.state = State::Off;
                &[]
            }
        }
    }

    /// Parses one head; on success sets the body state and numbers it.
    fn parse(&mut self, buf: &[u8]) -> Parsed {
        // Uninitialised slots: httparse writes the ones it fills (no 3 KiB
        // memset per request).
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap;
        let headers: &mut [MaybeUninit<httparse::Header<'_>>] = if self.max_headers <= STACK_HEADERS
        {
            &mut stack
        } else {
            heap = Vec::with_capacity(self.max_headers);
            heap.resize_with(self.max_headers, MaybeUninit::uninit);
            &mut heap
        };
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Invalid,
        };
        let index = self.index;
        self.index += 1;
        match framing_of(req.headers) {
            Ok(next) => self.state = next,
            Err(fault) => {
                self.verdict.refuse(index, fault);
                self.state = State::Off;
            }
        }
        Parsed::Complete(len)
    }

    fn chunk<'a>(&mut self, c: Chunk, bytes: &'a [u8]) -> &'a [u8] {
        match c {
            Chunk::Data(left) => {
                let n = left.min(bytes.len() as u64);
                self.state = State::Chunk(if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                });
                return &bytes[n as usize..];
            }
            Chunk::DataEnd => {
                return match bytes.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        self.state = State::Chunk(Chunk::Size {
                            size: 0,
                            ext: false,
                        });
                        &bytes[i + 1..]
                    }
                    None => &[],
                };
            }
            Chunk::Size { .. } | Chunk::Trailer { .. } => {}
        }
        let mut c = c;
        for (i, &b) in bytes.iter().enumerate() {
            match &mut c {
                Chunk::Size { size, ext } => match b {
                    b'\n' => {
                        self.state = State::Chunk(if *size == 0 {
                            Chunk::Trailer { line: 0 }
                        } else {
                            Chunk::Data(*size)
                        });
                        return &bytes[i + 1..];
                    }
                    b';' => *ext = true,
                    _ if *ext => {}
                    b'\r' | b' ' | b'\t' => {}
                    _ => match (b as char).to_digit(16) {
                        Some(d) if *size >> 60 == 0 => *size = (*size << 4) | u64::from(d),
                        // Not a size hyper accepts: it refuses the body.
                        _ => {
                            self.state = State::Off;
                            return &[];
                        }
                    },
                },
                Chunk::Trailer { line } => match b {
                    b'\n' if *line == 0 => {
                        self.state = State::Head;
                        return &bytes[i + 1..];
                    }
                    b'\n' => *line = 0,
                    b'\r' => {}
                    _ => *line += 1,
                },
                Chunk::Data(_) | Chunk::DataEnd => {}
            }
        }
        self.state = State::Chunk(c);
        &[]
    }
}

enum Parsed {
    Partial,
    Complete(usize),
    Invalid,
}

/// The body framing a request head announces, or why it is refused.
fn framing_of(headers: &[httparse::Header<'_>]) -> Result<State, FramingFault> {
    let mut length: Option<&[u8]> = None;
    let mut encodings = 0usize;
    let mut last_coding_chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = trim(h.value);
            match length {
                Some(prev) if prev != v => return Err(FramingFault::ConflictingLengths),
                _ => length = Some(v),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings += 1;
            last_coding_chunked = h
                .value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|c| trim(c).eq_ignore_ascii_case(b"chunked"));
        }
    }
    match (encodings, length) {
        (0, None) => Ok(State::Head),
        (0, Some(v)) => Ok(std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(State::Off, |n| {
                if n == 0 { State::Head } else { State::Body(n) }
            })),
        (_, Some(_)) => Err(FramingFault::BothLengths),
        (_, None) if !last_coding_chunked => Err(FramingFault::NotChunked),
        (_, None) => Ok(State::Chunk(Chunk::Size {
            size: 0,
            ext: false,
        })),
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> (FramingTracker, Arc<FramingVerdict>) {
        let v = Arc::new(FramingVerdict::default());
        (FramingTracker::new(8192, 100, v.clone()), v)
    }

    /// Feeds `bytes` in every split into two reads, and byte by byte.
    fn verdicts(bytes: &[u8], upto: u64) -> Vec<Vec<Option<FramingFault>>> {
        let mut out = Vec::new();
        for cut in 0..=bytes.len() {
            let (mut t, v) = tracker();
            t.feed(&bytes[..cut]);
            t.feed(&bytes[cut..]);
            out.push((0..upto).map(|i| v.fault(i)).collect());
        }
        let (mut t, v) = tracker();
        for b in bytes {
            t.feed(std::slice::from_ref(b));
        }
        out.push((0..upto).map(|i| v.fault(i)).collect());
        out
    }

    fn assert_all(bytes: &[u8], want: &[Option<FramingFault>]) {
        for got in verdicts(bytes, want.len() as u64) {
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn pipelined_good_requests_pass() {
        let reqs = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_all(reqs, &[None, None, None, None, None]);
    }

    #[test]
    fn both_lengths_are_refused_in_either_order_and_after_good_requests() {
        let cl_te = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let bad = Some(FramingFault::BothLengths);
        assert_all(cl_te, &[None, bad, bad]);
        let te_cl = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-length: 4\r\n\r\n0\r\n\r\n";
        assert_all(te_cl, &[bad]);
    }

    #[test]
    fn a_final_coding_other_than_chunked_is_refused() {
        let bad = Some(FramingFault::NotChunked);
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            &[bad],
        );
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            &[None],
        );
    }

    #[test]
    fn disagreeing_lengths_are_refused() {
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            &[Some(FramingFault::ConflictingLengths)],
        );
    }

    #[test]
    fn http2_preface_and_garbage_turn_it_off() {
        let (mut t, v) = tracker();
        t.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(t.state, State::Off);
        assert_eq!(v.fault(0), None);
        let (mut t, _) = tracker();
        t.feed(&[0u8; 9000]);
        assert_eq!(t.state, State::Off);
    }

    #[test]
    fn an_oversized_head_turns_it_off_without_growing() {
        let (mut t, _) = tracker();
        t.feed(b"GET / HTTP/1.1\r\n");
        for _ in 0..100 {
            t.feed(&[b'a'; 1000]);
        }
        assert_eq!(t.state, State::Off);
        assert!(t.partial.len() <= 8192 + 1000);
    }
}
