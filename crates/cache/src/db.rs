//! The keyspace: 16 databases, each split into shards by key hash (one lock per shard,
//! so the runtime's workers serve different keys at once), each shard a hash map of
//! entries and an ordered index of expiry times.
//!
//! Expiry is lazy (a key past its time is treated as absent and removed when touched)
//! and active: [`Keyspace::expire_cycle`] removes keys in expiry order with a bound on
//! the work per call, so many keys expiring at once never stop the world.

use std::collections::{BTreeSet, VecDeque};

use indexmap::IndexMap;
use std::hash::BuildHasher;

use bytes::Bytes;

use crate::key::Key;
use parking_lot::{Mutex, MutexGuard};

/// Databases, as Redis' default `databases 16`.
pub const DATABASES: usize = 16;

/// A value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string (bytes).
    Str(Bytes),
    /// A list.
    List(VecDeque<Bytes>),
    /// A hash (fields in insertion order). Boxed, as the set and the sorted set: a
    /// value is then as small as a string's, and every key's entry with it.
    Hash(Box<indexmap::IndexMap<Bytes, Bytes>>),
    /// A set (an index set: a random member and a removal are O(1)).
    Set(Box<indexmap::IndexSet<Bytes>>),
    /// A sorted set.
    ZSet(Box<crate::zset::ZSet>),
}

impl Value {
    /// The name `TYPE` answers.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Hash(_) => "hash",
            Value::Set(_) => "set",
            Value::ZSet(_) => "zset",
        }
    }

    /// Approximate bytes it holds (for `used_memory`); aggregates are sampled
    /// ([`crate::types::estimate`]).
    pub(crate) fn weight(&self) -> usize {
        use crate::types::estimate;
        match self {
            Value::Str(b) => b.len(),
            Value::List(l) => {
                // Both ends: a queue's producers and consumers work there.
                let (front, back) = if l.len() <= 32 {
                    (l.len(), 0)
                } else {
                    (16, 16)
                };
                estimate(
                    l.len(),
                    l.iter()
                        .take(front)
                        .chain(l.iter().rev().take(back))
                        .map(|b| b.len() + 16),
                )
            }
            Value::Hash(h) => estimate(h.len(), h.iter().map(|(k, v)| k.len() + v.len() + 48)),
            Value::Set(s) => estimate(s.len(), s.iter().map(|b| b.len() + 32)),
            Value::ZSet(z) => z.weight(),
        }
    }
}

/// One key's value and expiry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// When it expires (ms since the epoch), if ever: 8 bytes, not an
    /// `Option<u64>`'s 16 (see [`Entry::expire_at`]).
    expire: Option<std::num::NonZeroU64>,
    /// Last access, in milliseconds since the process started, wrapping (LRU: ages
    /// are compared modulo 2^32, so up to 24 days apart).
    pub access: u32,
    /// Logarithmic access frequency (LFU), as Redis' 8-bit counter.
    pub freq: u8,
}

/// A new key's LFU counter, as Redis' `LFU_INIT_VAL`: a new key is not the first
/// evicted.
const LFU_INIT: u8 = 5;

/// A time as a non-zero one: 0 (the epoch, long past) becomes 1 ms, just as past.
fn at_least_one(t: u64) -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(t).unwrap_or(std::num::NonZeroU64::MIN)
}

impl Entry {
    /// When it expires (ms since the epoch), if ever.
    pub fn expire_at(&self) -> Option<u64> {
        self.expire.map(std::num::NonZeroU64::get)
    }

    /// Sets or clears its expiry (the shard's expiry index is the caller's).
    pub(crate) fn set_expire_at(&mut self, at: Option<u64>) {
        self.expire = at.map(at_least_one);
    }

    /// An entry just written.
    pub fn new(value: Value, expire_at: Option<u64>) -> Entry {
        Entry {
            value,
            expire: expire_at.map(at_least_one),
            access: clock(),
            freq: LFU_INIT,
        }
    }

