//! The local copy of the registry, kept current by watch: instances joined with their
//! health, an index per service that moves whenever the service changes (for blocking
//! queries), change notifications, and a bounded log of recent events.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use super::model::{HealthStatus, Instance, KeyKind, ServiceSettings, now_ms, parse_key};
use crate::backend::{Event, KeyValue, MirrorHandler, is_delete};

/// How many recent events the cache remembers.
pub const EVENT_LOG: usize = 1000;

/// One service's state.
#[derive(Debug, Default, Clone)]
pub struct ServiceState {
    /// Instances by id.
    pub instances: BTreeMap<String, Instance>,
    /// Health records by instance id.
    pub health: BTreeMap<String, HealthStatus>,
    /// Settings, if any were stored.
    pub settings: Option<ServiceSettings>,
    /// Revision of the last change to any key of the service.
    pub index: i64,
}

/// An instance with its health, as discovery returns it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    /// The instance.
    #[serde(flatten)]
    pub instance: Instance,
    /// Whether it should receive traffic: enabled, weight > 0, and not failing checks.
    pub healthy: bool,
    /// `passing`, `failing`, `pending` (checked, no result yet) or `none` (no check).
    pub health: &'static str,
    /// Detail of the last check result, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<HealthStatus>,
}

impl InstanceView {
    fn of(i: &Instance, h: Option<&HealthStatus>) -> InstanceView {
        let health = match (&i.spec.check, h) {
            (None, _) => "none",
            (Some(_), None) => "pending",
            (Some(_), Some(h)) if h.healthy => "passing",
            (Some(_), Some(_)) => "failing",
        };
        InstanceView {
            instance: i.clone(),
            healthy: i.spec.enabled && i.spec.weight > 0 && health != "failing",
            health,
            health_detail: h.cloned(),
        }
    }
}

/// What happened in the registry.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryEvent {
    /// Store revision of the change.
    pub revision: i64,
    /// When this node saw it, Unix milliseconds.
    pub seen_at_ms: u64,
    /// Service.
    pub service: String,
    /// Instance, if the event concerns one.
    pub instance: String,
    /// `registered`, `updated`, `deregistered` (or lease expired), `healthy`,
    /// `unhealthy`, `settings`.
    pub kind: &'static str,
    /// Who or why (registrant, failure reason).
    pub detail: String,
}

/// The registry mirror state.
pub struct RegistryCache {
    services: HashMap<String, ServiceState>,
    revision: i64,
    events: VecDeque<RegistryEvent>,
    notify: HashMap<String, watch::Sender<i64>>,
    any: broadcast::Sender<String>,
    bad_records: u64,
    instance_count: usize,
    /// The one service this copy follows (a client's discovery), or None for
    /// the whole registry (a node's): which metrics it writes.
    scope: Option<String>,
}

impl Default for RegistryCache {
    fn default() -> Self {
        RegistryCache::new()
    }
}

impl RegistryCache {
    /// An empty cache.
    pub fn new() -> RegistryCache {
        RegistryCache {
            services: HashMap::new(),
            revision: 0,
            events: VecDeque::new(),
            notify: HashMap::new(),
            any: broadcast::channel(4096).0,
            bad_records: 0,
            instance_count: 0,
            scope: None,
        }
    }

    /// An empty copy of one service's part of the registry (its figures go to
    /// `meshwork_discovery_*{service}`, not to the registry's).
    pub fn scoped(service: &str) -> RegistryCache {
        RegistryCache {
            scope: Some(service.to_string()),
            ..RegistryCache::new()
        }
    }

    /// Revision the cache reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// A service's state.
    pub fn service(&self, name: &str) -> Option<&ServiceState> {
        self.services.get(name)
    }

    /// Every service with at least one key.
    pub fn services(&self) -> impl Iterator<Item = (&String, &ServiceState)> {
        self.services.iter()
    }

