//! The live route table: compiled plans bound to runtime state (clusters,
//! breakers, budgets, bulkheads, limiters, counters). State is kept across
//! applies when a route's settings for it did not change, so a reload does
//! not reset breakers, ejections, limiter buckets or latency estimates.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use meshwork_resilience::breaker::BreakerCore;
use meshwork_resilience::limit::concurrency::BulkheadLayer;
use meshwork_resilience::retry::{RetryBudget, RetryBudgetConfig};
use serde::Serialize;
use tokio::time::Instant;

use crate::limits::Limiter;
use crate::resolver::Resolver;
use crate::route::compile::{ActionPlan, RoutePlan, Source, TargetPlan};
use crate::route::model::{LbPolicy, RouteSet};
use crate::upstream::Cluster;
use meshwork_resilience::outlier::OutlierConfig;
use meshwork_telemetry::TraceContext;

/// Upper bounds (microseconds) of the latency buckets kept per route; the last
/// bucket counts everything slower. A reader that keeps two snapshots gets the
/// latency distribution (and its p99) over the time between them.
pub const LATENCY_BUCKETS_US: [u64; 17] = [
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 30_000_000,
];

/// The quantile `q` (0..=1) of a bucketed distribution, in milliseconds: the
/// upper bound of the bucket holding it (`None` when empty; the overflow
/// bucket reports the largest bound).
pub fn bucket_quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            let us = LATENCY_BUCKETS_US
                .get(i)
                .or(LATENCY_BUCKETS_US.last())
                .copied()
                .unwrap_or(0);
            return Some(us as f64 / 1000.0);
        }
    }
    None
}

/// Live counters of one route.
#[derive(Debug)]
pub(crate) struct RouteStats {
    pub(crate) requests: AtomicU64,
    /// Requests per latency bucket ([`LATENCY_BUCKETS_US`] plus overflow).
    pub(crate) latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    pub(crate) by_class: [AtomicU64; 5],
    pub(crate) rate_limited: AtomicU64,
    /// Requests whose client failed (aborted or malformed body).
    pub(crate) client_faults: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) m_by_class: [metrics::Counter; 5],
    pub(crate) m_client_faults: metrics::Counter,
    pub(crate) m_latency: meshwork_telemetry::exemplar::Histogram,
    pub(crate) m_rate_limited: metrics::Counter,
}

impl RouteStats {
    fn new(route: &str) -> Self {
        let class = |c: &'static str| metrics::counter!("meshwork_gateway_requests_total", "route" => route.to_owned(), "status_class" => c);
        Self {
            requests: AtomicU64::new(0),
            by_class: Default::default(),
            latency: Default::default(),
            rate_limited: AtomicU64::new(0),
            client_faults: AtomicU64::new(0),
            active: AtomicU64::new(0),
            m_by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            m_latency: meshwork_telemetry::exemplar::Histogram::new(
                "meshwork_gateway_request_duration_seconds",
                &[("route", route)],
            ),
            m_rate_limited: metrics::counter!("meshwork_gateway_rate_limited_total", "route" => route.to_owned()),
            m_client_faults: metrics::counter!("meshwork_gateway_client_faults_total", "route" => route.to_owned()),
        }
    }

