//! A two-level cache: an in-process L1 ([`moka`]) over a shared L2 that speaks
//! RESP — the node's cache role, a real Redis, a Redis Cluster (slot routing and
//! `MOVED`/`ASK` by the `redis` crate), or several cache nodes chosen by rendezvous
//! hashing over the node registry.
//!
//! [`Cache::get_or_load`] defends against the three classic failures:
//! - **breakdown** (a hot key expires under load): one load per key at a time in
//!   the process (concurrent callers wait for it), and a short lock in L2
//!   (`SET ... NX PX`) so that other processes wait for the value instead of
//!   loading it too;
//! - **penetration** (requests for keys that do not exist): an absent result is
//!   cached too, for [`CacheOptions::negative_ttl`]; an optional Bloom filter of the
//!   keys that exist ([`Cache::admit`]) answers "absent" without L2 or the loader;
//! - **avalanche** (many keys expiring together): every L2 TTL is stretched by a
//!   random fraction up to [`CacheOptions::jitter`].
//!
//! Writers call [`Cache::set`] or [`Cache::invalidate`]: L2 is changed and every
//! process's L1 drops its copy (an invalidation message over pub/sub; a process
//! whose subscription broke empties its L1 when it resubscribes, and L1 entries never
//! outlive [`CacheOptions::l1_ttl`]). `invalidate` deletes a second time after
//! [`CacheOptions::second_delete`], so a load that read the old value just before
//! the change cannot leave it in L2. L2 failures never fail a read: the value is
//! loaded from the source and the error counted.
//!
//! Values are stored as JSON (readable with `redis-cli`) under `{cache}:{key}`; an
//! absent result is the empty string.
//!
//! ```no_run
//! # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::cache::CacheError> {
//! use std::time::Duration;
//! let products = mw.cache("products").await?;
//! let price: Option<u64> = products
//!     .get_or_load("sku-1", Duration::from_secs(60), || async {
//!         Ok::<_, std::io::Error>(Some(1_250)) // read the database here
//!     })
//!     .await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use meshwork_coord::CoordClient;
use meshwork_coord::nodes::NodeInfo;
use parking_lot::{Mutex, RwLock};
use redis::AsyncCommands;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Environment variable naming the L2: `redis://[:password@]HOST:PORT[/db]`, or
/// `redis+cluster://HOST:PORT,HOST:PORT` for a Redis Cluster. Unset: the nodes that
/// run the `cache` role, from the registry.
pub const CACHE_ENV: &str = "MESHWORK_CACHE";
/// Environment variable with the password of the registry's cache nodes.
pub const CACHE_PASSWORD_ENV: &str = "MESHWORK_CACHE_PASSWORD";
/// The membership role of nodes that run the cache.
pub const CACHE_ROLE: &str = "cache";
/// Longest key accepted, bytes.
pub const MAX_KEY_BYTES: usize = 1024;

const NODES_PREFIX: &str = "/meshwork/nodes/";

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A name, key or option is invalid; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    /// The loader failed (nothing was cached).
    #[error("loading {key}: {reason}")]
    Load {
        /// The key.
        key: String,
        /// The loader's error.
        reason: String,
    },
    /// A value could not be encoded or decoded as JSON.
    #[error("value of {key}: {reason}")]
    Codec {
        /// The key.
        key: String,
        /// What failed.
        reason: String,
    },
    /// The L2 refused or failed a write (reads fall back to the loader instead).
    #[error("cache L2: {0}")]
    L2(String),
}

/// Where the L2 is.
#[derive(Clone)]
pub enum L2Spec {
    /// One RESP server (a cache node or a Redis): `redis://HOST:PORT`.
    Redis(String),
    /// A Redis Cluster, from any of its nodes (`redis://HOST:PORT` each).
    Cluster(Vec<String>),
    /// The nodes that run the `cache` role, by rendezvous hashing of the key.
    Registry(CoordClient),
}

