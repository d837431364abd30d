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
use tokio::sync::Notify;
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

/// Slot accounting: an atomic counter (admission is one CAS, release one
/// `fetch_sub`) plus a `Notify` that wakes a queued call when a slot frees.
/// Queued calls are not served in FIFO order: a new call may take a slot
/// that frees while others wait (they then retry until `max_wait_ms`).
#[derive(Debug)]
struct Shared {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    queued: AtomicUsize,
    freed: Notify,
    cfg: BulkheadConfig,
    rejected: metrics::Counter,
}

impl Shared {
    #[inline]
    fn try_acquire(self: &Arc<Self>) -> Option<BulkheadSlot> {
        let max = self.max_in_flight.load(Ordering::Relaxed);
        let mut n = self.in_flight.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                n,
                n + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(BulkheadSlot(self.clone())),
                Err(current) => n = current,
            }
        }
    }

    /// Joins the queue, or rejects (counted) when `max_queued` already wait.
    fn join_queue(&self) -> Result<(), BulkheadFull> {
        let queued = self.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= self.cfg.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.rejected.increment(1);
            return Err(BulkheadFull {
                queue_full: true,
                waited: Duration::ZERO,
            });
        }
        Ok(())
    }

    /// Waits in the queue (joined with `join_queue`) for a slot, at most
    /// `max_wait_ms`; leaves the queue either way.
    async fn wait_queued(self: &Arc<Self>) -> Result<BulkheadSlot, BulkheadFull> {
        let start = Instant::now();
        let max_wait = Duration::from_millis(self.cfg.max_wait_ms);
        let slot = {
            let _guard = QueueGuard(&self.queued);
            self.acquire_within(max_wait).await
        };
        slot.ok_or_else(|| {
            self.rejected.increment(1);
            BulkheadFull {
                queue_full: false,
                waited: start.elapsed(),
            }
        })
    }

    async fn acquire_within(self: &Arc<Self>, max_wait: Duration) -> Option<BulkheadSlot> {
        let deadline = Instant::now() + max_wait;
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_acquire() {
                return Some(slot);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_acquire();
            }
        }
    }
}

/// One taken bulkhead slot, given back on drop.
#[derive(Debug)]
pub struct BulkheadSlot(Arc<Shared>);

impl Drop for BulkheadSlot {
    #[inline]
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
        if self.0.queued.load(Ordering::Acquire) > 0 {
            self.0.freed.notify_one();
        }
    }
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
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(cfg.max_in_flight),
                queued: AtomicUsize::new(0),
                freed: Notify::new(),
                cfg,
                rejected: metrics::counter!("meshwork_bulkhead_rejected_total"),
            }),
        })
    }

    /// Changes `max_in_flight` at run time. Growing takes effect at once
    /// (waking queued calls); shrinking lets running calls finish and admits
    /// new ones only below the new limit.
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
        for _ in old..max_in_flight.min(old + self.shared.queued.load(Ordering::Acquire)) {
            self.shared.freed.notify_one();
        }
        Ok(())
    }

    /// A free slot now, or `None`; for work that is not a tower call. Drop
    /// the slot to give it back.
    pub fn try_acquire(&self) -> Option<BulkheadSlot> {
        self.shared.try_acquire()
    }

    /// A slot for work that is not a tower call (the gateway holds one while
    /// a proxied request runs to its response head), admitted exactly as the
    /// service admits a call: at once when a slot is free, else queued (at
    /// most `max_queued` waiting, each at most `max_wait_ms`). Drop the slot to
    /// give it back.
    pub async fn acquire(&self) -> Result<BulkheadSlot, BulkheadFull> {
        if let Some(slot) = self.shared.try_acquire() {
            return Ok(slot);
        }
        self.shared.join_queue()?;
        self.shared.wait_queued().await
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        let max = self.shared.max_in_flight.load(Ordering::Acquire);
        max.saturating_sub(self.shared.in_flight.load(Ordering::Acquire))
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
        if let Some(slot) = shared.try_acquire() {
            return ResponseFuture::Direct {
                inner: self.inner.call(req),
                slot: Some(slot),
            };
        }
        if let Err(e) = shared.join_queue() {
            return ResponseFuture::Rejected { error: Some(e) };
        }
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::Queued {
            fut: Box::pin(async move {
                let _slot = shared.wait_queued().await?;
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
        Direct { #[pin] inner: F, slot: Option<BulkheadSlot> },
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
            Proj::Direct { inner, slot } => {
                let out = std::task::ready!(inner.poll(cx));
                slot.take();
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

    /// The permit API admits exactly as the service does: a free slot at once,
    /// then `max_queued` waiters for at most `max_wait_ms`, the rest refused.
    #[tokio::test(start_paused = true)]
    async fn permits_follow_the_same_admission_as_calls() {
        let layer = BulkheadLayer::new(BulkheadConfig {
            max_in_flight: 1,
            max_queued: 1,
            max_wait_ms: 100,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let first = layer.try_acquire().unwrap_or_else(|| panic!("a free slot"));
        assert!(layer.try_acquire().is_none());
        let l = layer.clone();
        let waiter = tokio::spawn(async move { l.acquire().await.map(|_slot| ()) });
        tokio::task::yield_now().await;
        let refused = layer
            .acquire()
            .await
            .err()
            .unwrap_or_else(|| panic!("queue is full"));
        assert!(refused.queue_full);
        drop(first);
        assert!(
            matches!(waiter.await, Ok(Ok(()))),
            "the waiter got the freed slot"
        );
        // Held past max_wait: the next waiter gives up after 100 ms.
        let _held = layer.acquire().await.unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        let timed_out = layer
            .acquire()
            .await
            .err()
            .unwrap_or_else(|| panic!("times out"));
        assert!(!timed_out.queue_full);
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert_eq!(layer.available(), 0);
    }

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_max_in_flight_under_load() {
        use std::sync::atomic::AtomicUsize;
        let layer = BulkheadLayer::new(BulkheadConfig {
            max_in_flight: 3,
            max_queued: 100,
            max_wait_ms: 10_000,
        })
        .unwrap();
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (n, p) = (now.clone(), peak.clone());
        let svc = layer.layer(tower::service_fn(move |i: u64| {
            let (n, p) = (n.clone(), p.clone());
            async move {
                let c = n.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(c, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200 + (i % 7) * 50)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, BoxError>(i)
            }
        }));
        let tasks: Vec<_> = (0..60)
            .map(|i| tokio::spawn(svc.clone().oneshot(i)))
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert_eq!(layer.available(), 3);
    }
}
