//! Upstream clusters: the live endpoint set of one target (from a
//! [`Resolver`](crate::Resolver) or a static list), balanced by a
//! meshwork-resilience picker, with peak-EWMA load and passive outlier
//! detection per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::uri::Authority;
use meshwork_resilience::balance::{
    DEFAULT_DECAY, DEFAULT_RTT, EndpointId, Maglev, P2c, PeakEwma, PickContext, Picker,
    RandomPicker, Ring, SmoothWrr, stable_hash,
};
use meshwork_resilience::classify::Outcome;
use meshwork_resilience::outlier::{HostState, OutlierConfig, OutlierDetector, OutlierEvent};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::resolver::{Endpoint, InstanceFilter};
use crate::route::model::LbPolicy;
use meshwork_coord::rollout::tally::{Live, ServiceSplit};

/// Counters of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
}

struct Slot {
    ep: Endpoint,
    authority: Authority,
    load: Arc<PeakEwma>,
    stats: Arc<EndpointStats>,
}

/// The endpoint chosen for one try.
#[derive(Clone)]
pub(crate) struct Picked {
    pub(crate) addr: SocketAddr,
    pub(crate) authority: Authority,
    pub(crate) load: Arc<PeakEwma>,
    pub(crate) stats: Arc<EndpointStats>,
    /// This try is the endpoint's trial after an ejection: if it fails,
    /// the request goes to another endpoint.
    pub(crate) trial: bool,
    /// The rollout split in force when it was picked, and whether the
    /// endpoint runs its new version (the try is counted for it).
    pub(crate) rollout: Option<(Arc<Live>, bool)>,
}

struct State {
    rx: watch::Receiver<Arc<Vec<Endpoint>>>,
    picker: Box<dyn Picker + Sync>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    by_addr: HashMap<SocketAddr, EndpointId>,
    outlier: Option<OutlierDetector<SocketAddr>>,
}

/// One balanced set of endpoints.
pub(crate) struct Cluster {
    pub(crate) name: String,
    filter: InstanceFilter,
    state: Mutex<State>,
    /// Keeps a static source's channel open.
    _static_tx: Option<watch::Sender<Arc<Vec<Endpoint>>>>,
    /// The service's rollout split (registry sources only).
    split: Option<Arc<ServiceSplit>>,
    ejections: metrics::Counter,
    m_success: metrics::Counter,
    m_failure: metrics::Counter,
    m_latency: meshwork_telemetry::exemplar::Histogram,
    pub(crate) ejections_total: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn picker_for(policy: LbPolicy) -> Box<dyn Picker + Sync> {
    match policy {
        LbPolicy::P2c => Box::new(P2c::default()),
        LbPolicy::Wrr => Box::new(SmoothWrr::default()),
        LbPolicy::Random => Box::new(RandomPicker::default()),
        LbPolicy::RingHash => Box::new(Ring::default()),
        LbPolicy::Maglev => Box::new(Maglev::default()),
    }
}

/// Endpoint state for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Zone.
    pub zone: Option<String>,
    /// Version.
    pub version: Option<String>,
    /// Health as reported by the resolver.
    pub healthy: bool,
    /// Whether outlier detection has ejected it now.
    pub ejected: bool,
    /// Outlier detection's view: state, why, until when.
    pub outlier: OutlierSnapshot,
    /// Calls in flight.
    pub in_flight: u64,
    /// Peak-EWMA latency estimate, milliseconds.
    pub latency_ewma_ms: f64,
    /// Tries sent.
    pub requests: u64,
    /// Tries failed.
    pub failures: u64,
}

/// Where outlier detection has put an endpoint, for the admin API and the
/// console ("why is it out").
#[derive(Debug, Clone, Serialize)]
pub struct OutlierSnapshot {
    /// `active`, `ejected` or `trial` (back from ejection: one request at a
    /// time until one succeeds).
    pub state: &'static str,
    /// Why it was ejected (`consecutive_failures`, `success_rate`,
    /// `failed_trial`); absent when active.
    pub reason: Option<&'static str>,
    /// Milliseconds until its trial, when ejected.
    pub remaining_ms: Option<u64>,
    /// Consecutive ejections (each one lasts longer).
    pub times_ejected: u32,
    /// True while the cluster is in panic (too few endpoints admitted):
    /// ejections are then ignored.
    pub panic: bool,
}

