//! The server side of an HTTP/1.1 connection: request heads read into one
//! buffer and parsed in place ([`parse_request`]), handed to a [`Handler`]
//! one at a time (pipelined requests are answered in order), bodies copied
//! by the handler through the same buffer ([`Request::send_with_body`]).
//!
//! What a hostile or broken client can do is settled here once, for every
//! handler: a refused head is answered with its status and a message, and
//! the connection closes; a head not complete within
//! [`ServerLimits::header_read_timeout`] of its first byte (slowloris) is
//! answered 408; a keep-alive connection idle past
//! [`ServerLimits::idle_timeout`] is closed; a body that stalls past
//! [`CopyLimits::read_timeout`] between reads, or is cut short, ends the
//! connection; a body the handler did not read closes the connection (the
//! next head cannot be found without reading it). Where the server closes
//! while the client may still be sending, it closes lingering (nginx's
//! `lingering_close`): its answer goes first, then it reads and drops what
//! still arrives for a bounded time and size, so the kernel does not answer
//! the unread bytes with a reset that can destroy the answer in flight.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::body::{
    self, BodyEnd, BodyError, BodyFraming, Buffer, CopyLimits, within, write_within,
};
use super::head::{HeadError, Limits, RequestHead, parse_request};

/// The limits a connection is served under.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Head size and line count (the read buffer is this large).
    pub head: Limits,
    /// Longest a head may take from its first byte to its blank line.
    pub header_read_timeout: Duration,
    /// Longest a connection may wait for the next request's first byte.
    pub idle_timeout: Duration,
    /// Limits on bodies (chunk extensions, trailers, the wait between reads).
    pub body: CopyLimits,
    /// Longest a lingering close reads and drops what the client still sends.
    pub linger_time: Duration,
    /// Most bytes a lingering close reads and drops.
    pub linger_bytes: usize,
    /// Most requests served on one connection; it closes after the last
    /// ([`Request::is_last`] tells the handler, to say `Connection: close`).
    /// Bounds what one long-lived connection holds, and lets a busy client's
    /// next connection land on another worker. At least one is served.
    pub max_requests: u64,
}

impl Default for ServerLimits {
    /// Heads of 16 KiB and 100 lines; 10 s to send a head (hyper's default
    /// is 30 s, nginx's `client_header_timeout` 60 s: a slow head holds a
    /// connection for nothing); 75 s idle between requests (nginx's
    /// `keepalive_timeout`); [`CopyLimits::default`] for bodies; a lingering
    /// close of at most 5 s and 1 MiB; 10,000 requests per connection
    /// (nginx's `keepalive_requests` is 1,000).
    fn default() -> Self {
        Self {
            head: Limits::default(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            body: CopyLimits::default(),
            linger_time: Duration::from_secs(5),
            linger_bytes: 1 << 20,
            max_requests: 10_000,
        }
    }
}

/// What the connection does after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Read the next request (unless this one was the connection's last:
    /// [`Request::is_last`]).
    KeepAlive,
    /// Close the connection.
    Close,
    /// Stop serving and give the connection back from this request on,
    /// its head included ([`Served::HandedOff`]): for a request this
    /// engine does not serve (a protocol upgrade, say), which another
    /// server then reads as if it had read the connection from the start
    /// ([`Prefixed`]). Only before the handler answered or read the body;
    /// after, it closes the connection as [`Flow::Close`] does.
    HandOff,
}

/// How [`serve`] ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The connection closed (either side, a limit, or [`Handler::stopping`]).
    Closed,
    /// The handler said [`Flow::HandOff`]: `buf[at..end]` holds what was
    /// read from the connection from that request's head on.
    HandedOff {
        /// Where the declined request's head starts in the buffer.
        at: usize,
        /// The end of what was read.
        end: usize,
    },
}

