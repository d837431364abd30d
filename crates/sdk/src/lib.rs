//! The Meshwork SDK: what an application service links to run on Meshwork.
//!
//! [`Meshwork::connect`] opens a session with the control plane (the node's etcd
//! endpoint, or an etcd cluster). From the handle a service:
//!
//! - registers itself ([`Meshwork::register`]): an ephemeral instance on the session
//!   lease, re-registered if the session is ever lost, deregistered by
//!   [`Meshwork::shutdown`]; with an HTTP health check Meshwork runs against it;
//! - discovers others ([`Meshwork::instances`]) from a local copy kept current by
//!   watch, which keeps serving while the control plane is unreachable (logged, and
//!   the gauge `meshwork_sdk_control_plane_up` drops to 0);
//! - calls them ([`Meshwork::http`], [`Meshwork::grpc_channel`]) through a resilient
//!   client: discovery, load balancing, timeout, retry budget, circuit breaker and
//!   fallback per target service, trace context and deadline propagated;
//! - reads typed configuration ([`Meshwork::config`]) that follows the config
//!   center, keeping the last good value when an update does not decode;
//! - takes locks, runs for leader and draws unique ids ([`Meshwork::lock`],
//!   [`Meshwork::campaign`], [`Meshwork::ids`]);
//! - serves with [`server::Server`]: inbound rate and concurrency limits, trace
//!   context extraction, Prometheus metrics, a health endpoint and graceful
//!   shutdown;
//! - takes part in distributed transactions ([`txn`]): the branch headers, and
//!   with the `sqlite` feature a barrier that makes every phase idempotent.
//!
//! ```no_run
//! # async fn demo() -> Result<(), meshwork_sdk::Error> {
//! use meshwork_sdk::{Meshwork, Options};
//!
//! let mw = Meshwork::connect(Options::from_env("checkout")?).await?;
//! let stock = mw.http().get("inventory", "/stock/sku-1").await?;
//! println!("{}", String::from_utf8_lossy(stock.body()));
//! mw.shutdown().await;
//! # Ok(()) }
//! ```

#[cfg(feature = "cache")]
pub mod cache;
pub mod client;
pub mod context;
mod error;
pub mod grpc;
pub mod identity;
pub mod mq;
pub mod server;
pub mod telemetry;
pub mod txn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use meshwork_coord::client::{LockGuard, TypedConfig};
use meshwork_coord::ids::{IdGenerator, IdLayout};
use meshwork_coord::lock::{self, Held};
use meshwork_coord::registry::{InstanceSpec, InstanceView, Registered};
use meshwork_coord::{ClientOptions, CoordClient};
use serde::de::DeserializeOwned;

pub use client::{HttpClient, TargetPolicy};
pub use context::RequestContext;
pub use error::{CallError, Error};
pub use meshwork_api::{ApiError, ErrorBody};
pub use meshwork_coord::registry::Filter;
pub use meshwork_coord::registry::probe::{CheckPolicy, CheckSpec, HealthCheck};

/// Environment variable with the control plane's endpoints (comma separated).
pub const ENDPOINTS_ENV: &str = "MESHWORK_ENDPOINTS";
/// Default control plane endpoint: the local node's etcd port.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2479";
/// Environment variable that turns the service identity on (`1`).
pub const IDENTITY_ENV: &str = "MESHWORK_IDENTITY";

/// How a service connects and how it calls others.
#[derive(Debug, Clone)]
pub struct Options {
    /// The service's name (recorded as who registered, and used in logs).
    pub name: String,
    /// etcd endpoints of the control plane (`HOST:PORT` or `http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// Session TTL, seconds: this process's instances vanish this long after it dies.
    pub session_ttl: i64,
    /// Policy for target services without their own entry in `targets`.
    pub default_target: TargetPolicy,
    /// Per target service policies.
    pub targets: HashMap<String, TargetPolicy>,
    /// Who to log in to the control plane's store as, when it has auth on
    /// (renewed before and whenever the store refuses the token).
    pub credentials: Option<meshwork_coord::backend::Credentials>,
    /// TLS to the control plane (`MESHWORK_CACERT`, and `MESHWORK_CERT` /
    /// `MESHWORK_KEY` for mutual TLS).
    pub tls: Option<meshwork_coord::backend::ClientTls>,
    /// Master keys that open secret config entries (`MESHWORK_SECRETS_KEY`,
    /// `MESHWORK_SECRETS_KEY_FILE`); without one a secret entry stays locked.
    pub secret_keys: meshwork_coord::config::secret::MasterKeys,
    /// Get a certificate naming this service from the node's authority and
    /// serve and call with it (mutual TLS between services;
    /// `MESHWORK_IDENTITY=1`). See [`identity`].
    pub identity: bool,
    /// How long connecting waits for the certificate, milliseconds.
    pub identity_wait_ms: u64,
    /// The authority's certificate (PEM file) the answer must come from
    /// (`MESHWORK_IDENTITY_CA`); unset, the first answer's authority is
    /// trusted and renewals must come from the same one.
    pub identity_ca: Option<std::path::PathBuf>,
}

