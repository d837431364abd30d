//! Per-key GCRA limiting (per client IP, header value, route...) with
//! bounded memory.
//!
//! Keys live in `shards` mutex-protected maps holding one TAT each (16 bytes
//! plus the key). When a shard is full, a new key evicts: first an *idle* key
//! among a small sample (its bucket is full again, so forgetting it changes
//! nothing), else the sampled key with the oldest TAT (which then restarts
//! with a full burst: the only imprecision, and only under more than
//! `max_keys` concurrently active keys).
//!
//! Hot-key mode (`hot_keys: Some(k)`) limits only the `k` most frequent keys,
//! found with the Space-Saving heavy-hitters algorithm; other keys pass. Use
//! it when there are far too many keys to track but abuse comes from few.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::RateLimited;
use crate::config::{ConfigError, check};

/// Entries examined to choose an eviction victim.
const EVICTION_SAMPLE: usize = 16;

/// Per-key limits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyedConfig {
    /// Rate per key, calls per second (> 0).
    pub rate_per_sec: f64,
    /// Burst per key (>= 1).
    pub burst: u32,
    /// Most keys remembered at once (>= shards).
    pub max_keys: usize,
    /// Lock shards (1..=1024).
    pub shards: usize,
    /// Limit only the top-k keys (`None`: every key).
    pub hot_keys: Option<usize>,
}

impl Default for KeyedConfig {
    fn default() -> Self {
        Self {
            rate_per_sec: 10.0,
            burst: 20,
            max_keys: 1_000_000,
            shards: 64,
            hot_keys: None,
        }
    }
}

impl KeyedConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        super::GcraConfig {
            rate_per_sec: self.rate_per_sec,
            burst: self.burst,
        }
        .validate()?;
        check(
            (1..=1024).contains(&self.shards),
            "keyed.shards",
            self.shards,
            "1..=1024",
        )?;
        check(
            self.max_keys >= self.shards,
            "keyed.max_keys",
            self.max_keys,
            "at least `shards`",
        )?;
        if let Some(k) = self.hot_keys {
            check(
                (1..=100_000).contains(&k),
                "keyed.hot_keys",
                k,
                "1..=100000",
            )?;
        }
        Ok(())
    }
}

/// Space-Saving top-k counter: at most `k` counters, error bounded by the
/// smallest count.
#[derive(Debug)]
pub struct HotKeys<K> {
    capacity: usize,
    counts: HashMap<K, u64>,
}

impl<K: Hash + Eq + Clone> HotKeys<K> {
    /// Tracks the top `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            counts: HashMap::with_capacity(capacity.max(1)),
        }
    }

    /// Counts one occurrence of `key`; true if `key` is now tracked.
    pub fn observe(&mut self, key: &K) -> bool {
        if let Some(c) = self.counts.get_mut(key) {
            *c += 1;
            return true;
        }
        if self.counts.len() < self.capacity {
            self.counts.insert(key.clone(), 1);
            return true;
        }
        let Some((victim, min)) = self
            .counts
            .iter()
            .min_by_key(|e| *e.1)
            .map(|(k, c)| (k.clone(), *c))
        else {
            return false;
        };
        self.counts.remove(&victim);
        self.counts.insert(key.clone(), min + 1);
        true
    }

    /// The tracked keys with their (over-)estimated counts, most frequent first.
    pub fn top(&self) -> Vec<(K, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(k, c)| (k.clone(), *c)).collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    /// Whether `key` is tracked.
    pub fn contains(&self, key: &K) -> bool {
        self.counts.contains_key(key)
    }
}

