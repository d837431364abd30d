//! A request body that can be sent again on a retry (Envoy's model): while
//! the first try streams the client's body upstream, the data read so far
//! is kept (reference-counted [`Bytes`], no copy) up to a limit. A retry
//! replays what was kept, then goes on reading the client's body where the
//! earlier try stopped. Once more than the limit has been read the copy is
//! dropped and the request can no longer be retried — unless nothing was
//! read at all (a connect failure: nothing was sent).
//!
//! Each try gets its own [`ReplayBody`]; starting a new one supersedes the
//! older ones (an earlier try's connection that still polls its body gets
//! an error, so it can never steal data meant for the retry).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;

use crate::body::{Body, BoxError};

/// A try's body was superseded by a retry's (the earlier try was abandoned).
#[derive(Debug, thiserror::Error)]
#[error("request body superseded by a retry")]
pub(crate) struct ReplaySuperseded;

/// The client's body failed during an earlier try, so a replay cannot complete.
#[derive(Debug, thiserror::Error)]
#[error("request body failed during an earlier try")]
pub(crate) struct ReplaySourceFailed;

struct State {
    /// The client's body (guarded: size limit, read timeout, mirror tee).
    source: Body,
    /// Data frames read from `source` so far, while within `limit`.
    kept: Vec<Bytes>,
    kept_bytes: u64,
    limit: u64,
    /// More than `limit` was read: `kept` was dropped.
    over_limit: bool,
    /// Anything was read from `source`.
    touched: bool,
    source_done: bool,
    source_failed: bool,
    trailers: Option<HeaderMap>,
    /// The try whose body may read; older ones are superseded.
    generation: u64,
}

/// The shared side: hands out one body per try.
#[derive(Clone)]
pub(crate) struct Replay {
    state: Arc<Mutex<State>>,
    hint: SizeHint,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").finish_non_exhaustive()
    }
}

impl Replay {
    /// Wraps `source`, keeping up to `limit` bytes of it for retries. A body
    /// whose declared size exceeds `limit` keeps nothing (only a try that
    /// read nothing can be replayed).
    pub(crate) fn new(source: Body, limit: u64) -> Self {
        let hint = source.size_hint();
        let over_limit = hint.lower() > limit;
        Self {
            state: Arc::new(Mutex::new(State {
                source,
                kept: Vec::new(),
                kept_bytes: 0,
                limit,
                over_limit,
                touched: false,
                source_done: false,
                source_failed: false,
                trailers: None,
                generation: 0,
            })),
            hint,
        }
    }

    /// Whether a new try can send the whole body again.
    pub(crate) fn replayable(&self) -> bool {
        let st = self.state.lock();
        !st.source_failed && (!st.touched || !st.over_limit)
    }

    /// The body for the next try (the first call gives the first try's);
    /// every earlier body is superseded. `None` when not replayable.
    pub(crate) fn next_body(&self) -> Option<ReplayBody> {
        let mut st = self.state.lock();
        if st.source_failed || (st.touched && st.over_limit) {
            return None;
        }
        st.generation += 1;
        Some(ReplayBody {
            state: self.state.clone(),
            generation: st.generation,
            pos: 0,
            sent: 0,
            trailers_sent: false,
            hint: self.hint,
        })
    }
}

/// One try's view of a [`Replay`]: kept data first, then the client's body.
pub(crate) struct ReplayBody {
    state: Arc<Mutex<State>>,
    generation: u64,
    /// Kept frames already replayed by this body.
    pos: usize,
    /// Data bytes this body has yielded.
    sent: u64,
    trailers_sent: bool,
    hint: SizeHint,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut st = this.state.lock();
        if st.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(ReplaySuperseded))));
        }
        if !st.over_limit
            && let Some(b) = st.kept.get(this.pos)
        {
            let b = b.clone();
            this.pos += 1;
            this.sent += b.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if st.source_failed {
            return Poll::Ready(Some(Err(Box::new(ReplaySourceFailed))));
        }
        if st.source_done {
            if !this.trailers_sent
                && let Some(t) = st.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let st = &mut *st;
        match Pin::new(&mut st.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.source_done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.touched = true;
                st.source_failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                st.touched = true;
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.sent += n;
                    if !st.over_limit {
                        if st.kept_bytes + n > st.limit {
                            st.over_limit = true;
                            st.kept = Vec::new();
                        } else {
                            st.kept_bytes += n;
                            st.kept.push(data.clone());
                            this.pos = st.kept.len();
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    st.source_done = true;
                    st.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = self.state.lock();
        st.generation == self.generation
            && !st.source_failed
            && (st.over_limit || self.pos >= st.kept.len())
            && (st.source_done || st.source.is_end_stream())
            && (self.trailers_sent || st.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint.exact() {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    fn chunks(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    async fn frame(b: &mut ReplayBody) -> Option<Bytes> {
        b.frame().await.map(|f| f.unwrap().into_data().unwrap())
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_read_then_continues() {
        let r = Replay::new(chunks(&[b"ab", b"cd", b"ef"]), 64);
        let mut first = r.next_body().unwrap();
        assert_eq!(frame(&mut first).await.unwrap(), "ab");
        let second = r.next_body().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "superseded");
        let all = second.collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcdef");
        let third = r.next_body().unwrap();
        assert_eq!(third.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn over_the_limit_is_not_replayable_once_read() {
        let r = Replay::new(chunks(&[b"abc", b"def"]), 4);
        assert!(r.replayable());
        let first = r.next_body().unwrap();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "abcdef");
        assert!(!r.replayable());
        assert!(r.next_body().is_none());
    }

    #[tokio::test]
    async fn an_untouched_body_is_replayable_even_over_the_limit() {
        let r = Replay::new(chunks(&[b"abc", b"def"]), 0);
        let first = r.next_body().unwrap();
        drop(first);
        assert!(r.replayable());
        let second = r.next_body().unwrap();
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let src =
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let r = Replay::new(src, 64);
        let first = r.next_body().unwrap().collect().await.unwrap();
        assert_eq!(first.trailers(), Some(&t));
        let second = r.next_body().unwrap().collect().await.unwrap();
        assert_eq!(second.trailers(), Some(&t));
        assert_eq!(second.to_bytes(), "x");
    }
}