impl L2Spec {
    /// From [`CACHE_ENV`], else the registry of `coord`.
    pub fn from_env(coord: &CoordClient) -> Result<L2Spec, CacheError> {
        match std::env::var(CACHE_ENV) {
            Ok(v) if !v.trim().is_empty() => L2Spec::parse(v.trim()),
            _ => Ok(L2Spec::Registry(coord.clone())),
        }
    }

    /// Parses `redis://...` or `redis+cluster://a,b,...`.
    pub fn parse(s: &str) -> Result<L2Spec, CacheError> {
        if let Some(rest) = s.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| format!("redis://{n}"))
                .collect();
            if nodes.is_empty() {
                return Err(CacheError::Invalid(format!(
                    "{CACHE_ENV}={s}: name at least one cluster node (redis+cluster://HOST:PORT,...)"
                )));
            }
            return Ok(L2Spec::Cluster(nodes));
        }
        if s.starts_with("redis://") || s.starts_with("rediss://") {
            return Ok(L2Spec::Redis(s.to_owned()));
        }
        Err(CacheError::Invalid(format!(
            "{CACHE_ENV}={s}: expected redis://HOST:PORT or redis+cluster://HOST:PORT,..."
        )))
    }
}

/// How a cache behaves.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Most entries L1 keeps (least recently and frequently used go first).
    pub l1_capacity: u64,
    /// Longest an entry stays in L1, whatever its TTL: bounds how stale a process
    /// can be when an invalidation message is lost.
    pub l1_ttl: Duration,
    /// How long an absent result is remembered (penetration guard).
    pub negative_ttl: Duration,
    /// Up to this fraction is added at random to every L2 TTL (avalanche guard).
    pub jitter: f64,
    /// How long the cross-process load lock is held at most.
    pub lock_ttl: Duration,
    /// How long a process waits for another's load before loading itself.
    pub lock_wait: Duration,
    /// When [`Cache::invalidate`] deletes the key a second time.
    pub second_delete: Duration,
    /// Each L2 command's timeout (a slow L2 is treated as a miss).
    pub l2_timeout: Duration,
    /// A Bloom filter of existing keys: (expected keys, false-positive rate).
    pub bloom: Option<(usize, f64)>,
    /// The password of the registry's cache nodes (else [`CACHE_PASSWORD_ENV`]).
    pub password: Option<String>,
    /// How often the counters are added to L2's `meshwork:cache:{name}:stats` hash
    /// (and the name to the `meshwork:caches` set), so that the console shows every
    /// process's hit ratio together; `None`: never.
    pub report_every: Option<Duration>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            l1_capacity: 10_000,
            l1_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            jitter: 0.1,
            lock_ttl: Duration::from_secs(3),
            lock_wait: Duration::from_secs(2),
            second_delete: Duration::from_millis(500),
            l2_timeout: Duration::from_millis(500),
            bloom: None,
            password: None,
            report_every: Some(Duration::from_secs(5)),
        }
    }
}

/// Counters of one cache (also exported as Prometheus metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads answered by L1.
    pub l1_hits: u64,
    /// Reads answered by L2.
    pub l2_hits: u64,
    /// Reads that found nothing in either level.
    pub misses: u64,
    /// Reads answered "absent" by the Bloom filter.
    pub rejected: u64,
    /// Loader runs.
    pub loads: u64,
    /// L2 commands that failed or timed out.
    pub l2_errors: u64,
    /// Invalidation messages applied to L1.
    pub invalidations: u64,
}

#[derive(Default)]
struct Counters {
    l1_hits: AtomicU64,
    l2_hits: AtomicU64,
    misses: AtomicU64,
    rejected: AtomicU64,
    loads: AtomicU64,
    l2_errors: AtomicU64,
    invalidations: AtomicU64,
}

