//! Load balancers fed by a stream of endpoint changes.
//!
//! [`Balance`] keeps the endpoints announced by its discovery stream
//! ([`Change`]: insert, remove, weight change), asks a [`Picker`] which one
//! gets each request, and skips endpoints an optional [`OutlierDetector`]
//! does not admit (ejected, or on trial with a trial request in flight),
//! unless the detector is in panic (too few admitted: then every endpoint
//! takes traffic). Pickers are plain cores:
//!
//! | picker | algorithm |
//! | --- | --- |
//! | [`P2c`] | power of two choices on peak-EWMA latency x in-flight (Finagle, linkerd) |
//! | [`SmoothWrr`] | smooth weighted round robin (nginx) |
//! | [`RandomPicker`] | uniform random |
//! | [`Ring`] | consistent hashing on a ketama ring with virtual nodes |
//! | [`Maglev`] | Maglev consistent hashing |
//!
//! Hashing pickers hash the request with the function given to
//! [`Balance::with_request_hash`] (e.g. [`header_hash`]). Endpoint services
//! must be `Clone` (connection handles, as hyper's client is): a call clones
//! the chosen one and waits for it to be ready. With no available endpoint
//! a call fails with [`NoEndpoint`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use meshwork_resilience::balance::{Balance, Change, P2c};
//! use tower::ServiceExt;
//!
//! let (tx, changes) = meshwork_resilience::balance::channel();
//! for port in [8001u16, 8002] {
//!     let svc = tower::service_fn(move |_: ()| async move { Ok::<_, std::io::Error>(port) });
//!     tx.send(Change::Insert { key: port, service: svc, weight: 1 }).unwrap();
//! }
//! let mut lb = Balance::new(changes, P2c::default());
//! let port = lb.ready().await.unwrap().call(()).await.unwrap();
//! assert!(port == 8001 || port == 8002);
//! # use tower::Service;
//! # }
//! ```

mod hash;
mod maglev;
mod p2c;
mod random;
mod ring;
mod wrr;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::Service;

pub use self::hash::{StableHasher, mix, stable_hash};
pub use self::maglev::{DEFAULT_TABLE_SIZE, Maglev};
pub use self::p2c::{P2c, PeakEwma};
pub use self::random::RandomPicker;
pub use self::ring::Ring;
pub use self::wrr::SmoothWrr;
use crate::BoxError;
use crate::classify::{Classify, ErrorsAsFailures, Outcome};
use crate::outlier::{OutlierDetector, OutlierEvent};

/// Latency assumed for an endpoint before its first response.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the peak-EWMA decay.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// A change of the endpoint set.
#[derive(Debug)]
pub enum Change<K, S> {
    /// Adds (or replaces) endpoint `key`.
    Insert {
        /// Endpoint identity (e.g. its address).
        key: K,
        /// Service reaching it.
        service: S,
        /// Relative weight (0 = receives nothing).
        weight: u32,
    },
    /// Removes endpoint `key`.
    Remove(K),
    /// Changes the weight of `key`.
    Weight(K, u32),
}

/// A stream of changes fed by a [`ChangeSender`].
#[derive(Debug)]
pub struct ChangeStream<K, S>(mpsc::UnboundedReceiver<Change<K, S>>);

/// Sending side of [`channel`].
pub type ChangeSender<K, S> = mpsc::UnboundedSender<Change<K, S>>;

/// A channel of endpoint changes (the discovery side keeps the sender).
pub fn channel<K, S>() -> (ChangeSender<K, S>, ChangeStream<K, S>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChangeStream(rx))
}

impl<K, S> Stream for ChangeStream<K, S> {
    type Item = Change<K, S>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Index of an endpoint inside a balancer; stable while it is present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

/// What a picker may ask about endpoints while picking.
pub struct PickContext<'a> {
    /// Hash of the request, for consistent-hashing pickers.
    pub request_hash: Option<u64>,
    /// False for ejected endpoints: never pick them.
    pub available: &'a dyn Fn(EndpointId) -> bool,
    /// Current load (lower is better).
    pub load: &'a dyn Fn(EndpointId) -> f64,
}

impl fmt::Debug for PickContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PickContext")
            .field("request_hash", &self.request_hash)
            .finish_non_exhaustive()
    }
}

/// A load-balancing algorithm: decides, does no I/O.
pub trait Picker: Send + 'static {
    /// Adds endpoint `id` whose key hashes (stably) to `key_hash`.
    fn insert(&mut self, id: EndpointId, key_hash: u64, weight: u32);
    /// Removes endpoint `id`.
    fn remove(&mut self, id: EndpointId);
    /// Changes the weight of `id`.
    fn set_weight(&mut self, id: EndpointId, key_hash: u64, weight: u32) {
        self.remove(id);
        self.insert(id, key_hash, weight);
    }
    /// Chooses an available endpoint, if any.
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId>;
}