impl OutlierSnapshot {
    fn of(d: Option<&OutlierDetector<SocketAddr>>, addr: &SocketAddr, now: Instant) -> Self {
        let panic = d.is_some_and(|d| d.panic(now));
        match d.map(|d| d.state(addr, now)) {
            None | Some(HostState::Active) => Self {
                state: "active",
                reason: None,
                remaining_ms: None,
                times_ejected: 0,
                panic,
            },
            Some(HostState::Ejected {
                until,
                reason,
                times,
            }) => Self {
                state: "ejected",
                reason: Some(reason.as_str()),
                remaining_ms: Some(until.saturating_duration_since(now).as_millis() as u64),
                times_ejected: times,
                panic,
            },
            Some(HostState::OnTrial { reason }) => Self {
                state: "trial",
                reason: Some(reason.as_str()),
                remaining_ms: None,
                times_ejected: 0,
                panic,
            },
        }
    }
}

/// Cluster state for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterSnapshot {
    /// Cluster name (`service:NAME` or `static:ADDRS`).
    pub name: String,
    /// Endpoints receiving traffic (healthy and matching the filter).
    pub endpoints: Vec<EndpointSnapshot>,
    /// Endpoints known to the resolver but excluded (unhealthy, filtered, weight 0).
    pub excluded: usize,
    /// Ejections so far.
    pub ejections_total: u64,
}

impl Cluster {
    pub(crate) fn new(
        name: String,
        rx: watch::Receiver<Arc<Vec<Endpoint>>>,
        static_tx: Option<watch::Sender<Arc<Vec<Endpoint>>>>,
        filter: InstanceFilter,
        policy: LbPolicy,
        outlier: Option<OutlierConfig>,
        split: Option<Arc<ServiceSplit>>,
    ) -> Self {
        let outlier = outlier.and_then(|c| OutlierDetector::new(c).ok());
        let ejections =
            metrics::counter!("meshwork_gateway_ejections_total", "cluster" => name.clone());
        let m_success = metrics::counter!("meshwork_gateway_upstream_requests_total",
            "cluster" => name.clone(), "outcome" => "success");
        let m_failure = metrics::counter!("meshwork_gateway_upstream_requests_total",
            "cluster" => name.clone(), "outcome" => "failure");
        let m_latency = meshwork_telemetry::exemplar::Histogram::new(
            "meshwork_gateway_upstream_duration_seconds",
            &[("cluster", &name)],
        );
        let mut rx = rx;
        rx.mark_changed();
        let c = Self {
            name,
            filter,
            state: Mutex::new(State {
                rx,
                picker: picker_for(policy),
                slots: Vec::new(),
                free: Vec::new(),
                by_addr: HashMap::new(),
                outlier,
            }),
            _static_tx: static_tx,
            split,
            ejections,
            m_success,
            m_failure,
            m_latency,
            ejections_total: AtomicU64::new(0),
        };
        c.state.lock().sync(&c.filter);
        c
    }

    /// A cluster over a fixed list.
    pub(crate) fn fixed(
        name: String,
        addrs: &[SocketAddr],
        policy: LbPolicy,
        outlier: Option<OutlierConfig>,
    ) -> Self {
        let eps: Vec<Endpoint> = addrs.iter().map(|a| Endpoint::new(*a)).collect();
        let (tx, rx) = watch::channel(Arc::new(eps));
        Self::new(
            name,
            rx,
            Some(tx),
            InstanceFilter::default(),
            policy,
            outlier,
            None,
        )
    }