    /// Counts one answered request; a sampled `trace` may become the
    /// latency bucket's exemplar.
    pub(crate) fn record(&self, status: u16, secs: f64, trace: Option<&TraceContext>) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.by_class[i].fetch_add(1, Ordering::Relaxed);
        self.m_by_class[i].increment(1);
        self.m_latency.record(secs, trace);
        let us = (secs * 1e6) as u64;
        let b = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.latency[b].fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of a route for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct RouteCounters {
    /// Route name.
    pub route: String,
    /// Requests answered.
    pub requests: u64,
    /// Responses by status class 1xx..5xx.
    pub status_classes: [u64; 5],
    /// Requests rejected by a rate limit.
    pub rate_limited: u64,
    /// Requests the client broke (aborted or malformed body): never counted
    /// against an upstream.
    pub client_faults: u64,
    /// Requests in progress.
    pub active: u64,
    /// Requests per latency bucket (bounds in [`LATENCY_BUCKETS_US`], then overflow).
    pub latency_buckets: Vec<u64>,
    /// p99 latency since the route was created, milliseconds (bucket upper bound).
    pub p99_ms: Option<f64>,
}

impl RouteCounters {
    fn with_p99(mut self) -> Self {
        self.p99_ms = bucket_quantile_ms(&self.latency_buckets, 0.99);
        self
    }
}

impl RouteStats {
    pub(crate) fn counters(&self, route: &str) -> RouteCounters {
        RouteCounters {
            route: route.to_owned(),
            requests: self.requests.load(Ordering::Relaxed),
            status_classes: std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            client_faults: self.client_faults.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            p99_ms: None,
            latency_buckets: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
        .with_p99()
    }
}

/// A target bound to its cluster and breaker.
#[derive(Debug)]
pub(crate) struct TargetRt {
    pub(crate) name: String,
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) breaker: Option<(Arc<BreakerCore>, metrics::Gauge)>,
    /// TLS to its endpoints.
    pub(crate) tls: Option<Arc<crate::pool::UpstreamTls>>,
}

/// Runtime state of a forward action.
#[derive(Debug)]
pub(crate) struct ForwardRt {
    pub(crate) targets: Vec<TargetRt>,
    pub(crate) mirror: Option<(Arc<Cluster>, f64)>,
    pub(crate) budget: Option<Arc<RetryBudget>>,
    pub(crate) bulkhead: Option<BulkheadLayer>,
}

/// A route ready to serve.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) plan: RoutePlan,
    pub(crate) forward: Option<ForwardRt>,
    pub(crate) limiters: Vec<Arc<Limiter>>,
    pub(crate) stats: Arc<RouteStats>,
}

/// The table the gateway serves from.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    pub(crate) routes: Vec<Arc<Route>>,
    pub(crate) set: RouteSet,
    pub(crate) version: u64,
}

/// Runtime state reusable across applies, by a key of its settings.
#[derive(Default)]
pub(crate) struct StateCache {
    clusters: HashMap<String, Arc<Cluster>>,
    breakers: HashMap<String, Arc<BreakerCore>>,
    budgets: HashMap<String, Arc<RetryBudget>>,
    bulkheads: HashMap<String, BulkheadLayer>,
    limiters: HashMap<String, Arc<Limiter>>,
    stats: HashMap<String, Arc<RouteStats>>,
}

