//! Node configuration: defaults, then a TOML file, then `MESHWORK_*` environment
//! variables and flags (clap reads both; a flag wins over its variable).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshwork_store::StoreConfig;
use serde::Deserialize;

/// The `[server]` table of the config file.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    pub(crate) name: Option<String>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) etcd_addr: Option<String>,
    pub(crate) http_addr: Option<String>,
    /// `etcd://HOST:PORT[,...]`: coordination on an external etcd cluster.
    pub(crate) store: Option<String>,
    /// Roles to run (`store,coord,gateway,txn,mq`).
    pub(crate) roles: Option<String>,
    /// Gateway listen address (enables the gateway role).
    pub(crate) gateway_addr: Option<String>,
    /// Cache (RESP) listen address (enables the cache role).
    pub(crate) cache_addr: Option<String>,
    /// OTLP/gRPC listen address of the trace store (enables the traces role).
    pub(crate) otlp_grpc_addr: Option<String>,
    /// OTLP/HTTP listen address of the trace store (enables the traces role).
    pub(crate) otlp_http_addr: Option<String>,
}

/// What a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Roles {
    /// The embedded store and its etcd v3 endpoint.
    pub(crate) store: bool,
    /// Coordination services and their HTTP API.
    pub(crate) coord: bool,
    /// The API gateway.
    pub(crate) gateway: bool,
    /// The distributed-transaction coordinator.
    pub(crate) txn: bool,
    /// The message broker.
    pub(crate) mq: bool,
    /// The Redis-compatible cache.
    pub(crate) cache: bool,
    /// The built-in trace store and its OTLP receivers.
    pub(crate) traces: bool,
}

/// Parses `store,coord,gateway,txn,mq,cache,traces`; the default is every role
/// that fits the store choice (the gateway, the cache and the trace store when
/// they have an address).
pub(crate) fn parse_roles(
    s: Option<&str>,
    external: bool,
    gateway_addr: bool,
    cache_addr: bool,
    otlp_addr: bool,
) -> Result<Roles> {
    let mut r = Roles {
        store: false,
        coord: false,
        gateway: false,
        txn: false,
        mq: false,
        cache: false,
        traces: false,
    };
    match s {
        None => {
            r.store = !external;
            r.coord = true;
            r.gateway = gateway_addr;
            r.txn = true;
            r.mq = true;
            r.cache = cache_addr;
            r.traces = otlp_addr;
        }
        Some(list) => {
            for role in list.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                match role {
                    "store" => r.store = true,
                    "coord" => r.coord = true,
                    "gateway" => r.gateway = true,
                    "txn" => r.txn = true,
                    "mq" => r.mq = true,
                    "cache" => r.cache = true,
                    "traces" => r.traces = true,
                    other => {
                        bail!(
                            "unknown role {other:?}; roles are store, coord, gateway, txn, mq, cache and traces"
                        )
                    }
                }
            }
        }
    }
    if r.store && external {
        bail!(
            "the store role runs the embedded store; with --store etcd://... leave it out (--roles coord)"
        );
    }
    if !r.store && !r.coord && !r.gateway && !r.txn && !r.mq && !r.cache && !r.traces {
        bail!(
            "no role to run; give --roles with store, coord, gateway, txn, mq, cache and/or traces"
        );
    }
    if r.traces && !otlp_addr {
        bail!(
            "the traces role needs --otlp-grpc-addr and/or --otlp-http-addr HOST:PORT (port 0 picks a free one)"
        );
    }
    if r.cache && !cache_addr {
        bail!("the cache role needs --cache-addr HOST:PORT (port 0 picks a free one)");
    }
    if r.txn && !r.coord {
        bail!(
            "the txn role needs the coord role (transactions live in the store, participants in the registry)"
        );
    }
    if r.gateway && !r.coord {
        bail!(
            "the gateway role needs the coord role (routes live in the config center, upstreams in the registry)"
        );
    }
    if r.gateway && !gateway_addr {
        bail!("the gateway role needs --gateway-addr HOST:PORT (port 0 picks a free one)");
    }
    if r.coord && !r.store && !external {
        bail!("the coord role needs a store: add the store role or give --store etcd://HOST:PORT");
    }
    Ok(r)
}