/// An L1 entry: the JSON bytes, or `None` for a remembered absence.
#[derive(Clone)]
struct L1Entry {
    data: Option<Bytes>,
    ttl: Duration,
}

struct PerEntryTtl;

impl moka::Expiry<String, L1Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, v: &L1Entry, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

/// A connection made on first use (and again after a failure to connect);
/// afterwards the `redis` crate's manager reconnects by itself.
struct Lazy {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
}

impl Lazy {
    fn new(url: &str) -> Result<Lazy, CacheError> {
        let client = redis::Client::open(url)
            .map_err(|e| CacheError::Invalid(format!("cache address {url}: {e}")))?;
        Ok(Lazy {
            client,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn get(&self, timeout: Duration) -> Result<redis::aio::ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            timeout * 2,
            self.client.get_connection_manager_with_config(cfg),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

/// The registry's cache nodes: (node name, RESP address), kept current.
struct Ring {
    members: RwLock<Vec<(String, String)>>,
    conns: Mutex<HashMap<String, Arc<Lazy>>>,
    password: Option<String>,
}

impl Ring {
    fn url(&self, addr: &str) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{addr}"),
            None => format!("redis://{addr}"),
        }
    }

    /// The member that owns `key` (rendezvous hashing: adding or removing a node
    /// moves only that node's share).
    fn owner(&self, key: &str) -> Option<String> {
        let m = self.members.read();
        let name = meshwork_coord::nodes::owner(m.iter().map(|(n, _)| n.as_str()), key)?;
        m.iter().find(|(n, _)| n == name).map(|(_, a)| a.clone())
    }

    fn conn(&self, addr: &str) -> Result<Arc<Lazy>, String> {
        let mut c = self.conns.lock();
        if let Some(l) = c.get(addr) {
            return Ok(l.clone());
        }
        let l = Arc::new(Lazy::new(&self.url(addr)).map_err(|e| e.to_string())?);
        c.insert(addr.to_owned(), l.clone());
        Ok(l)
    }

    async fn refresh(&self, coord: &CoordClient) -> Result<(), String> {
        let (kvs, _) = coord
            .backend()
            .get_prefix(NODES_PREFIX, 0)
            .await
            .map_err(|e| e.to_string())?;
        let mut members: Vec<(String, String)> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<NodeInfo>(&kv.value).ok())
            .filter(|n| n.roles.iter().any(|r| r == CACHE_ROLE))
            .filter_map(|n| {
                n.endpoints
                    .get(CACHE_ROLE)
                    .map(|a| (n.name.clone(), a.clone()))
            })
            .collect();
        members.sort();
        *self.members.write() = members;
        Ok(())
    }
}

enum L2 {
    Single(Lazy),
    Cluster(Box<Cluster>),
    Ring(Arc<Ring>),
}

/// A Redis Cluster: the crate's client (slot routing), and a plain connection to
/// one node for invalidations (PUBLISH reaches every node of a cluster).
struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>,
    pubsub: Lazy,
}

