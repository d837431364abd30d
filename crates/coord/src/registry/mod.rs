//! The service registry: register instances (ephemeral on a lease, or persistent),
//! discover them from a local copy kept current by watch, block until a service
//! changes, and follow what happened. Active health checks live in [`checker`].

pub mod cache;
#[cfg(feature = "server")]
pub mod checker;
pub mod model;
pub mod probe;
#[cfg(feature = "server")]
pub mod prober;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::backend::{Backend, LOAD_LIMIT, Mirror, mirror, txn};
use crate::error::{CoordError, Result};
pub use cache::{Discovery, Filter, InstanceView, RegistryCache, RegistryEvent};
pub use model::{HealthStatus, Instance, InstanceSpec, Protocol, ServiceSettings};
use model::{
    REGISTRY_PREFIX, health_key, instance_key, now_ms, service_prefix, settings_key,
    validate_instance_id, validate_service_name,
};

/// Registry limits.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Smallest TTL of an ephemeral instance, seconds.
    pub min_ttl: i64,
    /// Largest TTL of an ephemeral instance, seconds.
    pub max_ttl: i64,
    /// Longest wait of a blocking query.
    pub max_wait: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            min_ttl: 2,
            max_ttl: 3600,
            max_wait: Duration::from_secs(300),
        }
    }
}

/// A registered instance and the lease that keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    /// The stored record.
    pub instance: Instance,
    /// Lease id (0 for persistent); renew it with heartbeats within `ttl_seconds`.
    pub lease: i64,
    /// Store revision of the registration.
    pub revision: i64,
}

/// One line of the service list.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceSummary {
    /// Name.
    pub name: String,
    /// Instances registered.
    pub instances: usize,
    /// Instances healthy.
    pub healthy: usize,
    /// Index (revision of the last change).
    pub index: i64,
    /// Protection threshold.
    pub protect_threshold: f64,
}

/// The registry, over a watched local copy of (part of) the key space.
#[derive(Clone)]
pub struct Registry {
    backend: Backend,
    cache: Arc<Mutex<RegistryCache>>,
    mirror: Arc<Mirror>,
    opts: RegistryOptions,
}

impl Registry {
    /// Opens the registry of every service (`scope` None) or of one service, and
    /// waits for the local copy to load.
    pub async fn open(
        backend: &Backend,
        scope: Option<&str>,
        opts: RegistryOptions,
    ) -> Result<Registry> {
        let prefix = match scope {
            None => REGISTRY_PREFIX.to_string(),
            Some(s) => {
                validate_service_name(s)?;
                service_prefix(s)
            }
        };
        let cache = Arc::new(Mutex::new(match scope {
            None => RegistryCache::new(),
            Some(s) => RegistryCache::scoped(s),
        }));
        let mirror = mirror(backend, prefix, cache.clone());
        let reg = Registry {
            backend: backend.clone(),
            cache,
            mirror: Arc::new(mirror),
            opts,
        };
        if !reg.mirror.loaded(LOAD_LIMIT).await {
            return Err(CoordError::Unavailable(format!(
                "the registry could not be loaded from the store within {} s",
                LOAD_LIMIT.as_secs()
            )));
        }
        Ok(reg)
    }

    /// The backend in use.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The local copy (lock briefly; never across an await).
    pub fn cache(&self) -> &Arc<Mutex<RegistryCache>> {
        &self.cache
    }

    /// Registers (or re-registers) an instance. An ephemeral instance goes on `lease`
    /// when given (a session shared by a process's instances), else on a new lease
    /// of its own TTL.
    pub async fn register(
        &self,
        service: &str,
        mut spec: InstanceSpec,
        registered_by: &str,
        lease: Option<i64>,
    ) -> Result<Registered> {
        validate_service_name(service)?;
        spec.normalize(self.opts.min_ttl, self.opts.max_ttl)?;
        let mut instance = Instance {
            service: service.to_string(),
            spec,
            lease: 0,
            registered_by: registered_by.chars().take(256).collect(),
            registered_at_ms: now_ms(),
        };
        // Check the size before granting anything (a lease id adds at most 20 bytes).
        let probe = serde_json::to_vec(&instance)
            .map_err(|e| CoordError::invalid(format!("instance does not encode: {e}")))?;
        if probe.len() + 20 > model::MAX_RECORD {
            return Err(CoordError::TooLarge(format!(
                "instance record is {} bytes; the limit is {}",
                probe.len(),
                model::MAX_RECORD
            )));
        }
        let granted = instance.spec.ephemeral && lease.is_none();
        instance.lease = if instance.spec.ephemeral {
            match lease {
                Some(l) => l,
                None => self.backend.grant(instance.spec.ttl_seconds).await?,
            }
        } else {
            0
        };
        let lease = instance.lease;
        let value = serde_json::to_vec(&instance)
            .map_err(|e| CoordError::invalid(format!("instance does not encode: {e}")))?;
        let key = instance_key(service, &instance.spec.id);
        let revision = match self.backend.put(key, value, lease).await {
            Ok(r) => r,
            Err(e) => {
                if granted {
                    let _ = self.backend.revoke(lease).await;
                }
                return Err(match e {
                    CoordError::NotFound(m) => CoordError::NotFound(format!(
                        "lease {lease:x} not found ({m}); it expired: register again"
                    )),
                    e => e,
                });
            }
        };
        self.mirror.wait_for(revision).await;
        Ok(Registered {
            instance,
            lease,
            revision,
        })
    }