    /// Recent events, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &RegistryEvent> {
        self.events.iter()
    }

    fn export_gauges(&self) {
        match &self.scope {
            None => {
                metrics::gauge!("meshwork_registry_services").set(self.services.len() as f64);
                metrics::gauge!("meshwork_registry_instances").set(self.instance_count as f64);
                metrics::gauge!("meshwork_registry_revision").set(self.revision as f64);
            }
            Some(s) => {
                metrics::gauge!("meshwork_discovery_instances", "service" => s.clone())
                    .set(self.instance_count as f64);
                metrics::gauge!("meshwork_discovery_revision", "service" => s.clone())
                    .set(self.revision as f64);
            }
        }
    }

    /// The index a blocking query on `service` compares with: never below what its
    /// waiters were last told (a service that vanished keeps its last index).
    pub fn index_of(&self, service: &str) -> i64 {
        let own = self.services.get(service).map(|s| s.index).unwrap_or(0);
        let told = self.notify.get(service).map(|tx| *tx.borrow()).unwrap_or(0);
        own.max(told)
    }

    /// Records that failed to decode (written by something else).
    pub fn bad_records(&self) -> u64 {
        self.bad_records
    }

    /// A receiver of the service's index; it moves on every change of the service.
    pub fn subscribe(&mut self, service: &str) -> watch::Receiver<i64> {
        let index = self.services.get(service).map(|s| s.index).unwrap_or(0);
        // Waiters on services that never change would otherwise stay here forever.
        if self.notify.len() >= 1024 && self.notify.len().is_power_of_two() {
            self.notify.retain(|_, tx| tx.receiver_count() > 0);
        }
        self.notify
            .entry(service.to_string())
            .or_insert_with(|| watch::channel(index).0)
            .subscribe()
    }

    /// A receiver of the names of services as they change.
    pub fn subscribe_all(&self) -> broadcast::Receiver<String> {
        self.any.subscribe()
    }

    /// Instances of a service joined with health.
    pub fn views(&self, service: &str) -> Vec<InstanceView> {
        self.services
            .get(service)
            .map(|s| {
                s.instances
                    .values()
                    .map(|i| InstanceView::of(i, s.health.get(&i.spec.id)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn log(&mut self, e: RegistryEvent) {
        if self.events.len() >= EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn touch(&mut self, service: &str, rev: i64) {
        if let Some(s) = self.services.get_mut(service) {
            s.index = s.index.max(rev);
        }
        if let Some(tx) = self.notify.get(service) {
            if tx.receiver_count() == 0 {
                self.notify.remove(service);
            } else {
                tx.send_replace(rev);
            }
        }
        let _ = self.any.send(service.to_string());
    }

    fn put(&mut self, kv: &KeyValue, log: bool) -> Option<String> {
        let kind = parse_key(&kv.key)?;
        let rev = kv.mod_revision;
        let (service, ev) = match kind {
            KeyKind::Instance(svc, id) => {
                let Ok(inst) = serde_json::from_slice::<Instance>(&kv.value) else {
                    self.bad_records += 1;
                    tracing::warn!(service = svc, instance = id, "undecodable instance record");
                    return None;
                };
                let st = self.services.entry(svc.to_string()).or_default();
                let kind = if st.instances.contains_key(id) {
                    "updated"
                } else {
                    "registered"
                };
                let detail = format!(
                    "{}:{} by {}",
                    inst.spec.address, inst.spec.port, inst.registered_by
                );
                if st.instances.insert(id.to_string(), inst).is_none() {
                    self.instance_count += 1;
                }
                (svc, (id, kind, detail))
            }
            KeyKind::Health(svc, id) => {
                let Ok(h) = serde_json::from_slice::<HealthStatus>(&kv.value) else {
                    self.bad_records += 1;
                    return None;
                };
                let st = self.services.entry(svc.to_string()).or_default();
                let changed = st.health.get(id).map(|o| o.healthy) != Some(h.healthy);
                let kind = if h.healthy { "healthy" } else { "unhealthy" };
                let detail = format!("{} (checked by {})", h.detail, h.checker);
                st.health.insert(id.to_string(), h);
                if !changed {
                    self.touch(svc, rev);
                    return Some(svc.to_string());
                }
                (svc, (id, kind, detail))
            }
            KeyKind::Settings(svc) => {
                let Ok(s) = serde_json::from_slice::<ServiceSettings>(&kv.value) else {
                    self.bad_records += 1;
                    return None;
                };
                self.services.entry(svc.to_string()).or_default().settings = Some(s);
                (svc, ("", "settings", String::new()))
            }
        };
        let svc = service.to_string();
        if log {
            self.log(RegistryEvent {
                revision: rev,
                seen_at_ms: now_ms(),
                service: svc.clone(),
                instance: ev.0.to_string(),
                kind: ev.1,
                detail: ev.2,
            });
        }
        self.touch(&svc, rev);
        Some(svc)
    }

    fn delete(&mut self, key: &[u8], rev: i64) -> Option<String> {
        let kind = parse_key(key)?;
        let (svc, id, logged) = match kind {
            KeyKind::Instance(svc, id) => {
                let st = self.services.get_mut(svc)?;
                let removed = st.instances.remove(id).is_some();
                if removed {
                    self.instance_count = self.instance_count.saturating_sub(1);
                }
                (svc, id, removed)
            }
            KeyKind::Health(svc, id) => {
                let st = self.services.get_mut(svc)?;
                st.health.remove(id);
                (svc, id, false)
            }
            KeyKind::Settings(svc) => {
                self.services.get_mut(svc)?.settings = None;
                (svc, "", false)
            }
        };
        let svc = svc.to_string();
        if logged {
            self.log(RegistryEvent {
                revision: rev,
                seen_at_ms: now_ms(),
                service: svc.clone(),
                instance: id.to_string(),
                kind: "deregistered",
                detail: "deregistered or lease expired".into(),
            });
        }
        self.touch(&svc, rev);
        if let Some(st) = self.services.get(&svc)
            && st.instances.is_empty()
            && st.health.is_empty()
            && st.settings.is_none()
        {
            // Keep the index monotonic for blocking queries even after the last instance
            // went: the entry stays while anyone waits on it.
            if !self.notify.contains_key(&svc) {
                self.services.remove(&svc);
            }
        }
        Some(svc)
    }
}

impl MirrorHandler for RegistryCache {
    fn reset(&mut self, kvs: Vec<KeyValue>, revision: i64) {
        let old: Vec<String> = self.services.keys().cloned().collect();
        self.services.clear();
        self.instance_count = 0;
        for kv in &kvs {
            self.put(kv, false);
        }
        self.revision = revision;
        self.export_gauges();
        // Everyone waiting re-reads: the state may have changed arbitrarily.
        for svc in old
            .iter()
            .chain(self.services.keys().cloned().collect::<Vec<_>>().iter())
        {
            if let Some(s) = self.services.get_mut(svc) {
                s.index = s.index.max(revision);
            }
            if let Some(tx) = self.notify.get(svc) {
                tx.send_replace(revision);
            }
        }
    }

    fn apply(&mut self, events: Vec<Event>, revision: i64) {
        for e in &events {
            let Some(kv) = e.kv.as_ref() else { continue };
            if is_delete(e) {
                self.delete(&kv.key, kv.mod_revision);
            } else {
                self.put(kv, true);
            }
        }
        self.revision = revision;
        self.export_gauges();
    }
}

/// How discovery filters instances.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// Only instances passing their checks (with the protection threshold applied).
    #[serde(default)]
    pub healthy: bool,
    /// Every listed tag must be present.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Zone must equal this.
    #[serde(default)]
    pub zone: Option<String>,
    /// Version must equal this.
    #[serde(default)]
    pub version: Option<String>,
}

/// A discovery answer.
#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    /// Service name.
    pub service: String,
    /// The service's index: pass it back as `index` to block until it moves.
    pub index: i64,
    /// Matching instances.
    pub instances: Vec<InstanceView>,
    /// Healthy instances among those matching the tag/zone/version filter.
    pub healthy_count: usize,
    /// Instances matching the tag/zone/version filter.
    pub total_count: usize,
    /// True when the healthy share fell below the protection threshold and every
    /// instance is returned.
    pub protection_triggered: bool,
}

/// Applies a filter and the protection threshold to a service's instances.
pub fn discover(cache: &RegistryCache, service: &str, f: &Filter) -> Discovery {
    let st = cache.service(service);
    let index = cache.index_of(service);
    let threshold = st
        .and_then(|s| s.settings.as_ref())
        .map(|s| s.protect_threshold)
        .unwrap_or(0.0);
    let matching: Vec<InstanceView> = cache
        .views(service)
        .into_iter()
        .filter(|v| {
            let s = &v.instance.spec;
            f.tags.iter().all(|t| s.tags.contains(t))
                && f.zone.as_ref().is_none_or(|z| &s.zone == z)
                && f.version.as_ref().is_none_or(|ver| &s.version == ver)
        })
        .collect();
    let total = matching.len();
    let healthy = matching.iter().filter(|v| v.healthy).count();
    let protect = f.healthy && total > 0 && (healthy as f64) < threshold * total as f64;
    let instances = if f.healthy && !protect {
        matching.into_iter().filter(|v| v.healthy).collect()
    } else {
        matching
    };
    Discovery {
        service: service.to_string(),
        index,
        instances,
        healthy_count: healthy,
        total_count: total,
        protection_triggered: protect,
    }
}