/// One L2 command's target connection.
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl L2 {
    async fn conn_for(&self, key: &str, timeout: Duration) -> Result<Conn, String> {
        match self {
            L2::Single(l) => l.get(timeout).await.map(Conn::Single),
            L2::Cluster(cl) => {
                let mut slot = cl.conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = tokio::time::timeout(timeout * 2, cl.client.get_async_connection())
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
            L2::Ring(r) => {
                let addr = r
                    .owner(key)
                    .ok_or_else(|| "no live node runs the cache role".to_string())?;
                r.conn(&addr)?.get(timeout).await.map(Conn::Single)
            }
        }
    }

    /// The connection invalidations go through, and what identifies it (a change
    /// of it means resubscribing).
    fn pubsub_client(&self, channel: &str) -> Result<(redis::Client, String), String> {
        match self {
            L2::Single(l) => Ok((l.client.clone(), String::new())),
            // PUBLISH reaches every node of a Redis Cluster.
            L2::Cluster(cl) => Ok((cl.pubsub.client.clone(), String::new())),
            L2::Ring(r) => {
                let addr = r
                    .owner(channel)
                    .ok_or_else(|| "no live node runs the cache role".to_string())?;
                let c = r.conn(&addr)?;
                Ok((c.client.clone(), addr))
            }
        }
    }
}

struct Inner {
    name: String,
    opts: CacheOptions,
    l1: moka::future::Cache<String, L1Entry>,
    l2: L2,
    bloom: Option<RwLock<fastbloom::BloomFilter>>,
    counters: Counters,
    channel: String,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// A named two-level cache. Cheap to clone; its background tasks (the invalidation
/// subscriber, the registry refresh) stop when the last clone is dropped.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

fn valid_name(name: &str) -> Result<(), CacheError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(CacheError::Invalid(format!(
            "cache name {name:?}: use 1 to 64 of a-z, A-Z, 0-9, '-', '_', '.'"
        )))
    }
}

fn valid_key(key: &str) -> Result<(), CacheError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(CacheError::Invalid(format!(
            "cache key of {} bytes: use 1 to {MAX_KEY_BYTES} bytes",
            key.len()
        )));
    }
    Ok(())
}

