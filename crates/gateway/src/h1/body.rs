//! Bodies copied between two connections by their framing, verbatim,
//! through the reader's own buffer (no allocation per request).
//!
//! [`copy`] starts with the body bytes that arrived with the head, already
//! in the buffer, sends them together with bytes before them (the head just
//! written into the same buffer, so head and first body bytes leave in one
//! write), then reads and writes until the framing says the body ended.
//! Chunked bodies pass through [`Chunked`](super::chunked::Chunked), so a
//! malformed chunk stops the copy at the bad byte: nothing past it is sent.
//! What the sender wrote after the body (a pipelined request) stays in the
//! buffer for the caller. Errors say which side failed: a client that gave
//! up mid-upload is not an upstream fault, and the other way round.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::chunked::{ChunkError, Chunked, Piece};
use super::head::{Framing, ResponseFraming};

/// How a body is delimited, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (copied with its framing and trailers).
    Chunked,
    /// Everything until the sender closes (responses only).
    UntilClose,
}

impl BodyFraming {
    /// A request's body framing; `None` without a body.
    pub fn of_request(f: Framing) -> Option<Self> {
        match f {
            Framing::Empty => None,
            Framing::Length(n) => Some(Self::Length(n)),
            Framing::Chunked => Some(Self::Chunked),
        }
    }

    /// A response's body framing; `None` without a body.
    pub fn of_response(f: ResponseFraming) -> Option<Self> {
        match f {
            ResponseFraming::Empty => None,
            ResponseFraming::Length(n) => Some(Self::Length(n)),
            ResponseFraming::Chunked => Some(Self::Chunked),
            ResponseFraming::UntilClose => Some(Self::UntilClose),
        }
    }
}

/// Where a copied body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Inside the buffer: `buf[at..end]` is what the sender sent after the
    /// body (empty when nothing was).
    At {
        /// The first byte after the body.
        at: usize,
        /// The end of what was read.
        end: usize,
    },
    /// The sender closed the connection, which ended an until-close body.
    Closed,
}

/// Why a body copy stopped before the body's end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The sender closed the connection before the body ended.
    #[error("the sender closed the connection before the body's end")]
    Truncated,
    /// The chunked framing is malformed (nothing after the bad byte was sent).
    #[error("the chunked body is malformed: {0}")]
    Chunk(#[from] ChunkError),
    /// Reading from the sender failed.
    #[error("reading the body failed: {0}")]
    Read(std::io::Error),
    /// The sender sent nothing for [`CopyLimits::read_timeout`].
    #[error("the sender sent nothing of the body for {0:?}")]
    ReadTimeout(Duration),
    /// The receiver took nothing for [`CopyLimits::write_timeout`].
    #[error("the receiver took nothing for {0:?}")]
    WriteTimeout(Duration),
    /// Writing to the receiver failed.
    #[error("writing the body failed: {0}")]
    Write(std::io::Error),
}

/// Limits a body is copied under.
#[derive(Debug, Clone, Copy)]
pub struct CopyLimits {
    /// Most bytes of chunk extensions per chunk.
    pub max_ext: usize,
    /// Most bytes of a chunked body's trailer section.
    pub max_trailers: usize,
    /// Longest wait for the sender's next bytes (`None`: no limit).
    pub read_timeout: Option<Duration>,
    /// Longest a write may wait for the receiver (`None`: no limit).
    pub write_timeout: Option<Duration>,
}