    /// Counts an access: the LRU clock, and the LFU counter incremented with a
    /// probability that falls as it grows (Redis' `lfu-log-factor` 10).
    fn touch(&mut self, now_ms: u64) {
        let now = now_ms as u32;
        self.freq = decayed(self.freq, self.access, now);
        self.access = now;
        if self.freq < 255 {
            let base = u64::from(self.freq.saturating_sub(LFU_INIT));
            if base == 0 || fast_random().is_multiple_of(base * 10 + 1) {
                self.freq += 1;
            }
        }
    }
}

/// The LFU counter after one decrement per minute since the last access (Redis'
/// `lfu-decay-time` 1).
fn decayed(freq: u8, access: u32, now: u32) -> u8 {
    let minutes = now.wrapping_sub(access) / 60_000;
    freq.saturating_sub(u8::try_from(minutes).unwrap_or(u8::MAX))
}

/// The LRU clock: the wall clock's milliseconds, wrapping at 2^32 (the commands pass
/// the time they already read).
fn clock() -> u32 {
    crate::cmd::now_ms() as u32
}

/// A cheap per-thread random number (xorshift; for the LFU counter's coin, called on
/// every read, where a cryptographic generator would cost more than the read).
fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// Bytes counted per key beyond its value (and a key too long to be inline): the
/// map's entry (hash, inline key, entry) and index slot, the value's allocation
/// header and rounding (measured: 212 bytes of RSS per key of 16-byte keys and
/// 100-byte values, redis-server 211, 2026-12-06).
const ENTRY_OVERHEAD: usize = 112;

/// How `maxmemory` picks what to evict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Evict nothing: writes are refused with `OOM` past the limit.
    NoEviction,
    /// The least recently used of a sample of all keys.
    AllKeysLru,
    /// The least frequently used of a sample of all keys.
    AllKeysLfu,
    /// The least recently used of a sample of keys with a time to live.
    VolatileLru,
    /// The nearest to expiring of a sample of keys with a time to live.
    VolatileTtl,
}

impl Policy {
    /// Redis' name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::NoEviction => "noeviction",
            Policy::AllKeysLru => "allkeys-lru",
            Policy::AllKeysLfu => "allkeys-lfu",
            Policy::VolatileLru => "volatile-lru",
            Policy::VolatileTtl => "volatile-ttl",
        }
    }

    /// From Redis' name.
    pub fn parse(s: &str) -> Option<Policy> {
        [
            Policy::NoEviction,
            Policy::AllKeysLru,
            Policy::AllKeysLfu,
            Policy::VolatileLru,
            Policy::VolatileTtl,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }

    /// A candidate's rank: lower is evicted first.
    fn rank(self, e: &Entry, now: u32) -> Option<u64> {
        match self {
            Policy::NoEviction => None,
            // The oldest access (largest age) first.
            Policy::AllKeysLru => Some(u64::from(u32::MAX - now.wrapping_sub(e.access))),
            Policy::AllKeysLfu => Some(u64::from(decayed(e.freq, e.access, now))),
            Policy::VolatileLru => e
                .expire_at()
                .map(|_| u64::from(u32::MAX - now.wrapping_sub(e.access))),
            Policy::VolatileTtl => e.expire_at(),
        }
    }
}

/// A connection's "a watched key was written" flag.
pub type WatchFlag = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// `WATCH`: for each watched `(db, key)`, the flags of the connections watching it; a
/// write to the key sets them (its `EXEC` then fails). Writes look only when something
/// is watched.
#[derive(Default)]
pub struct Watches {
    keys: Mutex<std::collections::HashMap<(usize, Bytes), Vec<WatchFlag>>>,
    count: std::sync::atomic::AtomicUsize,
}