impl Cache {
    /// Opens cache `name` over `l2`. Never waits for L2: connections are made on
    /// first use, and reads go to the loader while L2 is unreachable.
    pub async fn open(name: &str, l2: L2Spec, opts: CacheOptions) -> Result<Cache, CacheError> {
        valid_name(name)?;
        if !(0.0..=1.0).contains(&opts.jitter) {
            return Err(CacheError::Invalid(format!(
                "jitter {}: use a fraction from 0 to 1",
                opts.jitter
            )));
        }
        if opts.l1_ttl.is_zero() || opts.negative_ttl.is_zero() || opts.lock_ttl.is_zero() {
            return Err(CacheError::Invalid(
                "l1_ttl, negative_ttl and lock_ttl must be above zero".into(),
            ));
        }
        let bloom = match opts.bloom {
            None => None,
            Some((n, fp)) if n > 0 && fp > 0.0 && fp < 1.0 => Some(RwLock::new(
                fastbloom::BloomFilter::with_false_pos(fp).expected_items(n),
            )),
            Some((n, fp)) => {
                return Err(CacheError::Invalid(format!(
                    "bloom ({n}, {fp}): expected keys above 0 and a rate between 0 and 1"
                )));
            }
        };
        let mut coord = None;
        let l2 = match l2 {
            L2Spec::Redis(url) => L2::Single(Lazy::new(&url)?),
            L2Spec::Cluster(urls) => {
                let client = redis::cluster::ClusterClient::builder(urls.clone())
                    .connection_timeout(opts.l2_timeout)
                    .response_timeout(opts.l2_timeout)
                    .build()
                    .map_err(|e| CacheError::Invalid(format!("cluster {urls:?}: {e}")))?;
                L2::Cluster(Box::new(Cluster {
                    client,
                    conn: tokio::sync::Mutex::new(None),
                    pubsub: Lazy::new(&urls[0])?,
                }))
            }
            L2Spec::Registry(c) => {
                let password = opts
                    .password
                    .clone()
                    .or_else(|| std::env::var(CACHE_PASSWORD_ENV).ok());
                let ring = Arc::new(Ring {
                    members: RwLock::new(Vec::new()),
                    conns: Mutex::new(HashMap::new()),
                    password,
                });
                if let Err(e) = ring.refresh(&c).await {
                    tracing::warn!(error = %e, "cache: reading the registry's cache nodes");
                }
                coord = Some(c);
                L2::Ring(ring)
            }
        };
        let l1 = moka::future::Cache::builder()
            .max_capacity(opts.l1_capacity)
            .expire_after(PerEntryTtl)
            .build();
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            channel: format!("meshwork:cache:{name}:invalidate"),
            opts,
            l1,
            l2,
            bloom,
            counters: Counters::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let sub = tokio::spawn(subscriber(weak.clone()));
        inner.tasks.lock().push(sub);
        if let Some(every) = inner.opts.report_every {
            inner
                .tasks
                .lock()
                .push(tokio::spawn(reporter(weak.clone(), every)));
        }
        if let (Some(coord), L2::Ring(ring)) = (coord, &inner.l2) {
            let ring = ring.clone();
            inner.tasks.lock().push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if let Err(e) = ring.refresh(&coord).await {
                        tracing::debug!(error = %e, "cache: registry refresh");
                    }
                }
            }));
        }
        Ok(Cache { inner })
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            l1_hits: r(&c.l1_hits),
            l2_hits: r(&c.l2_hits),
            misses: r(&c.misses),
            rejected: r(&c.rejected),
            loads: r(&c.loads),
            l2_errors: r(&c.l2_errors),
            invalidations: r(&c.invalidations),
        }
    }

    /// Records that `key` exists, for the Bloom filter (when configured, a key never
    /// admitted is answered "absent" without asking L2 or the loader).
    pub fn admit(&self, key: &str) {
        if let Some(b) = &self.inner.bloom {
            b.write().insert(key);
        }
    }

    /// The value of `key`: from L1, else L2, else `load` (run once per key across
    /// the process's concurrent callers, and — through a short lock in L2 — once
    /// across processes). `Ok(None)` is an absence, remembered for
    /// [`CacheOptions::negative_ttl`]. `ttl` is the L2 lifetime before jitter.
    pub async fn get_or_load<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<Option<T>, CacheError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        E: std::fmt::Display,
    {
        valid_key(key)?;
        if ttl.is_zero() {
            return Err(CacheError::Invalid("ttl must be above zero".into()));
        }
        if let Some(b) = &self.inner.bloom
            && !b.read().contains(key)
        {
            self.count(&self.inner.counters.rejected, "rejected");
            return Ok(None);
        }
        let mut hit = true;
        let entry = self
            .inner
            .l1
            .try_get_with(key.to_owned(), async {
                hit = false;
                self.fill(key, ttl, load).await
            })
            .await
            .map_err(|e| match &*e {
                CacheError::Load { key, reason } => CacheError::Load {
                    key: key.clone(),
                    reason: reason.clone(),
                },
                other => CacheError::L2(other.to_string()),
            })?;
        if hit {
            self.count(&self.inner.counters.l1_hits, "l1_hit");
        }
        decode(key, entry.data.as_deref())
    }

    /// The value of `key` from L1 or L2, without loading.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, CacheError> {
        valid_key(key)?;
        if let Some(e) = self.inner.l1.get(key).await {
            self.count(&self.inner.counters.l1_hits, "l1_hit");
            return decode(key, e.data.as_deref());
        }
        match self.l2_get(key).await {
            Some(Some(data)) => {
                self.count(&self.inner.counters.l2_hits, "l2_hit");
                decode(key, Some(&data))
            }
            _ => {
                self.count(&self.inner.counters.misses, "miss");
                Ok(None)
            }
        }
    }

    /// Stores `value` under `key` for `ttl` (plus jitter) in L2 and this L1; every
    /// other process's L1 drops its copy.
    pub async fn set<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), CacheError> {
        valid_key(key)?;
        let data = Bytes::from(serde_json::to_vec(value).map_err(|e| CacheError::Codec {
            key: key.into(),
            reason: e.to_string(),
        })?);
        self.admit(key);
        let ms = self.jittered(ttl);
        let k = self.l2_key(key);
        self.l2(key, |mut c| async move {
            match &mut c {
                Conn::Single(c) => c.pset_ex::<_, _, ()>(&k, &data[..], ms).await,
                Conn::Cluster(c) => c.pset_ex::<_, _, ()>(&k, &data[..], ms).await,
            }
        })
        .await
        .map_err(CacheError::L2)?;
        self.publish(key).await;
        Ok(())
    }

    /// Removes `key` from L2 and from every process's L1 (and from L2 once more
    /// after [`CacheOptions::second_delete`]). Call it after changing the source.
    pub async fn invalidate(&self, key: &str) -> Result<(), CacheError> {
        valid_key(key)?;
        self.inner.l1.invalidate(key).await;
        let r = self.del(key).await;
        self.publish(key).await;
        let (this, key2) = (self.clone(), key.to_owned());
        let later = self.inner.opts.second_delete;
        tokio::spawn(async move {
            tokio::time::sleep(later).await;
            let _ = this.del(&key2).await;
            this.inner.l1.invalidate(&key2).await;
        });
        r.map_err(CacheError::L2)
    }

    async fn del(&self, key: &str) -> Result<(), String> {
        let k = self.l2_key(key);
        self.l2(key, |mut c| async move {
            match &mut c {
                Conn::Single(c) => c.del::<_, ()>(&k).await,
                Conn::Cluster(c) => c.del::<_, ()>(&k).await,
            }
        })
        .await
    }

    async fn publish(&self, key: &str) {
        let ch = self.inner.channel.clone();
        let k = key.to_owned();
        let r = self
            .l2(&self.inner.channel, |mut c| async move {
                match &mut c {
                    Conn::Single(c) => c.publish::<_, _, ()>(&ch, &k).await,
                    Conn::Cluster(c) => c.publish::<_, _, ()>(&ch, &k).await,
                }
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(cache = %self.inner.name, key, error = %e, "cache: invalidation not published");
        }
    }

    /// L1 missed: L2, else the lock and the loader.
    async fn fill<T, F, Fut, E>(
        &self,
        key: &str,
        ttl: Duration,
        load: F,
    ) -> Result<L1Entry, CacheError>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        E: std::fmt::Display,
    {
        let o = &self.inner.opts;
        let l1_ttl = |absent: bool| {
            if absent {
                o.negative_ttl.min(o.l1_ttl)
            } else {
                ttl.min(o.l1_ttl)
            }
        };
        let found = |data: Bytes| {
            let absent = data.is_empty();
            L1Entry {
                data: (!absent).then_some(data),
                ttl: l1_ttl(absent),
            }
        };
        match self.l2_get(key).await {
            Some(Some(data)) => {
                self.count(&self.inner.counters.l2_hits, "l2_hit");
                return Ok(found(data));
            }
            // Another process may be loading it: wait for its value.
            Some(None) if !self.lock(key).await => {
                let deadline = Instant::now() + o.lock_wait;
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if let Some(Some(data)) = self.l2_get(key).await {
                        self.count(&self.inner.counters.l2_hits, "l2_hit");
                        return Ok(found(data));
                    }
                }
            }
            // Locked by us, or L2 unreachable: load.
            _ => {}
        }
        self.count(&self.inner.counters.misses, "miss");
        self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let loaded = load().await;
        let labels = [("cache", self.inner.name.clone())];
        metrics::histogram!("meshwork_sdk_cache_load_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        let value = match loaded {
            Ok(v) => v,
            Err(e) => {
                metrics::counter!("meshwork_sdk_cache_loads_total", "cache" => self.inner.name.clone(), "outcome" => "error").increment(1);
                self.unlock(key).await;
                return Err(CacheError::Load {
                    key: key.into(),
                    reason: e.to_string(),
                });
            }
        };
        let outcome = if value.is_some() { "found" } else { "absent" };
        metrics::counter!("meshwork_sdk_cache_loads_total", "cache" => self.inner.name.clone(), "outcome" => outcome).increment(1);
        let (data, l2_ttl) = match &value {
            Some(v) => (
                Bytes::from(serde_json::to_vec(v).map_err(|e| CacheError::Codec {
                    key: key.into(),
                    reason: e.to_string(),
                })?),
                ttl,
            ),
            None => (Bytes::new(), o.negative_ttl),
        };
        let ms = self.jittered(l2_ttl);
        let k = self.l2_key(key);
        let d = data.clone();
        let _ = self
            .l2(key, |mut c| async move {
                match &mut c {
                    Conn::Single(c) => c.pset_ex::<_, _, ()>(&k, &d[..], ms).await,
                    Conn::Cluster(c) => c.pset_ex::<_, _, ()>(&k, &d[..], ms).await,
                }
            })
            .await;
        self.unlock(key).await;
        Ok(found(data))
    }

    /// Takes the cross-process load lock of `key`; true when taken (or when L2
    /// cannot say: then loading is the only way forward).
    async fn lock(&self, key: &str) -> bool {
        let k = self.lock_key(key);
        let ms = self.inner.opts.lock_ttl.as_millis() as u64;
        let r = self
            .l2(key, |mut c| async move {
                let cmd = redis::cmd("SET")
                    .arg(&k)
                    .arg(std::process::id())
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .clone();
                match &mut c {
                    Conn::Single(c) => cmd.query_async::<Option<String>>(c).await,
                    Conn::Cluster(c) => cmd.query_async::<Option<String>>(c).await,
                }
            })
            .await;
        !matches!(r, Ok(None))
    }

    async fn unlock(&self, key: &str) {
        let k = self.lock_key(key);
        let _ = self
            .l2(key, |mut c| async move {
                match &mut c {
                    Conn::Single(c) => c.del::<_, ()>(&k).await,
                    Conn::Cluster(c) => c.del::<_, ()>(&k).await,
                }
            })
            .await;
    }

    /// `Some(Some(bytes))` found, `Some(None)` not there, `None` L2 failed.
    async fn l2_get(&self, key: &str) -> Option<Option<Bytes>> {
        let k = self.l2_key(key);
        self.l2(key, |mut c| async move {
            match &mut c {
                Conn::Single(c) => c.get::<_, Option<Vec<u8>>>(&k).await,
                Conn::Cluster(c) => c.get::<_, Option<Vec<u8>>>(&k).await,
            }
        })
        .await
        .ok()
        .map(|v| v.map(Bytes::from))
    }

    /// Runs one L2 command on the connection that owns `route`, with the timeout;
    /// failures are counted and logged at debug.
    async fn l2<R, F, Fut>(&self, route: &str, f: F) -> Result<R, String>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<R>>,
    {
        let t = self.inner.opts.l2_timeout;
        let r = async {
            let c = self.inner.l2.conn_for(route, t).await?;
            tokio::time::timeout(t, f(c))
                .await
                .map_err(|_| format!("no answer within {t:?}"))?
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = &r {
            self.inner
                .counters
                .l2_errors
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("meshwork_sdk_cache_l2_errors_total", "cache" => self.inner.name.clone()).increment(1);
            tracing::debug!(cache = %self.inner.name, error = %e, "cache: L2 command failed");
        }
        r
    }

    fn count(&self, c: &AtomicU64, result: &'static str) {
        c.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("meshwork_sdk_cache_requests_total", "cache" => self.inner.name.clone(), "result" => result).increment(1);
    }

    fn jittered(&self, ttl: Duration) -> u64 {
        let ms = ttl.as_millis().max(1) as f64;
        let extra = ms * self.inner.opts.jitter * rand::random::<f64>();
        (ms + extra) as u64
    }

    fn l2_key(&self, key: &str) -> String {
        format!("{}:{key}", self.inner.name)
    }

    fn lock_key(&self, key: &str) -> String {
        format!("{}:{key}:lock", self.inner.name)
    }
}