    /// Chooses an endpoint, avoiding `exclude` when another is available.
    /// Endpoints outlier detection does not admit are skipped unless too
    /// few are admitted (panic: then every endpoint takes traffic). An
    /// endpoint back from ejection takes the request as its trial
    /// ([`Picked::trial`]). During a rollout, the request's version (by its
    /// pin, else the weight; `retry` prefers the stable one) is chosen
    /// first, and an endpoint of the other is taken only when that version
    /// has none available.
    pub(crate) fn pick(
        &self,
        hash: Option<u64>,
        exclude: &[SocketAddr],
        headers: &http::HeaderMap,
        retry: bool,
    ) -> Option<Picked> {
        let now = Instant::now();
        let live = self.split.as_ref().and_then(|s| s.current());
        let lane = live
            .as_ref()
            .map(|l| (l, l.wants_new_by(headers, retry, hash)));
        let mut st = self.state.lock();
        if st.rx.has_changed().unwrap_or(false) {
            st.sync(&self.filter);
        }
        if let Some(d) = st.outlier.as_mut() {
            for e in d.tick(now) {
                if let OutlierEvent::OnTrial { key } = e {
                    tracing::info!(cluster = %self.name, endpoint = %key, "ejection over: the next request is a trial");
                }
            }
        }
        let id = {
            let State {
                picker,
                slots,
                outlier,
                ..
            } = &mut *st;
            let slots: &Vec<Option<Slot>> = slots;
            let outlier = outlier.as_ref();
            let panic = outlier.is_some_and(|d| d.panic(now));
            let load = |id: EndpointId| match slots.get(id.0 as usize) {
                Some(Some(s)) => s.load.load(now),
                _ => f64::INFINITY,
            };
            let avail = |id: EndpointId, with_exclude: bool, in_lane: bool| match slots
                .get(id.0 as usize)
            {
                Some(Some(s)) => {
                    let excluded = with_exclude && exclude.contains(&s.ep.addr);
                    let admitted = panic || outlier.is_none_or(|d| d.admits(&s.ep.addr, now));
                    let lane_ok = !in_lane
                        || lane
                            .is_none_or(|(l, canary)| l.is_new(s.ep.version.as_deref()) == canary);
                    !excluded && admitted && lane_ok
                }
                _ => false,
            };
            let in_lane = |id: EndpointId| avail(id, true, true);
            let strict = |id: EndpointId| avail(id, true, false);
            let laned = lane.and_then(|_| {
                picker.pick(&PickContext {
                    request_hash: hash,
                    available: &in_lane,
                    load: &load,
                })
            });
            let first = laned.or_else(|| {
                picker.pick(&PickContext {
                    request_hash: hash,
                    available: &strict,
                    load: &load,
                })
            });
            match first {
                Some(id) => Some(id),
                None if !exclude.is_empty() => {
                    let relaxed = |id: EndpointId| avail(id, false, false);
                    let ctx = PickContext {
                        request_hash: hash,
                        available: &relaxed,
                        load: &load,
                    };
                    picker.pick(&ctx)
                }
                None => None,
            }
        }?;
        let State { slots, outlier, .. } = &mut *st;
        let s = slots.get(id.0 as usize)?.as_ref()?;
        let trial = outlier
            .as_mut()
            .is_some_and(|d| d.begin_trial(&s.ep.addr, now));
        Some(Picked {
            addr: s.ep.addr,
            authority: s.authority.clone(),
            load: s.load.clone(),
            stats: s.stats.clone(),
            trial,
            rollout: live.map(|l| {
                let new = l.is_new(s.ep.version.as_deref());
                (l, new)
            }),
        })
    }

    /// Records the outcome of one try on `addr` (`Ignored`: the client's
    /// fault or cancelled; it frees a trial slot and counts for nothing).
    /// A sampled `trace` may become the latency bucket's exemplar.
    pub(crate) fn record(
        &self,
        picked: &Picked,
        outcome: Outcome,
        rtt: Duration,
        trace: Option<&meshwork_telemetry::TraceContext>,
    ) {
        let now = Instant::now();
        let addr = picked.addr;
        match outcome {
            Outcome::Success => self.m_success.increment(1),
            Outcome::Failure => self.m_failure.increment(1),
            Outcome::Ignored => {
                if let Some(d) = self.state.lock().outlier.as_mut() {
                    d.release_trial(&addr);
                }
                return;
            }
        }
        self.m_latency.record(rtt.as_secs_f64(), trace);
        let mut st = self.state.lock();
        let Some(d) = st.outlier.as_mut() else {
            return;
        };
        match d.record(&addr, outcome == Outcome::Success, now) {
            Some(OutlierEvent::Ejected { key, until, reason }) => {
                self.ejections.increment(1);
                self.ejections_total.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(cluster = %self.name, endpoint = %key, reason = reason.as_str(),
                    for_ms = until.saturating_duration_since(now).as_millis() as u64, "endpoint ejected");
            }
            Some(OutlierEvent::Returned { key }) => {
                tracing::info!(cluster = %self.name, endpoint = %key, "endpoint passed its trial and is back");
            }
            _ => {}
        }
    }