impl Watches {
    /// Watches `key` of `db` with `flag`.
    pub fn watch(&self, db: usize, key: &Bytes, flag: &WatchFlag) {
        self.keys
            .lock()
            .entry((db, Bytes::copy_from_slice(key)))
            .or_default()
            .push(flag.clone());
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Stops watching what `flag` watched.
    pub fn unwatch(&self, watched: &[(usize, Bytes)], flag: &WatchFlag) {
        let mut keys = self.keys.lock();
        for (db, key) in watched {
            let k = (*db, key.clone());
            if let Some(list) = keys.get_mut(&k) {
                let before = list.len();
                list.retain(|f| !std::sync::Arc::ptr_eq(f, flag));
                self.count
                    .fetch_sub(before - list.len(), std::sync::atomic::Ordering::AcqRel);
                if list.is_empty() {
                    keys.remove(&k);
                }
            }
        }
    }

    /// A write to `key` of `db` (every key of `db` when `None`).
    fn touched(&self, db: usize, key: Option<&[u8]>) {
        use std::sync::atomic::Ordering;
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let keys = self.keys.lock();
        match key {
            Some(k) => {
                if let Some(list) = keys.get(&(db, Bytes::copy_from_slice(k))) {
                    for f in list {
                        f.store(true, Ordering::Release);
                    }
                }
            }
            None => {
                for ((d, _), list) in keys.iter() {
                    if *d == db {
                        for f in list {
                            f.store(true, Ordering::Release);
                        }
                    }
                }
            }
        }
    }
}

/// A shard: part of one database's keys.
pub struct Shard {
    /// Keys to entries; an `IndexMap` so that eviction samples random keys in O(1),
    /// as Redis' `dictGetRandomKey`.
    map: IndexMap<Key, Entry>,
    /// `(expire_at, key)` of every key with a time to live.
    expiries: BTreeSet<(u64, Key)>,
    /// Approximate bytes held.
    used: usize,
    /// The keyspace's totals (its bytes are what `maxmemory` is checked against).
    total: std::sync::Arc<Totals>,
    /// Its database's number (for `WATCH`).
    db: usize,
    /// The keyspace's watched keys.
    watches: std::sync::Arc<Watches>,
}

impl Shard {
    /// Sets this shard's byte count, and the keyspace's total with it.
    fn set_used(&mut self, used: usize) {
        use std::sync::atomic::Ordering;
        if used == self.used {
            // The same size (an overwrite): no write to the shared total.
        } else if used > self.used {
            self.total
                .used
                .fetch_add(used - self.used, Ordering::Relaxed);
        } else {
            self.total
                .used
                .fetch_sub(self.used - used, Ordering::Relaxed);
        }
        self.used = used;
    }

    fn weigh(key: &[u8], e: &Entry) -> usize {
        // A key up to `key::INLINE` bytes lives in the entry; a longer one in its own
        // allocation (a 16-byte header).
        let key_heap = if key.len() > crate::key::INLINE {
            key.len() + 16
        } else {
            0
        };
        key_heap + e.value.weight() + ENTRY_OVERHEAD
    }

    /// The live entry of `key` (one past its time is absent; the active expiry, or
    /// the next write of the key, removes it). One hash lookup.
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        let e = self
            .map
            .get_mut(key)
            .filter(|e| e.expire_at().is_none_or(|t| t > now))?;
        e.touch(now);
        Some(e)
    }

    /// The live entry of `key`, to change in place. Call [`Shard::reweigh`] after
    /// changing its value's size.
    pub fn get_mut(&mut self, key: &[u8], now: u64) -> Option<&mut Entry> {
        // Taken to change it (reads through here count as writes for WATCH: an EXEC
        // may fail that need not have, never the other way).
        self.watches.touched(self.db, Some(key));
        let e = self
            .map
            .get_mut(key)
            .filter(|e| e.expire_at().is_none_or(|t| t > now))?;
        e.touch(now);
        Some(e)
    }

    fn expire_if_due(&mut self, key: &[u8], now: u64) {
        let due = self
            .map
            .get(key)
            .and_then(|e| e.expire_at())
            .is_some_and(|t| t <= now);
        if due {
            self.remove(key);
            self.total
                .expired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("meshwork_cache_expired_keys_total").increment(1);
        }
    }