impl Options {
    /// Options for service `name` with the control plane at
    /// `MESHWORK_ENDPOINTS` (default [`DEFAULT_ENDPOINT`]), logging in as
    /// `MESHWORK_STORE_USER` (`USER:PASSWORD`) or the credentials in the file
    /// `MESHWORK_STORE_CREDENTIALS_FILE` when set.
    ///
    /// ```
    /// let opts = meshwork_sdk::Options::from_env("order").expect("a valid service name");
    /// assert_eq!(opts.name, "order");
    /// ```
    pub fn from_env(name: &str) -> Result<Options, Error> {
        let endpoints = match std::env::var(ENDPOINTS_ENV) {
            Ok(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => vec![DEFAULT_ENDPOINT.to_string()],
        };
        let mut opts = Options::new(name, endpoints)?;
        opts.credentials =
            meshwork_coord::backend::Credentials::from_env().map_err(Error::Invalid)?;
        opts.tls = meshwork_coord::backend::ClientTls::from_env();
        opts.secret_keys = meshwork_coord::config::secret::MasterKeys::from_env()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        opts.identity_ca = std::env::var_os("MESHWORK_IDENTITY_CA").map(Into::into);
        opts.identity = match std::env::var(IDENTITY_ENV).as_deref() {
            Ok("1" | "true" | "on") => true,
            Ok("" | "0" | "false" | "off") | Err(_) => false,
            Ok(other) => {
                return Err(Error::Invalid(format!(
                    "{IDENTITY_ENV}={other:?}: use 1 or 0"
                )));
            }
        };
        Ok(opts)
    }

    /// Options for service `name` with the control plane at `endpoints`.
    pub fn new(name: &str, endpoints: Vec<String>) -> Result<Options, Error> {
        meshwork_coord::registry::model::validate_service_name(name)
            .map_err(|e| Error::Invalid(format!("service name: {e}")))?;
        if endpoints.is_empty() {
            return Err(Error::Invalid(format!(
                "no control plane endpoint: set {ENDPOINTS_ENV} (e.g. {DEFAULT_ENDPOINT})"
            )));
        }
        Ok(Options {
            name: name.to_string(),
            endpoints,
            session_ttl: 10,
            default_target: TargetPolicy::default(),
            targets: HashMap::new(),
            credentials: None,
            tls: None,
            secret_keys: Default::default(),
            identity: false,
            identity_wait_ms: 10_000,
            identity_ca: None,
        })
    }

    /// Sets the policy for calls to `service`.
    ///
    /// ```
    /// use meshwork_sdk::{Options, TargetPolicy};
    /// let opts = Options::new("order", vec!["127.0.0.1:2479".into()])?
    ///     .target("payment", TargetPolicy { timeout_ms: 1_000, ..TargetPolicy::default() });
    /// assert_eq!(opts.targets["payment"].timeout_ms, 1_000);
    /// # Ok::<(), meshwork_sdk::Error>(())
    /// ```
    pub fn target(mut self, service: &str, policy: TargetPolicy) -> Options {
        self.targets.insert(service.to_string(), policy);
        self
    }
}

struct Inner {
    opts: Options,
    coord: CoordClient,
    http: HttpClient,
    ids: tokio::sync::Mutex<Option<IdGenerator>>,
    identity: Option<Arc<meshwork_tls::identity::Identity>>,
    _monitor: tokio::task::JoinHandle<()>,
    _renewing: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self._monitor.abort();
        if let Some(r) = &self._renewing {
            r.abort();
        }
    }
}