/// The `[coord]` table: coordination limits.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct CoordFile {
    pub(crate) node_ttl_secs: Option<i64>,
    pub(crate) run_health_checks: Option<bool>,
    pub(crate) config_max_content_bytes: Option<usize>,
    pub(crate) instance_min_ttl_secs: Option<i64>,
    pub(crate) instance_max_ttl_secs: Option<i64>,
    pub(crate) etcd_request_timeout_ms: Option<u64>,
    pub(crate) etcd_retry_for_ms: Option<u64>,
}

impl CoordFile {
    /// Applies the file's values over the defaults.
    pub(crate) fn apply(&self, c: &mut meshwork_coord::CoordOptions) -> Result<()> {
        if let Some(v) = self.node_ttl_secs {
            c.node_ttl = v;
        }
        if let Some(v) = self.run_health_checks {
            c.run_checks = v;
        }
        if let Some(v) = self.config_max_content_bytes {
            c.config.max_content = v;
        }
        if let Some(v) = self.instance_min_ttl_secs {
            c.registry.min_ttl = v;
        }
        if let Some(v) = self.instance_max_ttl_secs {
            c.registry.max_ttl = v;
        }
        if let Some(v) = self.etcd_request_timeout_ms {
            c.backend.request_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.etcd_retry_for_ms {
            c.backend.retry_for = Duration::from_millis(v);
        }
        Ok(())
    }
}

/// Checks coordination options for values that cannot work.
pub(crate) fn validate_coord(c: &meshwork_coord::CoordOptions) -> Result<()> {
    if !(2..=300).contains(&c.node_ttl) {
        bail!("node TTL {} s is out of range 2..=300", c.node_ttl);
    }
    if c.config.max_content == 0 || c.config.max_content > 16 * 1024 * 1024 {
        bail!("config_max_content_bytes must be 1..=16777216");
    }
    if c.registry.min_ttl < 1 || c.registry.min_ttl > c.registry.max_ttl {
        bail!("instance TTL bounds must satisfy 1 <= min <= max");
    }
    Ok(())
}

/// Parses `etcd://HOST:PORT[,HOST:PORT...]` into endpoints.
pub(crate) fn parse_store_url(
    s: &str,
) -> Result<(Vec<String>, Option<meshwork_etcd::client::Credentials>)> {
    let rest = s.strip_prefix("etcd://").with_context(|| {
        format!("--store {s:?}: expected etcd://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] (omit --store for the embedded store)")
    })?;
    // The user part ends at the last `@`: a password may hold one.
    let (creds, rest) = match rest.rsplit_once('@') {
        Some((user, hosts)) => (
            Some(
                meshwork_etcd::client::Credentials::parse(user)
                    .context("--store: expected etcd://USER:PASSWORD@HOST:PORT")?,
            ),
            hosts,
        ),
        None => (None, rest),
    };
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if eps.is_empty() {
        bail!("--store {s:?} names no endpoint");
    }
    for e in &eps {
        let (host, port) = e
            .rsplit_once(':')
            .with_context(|| format!("--store endpoint {e:?} needs HOST:PORT"))?;
        if host.is_empty() || port.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            bail!("--store endpoint {e:?} needs HOST:PORT with a port 1..=65535");
        }
    }
    Ok((eps, creds))
}

/// The `[store]` table: every store limit, named as in `StoreConfig`.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreFile {
    pub(crate) max_key_bytes: Option<usize>,
    pub(crate) max_value_bytes: Option<usize>,
    pub(crate) max_request_bytes: Option<usize>,
    pub(crate) max_txn_ops: Option<usize>,
    pub(crate) quota_bytes: Option<u64>,
    pub(crate) cache_bytes: Option<usize>,
    pub(crate) max_batch_requests: Option<usize>,
    pub(crate) max_pending_writes: Option<usize>,
    pub(crate) watch_buffer_events: Option<usize>,
    pub(crate) max_watchers_per_stream: Option<usize>,
    pub(crate) auto_compaction_retention: Option<String>,
    pub(crate) min_lease_ttl_secs: Option<i64>,
    pub(crate) max_lease_ttl_secs: Option<i64>,
    pub(crate) fsync: Option<bool>,
    pub(crate) watch_progress_interval_secs: Option<u64>,
    pub(crate) lease_checkpoint_interval_secs: Option<u64>,
}

