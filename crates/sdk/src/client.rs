//! The resilient HTTP client: `client.call("inventory", request)` finds the
//! service's instances in the registry (a local copy kept current by watch),
//! balances over them and applies the target's [`TargetPolicy`].
//!
//! Per target service the call goes through one tower stack built from
//! meshwork-resilience (outermost first):
//!
//! | layer | what |
//! | --- | --- |
//! | timeout | the policy's timeout, shortened to the caller's deadline; the remaining time travels as `x-meshwork-deadline-ms` |
//! | circuit breaker | counts a call (all its tries) as failed on errors and 5xx; open: fails fast with [`CallError::CircuitOpen`] |
//! | retry | transport errors and 502/503/504 of idempotent requests (all methods if the policy says so), full-jitter backoff, a retry budget |
//! | balance | P2C over peak-EWMA latency (or round robin), with passive outlier ejection |
//! | endpoint | hyper's pooled HTTP/1.1 client to the chosen instance; the answer is read whole, up to `max_response_bytes` |
//!
//! When the call fails and the policy has a [`Fallback`], its answer is returned
//! instead. Every call continues the current [`RequestContext`](crate::RequestContext)'s
//! trace (`traceparent`) and deadline.
//!
//! ```no_run
//! # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::CallError> {
//! let req = http::Request::post("/reserve")
//!     .header("content-type", "application/json")
//!     .body(bytes::Bytes::from_static(br#"{"sku":"sku-1","qty":1}"#))
//!     .map_err(|e| meshwork_sdk::CallError::InvalidRequest { service: "inventory".into(), reason: e.to_string() })?;
//! let resp = mw.http().call("inventory", req).await?;
//! assert!(resp.status().is_success());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use meshwork_coord::CoordClient;
use meshwork_coord::registry::{Filter, Registry, traffic_endpoints};
use meshwork_coord::rollout::Rollouts;
use meshwork_coord::rollout::tally::{Live, ServiceSplit, Splits};
use meshwork_resilience::BoxError;
use meshwork_resilience::balance::{
    Balance, Change, ChangeStream, NoEndpoint, P2c, Picker, RandomPicker, SmoothWrr,
};
use meshwork_resilience::breaker::{Breaker, BreakerConfig, CircuitBreaker};
use meshwork_resilience::classify::{HttpUpstreamFailures, StatusSet};
use meshwork_resilience::outlier::{OutlierConfig, OutlierDetector};
use meshwork_resilience::retry::{Retry, RetryConfig, RetryHttp, RetryLayer};
use meshwork_resilience::timeout::{Timeout, TimeoutConfig, TimeoutLayer};
use meshwork_resilience::{CircuitOpen, Elapsed};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service, ServiceExt};

use crate::error::CallError;
use crate::{Error, Options};

/// What to answer when a call fails: `Some(response)` replaces the error.
pub type Fallback = Arc<dyn Fn(&CallError) -> Option<Response<Bytes>> + Send + Sync>;

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lb {
    /// Power of two choices over peak-EWMA latency x in-flight.
    #[default]
    P2c,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Uniform random.
    Random,
}

/// How calls to one target service behave.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetPolicy {
    /// Budget of a whole call, all tries included, milliseconds.
    pub timeout_ms: u64,
    /// Budget of opening a connection to an instance, milliseconds.
    pub connect_timeout_ms: u64,
    /// Retries (`max_attempts = 1` turns them off).
    pub retry: RetryConfig,
    /// Also retry POST/PATCH (only when the target is idempotent for them).
    pub retry_all_methods: bool,
    /// Circuit breaker (its `name` defaults to the service name).
    pub breaker: BreakerConfig,
    /// Passive outlier ejection of instances (`None`: off). A lone
    /// instance is never ejected, at most half are, and below the panic
    /// threshold every instance takes calls again.
    pub outlier: Option<OutlierConfig>,
    /// Response statuses that count as the instance's failure for the
    /// breaker and outlier ejection (default 502, 503, 504; transport
    /// errors always count). Any other answer shows the instance alive.
    pub failure_statuses: Vec<u16>,
    /// Balancing.
    pub lb: Lb,
    /// Which instances to use (tags, zone, version; `healthy` is always on).
    pub filter: Filter,
    /// Largest response body read, bytes.
    pub max_response_bytes: usize,
    /// Answer used instead of an error (set in code).
    #[serde(skip)]
    pub fallback: Option<Fallback>,
}

