//! The keyspace: 16 databases, each split into shards by key hash (one lock per shard,
//! so the runtime's workers serve different keys at once), each shard a hash map of
//! entries and an ordered index of expiry times.
//!
//! Expiry is lazy (a key past its time is treated as absent and removed when touched)
//! and active: [`Keyspace::expire_cycle`] removes keys in expiry order with a bound on
//! the work per call, so many keys expiring at once never stop the world.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;

use bytes::Bytes;
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
    /// A hash (fields in insertion order).
    Hash(indexmap::IndexMap<Bytes, Bytes>),
    /// A set.
    Set(HashSet<Bytes>),
}

impl Value {
    /// The name `TYPE` answers.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::List(_) => "list",
            Value::Hash(_) => "hash",
            Value::Set(_) => "set",
        }
    }

    /// Approximate bytes it holds (for `used_memory`).
    fn weight(&self) -> usize {
        match self {
            Value::Str(b) => b.len(),
            Value::List(l) => l.iter().map(|b| b.len() + 16).sum(),
            Value::Hash(h) => h.iter().map(|(k, v)| k.len() + v.len() + 48).sum(),
            Value::Set(s) => s.iter().map(|b| b.len() + 32).sum(),
        }
    }
}

/// One key's value and expiry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// When it expires (ms since the epoch), if ever.
    pub expire_at: Option<u64>,
}

/// Fixed overhead counted per key (map slot, entry, key header).
const ENTRY_OVERHEAD: usize = 64;

/// A shard: part of one database's keys.
#[derive(Default)]
pub struct Shard {
    map: HashMap<Bytes, Entry>,
    /// `(expire_at, key)` of every key with a time to live.
    expiries: BTreeSet<(u64, Bytes)>,
    /// Approximate bytes held.
    used: usize,
}

impl Shard {
    fn weigh(key: &Bytes, e: &Entry) -> usize {
        key.len() + e.value.weight() + ENTRY_OVERHEAD
    }

    /// The live entry of `key` (one past its time is absent; the active expiry, or
    /// the next write of the key, removes it). One hash lookup.
    pub fn get(&mut self, key: &[u8], now: u64) -> Option<&Entry> {
        self.map
            .get(key)
            .filter(|e| e.expire_at.is_none_or(|t| t > now))
    }

    /// The live entry of `key`, to change in place. Call [`Shard::reweigh`] after
    /// changing its value's size.
    pub fn get_mut(&mut self, key: &[u8], now: u64) -> Option<&mut Entry> {
        self.map
            .get_mut(key)
            .filter(|e| e.expire_at.is_none_or(|t| t > now))
    }

    fn expire_if_due(&mut self, key: &[u8], now: u64) {
        let due = self
            .map
            .get(key)
            .and_then(|e| e.expire_at)
            .is_some_and(|t| t <= now);
        if due {
            self.remove(key);
            metrics::counter!("meshwork_cache_expired_keys_total").increment(1);
        }
    }

    /// Sets `key` (replacing what was there, its expiry included). The key is copied:
    /// a request's arguments are slices of its connection's read buffer, which a stored
    /// slice would keep alive whole.
    pub fn insert(&mut self, key: Bytes, entry: Entry) {
        let new_weight = Self::weigh(&key, &entry);
        let new_expiry = entry.expire_at;
        // One lookup: replace in place, or add a copy of the key.
        match self.map.get_mut(&key[..]) {
            Some(slot) => {
                if let Some(old) = slot.expire_at {
                    self.expiries.remove(&(old, key.clone()));
                }
                let old_weight = Self::weigh(&key, slot);
                *slot = entry;
                self.used = self.used.saturating_sub(old_weight) + new_weight;
            }
            None => {
                self.map.insert(Bytes::copy_from_slice(&key), entry);
                self.used += new_weight;
            }
        }
        if let Some(t) = new_expiry {
            self.expiries.insert((t, Bytes::copy_from_slice(&key)));
        }
    }

    /// Removes `key`; its entry if it was there (expired or not).
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let (k, e) = self.map.remove_entry(key)?;
        if let Some(t) = e.expire_at {
            self.expiries.remove(&(t, k.clone()));
        }
        self.used = self.used.saturating_sub(Self::weigh(&k, &e));
        Some(e)
    }

    /// Changes the expiry of a live key; false if there is none.
    pub fn set_expiry(&mut self, key: &[u8], at: Option<u64>, now: u64) -> bool {
        self.expire_if_due(key, now);
        let Some((k, e)) = self.map.get_key_value(key) else {
            return false;
        };
        let k = k.clone();
        if let Some(old) = e.expire_at {
            self.expiries.remove(&(old, k.clone()));
        }
        if let Some(t) = at {
            self.expiries.insert((t, k.clone()));
        }
        if let Some(e) = self.map.get_mut(key) {
            e.expire_at = at;
        }
        true
    }

    /// Recounts `key`'s weight after its value changed size by `before` → now.
    pub fn reweigh(&mut self, key: &[u8], before: usize) {
        if let Some((k, e)) = self.map.get_key_value(key) {
            let w = Self::weigh(k, e);
            self.used = self.used.saturating_sub(before) + w;
        }
    }

    /// The current weight of `key` (for [`Shard::reweigh`]).
    pub fn weight_of(&self, key: &[u8]) -> usize {
        self.map
            .get_key_value(key)
            .map_or(0, |(k, e)| Self::weigh(k, e))
    }

    /// Live keys (expired ones not yet removed are skipped).
    pub fn keys(&self, now: u64) -> impl Iterator<Item = &Bytes> {
        self.map
            .iter()
            .filter(move |(_, e)| e.expire_at.is_none_or(|t| t > now))
            .map(|(k, _)| k)
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
        self.map.clear();
        self.expiries.clear();
        self.used = 0;
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
}

impl Db {
    fn new(shards: usize) -> Db {
        Db {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
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
        let mut idx: Vec<usize> = keys.iter().map(|k| self.shard_of(k)).collect();
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter()
            .map(|i| (i, self.shards[i].lock()))
            .collect()
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

/// Every database.
pub struct Keyspace {
    dbs: Vec<Db>,
}

impl Keyspace {
    /// An empty keyspace with `shards` shards per database.
    pub fn new(shards: usize) -> Keyspace {
        Keyspace {
            dbs: (0..DATABASES).map(|_| Db::new(shards)).collect(),
        }
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
        self.dbs
            .iter()
            .flat_map(|d| d.shards.iter())
            .map(|s| s.lock().used)
            .sum()
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
            metrics::counter!("meshwork_cache_expired_keys_total").increment(n as u64);
        }
        n
    }
}
