//! Outlier detection: passive ejection of misbehaving endpoints, with
//! Envoy's semantics and its safety limits made stricter.
//!
//! * **Consecutive failures**: an endpoint failing `consecutive_failures`
//!   calls in a row is ejected at once.
//! * **Success rate**: every `interval_ms`, among endpoints with at least
//!   `request_volume` calls in the interval (and only if at least
//!   `minimum_hosts` qualify), those whose success rate is below
//!   `mean - stdev_factor x stdev` are ejected.
//! * An ejection lasts `base_ejection_ms x times ejected` (capped by
//!   `max_ejection_ms`); the multiplier decreases by one for every interval
//!   an endpoint stays healthy.
//! * **Return on a trial**: when its time is up an endpoint is not simply
//!   back: it is *on trial*. One request at a time may go to it
//!   ([`OutlierDetector::begin_trial`]); a success returns it, a failure
//!   ejects it again at once for longer. A trial whose outcome never comes
//!   (the caller went away) frees the slot after `interval_ms`.
//! * **Limits**: at most `max_ejection_percent` of the endpoints are ejected
//!   at once (rounded down, so one of two at 50 %), and a lone endpoint is
//!   never ejected: passive detection cannot turn one bad answer into an
//!   outage. **Panic**: when fewer than `panic_threshold_percent` of the
//!   endpoints are available (endpoints left the set after others were
//!   ejected), [`OutlierDetector::panic`] says so and balancers ignore
//!   ejections, spreading load over every endpoint rather than failing.
//!
//! [`OutlierDetector`] is a plain core (no I/O, explicit `now`); the
//! [`Balance`](crate::balance::Balance) service and the gateway's clusters
//! feed it and skip endpoints it does not [`admit`](OutlierDetector::admits).
//! Ejections are counted in `meshwork_outlier_ejections_total`.
//!
//! ```
//! use meshwork_resilience::outlier::{OutlierConfig, OutlierDetector};
//! use std::time::Duration;
//! use tokio::time::Instant;
//!
//! let cfg = OutlierConfig { consecutive_failures: Some(3), base_ejection_ms: 30_000, ..Default::default() };
//! let mut detector = OutlierDetector::new(cfg).unwrap();
//! for host in ["10.0.0.1:80", "10.0.0.2:80"] {
//!     detector.add(host);
//! }
//! let now = Instant::now();
//! for _ in 0..3 {
//!     detector.record(&"10.0.0.1:80", false, now);
//! }
//! assert!(detector.is_ejected(&"10.0.0.1:80", now));
//! let later = now + Duration::from_secs(30);
//! detector.tick(later);
//! assert!(!detector.is_ejected(&"10.0.0.1:80", later), "its time is up: on trial");
//! assert!(detector.begin_trial(&"10.0.0.1:80", later), "one trial request");
//! assert!(!detector.admits(&"10.0.0.1:80", later), "one at a time");
//! detector.record(&"10.0.0.1:80", true, later);
//! assert!(detector.admits(&"10.0.0.1:80", later), "back after a success");
//! ```

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::{ConfigError, check};

/// Success-rate ejection settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SuccessRateConfig {
    /// Endpoints with enough volume needed for the analysis (>= 1).
    pub minimum_hosts: u32,
    /// Calls in the interval for an endpoint to be judged (>= 1).
    pub request_volume: u32,
    /// Ejection threshold: `mean - stdev_factor x stdev` (> 0).
    pub stdev_factor: f64,
}

