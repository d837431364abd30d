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
//! more than one `Content-Length` line marks its number in the shared
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

use crate::h1::head::{self, Framing, HeadError};

/// Why a request's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FramingFault {
    /// Both `Content-Length` and `Transfer-Encoding`.
    BothLengths = 1,
    /// A `Transfer-Encoding` whose final coding is not `chunked`.
    NotChunked = 2,
    /// More than one `Content-Length` line, even with equal values (RFC 9112
    /// §6.3 lets a recipient merge equal ones; a proxy whose upstream may
    /// count them differently refuses them, as nginx does).
    SeveralLengths = 3,
    /// `chunked` applied more than once.
    ChunkedTwice = 4,
    /// A `Content-Length` that is not a decimal number of bytes.
    BadLength = 5,
    /// `Transfer-Encoding` in an HTTP/1.0 request.
    TransferEncodingInHttp10 = 6,
}

impl FramingFault {
    /// The engine's error for it (one text for both paths).
    fn error(self) -> HeadError {
        match self {
            FramingFault::BothLengths => HeadError::BothLengths,
            FramingFault::NotChunked => HeadError::NotChunked,
            FramingFault::SeveralLengths => HeadError::SeveralLengths,
            FramingFault::ChunkedTwice => HeadError::ChunkedTwice,
            FramingFault::BadLength => HeadError::BadLength,
            FramingFault::TransferEncodingInHttp10 => HeadError::TransferEncodingInHttp10,
        }
    }

