//! Bulkhead: at most `max_in_flight` calls run at once, at most `max_queued`
//! more wait for a slot, and none waits longer than `max_wait_ms`. Anything
//! beyond fails fast with [`BulkheadFull`], so a slow dependency cannot take
//! every task and connection of the caller (resilience4j's bulkhead).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::BulkheadFull;
use crate::BoxError;
use crate::config::{ConfigError, check};

/// Bulkhead limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls running at once (1..=1_000_000).
    pub max_in_flight: usize,
    /// Calls waiting for a slot (0 = never wait).
    pub max_queued: usize,
    /// Longest wait for a slot, milliseconds.
    pub max_wait_ms: u64,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 100,
            max_queued: 100,
            max_wait_ms: 100,
        }
    }
}

impl BulkheadConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=1_000_000).contains(&self.max_in_flight),
            "bulkhead.max_in_flight",
            self.max_in_flight,
            "1..=1000000",
        )?;
        check(
            self.max_queued <= 1_000_000,
            "bulkhead.max_queued",
            self.max_queued,
            "at most 1000000",
        )?;
        check(
            self.max_wait_ms <= 3_600_000,
            "bulkhead.max_wait_ms",
            self.max_wait_ms,
            "at most one hour",
        )
    }
}

#[derive(Debug)]
struct Shared {
    semaphore: Arc<Semaphore>,
    queued: AtomicUsize,
    max_in_flight: AtomicUsize,
    cfg: BulkheadConfig,
    rejected: metrics::Counter,
}

/// Layer for [`Bulkhead`]; every service it builds shares one set of slots.
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    shared: Arc<Shared>,
}

impl BulkheadLayer {
    /// A layer with fresh slots.
    pub fn new(cfg: BulkheadConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                semaphore: Arc::new(Semaphore::new(cfg.max_in_flight)),
                queued: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(cfg.max_in_flight),
                cfg,
                rejected: metrics::counter!("meshwork_bulkhead_rejected_total"),
            }),
        })
    }

    /// Changes `max_in_flight` at run time. Growing takes effect at once;
    /// shrinking takes free slots at once and the rest as running calls end
    /// (a background task on the current tokio runtime collects them; without
    /// a runtime only free slots are taken).
    pub fn set_max_in_flight(&self, max_in_flight: usize) -> Result<(), ConfigError> {
        BulkheadConfig {
            max_in_flight,
            ..self.shared.cfg
        }
        .validate()?;
        let old = self
            .shared
            .max_in_flight
            .swap(max_in_flight, Ordering::AcqRel);
        let sem = &self.shared.semaphore;
        if max_in_flight > old {
            sem.add_permits(max_in_flight - old);
        } else if max_in_flight < old {
            let owed = (old - max_in_flight) - sem.forget_permits(old - max_in_flight);
            if owed > 0
                && let Ok(handle) = tokio::runtime::Handle::try_current()
            {
                let sem = sem.clone();
                handle.spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(owed as u32).await {
                        p.forget();
                    }
                });
            }
        }
        Ok(())
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.shared.semaphore.available_permits()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;
    fn layer(&self, inner: S) -> Bulkhead<S> {
        Bulkhead {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The bulkhead service.
#[derive(Debug, Clone)]
pub struct Bulkhead<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct QueueGuard<'a>(&'a AtomicUsize);
impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, Req> Service<Req> for Bulkhead<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError>,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let shared = &self.shared;
        if let Ok(permit) = shared.semaphore.clone().try_acquire_owned() {
            return ResponseFuture::Direct {
                inner: self.inner.call(req),
                permit: Some(permit),
            };
        }
        let queued = shared.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= shared.cfg.max_queued {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            shared.rejected.increment(1);
            let e = BulkheadFull {
                queue_full: true,
                waited: Duration::ZERO,
            };
            return ResponseFuture::Rejected { error: Some(e) };
        }
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::Queued {
            fut: Box::pin(async move {
                let start = Instant::now();
                let max_wait = Duration::from_millis(shared.cfg.max_wait_ms);
                let acquired = {
                    let _guard = QueueGuard(&shared.queued);
                    tokio::time::timeout(max_wait, shared.semaphore.clone().acquire_owned()).await
                };
                let _permit = match acquired {
                    Ok(Ok(p)) => p,
                    _ => {
                        shared.rejected.increment(1);
                        return Err(BulkheadFull {
                            queue_full: false,
                            waited: start.elapsed(),
                        }
                        .into());
                    }
                };
                ready.call(req).await.map_err(Into::into)
            }),
        }
    }
}

pin_project! {
    /// Future of [`Bulkhead`]; holds the slot until the call ends.
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    pub enum ResponseFuture<F, T> {
        /// Got a slot at once.
        Direct { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        /// Waiting in the queue.
        Queued { fut: Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>> },
        /// Rejected.
        Rejected { error: Option<BulkheadFull> },
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Direct { inner, permit } => {
                let out = std::task::ready!(inner.poll(cx));
                permit.take();
                Poll::Ready(out.map_err(Into::into))
            }
            Proj::Queued { fut } => fut.as_mut().poll(cx),
            Proj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn in_flight_queue_and_wait_limits() {
        let layer = BulkheadLayer::new(BulkheadConfig {
            max_in_flight: 2,
            max_queued: 1,
            max_wait_ms: 50,
        })
        .unwrap();
        let svc = layer.layer(tower::service_fn(|d: u64| async move {
            tokio::time::sleep(Duration::from_millis(d)).await;
            Ok::<_, BoxError>(d)
        }));
        let a = tokio::spawn(svc.clone().oneshot(100));
        let b = tokio::spawn(svc.clone().oneshot(100));
        tokio::task::yield_now().await;
        assert_eq!(layer.available(), 0);
        let c = tokio::spawn(svc.clone().oneshot(1)); // queued
        tokio::task::yield_now().await;
        let e = svc.clone().oneshot(1).await.unwrap_err(); // queue full
        assert!(e.downcast_ref::<BulkheadFull>().unwrap().queue_full);
        let e = c.await.unwrap().unwrap_err(); // waited 50 ms, no slot
        let full = e.downcast_ref::<BulkheadFull>().unwrap();
        assert!(!full.queue_full);
        assert_eq!(full.waited, Duration::from_millis(50));
        assert_eq!(a.await.unwrap().unwrap(), 100);
        assert_eq!(b.await.unwrap().unwrap(), 100);
        assert_eq!(layer.available(), 2);
        // A queued call that gets a slot in time runs.
        let a = tokio::spawn(svc.clone().oneshot(30));
        let b = tokio::spawn(svc.clone().oneshot(30));
        tokio::task::yield_now().await;
        assert_eq!(svc.clone().oneshot(5).await.unwrap(), 5);
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn resize_at_run_time() {
        let layer = BulkheadLayer::new(BulkheadConfig {
            max_in_flight: 4,
            max_queued: 0,
            max_wait_ms: 0,
        })
        .unwrap();
        let svc = layer.layer(tower::service_fn(|d: u64| async move {
            tokio::time::sleep(Duration::from_millis(d)).await;
            Ok::<_, BoxError>(d)
        }));
        let running: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(100)))
            .collect();
        tokio::task::yield_now().await;
        layer.set_max_in_flight(1).unwrap();
        assert_eq!(layer.available(), 0, "the free slot is taken at once");
        for r in running {
            r.await.unwrap().unwrap();
        }
        tokio::task::yield_now().await;
        assert_eq!(
            layer.available(),
            1,
            "shrunk to 1 once the running calls ended"
        );
        layer.set_max_in_flight(3).unwrap();
        assert_eq!(layer.available(), 3);
    }
}
