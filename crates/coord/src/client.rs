//! The client an application service links (the SDK builds on it): a session lease
//! that carries the process's ephemeral registrations (re-registered if the session
//! is ever lost), discovery from a local cache kept current by watch, typed config
//! subscriptions decoded with serde, and lock guards.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::backend::{Backend, BackendOptions, LeaseKeeper};
use crate::config::{ClientIdentity, ConfigCenter, ConfigKey, ConfigOptions, Format, format};
use crate::error::{CoordError, Result};
use crate::lock::{self, Held};
use crate::registry::{InstanceSpec, Registered, Registry, RegistryOptions};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Who this process is (recorded as `registered_by` and lock holder).
    pub name: String,
    /// Session lease TTL, seconds: ephemeral registrations vanish this long after the
    /// process dies.
    pub session_ttl: i64,
    /// Identity for gray-release matching of config.
    pub identity: ClientIdentity,
    /// Connection and retry behaviour.
    pub backend: BackendOptions,
    /// Master keys that open secret config entries (none: they stay locked).
    pub secret_keys: crate::config::secret::MasterKeys,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: "meshwork-client".into(),
            session_ttl: 10,
            identity: ClientIdentity::default(),
            backend: BackendOptions::default(),
            secret_keys: Default::default(),
        }
    }
}

struct Session {
    lease: i64,
    _keeper: LeaseKeeper,
}

/// A connected client. Cheap to clone.
#[derive(Clone)]
pub struct CoordClient {
    backend: Backend,
    opts: Arc<ClientOptions>,
    session: Arc<Mutex<Session>>,
    registrations: Arc<Mutex<Vec<(String, InstanceSpec)>>>,
    registries: Registries,
    config: Arc<tokio::sync::OnceCell<ConfigCenter>>,
    reachable: watch::Receiver<bool>,
    _task: Arc<AbortOnDrop>,
}

/// Per-service watched copies, opened on first use.
#[derive(Clone, Default)]
struct Registries(Arc<tokio::sync::Mutex<std::collections::HashMap<String, Registry>>>);