impl std::fmt::Debug for TargetPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetPolicy")
            .field("timeout_ms", &self.timeout_ms)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("lb", &self.lb)
            .field("fallback", &self.fallback.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for TargetPolicy {
    fn default() -> Self {
        TargetPolicy {
            timeout_ms: 2_000,
            connect_timeout_ms: 500,
            retry: RetryConfig::default(),
            retry_all_methods: false,
            breaker: BreakerConfig {
                consecutive_failures: Some(5),
                open_duration_ms: 5_000,
                // Empty: each target's breaker is named after its service
                // (`guards`), so their metrics stay apart.
                name: String::new(),
                ..BreakerConfig::default()
            },
            outlier: Some(OutlierConfig {
                consecutive_failures: Some(3),
                ..OutlierConfig::default()
            }),
            failure_statuses: StatusSet::UPSTREAM_FAILURES.codes(),
            lb: Lb::P2c,
            filter: Filter::default(),
            max_response_bytes: 8 << 20,
            fallback: None,
        }
    }
}

impl TargetPolicy {
    /// Checks every field; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        TimeoutConfig {
            timeout_ms: self.timeout_ms,
        }
        .validate()
        .map_err(|e| e.to_string())?;
        if !(1..=60_000).contains(&self.connect_timeout_ms) {
            return Err(format!(
                "connect_timeout_ms {} must be 1..=60000",
                self.connect_timeout_ms
            ));
        }
        self.retry.validate().map_err(|e| e.to_string())?;
        self.breaker.validate().map_err(|e| e.to_string())?;
        if let Some(o) = &self.outlier {
            o.validate().map_err(|e| e.to_string())?;
        }
        self.failure_classifier()?;
        if !(1..=(1 << 30)).contains(&self.max_response_bytes) {
            return Err(format!(
                "max_response_bytes {} must be 1..=1073741824",
                self.max_response_bytes
            ));
        }
        Ok(())
    }

    /// The classifier of the breaker and outlier ejection.
    fn failure_classifier(&self) -> Result<HttpUpstreamFailures, String> {
        let statuses = StatusSet::from_codes(self.failure_statuses.iter().copied())
            .map_err(|c| format!("failure_statuses: {c} is not an HTTP status (100..=599)"))?;
        Ok(HttpUpstreamFailures { statuses })
    }

    /// Sets the fallback.
    ///
    /// ```
    /// use meshwork_sdk::TargetPolicy;
    /// let policy = TargetPolicy::default().with_fallback(|err| {
    ///     // Serve a cached answer while recommendations are down.
    ///     Some(http::Response::new(bytes::Bytes::from_static(b"[]")))
    ///         .filter(|_| err.code() != "invalid_request")
    /// });
    /// assert!(policy.validate().is_ok());
    /// ```
    pub fn with_fallback(
        mut self,
        f: impl Fn(&CallError) -> Option<Response<Bytes>> + Send + Sync + 'static,
    ) -> TargetPolicy {
        self.fallback = Some(Arc::new(f));
        self
    }
}

type HyperClient = Client<HttpConnector, Full<Bytes>>;
type TlsClient = Client<meshwork_telemetry::https::HttpsConnector, Full<Bytes>>;

/// One instance: sends the request to its address and reads the answer whole.
#[derive(Clone)]
struct EndpointSvc {
    addr: SocketAddr,
    client: HyperClient,
    /// To instances serving with their identity: mutual TLS, expecting the
    /// target's name (`None`: this service has no identity to present).
    identity_client: Option<TlsClient>,
    /// This instance serves with its identity.
    tls: bool,
    service: Arc<str>,
    max_body: usize,
    /// The instance's version, and the service's rollout slot its calls are
    /// counted in (when the client follows rollouts).
    version: Option<Arc<str>>,
    split: Option<Arc<ServiceSplit>>,
}

impl EndpointSvc {
    /// The same client, to another instance.
    fn at(&self, addr: SocketAddr, ep: &Ep) -> EndpointSvc {
        EndpointSvc {
            addr,
            tls: ep.tls,
            version: ep.version.clone(),
            ..self.clone()
        }
    }
}

