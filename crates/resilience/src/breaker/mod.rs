//! Circuit breaker: stop calling a callee that is failing, probe it after a
//! while, resume when it answers again.
//!
//! [`BreakerCore`] decides (closed / open / half-open, see its docs);
//! [`CircuitBreaker`] is the tower service around it, classifying each
//! result with a [`Classify`] and measuring latency
//! for the slow-call trigger. Rejected calls fail fast with [`CircuitOpen`],
//! which carries the remaining open time. Transitions are logged with
//! `tracing`, counted in metrics (`meshwork_breaker_transitions_total`,
//! gauge `meshwork_breaker_state`, `meshwork_breaker_rejected_total`,
//! `meshwork_breaker_calls_total{outcome}`, all labelled `name`) and published to [`Breaker::subscribe`]rs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::breaker::{BreakerConfig, BreakerLayer};
//! use meshwork_resilience::CircuitOpen;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! // The classic: open after 3 failures in a row, try again after 30 s.
//! let cfg = BreakerConfig {
//!     consecutive_failures: Some(3),
//!     failure_rate_threshold: None,
//!     open_duration_ms: 30_000,
//!     ..Default::default()
//! };
//! let mut svc = ServiceBuilder::new()
//!     .layer(BreakerLayer::new(cfg).unwrap())
//!     .service_fn(|_: ()| async { Err::<(), _>(std::io::Error::other("down")) });
//! for _ in 0..3 {
//!     assert!(svc.ready().await.unwrap().call(()).await.is_err());
//! }
//! let err = svc.ready().await.unwrap().call(()).await.unwrap_err();
//! assert!(err.is::<CircuitOpen>());
//! # }
//! ```

mod config;
mod core;
mod error;
mod window;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower::{Layer, Service};

pub use self::config::{BreakerConfig, SlidingWindow};
pub use self::core::{BreakerCore, Permit, State, Transition};
pub use self::error::CircuitOpen;
use crate::BoxError;
use crate::classify::{Classify, ErrorsAsFailures, Outcome};
use crate::config::ConfigError;

/// Capacity of the transition broadcast channel; slow subscribers lag.
const EVENTS_CAPACITY: usize = 64;

#[derive(Debug)]
struct Shared {
    core: BreakerCore,
    events: broadcast::Sender<Transition>,
    rejected: metrics::Counter,
    /// Calls by outcome: success, failure, ignored.
    calls: [metrics::Counter; 3],
    state_gauge: metrics::Gauge,
    name: Arc<str>,
}

/// A shared handle on one breaker: clone it into as many services as should
/// trip together, observe its state, subscribe to its transitions.
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

impl Breaker {
    /// A closed breaker. Metrics handles are taken now: install the
    /// `metrics` recorder before building breakers.
    pub fn new(cfg: BreakerConfig) -> Result<Self, ConfigError> {
        let name: Arc<str> = cfg.name.as_str().into();
        let core = BreakerCore::new(cfg, Instant::now())?;
        let labels = [("name", name.to_string())];
        let state_gauge = metrics::gauge!("meshwork_breaker_state", &labels);
        state_gauge.set(State::Closed.as_gauge());
        Ok(Self {
            shared: Arc::new(Shared {
                core,
                events: broadcast::channel(EVENTS_CAPACITY).0,
                rejected: metrics::counter!("meshwork_breaker_rejected_total", &labels),
                calls: ["success", "failure", "ignored"].map(|outcome| {
                    metrics::counter!(
                        "meshwork_breaker_calls_total",
                        "name" => name.to_string(),
                        "outcome" => outcome
                    )
                }),
                state_gauge,
                name,
            }),
        })
    }

    /// The decision core.
    pub fn core(&self) -> &BreakerCore {
        &self.shared.core
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.shared.core.state()
    }

    /// A receiver of every future transition.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.shared.events.subscribe()
    }

    /// Operator override: opens the breaker for `duration`.
    pub fn force_open(&self, duration: Duration) {
        if let Some(t) = self.shared.core.force_open(duration, Instant::now()) {
            self.publish(t);
        }
    }

    /// Operator override: closes the breaker and clears its counts.
    pub fn reset(&self) {
        if let Some(t) = self.shared.core.reset(Instant::now()) {
            self.publish(t);
        }
    }

    fn publish(&self, t: Transition) {
        let s = &self.shared;
        s.state_gauge.set(t.to.as_gauge());
        metrics::counter!(
            "meshwork_breaker_transitions_total",
            "name" => s.name.to_string(),
            "to" => t.to.as_str()
        )
        .increment(1);
        tracing::info!(breaker = %s.name, from = t.from.as_str(), to = t.to.as_str(), "circuit breaker transition");
        let _ = s.events.send(t); // no subscriber is fine
    }
}

/// Layer producing [`CircuitBreaker`]s that share one [`Breaker`].
#[derive(Debug, Clone)]
pub struct BreakerLayer<C = ErrorsAsFailures> {
    breaker: Breaker,
    classifier: C,
}

impl BreakerLayer {
    /// A layer over a new breaker, classifying `Err` as failure.
    pub fn new(cfg: BreakerConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            breaker: Breaker::new(cfg)?,
            classifier: ErrorsAsFailures,
        })
    }
}

impl<C> BreakerLayer<C> {
    /// A layer over an existing breaker with a classifier.
    pub fn with_classifier(breaker: Breaker, classifier: C) -> Self {
        Self {
            breaker,
            classifier,
        }
    }