impl Default for CopyLimits {
    /// [`Chunked`]'s defaults (1 KiB of extensions, 16 KiB of trailers),
    /// 60 s between reads (nginx's `client_body_timeout`) and for a write
    /// (its `send_timeout`).
    fn default() -> Self {
        Self {
            max_ext: 1024,
            max_trailers: 16 * 1024,
            read_timeout: Some(Duration::from_secs(60)),
            write_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Writes `bytes` to `to` within `timeout`.
pub async fn write_within<W>(
    timeout: Option<Duration>,
    to: &mut W,
    bytes: &[u8],
) -> Result<(), BodyError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    within(timeout, to.write_all(bytes))
        .await
        .map_err(BodyError::WriteTimeout)?
        .map_err(BodyError::Write)
}

/// `f`'s output, or the timeout (`Err`) if it passes first; no timeout is
/// no limit.
pub(crate) async fn within<F: std::future::Future>(
    timeout: Option<Duration>,
    f: F,
) -> Result<F::Output, Duration> {
    match timeout {
        Some(t) => tokio::time::timeout(t, f).await.map_err(|_| t),
        None => Ok(f.await),
    }
}

/// The reader's buffer as a copy starts.
#[derive(Debug)]
pub struct Buffer<'a> {
    /// The buffer the reads go into (not empty).
    pub buf: &'a mut [u8],
    /// Where the body bytes read with the head start.
    pub at: usize,
    /// The end of what was read.
    pub end: usize,
    /// How many bytes before `at` go out first, in the same write (a head
    /// just written there; at most `at`).
    pub lead: usize,
}

/// Copies one body framed by `framing` from `from` to `to`: first what
/// `b` holds (with its lead bytes), then reads into the whole of `b.buf`
/// until the body ends. Returns where the bytes after the body lie in
/// `b.buf`, or [`BodyEnd::Closed`] when an until-close body ended.
pub async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    framing: BodyFraming,
    limits: CopyLimits,
    b: Buffer<'_>,
) -> Result<BodyEnd, BodyError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let Buffer {
        buf,
        mut at,
        mut end,
        mut lead,
    } = b;
    lead = lead.min(at);
    let mut left = match framing {
        BodyFraming::Length(n) => n,
        BodyFraming::Chunked | BodyFraming::UntilClose => u64::MAX,
    };
    let mut chunked = (framing == BodyFraming::Chunked)
        .then(|| Chunked::new(limits.max_ext, limits.max_trailers));
    loop {
        // How much of what is buffered belongs to the body.
        let mut take = end - at;
        let mut done = false;
        let mut bad = None;
        match (&mut chunked, framing) {
            (Some(c), _) => {
                let mut n = 0;
                while n < take {
                    match c.next(&buf[at + n..end]) {
                        Ok(Piece::Data(k) | Piece::Framing(k)) => n += k,
                        Ok(Piece::End(k)) => {
                            n += k;
                            done = true;
                            break;
                        }
                        Err(e) => {
                            bad = Some(e);
                            break;
                        }
                    }
                }
                take = n;
            }
            (None, BodyFraming::UntilClose) => {}
            (None, _) => {
                take = take.min(usize::try_from(left).unwrap_or(usize::MAX));
                left -= take as u64;
                done = left == 0;
            }
        }
        // What is sure to be body goes out, up to a bad chunk byte.
        if take > 0 || lead > 0 {
            write_within(limits.write_timeout, to, &buf[at - lead..at + take]).await?;
            lead = 0;
        }
        at += take;
        if let Some(e) = bad {
            return Err(BodyError::Chunk(e));
        }
        if done {
            return Ok(BodyEnd::At { at, end });
        }
        let read = from.read(buf);
        let n = match limits.read_timeout {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| BodyError::ReadTimeout(t))?,
            None => read.await,
        }
        .map_err(BodyError::Read)?;
        if n == 0 {
            return match framing {
                BodyFraming::UntilClose => Ok(BodyEnd::Closed),
                _ => Err(BodyError::Truncated),
            };
        }
        (at, end) = (0, n);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair of real sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// Copies a body that a sender sends as `reads` (each its own write,
    /// then a close if `close`) with `first` already buffered; returns the
    /// result, what the receiver got, and the bytes left after the body.
    async fn run(
        framing: BodyFraming,
        first: &[u8],
        reads: &[&[u8]],
        close: bool,
    ) -> (Result<BodyEnd, BodyError>, Vec<u8>, Vec<u8>) {
        let (mut sender, mut from) = pair().await;
        let (mut to, mut receiver) = pair().await;
        let reads: Vec<Vec<u8>> = reads.iter().map(|r| r.to_vec()).collect();
        let send = tokio::spawn(async move {
            for r in reads {
                sender.write_all(&r).await.unwrap();
                sender.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
            if !close {
                // Held open until the copy is done with it.
                std::future::pending::<()>().await;
            }
        });
        let mut buf = vec![0u8; 64];
        buf[..first.len()].copy_from_slice(first);
        let r = copy(
            &mut from,
            &mut to,
            framing,
            CopyLimits::default(),
            Buffer {
                buf: &mut buf,
                at: 0,
                end: first.len(),
                lead: 0,
            },
        )
        .await;
        send.abort();
        drop(to);
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).await.unwrap();
        let rest = match &r {
            Ok(BodyEnd::At { at, end }) => buf[*at..*end].to_vec(),
            _ => Vec::new(),
        };
        (r, got, rest)
    }

    #[tokio::test]
    async fn a_sized_body_is_copied_and_what_follows_stays_buffered() {
        let (r, got, rest) = run(
            BodyFraming::Length(10),
            b"hello",
            &[b"wor", b"ldGET / HTTP/1.1\r\n"],
            false,
        )
        .await;
        assert!(matches!(r, Ok(BodyEnd::At { .. })), "{r:?}");
        assert_eq!(got, b"helloworld");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_chunked_body_is_copied_verbatim_however_it_arrives() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n";
        let next = b"GET /next HTTP/1.1\r\n";
        let mut all = body.to_vec();
        all.extend_from_slice(next);
        for cut in 0..all.len() {
            let (first, later) = all.split_at(cut);
            let pieces: Vec<&[u8]> = later.chunks(7).collect();
            let (r, got, rest) = run(BodyFraming::Chunked, first, &pieces, false).await;
            assert!(matches!(r, Ok(BodyEnd::At { .. })), "cut {cut}: {r:?}");
            assert_eq!(got, body, "cut {cut}");
            // What came after the body in the same read stays in the buffer.
            assert!(next.starts_with(&rest), "cut {cut}: {rest:?}");
        }
    }

    #[tokio::test]
    async fn a_sender_that_gives_up_mid_body_is_a_truncation() {
        let (r, got, _) = run(BodyFraming::Length(100), b"abc", &[b"def"], true).await;
        assert!(matches!(r, Err(BodyError::Truncated)), "{r:?}");
        assert_eq!(got, b"abcdef", "what arrived was passed on, nothing more");
        let (r, _, _) = run(BodyFraming::Chunked, b"5\r\nhel", &[], true).await;
        assert!(matches!(r, Err(BodyError::Truncated)), "{r:?}");
    }

    #[tokio::test]
    async fn an_until_close_body_ends_with_the_close() {
        let (r, got, _) = run(BodyFraming::UntilClose, b"ab", &[b"cd", b"ef"], true).await;
        assert!(matches!(r, Ok(BodyEnd::Closed)), "{r:?}");
        assert_eq!(got, b"abcdef");
    }

    #[tokio::test]
    async fn nothing_past_a_bad_chunk_byte_is_sent() {
        // A bare LF after the size: a lenient peer would read other chunk
        // boundaries, so the copy stops before it.
        let (r, got, _) = run(
            BodyFraming::Chunked,
            b"5\r\nhello\r\n3\nGET /smuggled HTTP/1.1\r\n",
            &[],
            false,
        )
        .await;
        assert!(
            matches!(r, Err(BodyError::Chunk(ChunkError::BadLineEnd))),
            "{r:?}"
        );
        // Sent: the good chunk, and at most the good bytes up to the bad one.
        assert!(
            b"5\r\nhello\r\n3".starts_with(&got) && got.starts_with(b"5\r\nhello"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_receiver_that_went_away_is_a_write_error() {
        let (mut sender, mut from) = pair().await;
        let (mut to, receiver) = pair().await;
        drop(receiver);
        let send = tokio::spawn(async move {
            // More than the socket buffers hold, so a write must fail.
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..256 {
                if sender.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = vec![0u8; 16 * 1024];
        let r = copy(
            &mut from,
            &mut to,
            BodyFraming::Length(16 << 20),
            CopyLimits::default(),
            Buffer {
                buf: &mut buf,
                at: 0,
                end: 0,
                lead: 0,
            },
        )
        .await;
        assert!(matches!(r, Err(BodyError::Write(_))), "{r:?}");
        drop(from);
        send.await.unwrap();
    }

    #[tokio::test]
    async fn a_head_before_the_body_leaves_in_the_same_write() {
        let (mut to, mut receiver) = pair().await;
        let mut empty: &[u8] = &[];
        let mut buf = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcNEXT".to_vec();
        let head = buf.len() - 7;
        let r = copy(
            &mut empty,
            &mut to,
            BodyFraming::Length(3),
            CopyLimits::default(),
            Buffer {
                buf: &mut buf,
                at: head,
                end: head + 7,
                lead: head,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            r,
            BodyEnd::At {
                at: head + 3,
                end: head + 7
            }
        );
        drop(to);
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, &buf[..head + 3]);
    }
}