    /// Sets `key` (replacing what was there, its expiry included). The key is copied:
    /// a request's arguments are slices of its connection's read buffer, which a stored
    /// slice would keep alive whole.
    pub fn insert(&mut self, key: Bytes, entry: Entry) {
        self.watches.touched(self.db, Some(&key));
        let new_weight = Self::weigh(&key, &entry);
        let new_expiry = entry.expire_at();
        // One lookup: replace in place, or add a copy of the key.
        match self.map.get_mut(&key[..]) {
            Some(slot) => {
                if let Some(old) = slot.expire_at() {
                    self.expiries.remove(&(old, Key::new(&key)));
                }
                let old_weight = Self::weigh(&key, slot);
                *slot = entry;
                self.set_used(self.used.saturating_sub(old_weight) + new_weight);
            }
            None => {
                self.map.insert(Key::new(&key), entry);
                self.set_used(self.used + new_weight);
            }
        }
        if let Some(t) = new_expiry {
            self.expiries.insert((t, Key::new(&key)));
        }
    }

    /// Removes `key`; its entry if it was there (expired or not).
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let (k, e) = self.map.swap_remove_entry(key)?;
        self.watches.touched(self.db, Some(key));
        if let Some(t) = e.expire_at() {
            self.expiries.remove(&(t, k.clone()));
        }
        self.set_used(self.used.saturating_sub(Self::weigh(&k, &e)));
        Some(e)
    }

    /// Changes the expiry of a live key; false if there is none.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>, now: u64) -> bool {
        // As the entry keeps it (0 is 1), so that the index and the entry agree.
        let at = at.map(|t| t.max(1));
        self.watches.touched(self.db, Some(key));
        self.expire_if_due(key, now);
        let Some((k, e)) = self.map.get_key_value(key) else {
            return false;
        };
        let k = k.clone();
        if let Some(old) = e.expire_at() {
            self.expiries.remove(&(old, k.clone()));
        }
        if let Some(t) = at {
            self.expiries.insert((t, k.clone()));
        }
        if let Some(e) = self.map.get_mut(key) {
            e.set_expire_at(at);
        }
        true
    }

    /// Recounts `key`'s weight after its value changed size by `before` → now.
    pub fn reweigh(&mut self, key: &[u8], before: usize) {
        if let Some((k, e)) = self.map.get_key_value(key) {
            let w = Self::weigh(k, e);
            self.set_used(self.used.saturating_sub(before) + w);
        }
    }

    /// Recounts after a value changed in place from `old_len` to `new_len` bytes.
    pub fn resized(&mut self, old_len: usize, new_len: usize) {
        self.set_used(self.used.saturating_sub(old_len) + new_len);
    }

    /// The current weight of `key` (for [`Shard::reweigh`]).
    pub fn weight_of(&self, key: &[u8]) -> usize {
        self.map
            .get_key_value(key)
            .map_or(0, |(k, e)| Self::weigh(k, e))
    }

    /// `SCAN` over this shard: visits up to `steps` positions downward from `pos`
    /// (the number of positions not yet visited), calling `f` for each live key;
    /// returns the positions left. Downward, because removal moves the last key into
    /// the gap: a key present all along is never skipped (it may come twice).
    pub fn scan(
        &self,
        pos: usize,
        steps: usize,
        now: u64,
        mut f: impl FnMut(&[u8], &Entry),
    ) -> usize {
        let mut pos = pos.min(self.map.len());
        let mut n = 0;
        while pos > 0 && n < steps {
            pos -= 1;
            n += 1;
            if let Some((k, e)) = self.map.get_index(pos)
                && e.expire_at().is_none_or(|t| t > now)
            {
                f(k, e);
            }
        }
        pos
    }

    /// Every entry held (expired ones not yet removed included).
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], &Entry)> {
        self.map.iter().map(|(k, e)| (k.as_bytes(), e))
    }

    /// Live keys (expired ones not yet removed are skipped).
    pub fn keys(&self, now: u64) -> impl Iterator<Item = &[u8]> {
        self.map
            .iter()
            .filter(move |(_, e)| e.expire_at().is_none_or(|t| t > now))
            .map(|(k, _)| k.as_bytes())
    }

    /// A random live key: a few random probes, then the first live one.
    pub fn random_key(&self, now: u64) -> Option<&[u8]> {
        let n = self.map.len();
        if n == 0 {
            return None;
        }
        let live = |e: &Entry| e.expire_at().is_none_or(|t| t > now);
        (0..8)
            .filter_map(|_| self.map.get_index(rand::random_range(0..n)))
            .find(|(_, e)| live(e))
            .map(|(k, _)| k.as_bytes())
            .or_else(|| self.keys(now).next())
    }

    /// Keys held (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when it holds no key.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys with a time to live.
    pub fn expiring(&self) -> usize {
        self.expiries.len()
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.watches.touched(self.db, None);
        self.map.clear();
        self.expiries.clear();
        self.set_used(0);
    }

    /// Evicts the best victim among up to `samples` random keys by `policy`; its
    /// bytes, or `None` when none qualifies.
    fn evict_one(&mut self, policy: Policy, samples: usize) -> Option<usize> {
        let n = self.map.len();
        if n == 0 {
            return None;
        }
        let now = clock();
        let start = rand::random_range(0..n);
        let mut best: Option<(u64, usize)> = None;
        // Random probes; volatile policies look a little further for keys with a TTL.
        let probes = if matches!(policy, Policy::VolatileLru | Policy::VolatileTtl) {
            samples * 4
        } else {
            samples
        };
        for i in 0..probes.min(n) {
            let idx = if i == 0 {
                start
            } else {
                rand::random_range(0..n)
            };
            if let Some((_, e)) = self.map.get_index(idx)
                && let Some(r) = policy.rank(e, now)
                && best.is_none_or(|(b, _)| r < b)
            {
                best = Some((r, idx));
            }
        }
        let (_, idx) = best?;
        let key = self.map.get_index(idx)?.0.clone();
        let before = self.used;
        self.remove(&key);
        Some(before.saturating_sub(self.used))
    }

    /// Removes up to `budget` keys past their time; returns how many went.
    fn expire_due(&mut self, now: u64, budget: usize) -> usize {
        let mut n = 0;
        while n < budget {
            let Some((t, k)) = self.expiries.first().cloned() else {
                break;
            };
            if t > now {
                break;
            }
            self.remove(&k);
            n += 1;
        }
        n
    }
}