impl Registries {
    async fn get(&self, backend: &Backend, service: &str) -> Result<Registry> {
        let mut m = self.0.lock().await;
        if let Some(r) = m.get(service) {
            return Ok(r.clone());
        }
        let r = Registry::open(backend, Some(service), RegistryOptions::default()).await?;
        m.insert(service.to_string(), r.clone());
        Ok(r)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl CoordClient {
    /// Connects to `endpoints` (the node's etcd endpoint, or the etcd cluster) and
    /// opens a session.
    pub async fn connect(endpoints: &[String], opts: ClientOptions) -> Result<CoordClient> {
        let backend = Backend::connect(endpoints, opts.backend.clone()).await?;
        let lease = backend.grant(opts.session_ttl).await?;
        let keeper = backend.keep_alive(lease, opts.session_ttl);
        let session = Arc::new(Mutex::new(Session {
            lease,
            _keeper: keeper,
        }));
        let registries = Registries::default();
        let registrations: Arc<Mutex<Vec<(String, InstanceSpec)>>> = Arc::default();
        let (reachable, reachable_rx) = watch::channel(true);
        let task = tokio::spawn(renew_session(
            backend.clone(),
            opts.clone(),
            session.clone(),
            registrations.clone(),
            registries.clone(),
            reachable,
        ));
        Ok(CoordClient {
            backend,
            opts: Arc::new(opts),
            session,
            registrations,
            registries,
            config: Arc::default(),
            reachable: reachable_rx,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Whether the control plane (the store) answers: false while session renewals
    /// fail or the session is being replaced. Discovery keeps serving the last known
    /// state meanwhile.
    pub fn control_plane(&self) -> watch::Receiver<bool> {
        self.reachable.clone()
    }

    /// The backend, for direct etcd calls.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The session lease id.
    pub fn lease(&self) -> i64 {
        self.session.lock().lease
    }

    /// Registers an ephemeral instance on the session (re-registered if the session
    /// is lost and renewed), or a persistent one if `spec.ephemeral` is false.
    pub async fn register(&self, service: &str, spec: InstanceSpec) -> Result<Registered> {
        let lease = spec.ephemeral.then(|| self.lease());
        let r = self
            .discovery(service)
            .await?
            .register(service, spec.clone(), &self.opts.name, lease)
            .await?;
        if spec.ephemeral {
            let mut regs = self.registrations.lock();
            regs.retain(|(s, i)| !(s == service && i.id == r.instance.spec.id));
            let mut spec = spec;
            spec.id = r.instance.spec.id.clone();
            regs.push((service.to_string(), spec));
        }
        Ok(r)
    }

    /// Deregisters an instance.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.registrations
            .lock()
            .retain(|(s, i)| !(s == service && i.id == id));
        self.discovery(service).await?.deregister(service, id).await
    }

    /// Deregisters everything this client registered and revokes the session.
    pub async fn close(self) -> Result<()> {
        let regs: Vec<(String, InstanceSpec)> = std::mem::take(&mut *self.registrations.lock());
        for (svc, spec) in regs {
            if let Ok(r) = self.discovery(&svc).await {
                let _ = r.deregister(&svc, &spec.id).await;
            }
        }
        let lease = self.lease();
        self.backend.revoke(lease).await
    }

    /// Discovery of one service from a local copy kept current by watch (opened on
    /// first use; only that service is mirrored). It keeps serving the last known
    /// state while the store is unreachable.
    pub async fn discovery(&self, service: &str) -> Result<Registry> {
        self.registries.get(&self.backend, service).await
    }

    /// The configuration center (opened on first use).
    pub async fn config(&self) -> Result<&ConfigCenter> {
        self.config
            .get_or_try_init(|| {
                ConfigCenter::open(
                    &self.backend,
                    ConfigOptions {
                        secret_keys: self.opts.secret_keys.clone(),
                        ..ConfigOptions::default()
                    },
                )
            })
            .await
    }

    /// Subscribes to `namespace/group/data_id` decoded as `T`: the current value (if
    /// any) and every later good value. A change that does not decode is reported
    /// (log, [`TypedConfig::last_error`]) and the last good value is kept.
    pub async fn subscribe<T>(&self, path: &str) -> Result<TypedConfig<T>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let key = ConfigKey::parse(path)?;
        let center = self.config().await?.clone();
        let mut stream = Box::pin(center.subscribe(key.clone(), self.opts.identity.clone()));
        let (tx, mut rx) = watch::channel::<Option<Arc<T>>>(None);
        let error = Arc::new(Mutex::new(None::<String>));
        // The first item is the current state: decode it before returning.
        if let Some(first) = stream.next().await
            && let Some(served) = first
        {
            match decode_served::<T>(&served) {
                Ok(v) => {
                    tx.send_replace(Some(Arc::new(v)));
                }
                Err(e) => {
                    *error.lock() = Some(format!("{key} version {}: {e}", served.entry.version))
                }
            }
        }
        // The current value is what `current()` returns, not a change.
        rx.borrow_and_update();
        let err2 = error.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                let Some(served) = item else { continue };
                match decode_served::<T>(&served) {
                    Ok(v) => {
                        *err2.lock() = None;
                        if tx.send(Some(Arc::new(v))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let msg = format!("{key} version {}: {e}", served.entry.version);
                        tracing::warn!(config = %key, error = %msg, "config update does not decode; keeping the last good value");
                        metrics::counter!("meshwork_config_decode_errors_total").increment(1);
                        *err2.lock() = Some(msg);
                    }
                }
            }
        });
        Ok(TypedConfig {
            rx,
            error,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// Acquires a lock on the session lease; the guard releases it when dropped.
    pub async fn lock(&self, name: &str, timeout: Option<Duration>) -> Result<LockGuard> {
        let held = lock::lock(&self.backend, name, self.lease(), &self.opts.name, timeout).await?;
        Ok(LockGuard {
            held: Some(held),
            backend: self.backend.clone(),
        })
    }
}

/// Decodes what was served, or says why a secret entry stayed locked.
fn decode_served<T: DeserializeOwned>(served: &crate::config::Served) -> Result<T> {
    match &served.locked {
        Some(why) => Err(CoordError::Unavailable(format!(
            "the secret entry cannot be opened: {why}"
        ))),
        None => decode(served.entry.format, &served.entry.content),
    }
}

/// Decodes config content of `format` into `T`.
pub fn decode<T: DeserializeOwned>(fmt: Format, content: &str) -> Result<T> {
    let bad = |e: String| CoordError::invalid(format!("does not decode as the expected type: {e}"));
    match fmt {
        Format::Json => serde_json::from_str(content).map_err(|e| bad(e.to_string())),
        Format::Toml => toml::from_str(content).map_err(|e| bad(e.to_string())),
        Format::Yaml => yaml_serde::from_str(content).map_err(|e| bad(e.to_string())),
        Format::Properties => {
            let map = format::parse_properties(content)?;
            serde_json::from_value(serde_json::to_value(map).map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))
        }
        Format::Text => serde_json::from_value(serde_json::Value::String(content.to_string()))
            .map_err(|e| bad(e.to_string())),
    }
}

/// A typed config subscription.
pub struct TypedConfig<T> {
    rx: watch::Receiver<Option<Arc<T>>>,
    error: Arc<Mutex<Option<String>>>,
    _task: Arc<AbortOnDrop>,
}

impl<T> TypedConfig<T> {
    /// The last good value (None while the entry does not exist or never decoded).
    pub fn current(&self) -> Option<Arc<T>> {
        self.rx.borrow().clone()
    }

    /// Waits for the next good value.
    pub async fn changed(&mut self) -> Option<Arc<T>> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().clone()
    }

    /// Why the latest update was rejected, if it was.
    pub fn last_error(&self) -> Option<String> {
        self.error.lock().clone()
    }
}

/// A held lock; released (in the background) when dropped.
pub struct LockGuard {
    held: Option<Held>,
    backend: Backend,
}

impl LockGuard {
    /// The fencing token: pass it to the resource the lock protects.
    pub fn fencing_token(&self) -> i64 {
        self.held.as_ref().map(|h| h.fencing_token).unwrap_or(0)
    }

    /// Releases now; false if the lock was already lost (its lease ended).
    pub async fn release(mut self) -> Result<bool> {
        match self.held.take() {
            Some(h) => lock::unlock(&self.backend, &h).await,
            None => Ok(false),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            let be = self.backend.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = lock::unlock(&be, &h).await;
                });
            }
        }
    }
}