impl<P: Picker + ?Sized> Picker for Box<P> {
    fn insert(&mut self, id: EndpointId, key_hash: u64, weight: u32) {
        (**self).insert(id, key_hash, weight)
    }
    fn remove(&mut self, id: EndpointId) {
        (**self).remove(id)
    }
    fn set_weight(&mut self, id: EndpointId, key_hash: u64, weight: u32) {
        (**self).set_weight(id, key_hash, weight)
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        (**self).pick(ctx)
    }
}

/// No endpoint is available (none known, or all ejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no endpoint available")]
pub struct NoEndpoint;

/// Hash of a request, for the consistent-hashing pickers.
pub type RequestHash<Req> = Arc<dyn Fn(&Req) -> u64 + Send + Sync>;

/// Which endpoints a request prefers (a rollout's version lane): the
/// balancer picks among the available ones it accepts, and among all the
/// available ones only when it accepts none.
pub type Prefer<Req, K> = Arc<dyn Fn(&Req, &K) -> bool + Send + Sync>;

/// Hashes the value of HTTP header `name` (absent: hashes nothing, one key).
pub fn header_hash<B>(name: &'static str) -> RequestHash<http::Request<B>> {
    Arc::new(move |req: &http::Request<B>| {
        stable_hash(&req.headers().get(name).map(|v| v.as_bytes()))
    })
}

struct Endpoint<K, S> {
    key: K,
    key_hash: u64,
    service: S,
    load: Arc<PeakEwma>,
}

/// The balancing service.
pub struct Balance<K, S, D, P, Req, C = ErrorsAsFailures> {
    discover: D,
    discover_done: bool,
    picker: P,
    slots: Vec<Option<Endpoint<K, S>>>,
    free: Vec<u32>,
    by_key: HashMap<K, EndpointId>,
    request_hash: Option<RequestHash<Req>>,
    prefer: Option<Prefer<Req, K>>,
    outlier: Option<(Arc<Mutex<OutlierDetector<K>>>, C)>,
    default_rtt: Duration,
}