/// A connected service. Cheap to clone.
#[derive(Clone)]
pub struct Meshwork {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Meshwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meshwork")
            .field("name", &self.inner.opts.name)
            .finish_non_exhaustive()
    }
}

impl Meshwork {
    /// Connects to the control plane and opens a session.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), meshwork_sdk::Error> {
    /// let opts = meshwork_sdk::Options::new("order", vec!["127.0.0.1:2479".into()])?;
    /// let mw = meshwork_sdk::Meshwork::connect(opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(opts: Options) -> Result<Meshwork, Error> {
        for (svc, p) in std::iter::once(("(default)", &opts.default_target))
            .chain(opts.targets.iter().map(|(k, v)| (k.as_str(), v)))
        {
            p.validate()
                .map_err(|e| Error::Invalid(format!("target policy of {svc}: {e}")))?;
        }
        let coord = CoordClient::connect(
            &opts.endpoints,
            ClientOptions {
                name: opts.name.clone(),
                session_ttl: opts.session_ttl,
                backend: meshwork_coord::backend::BackendOptions {
                    credentials: opts.credentials.clone(),
                    tls: opts.tls.clone(),
                    ..Default::default()
                },
                secret_keys: opts.secret_keys.clone(),
                ..ClientOptions::default()
            },
        )
        .await?;
        let (identity, renewing) = if opts.identity {
            let wait = std::time::Duration::from_millis(opts.identity_wait_ms);
            let (i, r) =
                identity::start(&coord, &opts.name, wait, opts.identity_ca.clone()).await?;
            (Some(i), Some(r))
        } else {
            (None, None)
        };
        let monitor = tokio::spawn(monitor_control_plane(coord.control_plane()));
        let http = HttpClient::new(coord.clone(), &opts, identity.clone())?;
        Ok(Meshwork {
            inner: Arc::new(Inner {
                opts,
                coord,
                http,
                ids: tokio::sync::Mutex::new(None),
                identity,
                _monitor: monitor,
                _renewing: renewing,
            }),
        })
    }

    /// The service name this handle was opened for.
    pub fn name(&self) -> &str {
        &self.inner.opts.name
    }

    /// The service's identity, when [`Options::identity`] is on.
    pub fn identity(&self) -> Option<&Arc<meshwork_tls::identity::Identity>> {
        self.inner.identity.as_ref()
    }

    /// Starts and follows distributed transactions on the cluster's `txn`
    /// nodes (see [`txn::TxnClient`]).
    pub fn transactions(&self) -> txn::TxnClient {
        txn::TxnClient::new(self.inner.coord.clone())
    }

    /// Publishes and subscribes on the cluster's broker (see [`mq::MqClient`]).
    pub fn mq(&self) -> mq::MqClient {
        mq::MqClient::new(self.inner.coord.clone())
    }

    /// Opens the two-level cache `name` (see [`cache`]) with default options, over
    /// the L2 named by `MESHWORK_CACHE`, else the registry's cache nodes.
    #[cfg(feature = "cache")]
    pub async fn cache(&self, name: &str) -> Result<cache::Cache, cache::CacheError> {
        self.cache_with(name, cache::CacheOptions::default()).await
    }

    /// [`Meshwork::cache`] with options.
    #[cfg(feature = "cache")]
    pub async fn cache_with(
        &self,
        name: &str,
        opts: cache::CacheOptions,
    ) -> Result<cache::Cache, cache::CacheError> {
        let l2 = cache::L2Spec::from_env(&self.inner.coord)?;
        cache::Cache::open(name, l2, opts).await
    }

    /// The coordination client underneath (registry, config center, raw etcd).
    pub fn coord(&self) -> &CoordClient {
        &self.inner.coord
    }

    /// Whether the control plane answers right now (discovery serves from the local
    /// copy while it does not).
    ///
    /// ```no_run
    /// # fn demo(mw: meshwork_sdk::Meshwork) {
    /// if !mw.control_plane_reachable() {
    ///     eprintln!("serving from the last known instances");
    /// }
    /// # }
    /// ```
    pub fn control_plane_reachable(&self) -> bool {
        *self.inner.coord.control_plane().borrow()
    }

    /// Registers an instance of this service, ephemeral on the session unless
    /// `spec.ephemeral` is false.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// let spec = meshwork_sdk::instance("127.0.0.1", 9001).with_http_check("/health");
    /// mw.register(spec.build()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn register(&self, spec: InstanceSpec) -> Result<Registered, Error> {
        Ok(self
            .inner
            .coord
            .register(&self.inner.opts.name, spec)
            .await?)
    }

    /// Instances of `service` that take traffic right now, from the local copy.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// for v in mw.instances("inventory").await? {
    ///     println!("{}:{} {}", v.instance.spec.address, v.instance.spec.port, v.health);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn instances(&self, service: &str) -> Result<Vec<InstanceView>, Error> {
        let registry = self.inner.coord.discovery(service).await?;
        let filter = Filter {
            healthy: true,
            ..Filter::default()
        };
        Ok(registry.discover(service, &filter).instances)
    }

    /// The resilient HTTP client (shared; per-target state lives inside).
    pub fn http(&self) -> &HttpClient {
        &self.inner.http
    }

    /// A tonic channel to `service`, balanced over its instances and following
    /// the registry (see [`grpc`]).
    pub async fn grpc_channel(&self, service: &str) -> Result<grpc::GrpcChannel, Error> {
        grpc::channel(&self.inner.coord, service, self.policy(service)).await
    }

    /// The policy used for calls to `service`.
    pub fn policy(&self, service: &str) -> &TargetPolicy {
        self.inner
            .opts
            .targets
            .get(service)
            .unwrap_or(&self.inner.opts.default_target)
    }

    /// Subscribes to config entry `namespace/group/data_id` decoded as `T`: the
    /// current value and every later good one; an update that does not decode is
    /// reported (log, metric, [`TypedConfig::last_error`]) and the last good value kept.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// #[derive(serde::Deserialize)]
    /// struct Features { payments_enabled: bool }
    /// let mut features = mw.config::<Features>("shop/features/flags").await?;
    /// if let Some(f) = features.current() { println!("payments: {}", f.payments_enabled); }
    /// while let Some(f) = features.changed().await { println!("now {}", f.payments_enabled); }
    /// # Ok(()) }
    /// ```
    pub async fn config<T>(&self, path: &str) -> Result<TypedConfig<T>, Error>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        Ok(self.inner.coord.subscribe(path).await?)
    }

    /// Takes lock `name` (waiting at most `timeout`, forever if `None`); the guard
    /// holds it on the session lease and releases it when dropped.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// let guard = mw.lock("nightly-report", Some(std::time::Duration::from_secs(5))).await?;
    /// println!("fencing token {}", guard.fencing_token());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn lock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard, Error> {
        Ok(self.inner.coord.lock(name, timeout).await?)
    }

    /// Campaigns in election `name` proclaiming `value`; returns once leader.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// let leadership = mw.campaign("order-sweeper", "order-1", None).await?;
    /// // ... lead ...
    /// leadership.resign().await?;
    /// # Ok(()) }
    /// ```
    pub async fn campaign(
        &self,
        name: &str,
        value: &str,
        timeout: Option<Duration>,
    ) -> Result<Leadership, Error> {
        let coord = &self.inner.coord;
        let held = lock::campaign(coord.backend(), name, coord.lease(), value, timeout).await?;
        Ok(Leadership {
            held: Some(held),
            coord: coord.clone(),
        })
    }

    /// The next unique id (Snowflake layout, worker id claimed on the session; a
    /// new worker is claimed after a session loss).
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// let order_id = mw.next_id().await?;
    /// # Ok(()) }
    /// ```
    pub async fn next_id(&self) -> Result<i64, Error> {
        Ok(self.ids(1).await?.remove(0))
    }

    /// `n` unique ids (1..=10000), increasing.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
    /// let batch = mw.ids(100).await?;
    /// assert!(batch.windows(2).all(|w| w[0] < w[1]));
    /// # Ok(()) }
    /// ```
    pub async fn ids(&self, n: usize) -> Result<Vec<i64>, Error> {
        let mut slot = self.inner.ids.lock().await;
        let lease = self.inner.coord.lease();
        let stale = slot
            .as_ref()
            .is_none_or(|g| !g.is_live() || g.claim().lease() != lease);
        if stale {
            if let Some(old) = slot.take() {
                old.invalidate();
            }
            let coord = &self.inner.coord;
            *slot = Some(
                IdGenerator::start(
                    coord.backend(),
                    IdLayout::default(),
                    lease,
                    &self.inner.opts.name,
                )
                .await?,
            );
        }
        match slot.as_ref() {
            Some(g) => Ok(g.next_batch(n)?),
            None => Err(Error::Invalid("id generator unavailable".into())),
        }
    }

    /// Deregisters this process's instances and closes the session.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) {
    /// mw.shutdown().await; // instances leave the registry at once, not after the TTL
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        if let Some(g) = self.inner.ids.lock().await.take()
            && let Err(e) = g.release().await
        {
            tracing::warn!(error = %e, "releasing the id worker failed");
        }
        if let Err(e) = self.inner.coord.clone().close().await {
            tracing::warn!(error = %e, "closing the session failed; instances expire with it");
        }
    }
}