impl Default for SuccessRateConfig {
    fn default() -> Self {
        Self {
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

/// Outlier detection configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Eject after this many failures in a row (`None`: off).
    pub consecutive_failures: Option<u32>,
    /// Success-rate ejection (`None`: off).
    pub success_rate: Option<SuccessRateConfig>,
    /// Analysis interval, milliseconds; also how long a trial request may
    /// hold an endpoint's trial slot.
    pub interval_ms: u64,
    /// First ejection time, milliseconds.
    pub base_ejection_ms: u64,
    /// Longest ejection time, milliseconds.
    pub max_ejection_ms: u64,
    /// Most endpoints ejected at once, percent of the endpoints, rounded
    /// down (0..=100; 0 turns ejection off). Default 50.
    pub max_ejection_percent: u32,
    /// Below this share of available endpoints, percent, ejections are
    /// ignored and every endpoint takes traffic (0..=100; 0: never).
    /// Default 50.
    pub panic_threshold_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: Some(5),
            success_rate: Some(SuccessRateConfig::default()),
            interval_ms: 10_000,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.consecutive_failures {
            check(n >= 1, "outlier.consecutive_failures", n, "at least 1")?;
        }
        if let Some(sr) = self.success_rate {
            check(
                sr.minimum_hosts >= 1,
                "outlier.success_rate.minimum_hosts",
                sr.minimum_hosts,
                ">= 1",
            )?;
            check(
                sr.request_volume >= 1,
                "outlier.success_rate.request_volume",
                sr.request_volume,
                ">= 1",
            )?;
            check(
                sr.stdev_factor > 0.0 && sr.stdev_factor.is_finite(),
                "outlier.success_rate.stdev_factor",
                sr.stdev_factor,
                "> 0",
            )?;
        }
        check(
            self.interval_ms >= 1,
            "outlier.interval_ms",
            self.interval_ms,
            "at least 1",
        )?;
        check(
            self.base_ejection_ms >= 1,
            "outlier.base_ejection_ms",
            self.base_ejection_ms,
            "at least 1",
        )?;
        check(
            self.max_ejection_ms >= self.base_ejection_ms,
            "outlier.max_ejection_ms",
            self.max_ejection_ms,
            "at least base_ejection_ms",
        )?;
        check(
            self.interval_ms <= 86_400_000,
            "outlier.interval_ms",
            self.interval_ms,
            "at most one day",
        )?;
        check(
            self.max_ejection_ms <= 86_400_000,
            "outlier.max_ejection_ms",
            self.max_ejection_ms,
            "at most one day",
        )?;
        check(
            self.max_ejection_percent <= 100,
            "outlier.max_ejection_percent",
            self.max_ejection_percent,
            "0..=100",
        )?;
        check(
            self.panic_threshold_percent <= 100,
            "outlier.panic_threshold_percent",
            self.panic_threshold_percent,
            "0..=100",
        )
    }
}

/// Why an endpoint was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Too many failures in a row.
    ConsecutiveFailures,
    /// Success rate far below its peers.
    SuccessRate,
    /// Its trial request failed.
    FailedTrial,
}

impl Reason {
    /// A stable name (`consecutive_failures`, `success_rate`, `failed_trial`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ConsecutiveFailures => "consecutive_failures",
            Reason::SuccessRate => "success_rate",
            Reason::FailedTrial => "failed_trial",
        }
    }
}

/// What the detector did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutlierEvent<K> {
    /// `key` is out until `until`.
    Ejected {
        /// The endpoint.
        key: K,
        /// When it may be tried again.
        until: Instant,
        /// Why.
        reason: Reason,
    },
    /// `key`'s ejection time is up: its next request is a trial.
    OnTrial {
        /// The endpoint.
        key: K,
    },
    /// `key` passed its trial and is back.
    Returned {
        /// The endpoint.
        key: K,
    },
}

/// Where an endpoint stands, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    /// Taking traffic.
    Active,
    /// Out until `until`, for `reason` (ejected `times` times in a row).
    Ejected {
        /// When it goes on trial.
        until: Instant,
        /// Why it was ejected.
        reason: Reason,
        /// The ejection multiplier.
        times: u32,
    },
    /// Taking one trial request at a time.
    OnTrial {
        /// Why it was ejected.
        reason: Reason,
    },
}

#[derive(Debug, Default, Clone)]
struct Host {
    consecutive: u32,
    successes: u64,
    total: u64,
    ejected_until: Option<Instant>,
    reason: Option<Reason>,
    times_ejected: u32,
    on_trial: bool,
    trial_started: Option<Instant>,
}

/// The detector core.
#[derive(Debug)]
pub struct OutlierDetector<K> {
    cfg: OutlierConfig,
    hosts: HashMap<K, Host>,
    next_tick: Option<Instant>,
}