impl<K, S, D, P, Req, C> fmt::Debug for Balance<K, S, D, P, Req, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("endpoints", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl<K, S, D, P, Req> Balance<K, S, D, P, Req>
where
    K: Hash + Eq + Clone,
    D: Stream<Item = Change<K, S>> + Unpin,
    P: Picker,
{
    /// A balancer over the endpoints announced by `discover`.
    pub fn new(discover: D, picker: P) -> Self {
        Self {
            discover,
            discover_done: false,
            picker,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            request_hash: None,
            prefer: None,
            outlier: None,
            default_rtt: DEFAULT_RTT,
        }
    }

    /// Ejects endpoints with `detector`, classifying results with `classifier`.
    pub fn with_outlier_detection<C>(
        self,
        detector: Arc<Mutex<OutlierDetector<K>>>,
        classifier: C,
    ) -> Balance<K, S, D, P, Req, C> {
        Balance {
            discover: self.discover,
            discover_done: self.discover_done,
            picker: self.picker,
            slots: self.slots,
            free: self.free,
            by_key: self.by_key,
            request_hash: self.request_hash,
            prefer: self.prefer,
            outlier: Some((detector, classifier)),
            default_rtt: self.default_rtt,
        }
    }
}

impl<K, S, D, P, Req, C> Balance<K, S, D, P, Req, C>
where
    K: Hash + Eq + Clone,
    D: Stream<Item = Change<K, S>> + Unpin,
    P: Picker,
{
    /// Hashes requests with `f` (for [`Ring`] and [`Maglev`]).
    pub fn with_request_hash(mut self, f: RequestHash<Req>) -> Self {
        self.request_hash = Some(f);
        self
    }

    /// Picks among the endpoints `f` accepts for a request first (see [`Prefer`]).
    pub fn with_preference(mut self, f: Prefer<Req, K>) -> Self {
        self.prefer = Some(f);
        self
    }

    /// Latency assumed for a new endpoint before its first response
    /// (default [`DEFAULT_RTT`]; zero makes P2C try new endpoints first).
    pub fn with_default_rtt(mut self, rtt: Duration) -> Self {
        self.default_rtt = rtt;
        self
    }

    /// Endpoints known.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// True if no endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Applies one change.
    pub fn apply(&mut self, change: Change<K, S>) {
        match change {
            Change::Insert {
                key,
                service,
                weight,
            } => {
                if let Some(&id) = self.by_key.get(&key) {
                    if let Some(ep) = self.slots[id.0 as usize].as_mut() {
                        ep.service = service;
                        self.picker.set_weight(id, ep.key_hash, weight);
                    }
                    return;
                }
                let id = match self.free.pop() {
                    Some(i) => EndpointId(i),
                    None => {
                        self.slots.push(None);
                        EndpointId(self.slots.len() as u32 - 1)
                    }
                };
                let key_hash = stable_hash(&key);
                let load = Arc::new(PeakEwma::new(
                    self.default_rtt,
                    DEFAULT_DECAY,
                    Instant::now(),
                ));
                if let Some((d, _)) = &self.outlier {
                    d.lock().add(key.clone());
                }
                self.slots[id.0 as usize] = Some(Endpoint {
                    key: key.clone(),
                    key_hash,
                    service,
                    load,
                });
                self.by_key.insert(key, id);
                self.picker.insert(id, key_hash, weight);
            }
            Change::Remove(key) => {
                if let Some(id) = self.by_key.remove(&key) {
                    self.picker.remove(id);
                    self.slots[id.0 as usize] = None;
                    self.free.push(id.0);
                    if let Some((d, _)) = &self.outlier {
                        d.lock().remove(&key);
                    }
                }
            }
            Change::Weight(key, weight) => {
                if let Some(&id) = self.by_key.get(&key) {
                    let key_hash = self.slots[id.0 as usize].as_ref().map_or(0, |e| e.key_hash);
                    self.picker.set_weight(id, key_hash, weight);
                }
            }
        }
    }

    fn poll_changes(&mut self, cx: &mut Context<'_>) {
        while !self.discover_done {
            match Pin::new(&mut self.discover).poll_next(cx) {
                Poll::Ready(Some(change)) => self.apply(change),
                Poll::Ready(None) => self.discover_done = true,
                Poll::Pending => break,
            }
        }
    }

    /// The key of the endpoint the next request would go to (for tests and
    /// debugging; consumes a pick for stateful pickers).
    pub fn pick_key(&mut self, req: &Req) -> Option<K> {
        let id = self.pick(req)?;
        self.slots[id.0 as usize].as_ref().map(|e| e.key.clone())
    }

    fn pick(&mut self, req: &Req) -> Option<EndpointId> {
        let now = Instant::now();
        let request_hash = self.request_hash.as_ref().map(|f| f(req));
        let slots = &self.slots;
        let mut guard = self.outlier.as_ref().map(|(d, _)| d.lock());
        // Panic: too few endpoints admitted, so ejections are ignored.
        let panic = guard.as_ref().is_some_and(|d| d.panic(now));
        let id = {
            let detector = guard.as_deref();
            let available = |id: EndpointId| match (slots.get(id.0 as usize), detector) {
                (Some(Some(ep)), Some(d)) => panic || d.admits(&ep.key, now),
                (Some(Some(_)), None) => true,
                _ => false,
            };
            let load = |id: EndpointId| match slots.get(id.0 as usize) {
                Some(Some(ep)) => ep.load.load(now),
                _ => f64::INFINITY,
            };
            let preferred = self.prefer.as_ref().and_then(|f| {
                let in_lane = |id: EndpointId| {
                    available(id)
                        && matches!(slots.get(id.0 as usize), Some(Some(ep)) if f(req, &ep.key))
                };
                self.picker.pick(&PickContext {
                    request_hash,
                    available: &in_lane,
                    load: &load,
                })
            });
            preferred.or_else(|| {
                self.picker.pick(&PickContext {
                    request_hash,
                    available: &available,
                    load: &load,
                })
            })
        };
        if let (Some(id), Some(d)) = (id, guard.as_deref_mut())
            && let Some(Some(ep)) = slots.get(id.0 as usize)
        {
            // An endpoint back from ejection takes this request as its trial.
            d.begin_trial(&ep.key, now);
        }
        id
    }
}

impl<K, S, D, P, Req, C> Service<Req> for Balance<K, S, D, P, Req, C>
where
    K: Hash + Eq + Clone + Send + 'static,
    D: Stream<Item = Change<K, S>> + Unpin,
    P: Picker,
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError> + Send,
    Req: Send + 'static,
    C: Classify<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.poll_changes(cx);
        if let Some((d, _)) = &self.outlier {
            for e in d.lock().tick(Instant::now()) {
                if let OutlierEvent::Ejected { .. } = e {
                    tracing::info!("outlier ejected");
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(ep) = self
            .pick(&req)
            .and_then(|id| self.slots[id.0 as usize].as_ref())
        else {
            return Box::pin(std::future::ready(Err(NoEndpoint.into())));
        };
        let mut svc = ep.service.clone();
        let load = ep.load.clone();
        let outlier = self
            .outlier
            .as_ref()
            .map(|(d, c)| (d.clone(), c.clone(), ep.key.clone()));
        load.start();
        let guard = InFlight(Some(load));
        Box::pin(async move {
            let mut guard = guard;
            let start = Instant::now();
            let result = match std::future::poll_fn(|cx| svc.poll_ready(cx)).await {
                Ok(()) => svc.call(req).await,
                Err(e) => Err(e),
            };
            let now = Instant::now();
            if let Some(load) = guard.0.take() {
                load.end(now - start, now);
            }
            if let Some((detector, classifier, key)) = outlier {
                match classifier.classify(result.as_ref()) {
                    Outcome::Ignored => detector.lock().release_trial(&key),
                    outcome => {
                        detector
                            .lock()
                            .record(&key, outcome == Outcome::Success, now);
                    }
                }
            }
            result.map_err(Into::into)
        })
    }
}

/// Releases the in-flight count of a cancelled call.
struct InFlight(Option<Arc<PeakEwma>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(load) = self.0.take() {
            load.cancel();
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