/// Leadership won by [`Meshwork::campaign`]; resigned (in the background) when dropped.
pub struct Leadership {
    held: Option<Held>,
    coord: CoordClient,
}

impl Leadership {
    /// The fencing token of this term.
    pub fn fencing_token(&self) -> i64 {
        self.held.as_ref().map_or(0, |h| h.fencing_token)
    }

    /// Changes the value this leader proclaims.
    pub async fn proclaim(&self, value: &str) -> Result<(), Error> {
        match &self.held {
            Some(h) => Ok(lock::proclaim(self.coord.backend(), h, value).await?),
            None => Err(Error::Invalid("leadership already resigned".into())),
        }
    }

    /// Gives leadership up now; false if it was already lost.
    pub async fn resign(mut self) -> Result<bool, Error> {
        match self.held.take() {
            Some(h) => Ok(lock::resign(self.coord.backend(), &h).await?),
            None => Ok(false),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            let coord = self.coord.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = lock::resign(coord.backend(), &h).await;
                });
            }
        }
    }
}

/// Starts an instance description for `address:port` (HTTP, weight 100, ephemeral).
///
/// ```
/// let spec = meshwork_sdk::instance("10.0.0.5", 9001)
///     .with_http_check("/health")
///     .version("1.4.2")
///     .zone("eu-1")
///     .tag("canary")
///     .build();
/// assert_eq!(spec.port, 9001);
/// ```
pub fn instance(address: &str, port: u16) -> InstanceBuilder {
    InstanceBuilder(InstanceSpec {
        id: String::new(),
        address: address.to_string(),
        port,
        protocol: Default::default(),
        weight: 100,
        zone: String::new(),
        version: String::new(),
        tags: Vec::new(),
        metadata: Default::default(),
        ephemeral: true,
        ttl_seconds: 10,
        check: None,
        enabled: true,
    })
}