    pub(crate) fn snapshot(&self) -> ClusterSnapshot {
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.rx.has_changed().unwrap_or(false) {
            st.sync(&self.filter);
        }
        let all = st.rx.borrow().len();
        let endpoints: Vec<EndpointSnapshot> = st
            .slots
            .iter()
            .flatten()
            .map(|s| EndpointSnapshot {
                addr: s.ep.addr,
                weight: s.ep.weight,
                zone: s.ep.zone.clone(),
                version: s.ep.version.clone(),
                healthy: s.ep.healthy,
                ejected: st
                    .outlier
                    .as_ref()
                    .is_some_and(|d| d.is_ejected(&s.ep.addr, now)),
                outlier: OutlierSnapshot::of(st.outlier.as_ref(), &s.ep.addr, now),
                in_flight: s.load.in_flight(),
                latency_ewma_ms: s.load.estimate(now) / 1e6,
                requests: s.stats.requests.load(Ordering::Relaxed),
                failures: s.stats.failures.load(Ordering::Relaxed),
            })
            .collect();
        ClusterSnapshot {
            name: self.name.clone(),
            excluded: all.saturating_sub(endpoints.len()),
            endpoints,
            ejections_total: self.ejections_total.load(Ordering::Relaxed),
        }
    }
}

impl State {
    /// Brings the slots in line with the resolver's current list.
    fn sync(&mut self, filter: &InstanceFilter) {
        let list = self.rx.borrow_and_update().clone();
        let wanted: HashMap<SocketAddr, &Endpoint> = list
            .iter()
            .filter(|e| e.healthy && e.weight > 0 && filter.matches(e))
            .map(|e| (e.addr, e))
            .collect();
        let gone: Vec<SocketAddr> = self
            .by_addr
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(id) = self.by_addr.remove(&addr) {
                self.picker.remove(id);
                self.slots[id.0 as usize] = None;
                self.free.push(id.0);
                if let Some(d) = self.outlier.as_mut() {
                    d.remove(&addr);
                }
            }
        }
        let mut addrs: Vec<&SocketAddr> = wanted.keys().collect();
        addrs.sort();
        for addr in addrs {
            let ep = wanted[addr];
            let key_hash = stable_hash(addr);
            if let Some(&id) = self.by_addr.get(addr) {
                if let Some(Some(slot)) = self.slots.get_mut(id.0 as usize)
                    && slot.ep != *ep
                {
                    if slot.ep.weight != ep.weight {
                        self.picker.set_weight(id, key_hash, ep.weight);
                    }
                    slot.ep = ep.clone();
                }
                continue;
            }
            let Ok(authority) = Authority::try_from(addr.to_string()) else {
                continue;
            };
            let id = match self.free.pop() {
                Some(i) => EndpointId(i),
                None => {
                    self.slots.push(None);
                    EndpointId((self.slots.len() - 1) as u32)
                }
            };
            self.slots[id.0 as usize] = Some(Slot {
                ep: ep.clone(),
                authority,
                load: Arc::new(PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, Instant::now())),
                stats: Arc::new(EndpointStats::default()),
            });
            self.by_addr.insert(*addr, id);
            self.picker.insert(id, key_hash, ep.weight);
            if let Some(d) = self.outlier.as_mut() {
                d.add(*addr);
            }
        }
    }
}

/// Releases an endpoint's in-flight count if a try is dropped midway.
pub(crate) struct TryGuard {
    load: Option<Arc<PeakEwma>>,
    start: Instant,
}

impl TryGuard {
    pub(crate) fn start(p: &Picked) -> Self {
        p.load.start();
        p.stats.requests.fetch_add(1, Ordering::Relaxed);
        Self {
            load: Some(p.load.clone()),
            start: Instant::now(),
        }
    }

    /// The try ended (with a response or an error): records its latency.
    pub(crate) fn end(mut self) -> Duration {
        let now = Instant::now();
        let rtt = now.saturating_duration_since(self.start);
        if let Some(l) = self.load.take() {
            l.end(rtt, now);
        }
        rtt
    }
}

impl Drop for TryGuard {
    fn drop(&mut self) {
        if let Some(l) = self.load.take() {
            l.cancel();
        }
    }
}

/// Hash of a request for consistent hashing.
pub(crate) fn hash_bytes(b: &[u8]) -> u64 {
    stable_hash(b)
}