/// The whole config file.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub(crate) server: ServerFile,
    #[serde(default)]
    pub(crate) store: StoreFile,
    #[serde(default)]
    pub(crate) coord: CoordFile,
    /// The gateway's limits and defaults.
    #[serde(default)]
    pub(crate) gateway: Option<meshwork_gateway::GatewayConfig>,
    /// The web console's login.
    #[serde(default)]
    pub(crate) console: ConsoleFile,
    /// Limits of the HTTP and etcd ports.
    #[serde(default)]
    pub(crate) listen: crate::listen::ListenConfig,
    /// The transaction coordinator.
    #[serde(default)]
    pub(crate) txn: TxnFile,
    /// The message broker.
    #[serde(default)]
    pub(crate) mq: MqFile,
    /// The Redis-compatible cache.
    #[serde(default)]
    pub(crate) cache: CacheFile,
    /// The built-in trace store.
    #[serde(default)]
    pub(crate) traces: TracesFile,
}

/// `[traces]`: the built-in trace store's settings (its files live in
/// `<data dir>/traces`).
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TracesFile {
    /// Bytes of spans kept on disk at most; the oldest go first (default 512 MiB).
    #[serde(default)]
    pub(crate) max_bytes: Option<u64>,
    /// Spans older than this go: `30m`, `24h`, `7d` (default 24h).
    #[serde(default)]
    pub(crate) max_age: Option<String>,
    /// Size of one segment file (default 32 MiB, at most a quarter of max_bytes).
    #[serde(default)]
    pub(crate) segment_bytes: Option<u64>,
    /// fsync spans before acknowledging an export (default: as the store's fsync).
    #[serde(default)]
    pub(crate) fsync: Option<bool>,
    /// Spans waiting to be written at most; exports past it get "unavailable"
    /// (default 100,000).
    #[serde(default)]
    pub(crate) queue_spans: Option<usize>,
    /// Largest span accepted, encoded (default 256 KiB).
    #[serde(default)]
    pub(crate) max_span_bytes: Option<usize>,
    /// Largest export request (default 4 MiB).
    #[serde(default)]
    pub(crate) max_request_bytes: Option<usize>,
    /// Keep whole traces by outcome: every trace with an error, every slow
    /// one, `sample_ratio` of the rest (default false: every span is kept).
    #[serde(default)]
    pub(crate) tail_sampling: Option<bool>,
    /// Share of the other traces kept, 0.0-1.0 (default 0.1).
    #[serde(default)]
    pub(crate) sample_ratio: Option<f64>,
    /// A trace at least this long is kept (default 500 ms).
    #[serde(default)]
    pub(crate) slow_ms: Option<u64>,
    /// How long a trace must be quiet before its decision (default 5000 ms).
    #[serde(default)]
    pub(crate) decision_wait_ms: Option<u64>,
    /// Spans waiting for a decision at most (default 200,000).
    #[serde(default)]
    pub(crate) max_pending_spans: Option<usize>,
}

impl TracesFile {
    /// The trace store's settings (`dir` is set by the node).
    pub(crate) fn config(&self, fsync: bool) -> Result<meshwork_traces::TracesConfig> {
        let mut c = meshwork_traces::TracesConfig {
            fsync: self.fsync.unwrap_or(fsync),
            ..meshwork_traces::TracesConfig::default()
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            max_bytes,
            segment_bytes,
            queue_spans,
            max_span_bytes,
            max_request_bytes
        );
        if let Some(age) = &self.max_age {
            match parse_retention(age)
                .with_context(|| format!("[traces] table: max_age {age:?}"))?
            {
                Retention::Time(d) if !d.is_zero() => c.max_age = d,
                _ => bail!(
                    "[traces] table: max_age {age:?} must be a duration such as 30m, 24h or 7d"
                ),
            }
        }
        if c.max_bytes < 1 << 20 || c.segment_bytes < 64 << 10 {
            bail!(
                "[traces] table: max_bytes must be at least 1 MiB and segment_bytes at least 64 KiB"
            );
        }
        if c.queue_spans == 0 || c.max_span_bytes == 0 || c.max_request_bytes == 0 {
            bail!(
                "[traces] table: queue_spans, max_span_bytes and max_request_bytes must be positive"
            );
        }
        if self.tail_sampling == Some(true) {
            let mut t = meshwork_traces::TailSampling::default();
            if let Some(r) = self.sample_ratio {
                if !(0.0..=1.0).contains(&r) {
                    bail!("[traces] table: sample_ratio {r} must be between 0.0 and 1.0");
                }
                t.keep_ratio = r;
            }
            if let Some(ms) = self.slow_ms {
                t.slow = Duration::from_millis(ms);
            }
            if let Some(ms) = self.decision_wait_ms {
                if !(100..=600_000).contains(&ms) {
                    bail!("[traces] table: decision_wait_ms {ms} must be between 100 and 600000");
                }
                t.decision_wait = Duration::from_millis(ms);
            }
            if let Some(n) = self.max_pending_spans {
                if n == 0 {
                    bail!("[traces] table: max_pending_spans must be positive");
                }
                t.max_pending_spans = n;
            }
            c.tail_sampling = Some(t);
        } else if self.sample_ratio.is_some()
            || self.slow_ms.is_some()
            || self.decision_wait_ms.is_some()
            || self.max_pending_spans.is_some()
        {
            bail!(
                "[traces] table: sample_ratio, slow_ms, decision_wait_ms and max_pending_spans need tail_sampling = true"
            );
        }
        Ok(c)
    }
}