/// The instance serves with its identity and this service has none.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} serves with its service identity (mutual TLS): give this service one (MESHWORK_IDENTITY=1) to call it"
)]
struct NeedsIdentity(Arc<str>);

/// The future of one call through the stack's inner services.
type CallFuture = std::pin::Pin<Box<dyn Future<Output = Result<Response<Bytes>, BoxError>> + Send>>;

/// The answer was larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("response body over {0} bytes")]
struct BodyTooLarge(usize);

impl Service<Request<Bytes>> for EndpointSvc {
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let client = self.client.clone();
        let tls = match (self.tls, &self.identity_client) {
            (false, _) => None,
            (true, Some(c)) => Some(c.clone()),
            (true, None) => {
                let e = NeedsIdentity(self.service.clone());
                return Box::pin(async move { Err(e.into()) });
            }
        };
        let addr = self.addr;
        let max = self.max_body;
        // During a rollout each try counts for the instance's version.
        let tally = self.split.as_ref().and_then(|s| s.current()).map(|live| {
            let new = live.is_new(self.version.as_deref());
            TryCount {
                live,
                new,
                start: tokio::time::Instant::now(),
                done: false,
            }
        });
        let call = Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let pq = parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            parts.uri = Uri::builder()
                .scheme(if tls.is_some() { "https" } else { "http" })
                .authority(addr.to_string())
                .path_and_query(pq)
                .build()?;
            let req = Request::from_parts(parts, Full::new(body));
            let resp = match tls {
                Some(c) => c.request(req).await?,
                None => client.request(req).await?,
            };
            let (parts, body) = resp.into_parts();
            let body = match Limited::new(body, max).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(BodyTooLarge(max).into());
                }
                Err(e) => return Err(e),
            };
            Ok(Response::from_parts(parts, body))
        });
        match tally {
            None => call,
            Some(mut count) => Box::pin(async move {
                let r = call.await;
                count.end(match &r {
                    Ok(r) => r.status().is_server_error(),
                    Err(_) => true,
                });
                r
            }),
        }
    }
}

/// 64 random bits from the standard library's hasher seeds (no `rand` here).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// One try counted for a rollout's analysis: when it ends, or as a failure
/// when it is dropped unfinished (the call's timeout fired).
struct TryCount {
    live: Arc<Live>,
    new: bool,
    start: tokio::time::Instant,
    done: bool,
}

impl TryCount {
    fn end(&mut self, failed: bool) {
        self.done = true;
        self.live.record(self.new, failed, self.start.elapsed());
    }
}

impl Drop for TryCount {
    fn drop(&mut self) {
        if !self.done {
            self.live.record(self.new, true, self.start.elapsed());
        }
    }
}

type Lbal = Balance<
    SocketAddr,
    EndpointSvc,
    ChangeStream<SocketAddr, EndpointSvc>,
    Box<dyn Picker>,
    Request<Bytes>,
    HttpUpstreamFailures,
>;

/// The balancer, shared by every clone of a target's stack (picking holds the
/// lock only to choose), and the service's rollout when the client follows
/// rollouts: each request is marked with the version lane it should take.
#[derive(Clone)]
struct LbSvc(Arc<Mutex<Lbal>>, Option<Arc<ServiceSplit>>);

/// The lane a request takes during a rollout: the new version's instances
/// or the others (see `meshwork_coord::rollout::Split::wants_new`).
#[derive(Clone, Debug)]
struct Lane {
    live: Arc<Live>,
    new: bool,
}

/// The tries of one call so far, shared by the retry layer's copies of its
/// request (the extension is cloned with them, the counter is not).
#[derive(Clone, Debug, Default)]
struct Tries(Arc<std::sync::atomic::AtomicU32>);

/// The version of each instance, by address (what a lane is checked against).
type Versions = Arc<Mutex<HashMap<SocketAddr, Option<Arc<str>>>>>;

