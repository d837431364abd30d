//! What a caller of a service keeps of its rollout: the split in force (which
//! version a request goes to) and the per-version figures of the current
//! window that the analysis reads. The gateway, the SDK's HTTP client and the
//! transaction coordinator each keep [`Splits`], fed and published by
//! [`follow`].
//!
//! Each called service has one [`ServiceSplit`] slot. On a hot path a request
//! pays one atomic load of the slot and, during a rollout, one random number;
//! each try adds three relaxed counter increments to the version it reached.
//! The figures reset whenever the rollout's window changes (a new step), and
//! [`follow`] publishes them once a second while they change.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderMap;
use parking_lot::Mutex;

use super::{Counts, Figures, LATENCY_BUCKETS, Rollouts, Split, latency_bucket};

/// One version's live counters.
#[derive(Debug)]
struct Side {
    requests: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Side {
    fn new() -> Side {
        Side {
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let c = c.load(Ordering::Relaxed);
                    (c > 0).then_some((i as u8, c))
                })
                .collect(),
        }
    }
}

/// A split in force with the counters of its window.
#[derive(Debug)]
pub struct Live {
    /// The split.
    pub split: Split,
    canary: Side,
    stable: Side,
}

impl Live {
    /// Whether a request goes to the new version: pinned by its header or
    /// cookie, else by the weight (a retry prefers the stable version
    /// while both take traffic).
    pub fn wants_new(&self, headers: &HeaderMap, retry: bool) -> bool {
        self.split.wants_new(headers, retry)
    }

    /// As [`Live::wants_new`], by the request's hash when it has one.
    pub fn wants_new_by(&self, headers: &HeaderMap, retry: bool, hash: Option<u64>) -> bool {
        self.split.wants_new_by(headers, retry, hash)
    }

    /// Whether an endpoint with `version` runs the new version.
    pub fn is_new(&self, version: Option<&str>) -> bool {
        self.split.is_new(version)
    }