/// One database: its shards.
pub struct Db {
    shards: Box<[Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Rung when a list gets elements while a connection waits in BLPOP/BRPOP.
    push: tokio::sync::Notify,
    /// Connections waiting in BLPOP/BRPOP on this database.
    pub blocked: std::sync::atomic::AtomicUsize,
}

impl Db {
    fn new(
        db: usize,
        shards: usize,
        total: &std::sync::Arc<Totals>,
        watches: &std::sync::Arc<Watches>,
    ) -> Db {
        Db {
            shards: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        map: IndexMap::new(),
                        expiries: BTreeSet::new(),
                        used: 0,
                        total: total.clone(),
                        db,
                        watches: watches.clone(),
                    })
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            push: tokio::sync::Notify::new(),
            blocked: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A list got elements: wakes the connections waiting to pop (if any).
    pub fn pushed(&self) {
        if self.blocked.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.push.notify_waiters();
        }
    }

    /// A future that completes at the next [`Db::pushed`] (enable it before looking).
    pub fn next_push(&self) -> tokio::sync::futures::Notified<'_> {
        self.push.notified()
    }

    /// The shard index of `key`.
    pub fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// Locks the shard holding `key`.
    pub fn lock(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        self.shards[self.shard_of(key)].lock()
    }

    /// Locks every shard any of `keys` is in, in shard order (so two multi-key
    /// commands never wait on each other in a cycle): `(shard index, guard)`.
    pub fn lock_many<'a>(&'a self, keys: &[&[u8]]) -> Vec<(usize, MutexGuard<'a, Shard>)> {
        let idx: Vec<usize> = keys.iter().map(|k| self.shard_of(k)).collect();
        self.lock_shards(&idx)
    }

    /// Locks shards `idx` (repeats allowed) in index order: `(shard index, guard)`,
    /// sorted by index.
    pub fn lock_shards<'a>(&'a self, idx: &[usize]) -> Vec<(usize, MutexGuard<'a, Shard>)> {
        let mut idx = idx.to_vec();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| (i, self.shards[i].lock()))
            .collect()
    }

    /// How many shards it has.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Locks shard `i`.
    pub fn lock_shard(&self, i: usize) -> Option<MutexGuard<'_, Shard>> {
        self.shards.get(i).map(|s| s.lock())
    }

    /// Every shard, locked in order.
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        self.shards.iter().map(|s| s.lock()).collect()
    }

    /// Keys held (expired ones not yet removed included, as Redis' `DBSIZE`).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The keyspace's running totals.