impl Service<Request<Bytes>> for LbSvc {
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        // The retry layer's copies share the call's counter: the first try
        // takes the lane its pin or the weight chooses, a retry the stable
        // version's (as the gateway's and the coordinator's retries do).
        let retry = req
            .extensions()
            .get::<Tries>()
            .is_some_and(|t| t.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) > 0);
        if let Some(live) = self.1.as_ref().and_then(|s| s.current()) {
            let new = live.wants_new(req.headers(), retry);
            req.extensions_mut().insert(Lane { live, new });
        }
        let mut lb = self.0.lock();
        // Applies pending endpoint changes; they are never waited for (the watch
        // task feeds the channel), so a no-op waker is enough.
        let mut cx = Context::from_waker(Waker::noop());
        let _ = lb.poll_ready(&mut cx);
        lb.call(req)
    }
}

type Stack = Timeout<CircuitBreaker<Retry<LbSvc, RetryHttp>, HttpUpstreamFailures>>;

struct Target {
    stack: Stack,
    breaker: Breaker,
    _feed: AbortOnDrop,
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The resilient client; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    coord: CoordClient,
    default: Arc<TargetPolicy>,
    policies: Arc<HashMap<String, TargetPolicy>>,
    targets: Arc<tokio::sync::Mutex<HashMap<String, Arc<Target>>>>,
    /// The rustls client presenting this service's identity, if it has one.
    identity: Option<Arc<rustls::ClientConfig>>,
    /// Every rollout's split and this client's figures (started with the
    /// first target; see [`HttpClient::splits`]).
    rollouts: Arc<std::sync::OnceLock<Following>>,
    /// The calling service's name (its rollout figures are published under it).
    caller: Arc<str>,
}

/// What a client follows of the rollouts: the splits, fed and published by
/// a task that ends with the last clone of the client.
#[derive(Clone)]
struct Following {
    splits: Arc<Splits>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    pub(crate) fn new(
        coord: CoordClient,
        opts: &Options,
        identity: Option<Arc<meshwork_tls::identity::Identity>>,
    ) -> Result<HttpClient, Error> {
        let identity = match identity {
            Some(i) => Some(
                i.client_config(&[b"http/1.1"])
                    .map_err(|e| Error::Invalid(format!("service identity: {e}")))?,
            ),
            None => None,
        };
        Ok(HttpClient {
            coord,
            default: Arc::new(opts.default_target.clone()),
            policies: Arc::new(opts.targets.clone()),
            targets: Arc::default(),
            identity,
            rollouts: Arc::default(),
            caller: opts.name.as_str().into(),
        })
    }

