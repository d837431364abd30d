//! Body types: one boxed streaming body for everything the gateway sends,
//! and [`GuardedBody`], which enforces the size limit and the idle read
//! timeout on a client's request body while streaming it (nothing is
//! buffered whole) and can copy it to a mirror.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;
use tokio::sync::mpsc;
use tokio::time::Sleep;

/// Errors of bodies the gateway streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the gateway produces.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts to [`BoxError`].
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// What ended a guarded body early (shared with the proxy, which maps it to
/// a status code when the upstream call fails because of it, and never
/// counts such a failure against the upstream).
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyFault(Arc<AtomicU8>);

impl BodyFault {
    pub(crate) const NONE: u8 = 0;
    pub(crate) const TOO_LARGE: u8 = 1;
    pub(crate) const TIMEOUT: u8 = 2;
    /// The client's body failed: the client went away mid-body or sent
    /// malformed framing (a bad chunk).
    pub(crate) const CLIENT: u8 = 3;

    pub(crate) fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
    fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release);
    }
}

/// The request body was larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit, bytes.
    pub limit: u64,
}

/// The client sent nothing for longer than the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body read timed out after {0:?} without data")]
pub struct BodyTimeout(pub Duration);

pin_project! {
    /// A client body with a size limit, an idle timeout between frames and
    /// an optional copy of its data to a mirror (dropped, never waited for,
    /// when the mirror falls behind).
    pub(crate) struct GuardedBody<B> {
        #[pin]
        inner: B,
        read: u64,
        limit: u64,
        idle: Duration,
        #[pin]
        sleep: Option<Sleep>,
        tee: Option<(mpsc::Sender<Bytes>, Arc<AtomicBool>)>,
        fault: BodyFault,
    }
}

impl<B> GuardedBody<B> {
    pub(crate) fn new(inner: B, limit: u64, idle: Duration, fault: BodyFault) -> Self {
        Self {
            inner,
            read: 0,
            limit,
            idle,
            sleep: None,
            tee: None,
            fault,
        }
    }

    /// Copies data frames to `tx`; `aborted` is set if the copy is cut short.
    pub(crate) fn with_tee(mut self, tx: mpsc::Sender<Bytes>, aborted: Arc<AtomicBool>) -> Self {
        self.tee = Some((tx, aborted));
        self
    }
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.idle)));
                }
                if let Some(s) = this.sleep.as_mut().as_pin_mut()
                    && s.poll(cx).is_ready()
                {
                    this.fault.set(BodyFault::TIMEOUT);
                    abort(this.tee);
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout(*this.idle)))));
                }
                Poll::Pending
            }
            Poll::Ready(None) => {
                *this.tee = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.fault.set(BodyFault::CLIENT);
                abort(this.tee);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.sleep.set(None);
                if let Some(data) = frame.data_ref() {
                    *this.read += data.len() as u64;
                    if *this.read > *this.limit {
                        this.fault.set(BodyFault::TOO_LARGE);
                        abort(this.tee);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: *this.limit,
                        }))));
                    }
                    if let Some((tx, _)) = this.tee.as_ref()
                        && tx.try_send(data.clone()).is_err()
                    {
                        // The mirror is behind or gone: its request is cut short.
                        abort(this.tee);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn abort(tee: &mut Option<(mpsc::Sender<Bytes>, Arc<AtomicBool>)>) {
    if let Some((_, aborted)) = tee.take() {
        aborted.store(true, Ordering::Release);
    }
}

use std::future::Future;

/// The mirror's copy of a request body was cut short.
#[derive(Debug, thiserror::Error)]
#[error("mirrored body cut short")]
pub struct MirrorCut;

/// A body fed by a channel (the mirror's copy of a request body); ends with
/// an error, never cleanly, if the copy was cut short.
pub(crate) fn channel_body(rx: mpsc::Receiver<Bytes>, aborted: Arc<AtomicBool>) -> Body {
    let stream =
        futures_util::stream::unfold((rx, aborted, false), |(mut rx, aborted, done)| async move {
            if done {
                return None;
            }
            match rx.recv().await {
                Some(b) => Some((Ok::<_, BoxError>(Frame::data(b)), (rx, aborted, false))),
                None if aborted.load(Ordering::Acquire) => {
                    Some((Err(Box::new(MirrorCut) as BoxError), (rx, aborted, true)))
                }
                None => None,
            }
        });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}