/// Replaces a lost session and re-registers the process's ephemeral instances.
async fn renew_session(
    backend: Backend,
    opts: ClientOptions,
    session: Arc<Mutex<Session>>,
    registrations: Arc<Mutex<Vec<(String, InstanceSpec)>>>,
    registries: Registries,
    reachable: watch::Sender<bool>,
) {
    loop {
        let (mut lost_rx, mut reach_rx) = {
            let s = session.lock();
            (s._keeper.lost_receiver(), s._keeper.reachable_receiver())
        };
        // Forward renewal health until the session is lost.
        loop {
            let now = *reach_rx.borrow_and_update();
            reachable.send_if_modified(|r| std::mem::replace(r, now) != now);
            if *lost_rx.borrow_and_update() {
                break;
            }
            // A keeper that ends has reported the loss first (if that is why it
            // ended); one that ended otherwise was aborted: nothing more will come.
            let closed = tokio::select! {
                r = lost_rx.changed() => r.is_err(),
                r = reach_rx.changed() => r.is_err(),
            };
            if closed && !*lost_rx.borrow() {
                std::future::pending::<()>().await;
            }
        }
        reachable.send_if_modified(|r| std::mem::replace(r, false));
        tracing::warn!("client session lost; opening a new one and re-registering");
        loop {
            match backend.grant(opts.session_ttl).await {
                Ok(lease) => {
                    let keeper = backend.keep_alive(lease, opts.session_ttl);
                    *session.lock() = Session {
                        lease,
                        _keeper: keeper,
                    };
                    // Re-register until every instance is back on the new session (or
                    // that session is lost too); the list is re-read each round, so a
                    // registration that raced with the swap is not forgotten.
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        let regs = registrations.lock().clone();
                        let mut failed = 0;
                        for (svc, spec) in regs {
                            let registry = match registries.get(&backend, &svc).await {
                                Ok(r) => r,
                                Err(e) => {
                                    failed += 1;
                                    tracing::warn!(service = %svc, error = %e, "re-registration failed; retrying");
                                    continue;
                                }
                            };
                            let current = registry
                                .cache()
                                .lock()
                                .service(&svc)
                                .and_then(|s| s.instances.get(&spec.id).map(|i| i.lease));
                            if current == Some(lease) {
                                continue;
                            }
                            if let Err(e) =
                                registry.register(&svc, spec, &opts.name, Some(lease)).await
                            {
                                failed += 1;
                                tracing::warn!(service = %svc, error = %e, "re-registration failed; retrying");
                            }
                        }
                        if failed == 0 || session.lock().lease != lease {
                            break;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a session; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