impl StateCache {
    /// Every cluster in use.
    pub(crate) fn clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values()
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn take_or<T: Clone>(
    old: &mut HashMap<String, T>,
    new: &mut HashMap<String, T>,
    key: String,
    make: impl FnOnce() -> Option<T>,
) -> Option<T> {
    if let Some(v) = new.get(&key) {
        return Some(v.clone());
    }
    let v = match old.remove(&key) {
        Some(v) => v,
        None => make()?,
    };
    new.insert(key, v.clone());
    Some(v)
}

fn cluster_for(
    old: &mut StateCache,
    new: &mut StateCache,
    resolver: &dyn Resolver,
    splits: &meshwork_coord::rollout::tally::Splits,
    target: &TargetPlan,
    policy: LbPolicy,
    outlier: Option<OutlierConfig>,
) -> Arc<Cluster> {
    let key = format!("{:?}|{:?}|{}", target.source, policy, json(&outlier));
    let make = || {
        let name = target.source.describe();
        Some(Arc::new(match &target.source {
            Source::Static(addrs) => Cluster::fixed(name, addrs, policy, outlier),
            Source::Service { name: svc, filter } => {
                let rx = resolver.subscribe(svc, filter);
                // A route pinned to one version keeps to it; the rollout
                // splits only routes open to every version.
                let split = filter.version.is_none().then(|| splits.slot(svc));
                Cluster::new(name, rx, None, filter.clone(), policy, outlier, split)
            }
        }))
    };
    take_or(&mut old.clusters, &mut new.clusters, key, make)
        .unwrap_or_else(|| Arc::new(Cluster::fixed(target.source.describe(), &[], policy, None)))
}

/// Binds `plans` to runtime state, reusing what `old` has.
pub(crate) fn build(
    plans: Vec<RoutePlan>,
    set: RouteSet,
    version: u64,
    old: &mut StateCache,
    resolver: &dyn Resolver,
    splits: &meshwork_coord::rollout::tally::Splits,
) -> (RouteTable, StateCache) {
    let mut new = StateCache::default();
    let now = Instant::now();
    let mut routes = Vec::with_capacity(plans.len());
    for plan in plans {
        let name = plan.name.clone();
        let stats = take_or(&mut old.stats, &mut new.stats, name.clone(), || {
            Some(Arc::new(RouteStats::new(&name)))
        })
        .unwrap_or_else(|| Arc::new(RouteStats::new(&name)));
        let mut limiters = Vec::new();
        for (i, rule) in plan.limits.iter().enumerate() {
            let key = format!("{name}#{i}|{}", json(rule));
            if let Some(l) = take_or(&mut old.limiters, &mut new.limiters, key, || {
                Limiter::build(&name, i, rule).ok().map(Arc::new)
            }) {
                limiters.push(l);
            }
        }
        let forward = match &plan.action {
            ActionPlan::Forward(f) => {
                let targets = f
                    .targets
                    .iter()
                    .map(|t| {
                        let cluster =
                            cluster_for(old, &mut new, resolver, splits, t, f.lb.policy, f.outlier);
                        let breaker = f.breaker.as_ref().and_then(|b| {
                            let key = format!("{name}/{}|{}|{}", t.name, cluster.name, json(b));
                            let core = take_or(&mut old.breakers, &mut new.breakers, key, || {
                                BreakerCore::new(b.clone(), now).ok().map(Arc::new)
                            })?;
                            let gauge = metrics::gauge!("meshwork_gateway_breaker_state",
                                "route" => name.clone(), "target" => t.name.clone());
                            Some((core, gauge))
                        });
                        TargetRt {
                            name: t.name.clone(),
                            cluster,
                            breaker,
                            tls: f.tls.as_ref().map(|cfg| {
                                Arc::new(crate::pool::UpstreamTls::new(
                                    cfg.clone(),
                                    t.tls_name.as_deref(),
                                ))
                            }),
                        }
                    })
                    .collect();
                let mirror = f.mirror.as_ref().map(|(t, pct)| {
                    (
                        cluster_for(old, &mut new, resolver, splits, t, LbPolicy::P2c, None),
                        *pct,
                    )
                });
                // Retries and failover draw on one budget per route (the
                // default budget when only failover is on).
                let budget_cfg = match (&f.retry, f.failover) {
                    (Some(r), _) => Some(r.budget),
                    (None, true) => Some(RetryBudgetConfig::default()),
                    (None, false) => None,
                };
                let budget = budget_cfg.and_then(|b| {
                    let key = format!("{name}|{}", json(&b));
                    take_or(&mut old.budgets, &mut new.budgets, key, || {
                        RetryBudget::new(b, now).ok().map(Arc::new)
                    })
                });
                let bulkhead = f.bulkhead.as_ref().and_then(|b| {
                    let key = format!("{name}|{}", json(b));
                    take_or(&mut old.bulkheads, &mut new.bulkheads, key, || {
                        BulkheadLayer::new(*b).ok()
                    })
                });
                Some(ForwardRt {
                    targets,
                    mirror,
                    budget,
                    bulkhead,
                })
            }
            _ => None,
        };
        routes.push(Arc::new(Route {
            plan,
            forward,
            limiters,
            stats,
        }));
    }
    (
        RouteTable {
            routes,
            set,
            version,
        },
        new,
    )
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let mut counts = vec![0u64; LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(bucket_quantile_ms(&counts, 0.99), None);
        counts[3] = 98; // <= 1 ms
        counts[6] = 2; // <= 10 ms
        assert_eq!(bucket_quantile_ms(&counts, 0.5), Some(1.0));
        assert_eq!(bucket_quantile_ms(&counts, 0.99), Some(10.0));
        counts[LATENCY_BUCKETS_US.len()] = 100; // overflow
        assert_eq!(bucket_quantile_ms(&counts, 0.99), Some(30_000.0));
    }
}