/// `[cache]`: the Redis-compatible cache's settings.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheFile {
    /// The password `AUTH` checks (Redis' `requirepass`; default none).
    #[serde(default)]
    pub(crate) password: Option<String>,
    /// Most connected clients (default 10,000).
    #[serde(default)]
    pub(crate) max_clients: Option<usize>,
    /// Largest bulk string of a request, in bytes (default 512 MiB).
    #[serde(default)]
    pub(crate) max_bulk_bytes: Option<usize>,
    /// Most unparsed request bytes held for one client (default 1 GiB).
    #[serde(default)]
    pub(crate) max_query_buffer_bytes: Option<usize>,
    /// Shards per database (default 4 per CPU).
    #[serde(default)]
    pub(crate) shards: Option<usize>,
    /// Worker threads serving connections (default one per CPU).
    #[serde(default)]
    pub(crate) workers: Option<usize>,
    /// Bytes of data past which writes evict or are refused (default 0: no limit).
    #[serde(default)]
    pub(crate) maxmemory: Option<usize>,
    /// noeviction, allkeys-lru, allkeys-lfu, volatile-lru or volatile-ttl (default
    /// noeviction).
    #[serde(default)]
    pub(crate) maxmemory_policy: Option<String>,
    /// Keys sampled per eviction (default 5).
    #[serde(default)]
    pub(crate) maxmemory_samples: Option<usize>,
    /// Write the data to `<data dir>/cache.snapshot` on shutdown and load it on
    /// start (default false: a cache starts empty).
    #[serde(default)]
    pub(crate) snapshot: bool,
    /// Commands slower than this many µs go to the slow log (default 10,000;
    /// negative: none).
    #[serde(default)]
    pub(crate) slowlog_log_slower_than: Option<i64>,
    /// Slow-log entries kept (default 128).
    #[serde(default)]
    pub(crate) slowlog_max_len: Option<usize>,
}

impl CacheFile {
    /// The cache's settings.
    pub(crate) fn config(&self) -> Result<meshwork_cache::CacheConfig> {
        let mut c = meshwork_cache::CacheConfig {
            password: std::env::var("MESHWORK_CACHE_PASSWORD")
                .ok()
                .or(self.password.clone()),
            shards: self.shards,
            workers: self.workers,
            // Relative: the node puts it in its data directory.
            snapshot: self
                .snapshot
                .then(|| std::path::PathBuf::from("cache.snapshot")),
            ..meshwork_cache::CacheConfig::default()
        };
        if let Some(v) = self.max_clients {
            c.max_clients = v;
        }
        if let Some(v) = self.max_bulk_bytes {
            c.limits.max_bulk_bytes = v;
        }
        if let Some(v) = self.max_query_buffer_bytes {
            c.max_query_buffer_bytes = v;
        }
        if let Some(v) = self.maxmemory {
            c.maxmemory = v;
        }
        if let Some(v) = self.slowlog_log_slower_than {
            c.slowlog_slower_than_us = v;
        }
        if let Some(v) = self.slowlog_max_len {
            c.slowlog_max_len = v;
        }
        if let Some(p) = &self.maxmemory_policy {
            c.policy = meshwork_cache::db::Policy::parse(p).ok_or_else(|| {
                anyhow::anyhow!(
                    "[cache] table: maxmemory_policy {p:?} is not one of noeviction, allkeys-lru, allkeys-lfu, volatile-lru, volatile-ttl"
                )
            })?;
        }
        if let Some(v) = self.maxmemory_samples {
            if !(1..=64).contains(&v) {
                bail!("[cache] table: maxmemory_samples must be 1 to 64");
            }
            c.samples = v;
        }
        if c.max_clients == 0
            || c.limits.max_bulk_bytes == 0
            || c.shards == Some(0)
            || c.workers == Some(0)
        {
            bail!(
                "[cache] table: max_clients, max_bulk_bytes, shards and workers must be positive"
            );
        }
        if c.password.as_deref() == Some("") {
            bail!("[cache] table: an empty password; leave it out for no authentication");
        }
        Ok(c)
    }
}