    /// Counts one try on an endpoint of the new version (`new`) or not.
    pub fn record(&self, new: bool, failed: bool, rtt: Duration) {
        if !self.split.counting {
            return;
        }
        let side = if new { &self.canary } else { &self.stable };
        side.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            side.failures.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        side.latency[latency_bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn figures(&self) -> Figures {
        Figures {
            id: self.split.id.clone(),
            window: self.split.window,
            canary: self.canary.counts(),
            stable: self.stable.counts(),
        }
    }
}

/// The split of one service (empty without a rollout).
#[derive(Debug, Default)]
pub struct ServiceSplit {
    live: ArcSwapOption<Live>,
}

impl ServiceSplit {
    /// The split in force, if any.
    pub fn current(&self) -> Option<Arc<Live>> {
        self.live.load_full()
    }

    /// Puts `split` in force; counters start afresh only for a new window.
    fn set(&self, split: Option<Split>) {
        let cur = self.live.load();
        match (cur.as_ref(), split) {
            (_, None) => {
                if cur.is_some() {
                    self.live.store(None);
                }
            }
            (Some(l), Some(s)) if l.split == s => {}
            (_, Some(s)) => self.live.store(Some(Arc::new(Live {
                split: s,
                canary: Side::new(),
                stable: Side::new(),
            }))),
        }
    }
}

/// Every service's split slot.
#[derive(Debug, Default)]
pub struct Splits {
    by_service: Mutex<HashMap<String, Arc<ServiceSplit>>>,
    current: Mutex<HashMap<String, Split>>,
    /// What was last published per service: nothing is written while it
    /// does not change.
    published: Mutex<HashMap<String, Figures>>,
}

impl Splits {
    /// The slot of `service` (made on first use, filled from the current set).
    pub fn slot(&self, service: &str) -> Arc<ServiceSplit> {
        let mut m = self.by_service.lock();
        m.entry(service.to_string())
            .or_insert_with(|| {
                let s = Arc::new(ServiceSplit::default());
                s.set(self.current.lock().get(service).cloned());
                s
            })
            .clone()
    }

    /// Puts the rollouts' splits (by service) in force.
    pub fn set_all(&self, splits: HashMap<String, Split>) {
        let m = self.by_service.lock();
        for (service, slot) in m.iter() {
            slot.set(splits.get(service).cloned());
        }
        *self.current.lock() = splits;
    }

    /// The figures of every counting split that changed since the last call
    /// (by service), to publish.
    pub fn changed_figures(&self) -> Vec<(String, Figures)> {
        let slots: Vec<(String, Arc<ServiceSplit>)> = self
            .by_service
            .lock()
            .iter()
            .map(|(s, v)| (s.clone(), v.clone()))
            .collect();
        let mut published = self.published.lock();
        let mut out = Vec::new();
        for (service, slot) in slots {
            let Some(live) = slot.current().filter(|l| l.split.counting) else {
                published.remove(&service);
                continue;
            };
            let f = live.figures();
            if published.get(&service) != Some(&f) {
                published.insert(service.clone(), f.clone());
                out.push((service, f));
            }
        }
        out
    }
}

/// How often figures are published (while they change).
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Keeps `splits` on the store's rollouts and publishes their figures as
/// `reporter` once a second while they change, each on the lease `lease`
/// names at that moment (a session lease: a dead reporter's figures go with
/// it). Runs until the rollouts' copy is dropped.
pub async fn follow(
    rollouts: Rollouts,
    splits: Arc<Splits>,
    reporter: String,
    lease: impl Fn() -> i64 + Send,
) {
    let mut changes = rollouts.changes();
    splits.set_all(rollouts.splits());
    let mut every = tokio::time::interval(PUBLISH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                splits.set_all(rollouts.splits());
            }
            _ = every.tick() => {
                for (service, figures) in splits.changed_figures() {
                    if let Err(e) = rollouts.publish(&service, &reporter, &figures, lease()).await {
                        // Published again at the next change.
                        splits.published.lock().remove(&service);
                        tracing::warn!(service, error = %e, "could not publish rollout figures");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{Pin, PinKind};

    fn split(weight: u8, pin: Option<Pin>) -> Split {
        Split {
            id: "r".into(),
            window: 1,
            to_version: "2".into(),
            weight,
            pin,
            counting: true,
        }
    }

    #[test]
    fn pins_and_weights_choose_the_version() {
        let splits = Splits::default();
        let slot = splits.slot("web");
        assert!(slot.current().is_none());
        let pin = Pin {
            kind: PinKind::Cookie,
            name: "beta".into(),
            value: "1".into(),
        };
        splits.set_all([("web".to_string(), split(0, Some(pin)))].into());
        let live = slot.current().unwrap();
        let mut h = HeaderMap::new();
        assert!(!live.wants_new(&h, false));
        h.insert(http::header::COOKIE, "a=b; beta=1".parse().unwrap());
        assert!(
            live.wants_new(&h, false),
            "the cookie pins before the first step"
        );
        splits.set_all([("web".to_string(), split(30, None))].into());
        let live = slot.current().unwrap();
        let n = (0..10_000)
            .filter(|_| live.wants_new(&HeaderMap::new(), false))
            .count();
        assert!((2_500..3_500).contains(&n), "{n} of 10000 at 30 %");
        assert!(
            !live.wants_new(&HeaderMap::new(), true),
            "retries go stable"
        );
        splits.set_all(HashMap::new());
        assert!(slot.current().is_none());
    }

    #[test]
    fn figures_count_by_the_endpoints_version_and_reset_with_the_window() {
        let splits = Splits::default();
        let slot = splits.slot("web");
        splits.set_all([("web".to_string(), split(50, None))].into());
        let live = slot.current().unwrap();
        live.record(live.is_new(Some("2")), true, Duration::from_millis(3));
        live.record(live.is_new(Some("1")), false, Duration::from_millis(1));
        live.record(live.is_new(None), false, Duration::from_millis(1));
        let f = splits.changed_figures();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].1.canary.requests, f[0].1.canary.failures), (1, 1));
        assert_eq!(f[0].1.stable.requests, 2);
        assert!(
            splits.changed_figures().is_empty(),
            "unchanged: nothing to publish"
        );
        // The same split again keeps the counters; a new window resets them.
        splits.set_all([("web".to_string(), split(50, None))].into());
        assert_eq!(slot.current().unwrap().canary.counts().requests, 1);
        let mut next = split(80, None);
        next.window = 2;
        splits.set_all([("web".to_string(), next)].into());
        assert_eq!(slot.current().unwrap().canary.counts().requests, 0);
    }
}