    /// The message answered with the 400.
    pub(crate) fn message(self) -> String {
        self.error().to_string()
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FramingFault::BothLengths),
            2 => Some(FramingFault::NotChunked),
            3 => Some(FramingFault::SeveralLengths),
            4 => Some(FramingFault::ChunkedTwice),
            5 => Some(FramingFault::BadLength),
            6 => Some(FramingFault::TransferEncodingInHttp10),
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
    /// After the last chunk: a CR here ends the body (then LF); any other
    /// byte begins a trailer line.
    EndCr,
    /// The LF that ends the body.
    EndLf,
    /// Inside a trailer line, which only a CR ends (an LF is content).
    Trailer,
    /// The LF after a trailer line's CR.
    TrailerLf,
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
            // Past the limit even when it came in one read: hyper refuses
            // it (431), and the verdict must not depend on how it was read.
            Ok(httparse::Status::Complete(n)) if n > self.max_head_bytes => return Parsed::Invalid,
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Invalid,
        };
        let index = self.index;
        self.index += 1;
        match framing_of(req.version.unwrap_or(1), req.headers) {
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
            _ => {}
        }
        let mut c = c;
        for (i, &b) in bytes.iter().enumerate() {
            match &mut c {
                Chunk::Size { size, ext } => match b {
                    b'\n' => {
                        self.state = State::Chunk(if *size == 0 {
                            Chunk::EndCr
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
                // The trailer section exactly as hyper 1.x's decoder reads
                // it (its `EndCr`/`EndLf`/`Trailer`/`TrailerLf` states): a
                // tracker that ended the body elsewhere would number the
                // next heads differently from hyper.
                Chunk::EndCr => {
                    c = if b == b'\r' {
                        Chunk::EndLf
                    } else {
                        Chunk::Trailer
                    }
                }
                Chunk::EndLf if b == b'\n' => {
                    self.state = State::Head;
                    return &bytes[i + 1..];
                }
                Chunk::Trailer if b == b'\r' => c = Chunk::TrailerLf,
                Chunk::Trailer => {}
                Chunk::TrailerLf if b == b'\n' => c = Chunk::EndCr,
                // hyper refuses the body here: nothing more to follow.
                Chunk::EndLf | Chunk::TrailerLf => {
                    self.state = State::Off;
                    return &[];
                }
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

/// The tracker's next state after a head with these lines: the framing
/// rules are `h1::head::framing`'s (one copy for the tracker and the
/// engine). Every framing fault becomes the request's verdict and stops the
/// tracking: where hyper refuses such a head itself the handler never sees
/// the verdict, and where hyper would accept it the handler refuses it.
/// Turning off instead would let later pipelined requests go unchecked.
fn framing_of(minor: u8, headers: &[httparse::Header<'_>]) -> Result<State, FramingFault> {
    match head::framing(minor, headers) {
        Ok(Framing::Empty) => Ok(State::Head),
        Ok(Framing::Length(n)) => Ok(State::Body(n)),
        Ok(Framing::Chunked) => Ok(State::Chunk(Chunk::Size {
            size: 0,
            ext: false,
        })),
        Err(HeadError::BothLengths) => Err(FramingFault::BothLengths),
        Err(HeadError::NotChunked) => Err(FramingFault::NotChunked),
        Err(HeadError::SeveralLengths) => Err(FramingFault::SeveralLengths),
        Err(HeadError::ChunkedTwice) => Err(FramingFault::ChunkedTwice),
        Err(HeadError::TransferEncodingInHttp10) => Err(FramingFault::TransferEncodingInHttp10),
        Err(_) => Err(FramingFault::BadLength),
    }
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
    fn trailers_end_where_hyper_ends_them() {
        // Found in review: a bare LF after the last chunk is trailer
        // content to hyper, not the end of the body. A tracker that ended
        // the body there counted a fake head and skipped the real CL+TE
        // request as that head's body.
        let attack = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\nGET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 90\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let bad = Some(FramingFault::BothLengths);
        assert_all(attack, &[None, bad]);
        // Trailer fields, then the end: the next head is followed.
        let trailers = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            1\r\nx\r\n0\r\nA: 1\r\nB: 2\r\n\r\n\
            GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_all(trailers, &[None, Some(FramingFault::SeveralLengths)]);
    }

    #[test]
    fn every_framing_fault_is_a_verdict_never_a_blind_spot() {
        // Zero-padded lengths are what hyper accepts: followed, not refused.
        let padded =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000000004\r\n\r\nabcd\
            POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_all(padded, &[None, Some(FramingFault::BothLengths)]);
        // Transfer-Encoding then a malformed length is still both lengths.
        for cl in ["+4", "4, 4", "x"] {
            let head = format!(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: {cl}\r\n\r\n"
            );
            assert_all(head.as_bytes(), &[Some(FramingFault::BothLengths)]);
        }
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
            &[Some(FramingFault::BadLength)],
        );
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            &[Some(FramingFault::ChunkedTwice)],
        );
        assert_all(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            &[Some(FramingFault::TransferEncodingInHttp10)],
        );
    }

    #[test]
    fn several_lengths_are_refused_even_equal() {
        let bad = Some(FramingFault::SeveralLengths);
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            &[bad],
        );
        assert_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nab",
            &[bad],
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
    fn an_oversized_head_is_off_however_it_was_read() {
        // Found by the fuzz target: a too-large head read whole was judged,
        // the same head read in two parts was not.
        let mut head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nX: ".to_vec();
        head.resize(8300, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_all(&head, &[None]);
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

/// The tracker against hyper's own decoder on the same bytes: the handler
/// refuses the request the tracker numbers, so the two must split a
/// connection's bytes into the same requests, whatever the bodies hold.
#[cfg(test)]
mod hyper_agreement {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use parking_lot::Mutex;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{FramingTracker, FramingVerdict};

    /// xorshift64*: a fixed sequence, so a failure is reproducible.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
    }

    /// A head with a framing fault, hidden in a body or a trailer.
    const BAD_HEAD: &str = "GET /bad-hidden HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    /// A head without one, hidden the same way.
    const OK_HEAD: &str = "GET /ok-hidden HTTP/1.1\r\nHost: a\r\n\r\n";

    fn payload(rng: &mut Rng) -> String {
        let mut p = String::new();
        for _ in 0..=rng.below(3) {
            p.push_str(rng.pick(&["hello", BAD_HEAD, OK_HEAD, "\r\n", "0\r\n\r\n", "\n", ";"]));
        }
        p
    }

    /// A chunked body with every variation the two readers could part on:
    /// zero-padded and upper-case sizes, extensions (quoted, after
    /// whitespace), bare LFs after sizes, data and the last chunk,
    /// trailers (with bare LFs, with heads in them).
    fn chunked(rng: &mut Rng, out: &mut String) {
        for _ in 0..rng.below(3) {
            let data = payload(rng);
            let zeros = "0".repeat(rng.below(3));
            let size = if rng.below(2) == 0 {
                format!("{zeros}{:x}", data.len())
            } else {
                format!("{zeros}{:X}", data.len())
            };
            out.push_str(&size);
            out.push_str(rng.pick(&["", "", ";a", ";a=b", ";a=\"x;y\"", " ;a", "\t;a", " "]));
            out.push_str(rng.pick(&["\r\n", "\r\n", "\r\n", "\n"]));
            out.push_str(&data);
            out.push_str(rng.pick(&["\r\n", "\r\n", "\r\n", "\n", ""]));
        }
        out.push_str(rng.pick(&["0", "0", "00", "000"]));
        out.push_str(rng.pick(&["", "", ";z", ";z=\"q\""]));
        out.push_str(rng.pick(&["\r\n", "\r\n", "\n"]));
        for _ in 0..rng.below(3) {
            let t = rng.pick(&[
                "X-T: v\r\n",
                "X-T: v\n",
                "X-T: a\nGET /bad-trailer HTTP/1.1\r\n",
                "\n",
                "X-T:\r\n",
            ]);
            out.push_str(t);
            if rng.below(4) == 0 {
                out.push_str(rng.pick(&[BAD_HEAD, OK_HEAD]));
            }
        }
        out.push_str(rng.pick(&["\r\n", "\r\n", "\r\n", "\n"]));
    }

    /// Two to five pipelined requests; a path starting `/bad` marks a head
    /// with a framing fault (h1::head::framing's rules).
    fn stream(rng: &mut Rng) -> String {
        let mut s = String::new();
        for n in 0..2 + rng.below(4) {
            let old = rng.below(8) == 0;
            let version = if old {
                "HTTP/1.0\r\nConnection: keep-alive"
            } else {
                "HTTP/1.1"
            };
            match rng.below(10) {
                0..=2 => s.push_str(&format!("GET /ok{n} {version}\r\nHost: a\r\n\r\n")),
                3..=4 => {
                    let body = payload(rng);
                    let zeros = "0".repeat(rng.below(2));
                    s.push_str(&format!(
                        "POST /ok{n} {version}\r\nHost: a\r\nContent-Length: {zeros}{}\r\n\r\n{body}",
                        body.len()
                    ));
                }
                5..=6 => {
                    let path = if old { "bad-te10" } else { "ok" };
                    s.push_str(&format!(
                        "POST /{path}{n} {version}\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    ));
                    chunked(rng, &mut s);
                }
                7 => {
                    let lines = if rng.below(2) == 0 {
                        "Content-Length: 5\r\nTransfer-Encoding: chunked"
                    } else {
                        "Transfer-Encoding: chunked\r\nContent-Length: 5"
                    };
                    s.push_str(&format!(
                        "POST /bad-both{n} {version}\r\nHost: a\r\n{lines}\r\n\r\n"
                    ));
                    chunked(rng, &mut s);
                }
                8 => {
                    let body = payload(rng);
                    let l = body.len();
                    s.push_str(&format!(
                        "POST /bad-twice{n} {version}\r\nHost: a\r\nContent-Length: {l}\r\nContent-Length: {l}\r\n\r\n{body}"
                    ));
                }
                _ => {
                    let te = rng.pick(&["chunked, chunked", "gzip", "gzip, chunked, chunked"]);
                    s.push_str(&format!(
                        "POST /bad-te{n} {version}\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n"
                    ));
                    chunked(rng, &mut s);
                }
            }
        }
        s
    }

    /// The paths of the requests a real hyper HTTP/1 server hands its
    /// service for these bytes, in order (each body read to its end).
    async fn through_hyper(bytes: &[u8]) -> Vec<String> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let svc = {
            let seen = seen.clone();
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.lock().push(req.uri().path().to_string());
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        Empty::<bytes::Bytes>::new(),
                    ))
                }
            })
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .half_close(true)
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
        let task = tokio::spawn(conn);
        client.write_all(bytes).await.unwrap();
        client.shutdown().await.unwrap();
        let _ = client.read_to_end(&mut Vec::new()).await;
        let _ = task.await;
        std::mem::take(&mut *seen.lock())
    }

    /// Every request hyper hands over, up to the first faulty one (where the
    /// handler closes the connection), is marked by the tracker exactly
    /// when its head has a framing fault: so neither a faulty head hidden
    /// where the tracker thinks a body is, nor a clean request refused in
    /// another's place.
    #[tokio::test]
    async fn the_tracker_splits_requests_where_hypers_decoder_does() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut delivered_total, mut bad_seen) = (0usize, 0usize);
        for case in 0..3000 {
            let bytes = stream(&mut rng);
            let delivered = through_hyper(bytes.as_bytes()).await;
            let verdict = Arc::new(FramingVerdict::default());
            let mut tracker = FramingTracker::new(16 * 1024, 100, verdict.clone());
            tracker.feed(bytes.as_bytes());
            for (i, path) in delivered.iter().enumerate() {
                let bad = path.starts_with("/bad");
                assert_eq!(
                    verdict.fault(i as u64).is_some(),
                    bad,
                    "case {case}: request {i} ({path}) of {delivered:?} in {bytes:?}"
                );
                delivered_total += 1;
                if bad {
                    bad_seen += 1;
                    break;
                }
            }
        }
        // The streams reach hyper's service, faulty heads included.
        assert!(
            delivered_total > 3000 && bad_seen > 300,
            "{delivered_total} {bad_seen}"
        );
    }
}