/// `[mq]`: the message broker's limits.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MqFile {
    /// Largest message in bytes (default 1 MiB).
    #[serde(default)]
    pub(crate) max_message_bytes: Option<usize>,
    /// Most topics (default 1000).
    #[serde(default)]
    pub(crate) max_topics: Option<usize>,
    /// Most partitions per topic (default 64).
    #[serde(default)]
    pub(crate) max_partitions: Option<u32>,
    /// Most groups per topic (default 100).
    #[serde(default)]
    pub(crate) max_groups_per_topic: Option<usize>,
    /// Most consumers of one broadcast group (default 1000).
    #[serde(default)]
    pub(crate) max_consumers_per_group: Option<usize>,
    /// Log segment size in bytes (default 64 MiB).
    #[serde(default)]
    pub(crate) segment_bytes: Option<u64>,
    /// Seconds a message id is remembered for dedup (default 120).
    #[serde(default)]
    pub(crate) dedup_window_secs: Option<u64>,
    /// Longest delay of a delayed message, in seconds (default 30 days).
    #[serde(default)]
    pub(crate) max_delay_secs: Option<u64>,
    /// Milliseconds before an unresolved half message is first checked back (default 10,000).
    #[serde(default)]
    pub(crate) half_check_after_ms: Option<u64>,
    /// Milliseconds between two check-backs of a half message (default 30,000).
    #[serde(default)]
    pub(crate) half_check_interval_ms: Option<u64>,
    /// Check-backs before an unresolved half message is rolled back (default 15).
    #[serde(default)]
    pub(crate) half_max_checks: Option<u32>,
    /// Most half messages pending at once (default 100,000).
    #[serde(default)]
    pub(crate) max_half_pending: Option<usize>,
}

impl MqFile {
    /// The broker's settings.
    pub(crate) fn config(&self, fsync: bool) -> Result<meshwork_mq::BrokerConfig> {
        let mut c = meshwork_mq::BrokerConfig::default();
        if let Some(v) = self.max_message_bytes {
            c.max_message_bytes = v;
        }
        if let Some(v) = self.max_topics {
            c.max_topics = v;
        }
        if let Some(v) = self.max_partitions {
            c.max_partitions = v;
        }
        if let Some(v) = self.max_groups_per_topic {
            c.max_groups_per_topic = v;
        }
        if let Some(v) = self.max_consumers_per_group {
            c.max_consumers_per_group = v;
        }
        if let Some(v) = self.segment_bytes {
            c.segment_bytes = v;
        }
        if let Some(v) = self.dedup_window_secs {
            c.dedup_window = Duration::from_secs(v);
        }
        if let Some(v) = self.max_delay_secs {
            c.max_delay = Duration::from_secs(v);
        }
        if let Some(v) = self.half_check_after_ms {
            c.half_check_after = Duration::from_millis(v);
        }
        if let Some(v) = self.half_check_interval_ms {
            c.half_check_interval = Duration::from_millis(v);
        }
        if let Some(v) = self.half_max_checks {
            c.half_max_checks = v;
        }
        if let Some(v) = self.max_half_pending {
            c.max_half_pending = v;
        }
        c.fsync = fsync;
        c.validate()
            .map_err(|e| anyhow::anyhow!("[mq] table: {e}"))?;
        Ok(c)
    }
}

/// `[txn]`: the transaction coordinator.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TxnFile {
    /// Seconds a finished transaction's record is kept (default 7 days; at
    /// least 60).
    #[serde(default)]
    pub(crate) retention_secs: Option<u64>,
}