/// A GCRA limiter per key with bounded memory.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    base: Instant,
    interval: AtomicU64,
    tolerance: AtomicU64,
    per_shard: usize,
    shards: Vec<Mutex<HashMap<K, u64>>>,
    hasher: std::collections::hash_map::RandomState,
    hot: Option<Mutex<HotKeys<K>>>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// An empty limiter at `now`.
    pub fn new(cfg: KeyedConfig, now: Instant) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let (interval, tolerance) = super::GcraConfig {
            rate_per_sec: cfg.rate_per_sec,
            burst: cfg.burst,
        }
        .nanos();
        Ok(Self {
            base: now,
            interval: AtomicU64::new(interval),
            tolerance: AtomicU64::new(tolerance),
            per_shard: cfg.max_keys.div_ceil(cfg.shards),
            shards: (0..cfg.shards)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: Default::default(),
            hot: cfg.hot_keys.map(|k| Mutex::new(HotKeys::new(k))),
        })
    }

    /// Changes the per-key rate and burst at run time.
    pub fn set_limit(&self, rate_per_sec: f64, burst: u32) -> Result<(), ConfigError> {
        let cfg = super::GcraConfig {
            rate_per_sec,
            burst,
        };
        cfg.validate()?;
        let (interval, tolerance) = cfg.nanos();
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance.store(tolerance, Ordering::Relaxed);
        Ok(())
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True if no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hot keys (hot-key mode only).
    pub fn hot_keys(&self) -> Vec<(K, u64)> {
        self.hot
            .as_ref()
            .map(|h| h.lock().top())
            .unwrap_or_default()
    }

    /// Admits one call for `key` at `now`.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), RateLimited> {
        if let Some(hot) = &self.hot {
            let mut hot = hot.lock();
            hot.observe(key);
            if !hot.contains(key) {
                return Ok(());
            }
        }
        let now_n = crate::nanos_since(self.base, now);
        let interval = self.interval.load(Ordering::Relaxed);
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let shard = &self.shards[(self.hasher.hash_one(key) % self.shards.len() as u64) as usize];
        let mut map = shard.lock();
        let tat = match map.get(key) {
            Some(&t) => t,
            None => {
                if map.len() >= self.per_shard {
                    evict(&mut map, now_n);
                }
                0
            }
        };
        let new_tat = tat.max(now_n).saturating_add(interval);
        if new_tat - now_n > tolerance {
            return Err(RateLimited {
                retry_after: Duration::from_nanos(new_tat - now_n - tolerance),
            });
        }
        map.insert(key.clone(), new_tat);
        Ok(())
    }
}

fn evict<K: Hash + Eq + Clone>(map: &mut HashMap<K, u64>, now_n: u64) {
    let mut victim: Option<(&K, u64)> = None;
    for (k, &tat) in map.iter().take(EVICTION_SAMPLE) {
        if tat <= now_n {
            victim = Some((k, tat));
            break;
        }
        if victim.is_none_or(|(_, t)| tat < t) {
            victim = Some((k, tat));
        }
    }
    if let Some(k) = victim.map(|(k, _)| k.clone()) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_independent_and_memory_bounded() {
        let t0 = Instant::now();
        let cfg = KeyedConfig {
            rate_per_sec: 1.0,
            burst: 2,
            max_keys: 100,
            shards: 4,
            hot_keys: None,
        };
        let l = KeyedLimiter::new(cfg, t0).unwrap();
        let (a, b) = ("a".to_string(), "b".to_string());
        l.check(&a, t0).unwrap();
        l.check(&a, t0).unwrap();
        assert!(l.check(&a, t0).is_err());
        l.check(&b, t0).unwrap();
        let keys: Vec<String> = (0..10_000).map(|i| format!("ip-{i}")).collect();
        for k in &keys {
            let _ = l.check(k, t0);
        }
        assert!(l.len() <= 100, "{}", l.len());
    }

    #[test]
    fn hot_key_mode_limits_only_heavy_hitters() {
        let t0 = Instant::now();
        let cfg = KeyedConfig {
            rate_per_sec: 1.0,
            burst: 5,
            hot_keys: Some(2),
            ..Default::default()
        };
        let l = KeyedLimiter::new(cfg, t0).unwrap();
        let mut rejected_hot = 0;
        for i in 0..200u32 {
            for _ in 0..2 {
                if l.check(&0u32, t0).is_err() {
                    rejected_hot += 1;
                }
            }
            l.check(&(1000 + i), t0).unwrap(); // many cold keys, each seen once
        }
        assert!(rejected_hot >= 390, "{rejected_hot}");
        assert_eq!(l.hot_keys()[0].0, 0);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// With no more keys than `max_keys`, every key on its own honours
        /// rate * d + burst.
        #[test]
        fn each_key_honours_its_bucket(
            rate in 1.0f64..100.0,
            burst in 1u32..10,
            calls in proptest::collection::vec((0u8..8, 0u64..50_000_000), 1..400),
        ) {
            let t0 = Instant::now();
            let cfg = KeyedConfig { rate_per_sec: rate, burst, max_keys: 8, shards: 1, hot_keys: None };
            let l = KeyedLimiter::new(cfg, t0).unwrap();
            let mut now = t0;
            let mut admitted: HashMap<u8, Vec<Instant>> = HashMap::new();
            for (key, gap) in calls {
                now += Duration::from_nanos(gap);
                if l.check(&key, now).is_ok() { admitted.entry(key).or_default().push(now); }
            }
            for times in admitted.values() {
                for i in 0..times.len() {
                    for j in i..times.len() {
                        let d = (times[j] - times[i]).as_secs_f64();
                        prop_assert!(((j - i + 1) as f64) <= rate * d + f64::from(burst) + 1e-6);
                    }
                }
            }
            prop_assert!(l.len() <= 8);
        }
    }
}
