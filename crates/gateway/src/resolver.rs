//! Where upstream endpoints come from: the [`Resolver`] seam (the registry
//! implements it) and [`StaticResolver`] for tests and fixed lists.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Relative weight (0 = receives nothing); used by WRR, ring and Maglev.
    pub weight: u32,
    /// Zone (e.g. `eu-west-1a`).
    pub zone: Option<String>,
    /// Version of the service it runs.
    pub version: Option<String>,
    /// Free-form tags (e.g. `canary`).
    pub tags: Vec<String>,
    /// Whether active health checks pass (unhealthy ones get no traffic).
    pub healthy: bool,
}

impl Endpoint {
    /// A healthy endpoint of weight 1 with no metadata.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            weight: 1,
            zone: None,
            version: None,
            tags: Vec::new(),
            healthy: true,
        }
    }
}

/// Which instances of a service a route wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceFilter {
    /// Every tag must be present.
    pub tags: Vec<String>,
    /// Exact version, if set.
    pub version: Option<String>,
    /// Exact zone, if set.
    pub zone: Option<String>,
    /// Exact metadata values (reserved for the registry; ignored by the
    /// static resolver).
    pub metadata: BTreeMap<String, String>,
}

impl InstanceFilter {
    /// Whether `ep` passes the filter (metadata is not checked here).
    pub fn matches(&self, ep: &Endpoint) -> bool {
        self.tags.iter().all(|t| ep.tags.contains(t))
            && self
                .version
                .as_ref()
                .is_none_or(|v| ep.version.as_ref() == Some(v))
            && self
                .zone
                .as_ref()
                .is_none_or(|z| ep.zone.as_ref() == Some(z))
    }
}

/// Resolves a service name to a live list of endpoints.
///
/// Implementations may pre-filter with `filter`; the gateway applies
/// [`InstanceFilter::matches`] and the `healthy` flag again, so returning
/// the whole service is correct too. The receiver must stay open as long as
/// the service may change; a closed receiver freezes the last list.
pub trait Resolver: Send + Sync + 'static {
    /// A receiver of the current endpoints of `service`.
    fn subscribe(
        &self,
        service: &str,
        filter: &InstanceFilter,
    ) -> watch::Receiver<Arc<Vec<Endpoint>>>;
}

/// A resolver over lists set in code (tests, static configuration).
#[derive(Debug, Default)]
pub struct StaticResolver {
    services: Mutex<HashMap<String, watch::Sender<Arc<Vec<Endpoint>>>>>,
}

impl StaticResolver {
    /// An empty resolver.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the endpoints of `service`, notifying subscribers.
    pub fn set(&self, service: &str, endpoints: Vec<Endpoint>) {
        let mut services = self.services.lock();
        let tx = services
            .entry(service.to_owned())
            .or_insert_with(|| watch::channel(Arc::new(Vec::new())).0);
        tx.send_replace(Arc::new(endpoints));
    }
}

impl Resolver for StaticResolver {
    fn subscribe(
        &self,
        service: &str,
        _filter: &InstanceFilter,
    ) -> watch::Receiver<Arc<Vec<Endpoint>>> {
        let mut services = self.services.lock();
        services
            .entry(service.to_owned())
            .or_insert_with(|| watch::channel(Arc::new(Vec::new())).0)
            .subscribe()
    }
}