/// Builds an [`InstanceSpec`]; see [`instance`].
#[derive(Debug, Clone)]
pub struct InstanceBuilder(InstanceSpec);

impl InstanceBuilder {
    /// Meshwork checks `GET path` on the instance (any 2xx is healthy) every 2 s,
    /// two failures in a row taking it out of rotation.
    pub fn with_http_check(mut self, path: &str) -> InstanceBuilder {
        self.0.check = Some(HealthCheck {
            spec: CheckSpec::Http {
                path: path.to_string(),
                expected_status: None,
                scheme: "http".into(),
                headers: Default::default(),
            },
            policy: CheckPolicy {
                interval_ms: 2000,
                timeout_ms: 1000,
                ..CheckPolicy::default()
            },
        });
        self
    }

    /// Sets the version.
    pub fn version(mut self, v: &str) -> InstanceBuilder {
        self.0.version = v.to_string();
        self
    }

    /// Sets the zone.
    pub fn zone(mut self, z: &str) -> InstanceBuilder {
        self.0.zone = z.to_string();
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, t: &str) -> InstanceBuilder {
        self.0.tags.push(t.to_string());
        self
    }

    /// The spec.
    pub fn build(self) -> InstanceSpec {
        self.0
    }
}

async fn monitor_control_plane(mut rx: tokio::sync::watch::Receiver<bool>) {
    let gauge = metrics::gauge!("meshwork_sdk_control_plane_up");
    loop {
        let up = *rx.borrow_and_update();
        gauge.set(if up { 1.0 } else { 0.0 });
        if up {
            tracing::info!("control plane reachable");
        } else {
            tracing::warn!("control plane unreachable; discovery serves from the local cache");
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