fn decode<T: DeserializeOwned>(key: &str, data: Option<&[u8]>) -> Result<Option<T>, CacheError> {
    match data {
        None => Ok(None),
        Some(d) => serde_json::from_slice(d)
            .map(Some)
            .map_err(|e| CacheError::Codec {
                key: key.into(),
                reason: e.to_string(),
            }),
    }
}

/// Applies invalidation messages to L1 for as long as the cache lives; after any
/// break of the subscription (or a change of the node it is on) L1 is emptied, as
/// messages may have been missed meanwhile.
/// The set of cache names that report their counters.
pub const REPORT_SET: &str = "meshwork:caches";

/// Adds the counters' growth since the last report to L2's stats hash of the cache,
/// every `every` (nothing when nothing moved), until the cache is dropped.
async fn reporter(weak: std::sync::Weak<Inner>, every: Duration) {
    let mut sent = CacheStats::default();
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let this = Cache { inner };
        let now = this.stats();
        let fields = [
            ("l1_hits", now.l1_hits - sent.l1_hits),
            ("l2_hits", now.l2_hits - sent.l2_hits),
            ("misses", now.misses - sent.misses),
            ("rejected", now.rejected - sent.rejected),
            ("loads", now.loads - sent.loads),
            ("l2_errors", now.l2_errors - sent.l2_errors),
        ];
        if fields.iter().all(|(_, d)| *d == 0) {
            continue;
        }
        let name = this.inner.name.clone();
        let key = format!("meshwork:cache:{name}:stats");
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (f, d) in fields.iter().filter(|(_, d)| *d > 0) {
            pipe.cmd("HINCRBY").arg(&key).arg(*f).arg(*d).ignore();
        }
        pipe.cmd("HSET")
            .arg(&key)
            .arg("reported_ms")
            .arg(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            )
            .ignore();
        let added = this
            .l2(REPORT_SET, |mut c| async move {
                match &mut c {
                    Conn::Single(c) => c.sadd::<_, _, ()>(REPORT_SET, &name).await,
                    Conn::Cluster(c) => c.sadd::<_, _, ()>(REPORT_SET, &name).await,
                }
            })
            .await;
        // Same route as the set, so both land on the same node of a registry ring.
        let r = this
            .l2(REPORT_SET, |mut c| async move {
                match &mut c {
                    Conn::Single(c) => pipe.query_async::<()>(c).await,
                    Conn::Cluster(c) => pipe.query_async::<()>(c).await,
                }
            })
            .await;
        if added.is_ok() && r.is_ok() {
            sent = now;
        }
    }
}