    /// Removes an instance and its health record.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        validate_service_name(service)?;
        validate_instance_id(id)?;
        let key = instance_key(service, id);
        let r = self
            .backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::create_rev_is(key.clone(), 0)],
                success: vec![txn::delete(health_key(service, id))],
                failure: vec![txn::delete(key), txn::delete(health_key(service, id))],
            })
            .await?;
        if r.succeeded {
            return Err(CoordError::NotFound(format!(
                "service {service:?} has no instance {id:?}"
            )));
        }
        self.mirror.wait_for(txn::revision(&r)).await;
        Ok(())
    }

    /// Renews an ephemeral instance's lease; returns the remaining TTL in seconds.
    pub async fn heartbeat(&self, service: &str, id: &str) -> Result<i64> {
        validate_service_name(service)?;
        validate_instance_id(id)?;
        let lease = {
            let c = self.cache.lock();
            c.service(service)
                .and_then(|s| s.instances.get(id))
                .map(|i| i.lease)
        };
        match lease {
            None => Err(CoordError::NotFound(format!(
                "service {service:?} has no instance {id:?} (expired? register again)"
            ))),
            Some(0) => Err(CoordError::invalid(format!(
                "instance {id:?} is persistent: it needs no heartbeat"
            ))),
            Some(l) => self.backend.keep_alive_once(l).await?.ok_or_else(|| {
                CoordError::NotFound(format!("the lease of {id:?} expired: register again"))
            }),
        }
    }

    /// Enables or disables an instance (takes it in or out of rotation) with a
    /// compare-and-set on its record.
    pub async fn set_enabled(&self, service: &str, id: &str, enabled: bool) -> Result<Instance> {
        validate_service_name(service)?;
        validate_instance_id(id)?;
        let key = instance_key(service, id);
        for _ in 0..16 {
            let (kv, _) = self.backend.get(key.clone()).await?;
            let kv = kv.ok_or_else(|| {
                CoordError::NotFound(format!("service {service:?} has no instance {id:?}"))
            })?;
            let mut inst: Instance =
                serde_json::from_slice(&kv.value).map_err(|e| CoordError::Corrupt {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            inst.spec.enabled = enabled;
            let value = serde_json::to_vec(&inst)
                .map_err(|e| CoordError::invalid(format!("instance does not encode: {e}")))?;
            let r = self
                .backend
                .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                    compare: vec![txn::mod_rev_is(key.clone(), kv.mod_revision)],
                    success: vec![txn::put(key.clone(), value, kv.lease)],
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                self.mirror.wait_for(txn::revision(&r)).await;
                return Ok(inst);
            }
        }
        Err(CoordError::Conflict(format!(
            "instance {id:?} kept changing; try again"
        )))
    }

    /// Stores a service's settings (protection threshold, description).
    pub async fn put_settings(&self, service: &str, s: &ServiceSettings) -> Result<()> {
        validate_service_name(service)?;
        s.validate()?;
        let value = serde_json::to_vec(s)
            .map_err(|e| CoordError::invalid(format!("settings do not encode: {e}")))?;
        let rev = self.backend.put(settings_key(service), value, 0).await?;
        self.mirror.wait_for(rev).await;
        Ok(())
    }

    /// Every service, sorted by name.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let c = self.cache.lock();
        let mut v: Vec<ServiceSummary> = c
            .services()
            .filter(|(_, s)| !s.instances.is_empty() || s.settings.is_some())
            .map(|(name, s)| {
                let views = c.views(name);
                ServiceSummary {
                    name: name.clone(),
                    instances: views.len(),
                    healthy: views.iter().filter(|v| v.healthy).count(),
                    index: s.index,
                    protect_threshold: s
                        .settings
                        .as_ref()
                        .map(|s| s.protect_threshold)
                        .unwrap_or(0.0),
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A service's settings, if stored.
    pub fn settings(&self, service: &str) -> Option<ServiceSettings> {
        self.cache
            .lock()
            .service(service)
            .and_then(|s| s.settings.clone())
    }

    /// Instances of a service matching `filter`, from the local copy.
    pub fn discover(&self, service: &str, filter: &Filter) -> Discovery {
        cache::discover(&self.cache.lock(), service, filter)
    }

    /// Like [`Registry::discover`], but first waits (at most `wait`) until the
    /// service's index is past `index` (Consul-style blocking query).
    pub async fn discover_blocking(
        &self,
        service: &str,
        filter: &Filter,
        index: i64,
        wait: Duration,
    ) -> Discovery {
        let mut rx = self.cache.lock().subscribe(service);
        let wait = wait.min(self.opts.max_wait);
        let _ = tokio::time::timeout(wait, async {
            while *rx.borrow_and_update() <= index {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.discover(service, filter)
    }

    /// Follows a service: yields the current answer, then a new one whenever the
    /// service changes. Intermediate states may be skipped (the latest one wins).
    pub fn watch(
        &self,
        service: &str,
        filter: Filter,
    ) -> impl futures_util::Stream<Item = Discovery> + Send + 'static {
        let rx = self.cache.lock().subscribe(service);
        let this = self.clone();
        let service = service.to_string();
        futures_util::stream::unfold((rx, true), move |(mut rx, first)| {
            let this = this.clone();
            let service = service.clone();
            let filter = filter.clone();
            async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                rx.borrow_and_update();
                Some((this.discover(&service, &filter), (rx, false)))
            }
        })
    }

    /// Recent events, newest last, of one service or all.
    pub fn events(&self, service: Option<&str>, limit: usize) -> Vec<RegistryEvent> {
        let c = self.cache.lock();
        let v: Vec<RegistryEvent> = c
            .events()
            .filter(|e| service.is_none_or(|s| e.service == s))
            .cloned()
            .collect();
        let skip = v.len().saturating_sub(limit);
        v.into_iter().skip(skip).collect()
    }

    /// Revision the local copy reflects.
    pub fn revision(&self) -> i64 {
        self.mirror.revision()
    }
}

/// An instance that should take traffic, as an address to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficEndpoint {
    /// Instance id.
    pub id: String,
    /// Resolved address.
    pub addr: std::net::SocketAddr,
    /// Load-balancing weight (> 0).
    pub weight: u32,
    /// Zone, if set.
    pub zone: Option<String>,
    /// Version, if set.
    pub version: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// It serves TLS with its service identity (metadata `tls = identity`):
    /// dial it with TLS, expecting its service's name.
    pub identity_tls: bool,
}

/// The instances of a discovery answer that should take traffic: enabled, weight
/// above 0 (health is the answer's filter).
fn traffic_specs(d: &Discovery) -> impl Iterator<Item = &InstanceSpec> {
    d.instances
        .iter()
        .map(|v| &v.instance.spec)
        .filter(|s| s.enabled && s.weight > 0)
}

fn endpoint_of(s: &InstanceSpec, addr: std::net::SocketAddr) -> TrafficEndpoint {
    TrafficEndpoint {
        id: s.id.clone(),
        addr,
        weight: s.weight,
        zone: (!s.zone.is_empty()).then(|| s.zone.clone()),
        version: (!s.version.is_empty()).then(|| s.version.clone()),
        tags: s.tags.clone(),
        identity_tls: s.metadata.get("tls").is_some_and(|v| v == "identity"),
    }
}

/// Like [`traffic_endpoints`], without waiting: only instances whose address is
/// an IP (host names are left out).
pub fn traffic_endpoints_now(d: &Discovery) -> Vec<TrafficEndpoint> {
    traffic_specs(d)
        .filter_map(|s| {
            let ip = s.address.parse::<std::net::IpAddr>().ok()?;
            Some(endpoint_of(s, std::net::SocketAddr::new(ip, s.port)))
        })
        .collect()
}

/// The instances of a discovery answer that should take traffic (enabled, weight
/// above 0; health is the answer's filter), host names resolved. A name that does
/// not resolve is left out and logged.
pub async fn traffic_endpoints(d: &Discovery) -> Vec<TrafficEndpoint> {
    let mut out = Vec::with_capacity(d.instances.len());
    for s in traffic_specs(d) {
        let addr = match s.address.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, s.port),
            Err(_) => match tokio::net::lookup_host((s.address.as_str(), s.port)).await {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => a,
                    None => continue,
                },
                Err(e) => {
                    tracing::warn!(host = %s.address, error = %e, "instance address does not resolve");
                    continue;
                }
            },
        };
        out.push(endpoint_of(s, addr));
    }
    out
}