impl TxnFile {
    /// The role's options.
    pub(crate) fn options(&self) -> Result<meshwork_txn::role::TxnOptions> {
        let mut o = meshwork_txn::role::TxnOptions::default();
        if let Some(secs) = self.retention_secs {
            if secs < 60 {
                bail!(
                    "[txn] retention_secs = {secs}: at least 60 (operators need time to look at a finished transaction)"
                );
            }
            o.retention = Duration::from_secs(secs);
        }
        Ok(o)
    }
}

/// `[console]`: when `password` is set, writes through the HTTP API (and so
/// the console) need a login.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsoleFile {
    /// User name (default `admin`).
    #[serde(default)]
    pub(crate) user: Option<String>,
    /// Password (at least 8 characters); `MESHWORK_CONSOLE_PASSWORD` overrides it.
    /// With it set, the HTTP API needs a token or this login (see README, Security).
    #[serde(default)]
    pub(crate) password: Option<String>,
    /// Reads need a token or the login too, not only writes (default false).
    #[serde(default)]
    pub(crate) protect_reads: Option<bool>,
    /// Calls one token (or the console login) may make per second, in
    /// bursts of twice that; 0 for no limit (default 200).
    #[serde(default)]
    pub(crate) token_rate_per_sec: Option<u32>,
}

impl FileConfig {
    pub(crate) fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }
}

/// How much history automatic compaction keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retention {
    Revisions(i64),
    Time(Duration),
}

/// Parses `1000` (revisions) or a duration such as `30m`, `1h`, `90s`.
pub(crate) fn parse_retention(s: &str) -> Result<Retention> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        if n < 0 {
            bail!("auto-compaction retention must not be negative (got {n})");
        }
        return Ok(Retention::Revisions(n));
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("auto-compaction retention {s:?}: expected a number of revisions or a duration like 30m, 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("auto-compaction retention {s:?}: unknown unit {unit:?} (use s, m, h or d)"),
    };
    Ok(Retention::Time(Duration::from_secs(secs)))
}

/// Parses a listen address; `HOST:0` picks a free port.
pub(crate) fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    s.parse::<SocketAddr>().with_context(|| {
        format!("{what} {s:?}: expected HOST:PORT, e.g. 127.0.0.1:2479 (port 0 picks a free port)")
    })
}

impl StoreFile {
    /// Applies the file's values over the defaults.
    pub(crate) fn apply(&self, c: &mut StoreConfig) -> Result<()> {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            max_key_bytes,
            max_value_bytes,
            max_request_bytes,
            max_txn_ops,
            quota_bytes,
            cache_bytes,
            max_batch_requests,
            max_pending_writes,
            watch_buffer_events,
            max_watchers_per_stream,
            min_lease_ttl_secs,
            max_lease_ttl_secs,
            fsync
        );
        if let Some(secs) = self.watch_progress_interval_secs {
            c.watch_progress_interval = Duration::from_secs(secs);
        }
        if let Some(secs) = self.lease_checkpoint_interval_secs {
            c.lease_checkpoint_interval = Duration::from_secs(secs);
        }
        if let Some(r) = &self.auto_compaction_retention {
            apply_retention(c, parse_retention(r)?);
        }
        Ok(())
    }
}

pub(crate) fn apply_retention(c: &mut StoreConfig, r: Retention) {
    match r {
        Retention::Revisions(n) => c.auto_compaction_retention_revisions = n,
        Retention::Time(d) => c.auto_compaction_retention = Some(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_parses_revisions_and_durations() {
        assert_eq!(parse_retention("1000").unwrap(), Retention::Revisions(1000));
        assert_eq!(
            parse_retention("2h").unwrap(),
            Retention::Time(Duration::from_secs(7200))
        );
        assert!(
            parse_retention("5y")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(parse_retention("-1").is_err());
    }

    #[test]
    fn file_values_override_defaults_and_unknown_keys_are_rejected() {
        let f: FileConfig =
            toml::from_str("[store]\nmax_txn_ops = 7\n[server]\nname = \"n1\"").unwrap();
        let mut c = StoreConfig::default();
        f.store.apply(&mut c).unwrap();
        assert_eq!(c.max_txn_ops, 7);
        assert_eq!(f.server.name.as_deref(), Some("n1"));
        let err = toml::from_str::<FileConfig>("[store]\nmax_txn_opz = 7").unwrap_err();
        assert!(err.to_string().contains("max_txn_opz"));
    }
}