async fn subscriber(weak: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let channel = inner.channel.clone();
        let target = inner.l2.pubsub_client(&channel);
        let timeout = inner.opts.l2_timeout;
        drop(inner);
        let (client, at) = match target {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "cache: no node for invalidations yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let subscribed = async {
            let mut ps = tokio::time::timeout(timeout * 2, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            ps.subscribe(&channel).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(ps)
        }
        .await;
        let mut ps = match subscribed {
            Ok(ps) => ps,
            Err(e) => {
                tracing::debug!(error = %e, "cache: subscribing to invalidations");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        match weak.upgrade() {
            Some(inner) => inner.l1.invalidate_all(),
            None => return,
        }
        let mut stream = ps.on_message();
        let mut check = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(inner) = weak.upgrade() else { return };
                    if let Ok(key) = msg.get_payload::<String>() {
                        // Counted first: whoever sees the key gone sees it counted.
                        inner.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                        inner.l1.invalidate(&key).await;
                    }
                }
                _ = check.tick() => {
                    let Some(inner) = weak.upgrade() else { return };
                    // The ring's owner of the channel moved: resubscribe there.
                    if inner.l2.pubsub_client(&channel).map(|(_, a)| a).ok().as_deref() != Some(at.as_str()) {
                        break;
                    }
                }
            }
        }
        tracing::debug!("cache: invalidation subscription ended; resubscribing");
    }
}