/// How a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A head was refused (and answered with its status).
    #[error("refused a request head: {0}")]
    Head(#[from] HeadError),
    /// A head took longer than the header read timeout (answered 408).
    #[error("the request head was not complete within {0:?}")]
    HeadTimeout(Duration),
    /// Reading from or writing to the client failed.
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Answers requests, one at a time.
pub trait Handler<S> {
    /// Answers `req`: reads its head, sends or leaves its body, writes the
    /// response to [`Request::client`]. Failures are the handler's to
    /// answer (a 502, say) before it returns [`Flow::Close`]. A connection
    /// the handler switched protocols on (`101`) is its own to carry to the
    /// end, then [`Flow::Close`]: the loop would read the tunnel's bytes as
    /// heads.
    fn handle(&mut self, req: &mut Request<'_, S>) -> impl Future<Output = Flow>;

    /// The whole response to a request refused before the handler saw it
    /// (`status` 400, 408 or 431); the connection closes after it. Plain
    /// text by default.
    fn refusal(&mut self, status: u16, message: &str) -> Vec<u8> {
        let reason = match status {
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{message}\n",
            message.len() + 1
        )
        .into_bytes()
    }

    /// Resolves when the server is shutting down: a connection waiting for
    /// its first or next request then closes (one mid-request finishes it first;
    /// the handler answers it with `Connection: close` if it wants). Never,
    /// by default.
    fn stopping(&mut self) -> impl Future<Output = ()> {
        std::future::pending()
    }
}

/// A connection whose first bytes were already read: they are read again
/// first, then the connection's own. What a server given a connection by
/// [`Flow::HandOff`] reads from.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    /// `inner`, with `prefix` read first.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Where a request's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Not read yet, framed so.
    Pending(BodyFraming),
    /// Read to its end (or there was none).
    Done,
    /// Cut short or malformed: the connection cannot go on.
    Failed,
}

/// One request, as the handler sees it.
#[derive(Debug)]
pub struct Request<'a, S> {
    io: &'a mut S,
    buf: &'a mut [u8],
    /// Where the head starts in `buf`; after the body, where the next
    /// request's bytes start.
    start: usize,
    /// The end of what was read.
    end: usize,
    head: RequestHead,
    body: Body,
    /// Whether the head's bytes are still in `buf` (a body read overwrites
    /// them).
    head_kept: bool,
    /// Whether the handler wrote to the client or read the body (a request
    /// can no longer be handed off).
    touched: bool,
    /// Whether the connection closes after this request.
    last: bool,
    limits: CopyLimits,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Request<'_, S> {
    /// The parsed head; its ranges index [`Request::head_bytes`].
    pub fn head(&self) -> &RequestHead {
        &self.head
    }

    /// The head's bytes as the client sent them, until the body is read
    /// (it is read into the same buffer).
    pub fn head_bytes(&self) -> Option<&[u8]> {
        self.head_kept
            .then(|| &self.buf[self.start..self.start + self.head.len])
    }

    /// Whether the connection closes after this request (the client asked
    /// to, or it is the connection's last by [`ServerLimits::max_requests`]):
    /// the answer should say `Connection: close`.
    pub fn is_last(&self) -> bool {
        self.last
    }

    /// The client's connection, to write the response to (bound the writes
    /// by [`CopyLimits::write_timeout`], as [`Request::respond`] does).
    /// Taking it, like answering or reading the body, means the request can
    /// no longer be handed off ([`Flow::HandOff`] then closes).
    pub fn client(&mut self) -> &mut S {
        self.touched = true;
        &mut *self.io
    }

    /// Writes `bytes` to the client within the write timeout.
    pub async fn respond(&mut self, bytes: &[u8]) -> Result<(), BodyError> {
        self.touched = true;
        write_within(self.limits.write_timeout, &mut *self.io, bytes).await
    }

    /// Whether the body has still to be read.
    pub fn body_pending(&self) -> bool {
        matches!(self.body, Body::Pending(_))
    }

    /// Writes `out` (an upstream head) to `to` followed by the request's
    /// body, copied verbatim by its framing: a sized body's bytes that
    /// came with the head go in the same write. A client that sent
    /// `Expect: 100-continue` and no body yet is told `100 Continue` first.
    /// On an error the connection closes after this request.
    pub async fn send_with_body<W>(
        &mut self,
        to: &mut W,
        out: &mut Vec<u8>,
    ) -> Result<(), BodyError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        self.touched = true;
        let Body::Pending(framing) = self.body else {
            return write_within(self.limits.write_timeout, to, out).await;
        };
        let mut at = self.start + self.head.len;
        self.head_kept = false;
        if self.head.expect_continue && at == self.end {
            write_within(
                self.limits.write_timeout,
                &mut *self.io,
                b"HTTP/1.1 100 Continue\r\n\r\n",
            )
            .await?;
        }
        let framing = match framing {
            BodyFraming::Length(n) => {
                let have = (self.end - at).min(usize::try_from(n).unwrap_or(usize::MAX));
                out.extend_from_slice(&self.buf[at..at + have]);
                at += have;
                BodyFraming::Length(n - have as u64)
            }
            f => f,
        };
        self.body = Body::Failed;
        write_within(self.limits.write_timeout, to, out).await?;
        let end = if framing == BodyFraming::Length(0) {
            BodyEnd::At { at, end: self.end }
        } else {
            let b = Buffer {
                buf: &mut *self.buf,
                at,
                end: self.end,
                lead: 0,
            };
            body::copy(&mut *self.io, to, framing, self.limits, b).await?
        };
        if let BodyEnd::At { at, end } = end {
            (self.start, self.end) = (at, end);
            self.body = Body::Done;
        }
        Ok(())
    }

    /// Reads the body and drops it (for a request answered without it),
    /// so the connection can go on. A client still waiting for
    /// `100 Continue` is not told to send it: its body is left unread and
    /// the connection closes after the answer.
    pub async fn discard_body(&mut self) -> Result<(), BodyError> {
        self.touched = true;
        if self.head.expect_continue
            && self.body_pending()
            && self.start + self.head.len == self.end
        {
            self.body = Body::Failed;
            return Ok(());
        }
        self.send_with_body(&mut tokio::io::sink(), &mut Vec::new())
            .await
    }
}