    /// The breaker shared by every service of this layer.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }
}

impl<S, C: Clone> Layer<S> for BreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

/// The circuit-breaking service.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S, C = ErrorsAsFailures> {
    inner: S,
    breaker: Breaker,
    classifier: C,
}

impl<S, C> CircuitBreaker<S, C> {
    /// Wraps `inner` with `breaker`.
    pub fn new(inner: S, breaker: Breaker, classifier: C) -> Self {
        Self {
            inner,
            breaker,
            classifier,
        }
    }
}

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let core = &self.breaker.shared.core;
        match core.try_acquire_with(Instant::now) {
            Ok(mut permit) => {
                if let Some(t) = permit.transition.take() {
                    self.breaker.publish(t);
                }
                let start = core.needs_latency().then(Instant::now);
                ResponseFuture::Called {
                    inner: self.inner.call(req),
                    state: Some(Pending {
                        permit,
                        start,
                        breaker: self.breaker.clone(),
                        classifier: self.classifier.clone(),
                    }),
                }
            }
            Err(open) => {
                self.breaker.shared.rejected.increment(1);
                ResponseFuture::Rejected { error: Some(open) }
            }
        }
    }
}

#[derive(Debug)]
#[doc(hidden)]
pub struct Pending<C> {
    permit: Permit,
    start: Option<Instant>,
    breaker: Breaker,
    classifier: C,
}

pin_project! {
    /// Future of [`CircuitBreaker`]: records the outcome when the call ends.
    #[project = Proj]
    #[allow(missing_docs)] // variant fields are private in spirit
    #[derive(Debug)]
    pub enum ResponseFuture<F, C> {
        /// The call is running.
        Called { #[pin] inner: F, state: Option<Pending<C>> },
        /// The call was rejected.
        Rejected { error: Option<CircuitOpen> },
    }
    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            // A call dropped before it finished (cancelled, timed out above
            // us) tells nothing about the callee, but a half-open probe slot
            // must be given back or the breaker would stay half-open forever.
            if let Proj::Called { state, .. } = this.project()
                && let Some(p) = state.take()
            {
                p.breaker.shared.core.record_with(p.permit, Outcome::Ignored, Duration::ZERO, Instant::now);
            }
        }
    }
}

impl<F, C, T, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<T, E>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Rejected { error } => Poll::Ready(Err(error
                .take()
                .map_or_else(|| "polled after completion".into(), Into::into))),
            Proj::Called { inner, state } => {
                let result = std::task::ready!(inner.poll(cx));
                if let Some(p) = state.take() {
                    let outcome = p.classifier.classify(result.as_ref());
                    let i = match outcome {
                        Outcome::Success => 0,
                        Outcome::Failure => 1,
                        Outcome::Ignored => 2,
                    };
                    p.breaker.shared.calls[i].increment(1);
                    let latency = p.start.map_or(Duration::ZERO, |s| s.elapsed());
                    if let Some(t) =
                        p.breaker
                            .shared
                            .core
                            .record_with(p.permit, outcome, latency, Instant::now)
                    {
                        p.breaker.publish(t);
                    }
                }
                Poll::Ready(result.map_err(Into::into))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn opens_rejects_and_recovers_with_paused_clock() {
        let cfg = BreakerConfig {
            consecutive_failures: Some(3),
            failure_rate_threshold: None,
            open_duration_ms: 30_000,
            half_open_max_probes: 1,
            ..Default::default()
        };
        let layer = BreakerLayer::new(cfg).unwrap();
        let mut events = layer.breaker().subscribe();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = healthy.clone();
        let mut svc = layer.layer(tower::service_fn(move |_: ()| {
            let ok = h.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::other("boom"))
                }
            }
        }));
        for _ in 0..3 {
            let e = svc.ready().await.unwrap().call(()).await.unwrap_err();
            assert!(e.is::<std::io::Error>());
        }
        let e = svc.ready().await.unwrap().call(()).await.unwrap_err();
        let open = e.downcast_ref::<CircuitOpen>().unwrap();
        assert_eq!(open.remaining, Duration::from_secs(30));
        assert_eq!(events.recv().await.unwrap().to, State::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        healthy.store(true, std::sync::atomic::Ordering::SeqCst);
        svc.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(events.recv().await.unwrap().to, State::HalfOpen);
        assert_eq!(events.recv().await.unwrap().to, State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_gives_its_slot_back() {
        let cfg = BreakerConfig {
            consecutive_failures: Some(1),
            failure_rate_threshold: None,
            open_duration_ms: 1_000,
            half_open_max_probes: 1,
            ..Default::default()
        };
        let layer = BreakerLayer::new(cfg).unwrap();
        let mut svc = layer.layer(tower::service_fn(|fail: bool| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            if fail {
                Err(std::io::Error::other("boom"))
            } else {
                Ok(())
            }
        }));
        assert!(svc.ready().await.unwrap().call(true).await.is_err());
        assert_eq!(layer.breaker().state(), State::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = svc.ready().await.unwrap().call(false);
        assert_eq!(layer.breaker().state(), State::HalfOpen);
        drop(probe); // cancelled, e.g. by a timeout above
        svc.ready().await.unwrap().call(false).await.unwrap();
        assert_eq!(layer.breaker().state(), State::Closed);
    }
}