    /// The rollouts' splits, followed once per client by a task that loads
    /// the rollouts (retrying until it can; calls ignore rollouts until then,
    /// never wait for them) and publishes this client's figures as
    /// `CALLER-<random>` on its session lease (unique per client even where
    /// every replica is PID 1).
    fn splits(&self) -> Arc<Splits> {
        self.rollouts
            .get_or_init(|| {
                let splits = Arc::new(Splits::default());
                let coord = self.coord.clone();
                let reporter = format!("{}-{:016x}", self.caller, random_u64());
                let s = splits.clone();
                let task = tokio::spawn(async move {
                    let mut wait = Duration::from_millis(500);
                    let rollouts = loop {
                        match Rollouts::open(coord.backend()).await {
                            Ok(r) => break r,
                            Err(e) => {
                                tracing::warn!(error = %e, "rollouts not loaded yet; calls ignore them meanwhile");
                                tokio::time::sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(30));
                            }
                        }
                    };
                    meshwork_coord::rollout::tally::follow(rollouts, s, reporter, move || {
                        coord.lease()
                    })
                    .await;
                });
                Following {
                    splits,
                    _task: Arc::new(AbortOnDrop(task)),
                }
            })
            .splits
            .clone()
    }

    fn policy(&self, service: &str) -> &TargetPolicy {
        self.policies.get(service).unwrap_or(&self.default)
    }

    /// Calls `service` with `req` (origin-form URI such as `/stock/sku-1`).
    pub async fn call(
        &self,
        service: &str,
        mut req: Request<Bytes>,
    ) -> Result<Response<Bytes>, CallError> {
        let policy = self.policy(service);
        let result = async {
            let target = self.target(service).await?;
            let span = crate::context::stamp(&mut req);
            req.extensions_mut().insert(Tries::default());
            let traced = crate::telemetry::tracer().map(|t| {
                (
                    t,
                    std::time::SystemTime::now(),
                    req.method().clone(),
                    req.uri().path().to_string(),
                )
            });
            let started = tokio::time::Instant::now();
            let result = target.stack.clone().oneshot(req).await;
            let elapsed = started.elapsed().as_secs_f64();
            if let Some((t, wall, method, path)) = traced {
                use meshwork_telemetry::export::{Kind, SpanRecord};
                let s = SpanRecord::new(&span, format!("{method} {service}"), Kind::Client, wall)
                    .attr("http.request.method", method.as_str())
                    .attr("server.address", service)
                    .attr("url.path", path);
                t.record(match &result {
                    Ok(r) if r.status().as_u16() >= 400 => s
                        .attr("http.response.status_code", r.status().as_u16())
                        .failed(format!("HTTP {}", r.status().as_u16())),
                    Ok(r) => s.attr("http.response.status_code", r.status().as_u16()),
                    Err(e) => s.attr("error.type", "call_failed").failed(e.to_string()),
                });
            }
            let outcome = match &result {
                Ok(r) if r.status().is_server_error() => "server_error",
                Ok(_) => "ok",
                Err(_) => "error",
            };
            metrics::histogram!("meshwork_sdk_call_duration_seconds", "service" => service.to_string(), "outcome" => outcome).record(elapsed);
            meshwork_telemetry::exemplar::offer(
                "meshwork_sdk_call_duration_seconds",
                &[("service", service), ("outcome", outcome)],
                elapsed,
                &span,
            );
            result.map_err(|e| classify(service, policy, e))
        }
        .await;
        match result {
            Err(e) => match policy.fallback.as_ref().and_then(|f| f(&e)) {
                Some(resp) => {
                    metrics::counter!("meshwork_sdk_fallbacks_total", "service" => service.to_string()).increment(1);
                    Ok(resp)
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// `GET path` on `service`.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::CallError> {
    /// let resp = mw.http().get("inventory", "/products/sku-1").await?;
    /// println!("{} {:?}", resp.status(), resp.body());
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, service: &str, path: &str) -> Result<Response<Bytes>, CallError> {
        let req = Request::get(path)
            .body(Bytes::new())
            .map_err(|e| invalid(service, e))?;
        self.call(service, req).await
    }

    /// `method path` on `service` with a JSON body.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::CallError> {
    /// let body = serde_json::json!({ "order_id": 1, "sku": "sku-1", "qty": 1 });
    /// let resp = mw.http().json("inventory", http::Method::POST, "/reservations", &body).await?;
    /// # Ok(()) }
    /// ```
    pub async fn json<T: Serialize>(
        &self,
        service: &str,
        method: http::Method,
        path: &str,
        body: &T,
    ) -> Result<Response<Bytes>, CallError> {
        let body = serde_json::to_vec(body).map_err(|e| invalid(service, e))?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body))
            .map_err(|e| invalid(service, e))?;
        self.call(service, req).await
    }

    /// State of `service`'s circuit breaker (`closed`, `open`, `half_open`), if
    /// it was called.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) {
    /// if mw.http().breaker_state("payment").await == Some("open") {
    ///     eprintln!("payment is failing fast");
    /// }
    /// # }
    /// ```
    pub async fn breaker_state(&self, service: &str) -> Option<&'static str> {
        let t = self.targets.lock().await.get(service).cloned()?;
        Some(t.breaker.state().as_str())
    }

    async fn target(&self, service: &str) -> Result<Arc<Target>, CallError> {
        let mut targets = self.targets.lock().await;
        if let Some(t) = targets.get(service) {
            return Ok(t.clone());
        }
        let t = Arc::new(
            self.build(service)
                .await
                .map_err(|e| CallError::Discovery {
                    service: service.to_string(),
                    reason: e.to_string(),
                })?,
        );
        targets.insert(service.to_string(), t.clone());
        Ok(t)
    }

    async fn build(&self, service: &str) -> Result<Target, Error> {
        let policy = self.policy(service);
        let registry = self.coord.discovery(service).await?;
        let filter = Filter {
            healthy: true,
            ..policy.filter.clone()
        };
        let picker: Box<dyn Picker> = match policy.lb {
            Lb::P2c => Box::new(P2c::default()),
            Lb::RoundRobin => Box::new(SmoothWrr::default()),
            Lb::Random => Box::new(RandomPicker::default()),
        };
        let (tx, changes) = meshwork_resilience::balance::channel();
        let outlier = match &policy.outlier {
            Some(cfg) => *cfg,
            // Never ejects: a failure count no instance reaches.
            None => OutlierConfig {
                consecutive_failures: None,
                success_rate: None,
                ..OutlierConfig::default()
            },
        };
        let detector = OutlierDetector::new(outlier).map_err(|e| Error::Invalid(e.to_string()))?;
        let classifier = policy.failure_classifier().map_err(Error::Invalid)?;
        let versions: Versions = Arc::default();
        let split = Some(self.splits().slot(service));
        let mut lb = Balance::new(changes, picker);
        {
            let versions = versions.clone();
            lb = lb.with_preference(Arc::new(move |req: &Request<Bytes>, addr: &SocketAddr| {
                let Some(lane) = req.extensions().get::<Lane>() else {
                    return true;
                };
                let version = versions.lock().get(addr).cloned().flatten();
                lane.live.is_new(version.as_deref()) == lane.new
            }));
        }
        let mut lb = lb.with_outlier_detection(Arc::new(Mutex::new(detector)), classifier);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(policy.connect_timeout_ms)));
        let identity_client = match &self.identity {
            Some(tls) => Some(
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(
                        meshwork_telemetry::https::HttpsConnector::new(tls.clone())
                            .with_server_name(service)
                            .map_err(Error::Invalid)?
                            .with_connect_timeout(Duration::from_millis(policy.connect_timeout_ms)),
                    ),
            ),
            None => None,
        };
        let template = EndpointSvc {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            identity_client,
            tls: false,
            service: service.into(),
            max_body: policy.max_response_bytes,
            version: None,
            split: split.clone(),
        };
        // The current instances before the first call; the feed applies changes.
        let known = current_endpoints(&registry, service, &filter).await;
        for (addr, ep) in &known {
            versions.lock().insert(*addr, ep.version.clone());
            lb.apply(Change::Insert {
                key: *addr,
                service: template.at(*addr, ep),
                weight: ep.weight,
            });
        }
        let feed_versions = versions.clone();
        let feed = tokio::spawn(follow(
            registry,
            service.to_string(),
            filter,
            known,
            move |change| {
                let change = match change {
                    EndpointChange::Add(addr, weight, tls, version) => {
                        feed_versions.lock().insert(addr, version.clone());
                        Change::Insert {
                            key: addr,
                            service: template.at(
                                addr,
                                &Ep {
                                    weight,
                                    tls,
                                    version,
                                },
                            ),
                            weight,
                        }
                    }
                    EndpointChange::Remove(addr) => {
                        feed_versions.lock().remove(&addr);
                        Change::Remove(addr)
                    }
                    EndpointChange::Weight(addr, weight) => Change::Weight(addr, weight),
                };
                std::future::ready(tx.send(change).is_ok())
            },
        ));
        let (breaker, timeout) = guards(service, policy)?;
        let retry = RetryLayer::new(
            policy.retry,
            RetryHttp {
                all_methods: policy.retry_all_methods,
            },
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let lb = LbSvc(Arc::new(Mutex::new(lb)), split);
        let stack = timeout.layer(CircuitBreaker::new(
            retry.layer(lb),
            breaker.clone(),
            classifier,
        ));
        Ok(Target {
            stack,
            breaker,
            _feed: AbortOnDrop(feed),
        })
    }
}