impl<K: Hash + Eq + Clone> OutlierDetector<K> {
    /// No endpoints yet.
    pub fn new(cfg: OutlierConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            hosts: HashMap::new(),
            next_tick: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &OutlierConfig {
        &self.cfg
    }

    /// Starts tracking `key`.
    pub fn add(&mut self, key: K) {
        self.hosts.entry(key).or_default();
    }

    /// Stops tracking `key`.
    pub fn remove(&mut self, key: &K) {
        self.hosts.remove(key);
    }

    /// Endpoints tracked.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True if no endpoint is tracked.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether `key` is ejected at `now` (its time not up yet).
    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.hosts
            .get(key)
            .and_then(|h| h.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Whether a request may go to `key` now: not ejected, and if on trial,
    /// no other trial request holds its slot. Unknown keys are admitted.
    pub fn admits(&self, key: &K, now: Instant) -> bool {
        match self.hosts.get(key) {
            None => true,
            Some(h) => {
                let ejected = h.ejected_until.is_some_and(|u| u > now);
                !(ejected || h.on_trial && self.trial_held(h, now))
            }
        }
    }

    fn trial_held(&self, h: &Host, now: Instant) -> bool {
        h.trial_started.is_some_and(|t| {
            now.saturating_duration_since(t) < Duration::from_millis(self.cfg.interval_ms)
        })
    }

    /// Call with the endpoint a request was sent to: if it is on trial,
    /// takes its trial slot and returns true (the request is its trial).
    pub fn begin_trial(&mut self, key: &K, now: Instant) -> bool {
        match self.hosts.get_mut(key) {
            Some(h) if h.on_trial && h.ejected_until.is_none_or(|u| u <= now) => {
                h.trial_started = Some(now);
                true
            }
            _ => false,
        }
    }

    /// A trial request ended without a verdict (cancelled, or the client's
    /// fault): frees the slot for the next one.
    pub fn release_trial(&mut self, key: &K) {
        if let Some(h) = self.hosts.get_mut(key) {
            h.trial_started = None;
        }
    }

    /// True while too few endpoints are available
    /// (`panic_threshold_percent`): balancers should then ignore ejections.
    pub fn panic(&self, now: Instant) -> bool {
        let n = self.hosts.len();
        if n == 0 {
            return false;
        }
        let ejected = self.ejected_count(now);
        (n - ejected) * 100 < n * self.cfg.panic_threshold_percent as usize
    }

    /// Where `key` stands at `now`.
    pub fn state(&self, key: &K, now: Instant) -> HostState {
        let Some(h) = self.hosts.get(key) else {
            return HostState::Active;
        };
        let reason = h.reason.unwrap_or(Reason::ConsecutiveFailures);
        match h.ejected_until {
            Some(until) if until > now => HostState::Ejected {
                until,
                reason,
                times: h.times_ejected,
            },
            Some(_) => HostState::OnTrial { reason },
            None if h.on_trial => HostState::OnTrial { reason },
            None => HostState::Active,
        }
    }

    /// Endpoints ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.hosts
            .values()
            .filter(|h| h.ejected_until.is_some_and(|u| u > now))
            .count()
    }

    fn may_eject(&self, now: Instant) -> bool {
        let hosts = self.hosts.len();
        // A lone endpoint is never ejected: there is nowhere else to go.
        hosts >= 2
            && (self.ejected_count(now) + 1) * 100 <= hosts * self.cfg.max_ejection_percent as usize
    }

    fn eject(&mut self, key: &K, reason: Reason, now: Instant) -> Option<OutlierEvent<K>> {
        if self.is_ejected(key, now) || !self.may_eject(now) {
            return None;
        }
        let cfg = self.cfg;
        let h = self.hosts.get_mut(key)?;
        h.times_ejected = h.times_ejected.saturating_add(1);
        let ms = cfg
            .base_ejection_ms
            .saturating_mul(u64::from(h.times_ejected))
            .min(cfg.max_ejection_ms);
        let until = now + Duration::from_millis(ms);
        h.ejected_until = Some(until);
        h.reason = Some(reason);
        h.on_trial = true;
        h.trial_started = None;
        h.consecutive = 0;
        metrics::counter!("meshwork_outlier_ejections_total").increment(1);
        Some(OutlierEvent::Ejected {
            key: key.clone(),
            until,
            reason,
        })
    }

    /// Records a call to `key`.
    pub fn record(&mut self, key: &K, success: bool, now: Instant) -> Option<OutlierEvent<K>> {
        let limit = self.cfg.consecutive_failures;
        let h = self.hosts.get_mut(key)?;
        h.total += 1;
        if h.on_trial && h.ejected_until.is_none_or(|u| u <= now) {
            h.ejected_until = None;
            h.trial_started = None;
            if success {
                h.on_trial = false;
                h.successes += 1;
                h.consecutive = 0;
                return Some(OutlierEvent::Returned { key: key.clone() });
            }
            // Failed its trial: out again at once, for longer. If the
            // limits forbid it, it stays on trial (one request at a time).
            return self.eject(key, Reason::FailedTrial, now);
        }
        if success {
            h.successes += 1;
            h.consecutive = 0;
            return None;
        }
        h.consecutive += 1;
        if limit.is_some_and(|l| h.consecutive >= l) {
            return self.eject(key, Reason::ConsecutiveFailures, now);
        }
        None
    }

    /// Runs the interval work if due: ends ejections whose time is up
    /// (the endpoint goes on trial), success-rate analysis, multiplier
    /// decay. Call it often; it does little between intervals.
    pub fn tick(&mut self, now: Instant) -> Vec<OutlierEvent<K>> {
        let mut events = Vec::new();
        for (k, h) in self.hosts.iter_mut() {
            if h.ejected_until.is_some_and(|u| u <= now) {
                h.ejected_until = None;
                events.push(OutlierEvent::OnTrial { key: k.clone() });
            }
        }
        let interval = Duration::from_millis(self.cfg.interval_ms);
        match self.next_tick {
            None => {
                self.next_tick = Some(now + interval);
                return events;
            }
            Some(t) if now < t => return events,
            Some(_) => self.next_tick = Some(now + interval),
        }
        if let Some(sr) = self.cfg.success_rate {
            let rates: Vec<(K, f64)> = self
                .hosts
                .iter()
                .filter(|(_, h)| {
                    h.ejected_until.is_none()
                        && !h.on_trial
                        && h.total >= u64::from(sr.request_volume)
                })
                .map(|(k, h)| (k.clone(), h.successes as f64 / h.total as f64))
                .collect();
            if rates.len() >= sr.minimum_hosts as usize {
                let n = rates.len() as f64;
                let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
                let var = rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n;
                let threshold = mean - sr.stdev_factor * var.sqrt();
                for (k, rate) in rates {
                    if rate < threshold {
                        events.extend(self.eject(&k, Reason::SuccessRate, now));
                    }
                }
            }
        }
        for h in self.hosts.values_mut() {
            if h.ejected_until.is_none() && !h.on_trial && h.times_ejected > 0 {
                h.times_ejected -= 1;
            }
            h.successes = 0;
            h.total = 0;
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(n: u32) -> OutlierDetector<u32> {
        let cfg = OutlierConfig {
            consecutive_failures: Some(3),
            success_rate: Some(SuccessRateConfig {
                minimum_hosts: 3,
                request_volume: 10,
                stdev_factor: 1.0,
            }),
            interval_ms: 1_000,
            base_ejection_ms: 10_000,
            max_ejection_ms: 25_000,
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
        };
        let mut d = OutlierDetector::new(cfg).unwrap();
        (0..n).for_each(|k| d.add(k));
        d
    }

    #[test]
    fn consecutive_failures_eject_then_a_trial_decides() {
        let t0 = Instant::now();
        let mut d = detector(4);
        d.record(&0, false, t0);
        d.record(&0, false, t0);
        let e = d.record(&0, false, t0).unwrap();
        assert_eq!(
            e,
            OutlierEvent::Ejected {
                key: 0,
                until: t0 + Duration::from_secs(10),
                reason: Reason::ConsecutiveFailures
            }
        );
        assert!(!d.admits(&0, t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert!(!d.is_ejected(&0, t1));
        assert_eq!(d.tick(t1), vec![OutlierEvent::OnTrial { key: 0 }]);
        assert!(d.admits(&0, t1));
        assert!(d.begin_trial(&0, t1));
        assert!(!d.admits(&0, t1), "one trial at a time");
        assert!(!d.begin_trial(&1, t1), "an active endpoint is no trial");
        // The trial fails: out again at once, for twice as long.
        assert!(matches!(
            d.record(&0, false, t1),
            Some(OutlierEvent::Ejected {
                reason: Reason::FailedTrial,
                ..
            })
        ));
        assert!(d.is_ejected(&0, t1 + Duration::from_secs(19)));
        let t2 = t1 + Duration::from_secs(20);
        d.tick(t2);
        assert!(d.begin_trial(&0, t2));
        assert_eq!(
            d.record(&0, true, t2),
            Some(OutlierEvent::Returned { key: 0 })
        );
        assert_eq!(d.state(&0, t2), HostState::Active);
        assert!(d.admits(&0, t2));
        assert!(!d.begin_trial(&0, t2), "back: no more trials");
    }

    #[test]
    fn an_abandoned_trial_frees_its_slot() {
        let t0 = Instant::now();
        let mut d = detector(2);
        for _ in 0..3 {
            d.record(&0, false, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        d.tick(t1);
        assert!(d.begin_trial(&0, t1));
        assert!(!d.admits(&0, t1 + Duration::from_millis(999)));
        assert!(
            d.admits(&0, t1 + Duration::from_secs(1)),
            "held for interval_ms at most"
        );
        d.release_trial(&0);
        assert!(d.admits(&0, t1));
    }

    #[test]
    fn a_lone_endpoint_is_never_ejected() {
        let t0 = Instant::now();
        let mut d = detector(1);
        for _ in 0..100 {
            assert_eq!(d.record(&0, false, t0), None);
        }
        assert!(d.admits(&0, t0));
        d.add(1);
        for _ in 0..3 {
            d.record(&0, false, t0);
        }
        assert!(d.is_ejected(&0, t0), "with a second endpoint it may go");
        for _ in 0..3 {
            d.record(&1, false, t0);
        }
        assert!(!d.is_ejected(&1, t0), "but only one of two at 50 %");
    }

    #[test]
    fn panic_when_too_few_are_available() {
        let t0 = Instant::now();
        let mut d = detector(4);
        for k in 0..2 {
            for _ in 0..3 {
                d.record(&k, false, t0);
            }
        }
        assert_eq!(d.ejected_count(t0), 2);
        assert!(!d.panic(t0), "2 of 4 available is the threshold");
        // Two healthy endpoints leave the set: 0 of 2 available.
        d.remove(&2);
        d.remove(&3);
        assert!(d.panic(t0));
        assert!(!d.panic(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn max_ejection_percent_is_respected() {
        let t0 = Instant::now();
        let mut d = detector(4);
        for k in 0..4 {
            for _ in 0..3 {
                d.record(&k, false, t0);
            }
        }
        assert_eq!(d.ejected_count(t0), 2, "50 % of 4");
    }

    #[test]
    fn success_rate_outlier_is_ejected() {
        let t0 = Instant::now();
        let mut d = detector(5);
        d.tick(t0);
        for k in 0..5u32 {
            for i in 0..20 {
                // Host 4 fails every other call (never 3 in a row).
                d.record(&k, k != 4 || i % 2 == 0, t0);
            }
        }
        let events = d.tick(t0 + Duration::from_secs(1));
        assert!(matches!(
            events.as_slice(),
            [OutlierEvent::Ejected {
                key: 4,
                reason: Reason::SuccessRate,
                ..
            }]
        ));
    }

    proptest::proptest! {
        /// Whatever the outcomes and timing: never more than the allowed
        /// share of endpoints is ejected (a lone one never), an
        /// ejection never outlasts `max_ejection_ms`, and every ejected
        /// endpoint is back after that long.
        #[test]
        fn ejections_respect_the_caps(
            hosts in 1u32..12,
            percent in 0u32..=100,
            events in proptest::collection::vec((0u32..12, proptest::bool::weighted(0.3), 0u64..3_000), 1..300),
        ) {
            let cfg = OutlierConfig {
                consecutive_failures: Some(2),
                success_rate: Some(SuccessRateConfig { minimum_hosts: 2, request_volume: 3, stdev_factor: 0.5 }),
                interval_ms: 1_000,
                base_ejection_ms: 2_000,
                max_ejection_ms: 5_000,
                max_ejection_percent: percent,
                panic_threshold_percent: 50,
            };
            let mut d = OutlierDetector::new(cfg).unwrap();
            (0..hosts).for_each(|h| d.add(h));
            let allowed = if hosts < 2 { 0 } else { (hosts * percent / 100) as usize };
            let mut now = Instant::now();
            for (host, success, dt) in events {
                now += Duration::from_millis(dt);
                let mut evs: Vec<_> = d.record(&(host % hosts), success, now).into_iter().collect();
                evs.extend(d.tick(now));
                for e in evs {
                    if let OutlierEvent::Ejected { until, .. } = e {
                        proptest::prop_assert!(until <= now + Duration::from_millis(5_000));
                    }
                }
                proptest::prop_assert!(d.ejected_count(now) <= allowed, "{} > {}", d.ejected_count(now), allowed);
                proptest::prop_assert_eq!(d.ejected_count(now + Duration::from_millis(5_000)), 0);
            }
        }
    }
}