#[derive(Default)]
pub struct Totals {
    /// Approximate bytes held by every key.
    pub used: std::sync::atomic::AtomicUsize,
    /// Keys removed because their time ran out (on access or by the active expiry).
    pub expired: std::sync::atomic::AtomicU64,
    /// Keys evicted under `maxmemory`.
    pub evicted: std::sync::atomic::AtomicU64,
}

/// Every database.
pub struct Keyspace {
    dbs: Vec<Db>,
    total: std::sync::Arc<Totals>,
    watches: std::sync::Arc<Watches>,
}

impl Keyspace {
    /// An empty keyspace with `shards` shards per database.
    pub fn new(shards: usize) -> Keyspace {
        let total = std::sync::Arc::new(Totals::default());
        let watches = std::sync::Arc::new(Watches::default());
        Keyspace {
            dbs: (0..DATABASES)
                .map(|i| Db::new(i, shards, &total, &watches))
                .collect(),
            total,
            watches,
        }
    }

    /// Bytes held, keys expired and evicted.
    pub fn totals(&self) -> &Totals {
        &self.total
    }

    /// The watched keys.
    pub fn watches(&self) -> &Watches {
        &self.watches
    }

    /// Database `i` (0..16).
    pub fn db(&self, i: usize) -> Option<&Db> {
        self.dbs.get(i)
    }

    /// Every database.
    pub fn dbs(&self) -> &[Db] {
        &self.dbs
    }

    /// Approximate bytes held by every key.
    pub fn used_bytes(&self) -> usize {
        self.total.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Evicts keys by `policy` until at most `limit` bytes are held; false when it
    /// cannot get there (nothing left that the policy may evict).
    pub fn evict_to(&self, limit: usize, policy: Policy, samples: usize) -> bool {
        if policy == Policy::NoEviction {
            return self.used_bytes() <= limit;
        }
        let shards: Vec<&Mutex<Shard>> = self.dbs.iter().flat_map(|d| d.shards.iter()).collect();
        let mut used = self.used_bytes();
        let mut misses = 0;
        while used > limit {
            // A random shard each time; each evicts the best of its own sample.
            let s = &shards[rand::random_range(0..shards.len())];
            // The guard goes before the match: the arm below locks every shard.
            let evicted = s.lock().evict_one(policy, samples);
            match evicted {
                Some(freed) => {
                    used = used.saturating_sub(freed);
                    misses = 0;
                    self.total
                        .evicted
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    metrics::counter!("meshwork_cache_evicted_keys_total").increment(1);
                }
                None => {
                    misses += 1;
                    if misses > shards.len() * 2 {
                        // Check every shard once before giving up.
                        if !shards.iter().any(|s| {
                            let mut s = s.lock();
                            s.evict_one(policy, samples).is_some_and(|freed| {
                                used = used.saturating_sub(freed);
                                self.total
                                    .evicted
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                true
                            })
                        }) {
                            return false;
                        }
                        misses = 0;
                    }
                }
            }
        }
        true
    }

    /// One active expiry pass: removes keys past their time, at most `budget` per
    /// shard; returns how many went.
    pub fn expire_cycle(&self, now: u64, budget: usize) -> usize {
        let mut n = 0;
        for d in &self.dbs {
            for s in d.shards.iter() {
                let mut s = s.lock();
                if s.expiring() > 0 {
                    n += s.expire_due(now, budget);
                }
            }
        }
        if n > 0 {
            self.total
                .expired
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("meshwork_cache_expired_keys_total").increment(n as u64);
        }
        n
    }
}