/// The breaker (named after the service unless the policy names it) and the
/// timeout layer of a target.
pub(crate) fn guards(
    service: &str,
    policy: &TargetPolicy,
) -> Result<(Breaker, TimeoutLayer), Error> {
    let mut cfg = policy.breaker.clone();
    if cfg.name.is_empty() {
        cfg.name = service.to_string();
    }
    let breaker = Breaker::new(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    let timeout = TimeoutLayer::new(TimeoutConfig {
        timeout_ms: policy.timeout_ms,
    })
    .map_err(|e| Error::Invalid(e.to_string()))?;
    Ok((breaker, timeout))
}

/// One change of a service's traffic endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndpointChange {
    /// A new instance at this address, with its weight, whether it
    /// serves TLS with its identity, and its version.
    Add(SocketAddr, u32, bool, Option<Arc<str>>),
    /// The instance at this address left.
    Remove(SocketAddr),
    /// Its weight changed.
    Weight(SocketAddr, u32),
}

/// The current traffic endpoints of `service` (as the feed's starting point).
pub(crate) async fn current_endpoints(
    registry: &Registry,
    service: &str,
    filter: &Filter,
) -> HashMap<SocketAddr, Ep> {
    traffic_endpoints(&registry.discover(service, filter))
        .await
        .into_iter()
        .map(|e| (e.addr, Ep::of(&e)))
        .collect()
}

