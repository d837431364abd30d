//! [`RegistryResolver`]: the gateway's upstreams from Meshwork's service registry.
//!
//! One subscription per service follows the registry's watched copy
//! ([`Registry::watch`]) and publishes the instances that should take traffic:
//! healthy ones (enabled, weight > 0, not failing their checks), or every enabled
//! instance when the service's protection threshold triggers. Host names are
//! resolved asynchronously; an instance whose name does not resolve is left out.
//!
//! [`MembershipSharedLimiter`]: cluster-wide rate limits without a store call per
//! request: each of the N live gateway nodes admits 1/N of the limit (and of its
//! burst), N following the membership. Exact when clients are spread evenly over
//! the gateways (behind an L4 balancer); a node that gets more than its share is
//! limited early.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use meshwork_coord::registry::{
    Filter, Registry, TrafficEndpoint, traffic_endpoints, traffic_endpoints_now,
};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::limits::{LocalSharedLimiter, SharedLimiter};
use crate::resolver::{Endpoint, InstanceFilter, Resolver};
use meshwork_coord::nodes::Membership;
use meshwork_resilience::RateLimited;
use meshwork_resilience::limit::rate::GcraConfig;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The membership role of nodes that run the gateway.
pub const GATEWAY_ROLE: &str = "gateway";

/// A [`SharedLimiter`] that splits each limit over the live gateway nodes.
pub struct MembershipSharedLimiter {
    local: LocalSharedLimiter,
    gateways: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl MembershipSharedLimiter {
    /// Follows `membership` for the number of nodes with the gateway role.
    pub fn new(membership: Arc<Membership>) -> MembershipSharedLimiter {
        let gateways = Arc::new(AtomicUsize::new(
            membership.count_with_role(GATEWAY_ROLE).max(1),
        ));
        let g = gateways.clone();
        let task = tokio::spawn(async move {
            let mut rx = membership.changes();
            loop {
                g.store(
                    membership.count_with_role(GATEWAY_ROLE).max(1),
                    Ordering::Relaxed,
                );
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        MembershipSharedLimiter {
            local: LocalSharedLimiter::new(),
            gateways,
            task,
        }
    }

    /// The number of gateway nodes the limits are split over.
    pub fn gateways(&self) -> usize {
        self.gateways.load(Ordering::Relaxed)
    }
}

impl Drop for MembershipSharedLimiter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SharedLimiter for MembershipSharedLimiter {
    fn check(&self, bucket: &str, key: &str, limit: GcraConfig) -> Result<(), RateLimited> {
        let n = self.gateways() as f64;
        let share = GcraConfig {
            rate_per_sec: limit.rate_per_sec / n,
            burst: ((limit.burst as f64 / n).ceil() as u32).max(1),
        };
        self.local.check(bucket, key, share)
    }
}

type Subscription = (
    watch::Sender<Arc<Vec<Endpoint>>>,
    tokio::task::JoinHandle<()>,
);

/// Resolves services through the registry.
pub struct RegistryResolver {
    registry: Registry,
    subs: Mutex<HashMap<String, Subscription>>,
}

impl RegistryResolver {
    /// A resolver over `registry`.
    pub fn new(registry: Registry) -> RegistryResolver {
        RegistryResolver {
            registry,
            subs: Mutex::new(HashMap::new()),
        }
    }
}

impl Drop for RegistryResolver {
    fn drop(&mut self) {
        for (_, (_, task)) in self.subs.lock().drain() {
            task.abort();
        }
    }
}

fn traffic_filter() -> Filter {
    Filter {
        healthy: true,
        ..Filter::default()
    }
}

/// The gateway's view of a registry endpoint: it takes traffic (the resolver
/// asked for healthy instances, or the protection threshold returned everyone).
fn to_endpoint(e: TrafficEndpoint) -> Endpoint {
    Endpoint {
        addr: e.addr,
        weight: e.weight,
        zone: e.zone,
        version: e.version,
        tags: e.tags,
        healthy: true,
    }
}

impl Resolver for RegistryResolver {
    fn subscribe(
        &self,
        service: &str,
        _filter: &InstanceFilter,
    ) -> watch::Receiver<Arc<Vec<Endpoint>>> {
        let mut subs = self.subs.lock();
        if let Some((tx, task)) = subs.get(service)
            && !task.is_finished()
        {
            return tx.subscribe();
        }
        let now: Vec<Endpoint> =
            traffic_endpoints_now(&self.registry.discover(service, &traffic_filter()))
                .into_iter()
                .map(to_endpoint)
                .collect();
        let (tx, rx) = watch::channel(Arc::new(now));
        let registry = self.registry.clone();
        let sender = tx.clone();
        let svc = service.to_string();
        let task = tokio::spawn(async move {
            let mut stream = Box::pin(registry.watch(&svc, traffic_filter()));
            while let Some(d) = stream.next().await {
                let eps: Vec<Endpoint> = traffic_endpoints(&d)
                    .await
                    .into_iter()
                    .map(to_endpoint)
                    .collect();
                // Publish only real changes: an unchanged list keeps balancer state.
                let same = *sender.borrow().as_ref() == eps;
                if !same {
                    sender.send_replace(Arc::new(eps));
                }
            }
        });
        subs.insert(service.to_string(), (tx, task));
        rx
    }
}