/// Serves one connection until it closes, a limit ends it, the handler
/// says [`Flow::Close`] or [`Flow::HandOff`], or [`Handler::stopping`]
/// resolves while it waits for a request. `buf` is the read buffer (grown
/// to the head limit; keep it to reuse for the next connection).
pub async fn serve<S, H>(
    io: &mut S,
    limits: &ServerLimits,
    handler: &mut H,
    buf: &mut Vec<u8>,
) -> Result<Served, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler<S>,
{
    if buf.len() < limits.head.max_head_bytes {
        buf.resize(limits.head.max_head_bytes, 0);
    }
    let (mut start, mut end) = (0usize, 0usize);
    // The first request has the head timeout from the connection's start
    // (a client that connects and sends nothing is a slow head, as nginx
    // counts it); later ones the idle timeout until their first byte.
    let mut first = true;
    let mut served = 0u64;
    loop {
        // One empty line before a request line is ignored (RFC 9112 §2.2:
        // some clients send a CRLF after a body); it does not start the
        // next head's clock.
        for _ in 0..2 {
            if start < end && matches!(buf[start], b'\r' | b'\n') {
                start += 1;
            }
        }
        let mut deadline =
            (first || start < end).then(|| Instant::now() + limits.header_read_timeout);
        first = false;
        // Bytes already parsed as an incomplete head: a head only completes
        // at an LF, so the parse waits for one (a head sent a byte at a time
        // is parsed once per line, not once per byte).
        let mut parsed_to = start;
        let head = loop {
            let full = end - start >= limits.head.max_head_bytes;
            if start < end && (full || buf[parsed_to..end].contains(&b'\n')) {
                parsed_to = end;
                match parse_request(&buf[start..end], limits.head) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(e) => {
                        let answer = handler.refusal(e.status(), &e.to_string());
                        let _ = within(limits.body.write_timeout, io.write_all(&answer)).await;
                        close_lingering(io, limits, buf).await;
                        return Err(ServeError::Head(e));
                    }
                }
            }
            if start > 0 {
                buf.copy_within(start..end, 0);
                parsed_to -= start;
                (start, end) = (0, end - start);
            }
            // Nothing of a request read yet (a new connection, or between
            // requests): the server stopping closes it.
            let waiting = start == end;
            let read = async {
                match deadline {
                    None => tokio::time::timeout(limits.idle_timeout, io.read(&mut buf[end..]))
                        .await
                        .map_err(|_| None),
                    Some(at) => tokio::time::timeout_at(at, io.read(&mut buf[end..]))
                        .await
                        .map_err(|_| Some(())),
                }
            };
            let read = tokio::select! {
                r = read => Some(r),
                () = handler.stopping(), if waiting => None,
            };
            let n = match read {
                Some(Ok(r)) => r?,
                // Idle past the idle timeout between requests, the server
                // stopping, or nothing of a head within the head timeout (a
                // connection opened ahead of use): close without an answer.
                Some(Err(None)) => return Ok(Served::Closed),
                None | Some(Err(Some(()))) if start == end => {
                    let _ = within(limits.body.write_timeout, io.shutdown()).await;
                    return Ok(Served::Closed);
                }
                None | Some(Err(Some(()))) => {
                    let t = limits.header_read_timeout;
                    let answer = handler.refusal(
                        408,
                        &format!("the request head was not complete within {t:?}"),
                    );
                    let _ = within(limits.body.write_timeout, io.write_all(&answer)).await;
                    close_lingering(io, limits, buf).await;
                    return Err(ServeError::HeadTimeout(t));
                }
            };
            if n == 0 {
                return Ok(Served::Closed);
            }
            deadline.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
            end += n;
        };
        let (close, head_len) = (head.close, head.len);
        let body = match BodyFraming::of_request(head.framing) {
            Some(f) => Body::Pending(f),
            None => Body::Done,
        };
        let bodiless = body == Body::Done;
        let mut req = Request {
            io,
            buf,
            start,
            end,
            head,
            body,
            head_kept: true,
            touched: false,
            last: close || served + 1 >= limits.max_requests,
            limits: limits.body,
        };
        served += 1;
        let flow = handler.handle(&mut req).await;
        let req_last = req.last;
        if flow == Flow::HandOff && !req.touched {
            return Ok(Served::HandedOff { at: start, end });
        }
        let done = req.body == Body::Done;
        (start, end) = if bodiless {
            (start + head_len, end)
        } else if done {
            (req.start, req.end)
        } else {
            (0, 0)
        };
        if !done {
            // Answered with the body unread or cut: it may still be coming,
            // and unread bytes at close would reset the answer away.
            close_lingering(io, limits, buf).await;
            return Ok(Served::Closed);
        }
        if flow != Flow::KeepAlive || req_last {
            // A client may have pipelined more behind this request (bytes
            // read and not served, or in flight when the server closes on
            // its own): linger, so they do not reset the answer away.
            if start < end || !close {
                close_lingering(io, limits, buf).await;
            } else {
                let _ = within(limits.body.write_timeout, io.shutdown()).await;
            }
            return Ok(Served::Closed);
        }
        if start == end {
            (start, end) = (0, 0);
        }
    }
}

/// Closes our side, then reads and drops what the client still sends until
/// it closes too or the linger limits pass.
async fn close_lingering<S>(io: &mut S, limits: &ServerLimits, buf: &mut [u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !matches!(
        within(limits.body.write_timeout, io.shutdown()).await,
        Ok(Ok(()))
    ) || buf.is_empty()
    {
        return;
    }
    let until = Instant::now() + limits.linger_time;
    let mut left = limits.linger_bytes;
    while left > 0 {
        match tokio::time::timeout_at(until, io.read(buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}