/// What the feed follows of an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ep {
    /// Load-balancing weight.
    pub(crate) weight: u32,
    /// It serves TLS with its identity.
    pub(crate) tls: bool,
    /// Its version (rollouts split by it).
    pub(crate) version: Option<Arc<str>>,
}

impl Ep {
    fn of(e: &meshwork_coord::registry::TrafficEndpoint) -> Ep {
        Ep {
            weight: e.weight,
            tls: e.identity_tls,
            version: e.version.as_deref().map(Arc::from),
        }
    }

    /// Another endpoint at the same address: it must go out and in again.
    fn replaced_by(&self, other: &Ep) -> bool {
        self.tls != other.tls || self.version != other.version
    }
}

/// Follows the registry from `known` on, handing each change to `apply` until it
/// answers false (its receiver is gone).
pub(crate) async fn follow<F: Future<Output = bool>>(
    registry: Registry,
    service: String,
    filter: Filter,
    mut known: HashMap<SocketAddr, Ep>,
    mut apply: impl FnMut(EndpointChange) -> F,
) {
    let mut answers = Box::pin(registry.watch(&service, filter));
    while let Some(d) = answers.next().await {
        let now: HashMap<SocketAddr, Ep> = traffic_endpoints(&d)
            .await
            .into_iter()
            .map(|e| (e.addr, Ep::of(&e)))
            .collect();
        // An address that now serves with (or without) TLS, or another
        // version, is another endpoint: out, then in again.
        let removed = known
            .iter()
            .filter(|(a, old)| now.get(a).is_none_or(|e| old.replaced_by(e)))
            .map(|(a, _)| EndpointChange::Remove(*a));
        let changed = now.iter().filter_map(|(a, e)| match known.get(a) {
            Some(old) if !old.replaced_by(e) && old.weight != e.weight => {
                Some(EndpointChange::Weight(*a, e.weight))
            }
            Some(old) if !old.replaced_by(e) => None,
            _ => Some(EndpointChange::Add(*a, e.weight, e.tls, e.version.clone())),
        });
        let changes: Vec<EndpointChange> = removed.chain(changed).collect();
        for change in changes {
            if !apply(change).await {
                return;
            }
        }
        if known != now {
            tracing::debug!(%service, instances = now.len(), "instances changed");
        }
        known = now;
    }
}

fn invalid(service: &str, e: impl std::fmt::Display) -> CallError {
    CallError::InvalidRequest {
        service: service.to_string(),
        reason: e.to_string(),
    }
}

/// Turns a stack error into the caller's error.
fn classify(service: &str, policy: &TargetPolicy, e: BoxError) -> CallError {
    let service = service.to_string();
    if e.is::<CircuitOpen>() {
        return CallError::CircuitOpen { service };
    }
    if e.is::<Elapsed>() {
        return CallError::Timeout { service };
    }
    if e.is::<NoEndpoint>() {
        return CallError::NoInstance { service };
    }
    if e.is::<BodyTooLarge>() {
        return CallError::TooLarge {
            service,
            limit: policy.max_response_bytes,
        };
    }
    if e.is::<http::Error>() {
        return CallError::InvalidRequest {
            service,
            reason: e.to_string(),
        };
    }
    let mut reason = e.to_string();
    let mut src = std::error::Error::source(&*e);
    while let Some(s) = src {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    CallError::Transport { service, reason }
}
