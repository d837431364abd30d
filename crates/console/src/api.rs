//! The JSON API behind the console's pages (documented in `/openapi.json`
//! under the `console` tag). Pages render from the same functions, so what a
//! page shows and what the API answers cannot drift apart.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, StatusCode, header};
use meshwork_coord::api::{SseItem, sse};
use meshwork_coord::backend::{is_delete, prefix_end};
use meshwork_coord::config::Format;
use meshwork_coord::lock;
use meshwork_etcd::proto::etcdserverpb as pb;
use serde::{Deserialize, Serialize};

use crate::ConsoleState;
use crate::auth::{COOKIE, SESSION_TTL};

/// Keys listed per KV page at most.
pub const MAX_KV_KEYS: i64 = 10_000;
/// Older revisions shown for one key at most.
pub const MAX_REVISIONS: usize = 10;
/// Bytes of a value shown inline at most.
pub const MAX_VALUE_SHOWN: usize = 64 * 1024;

pub use meshwork_api::ApiError;

/// The store as the etcd endpoint reports it.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StoreView {
    /// Current revision.
    pub revision: i64,
    /// Database size, bytes.
    pub db_size_bytes: i64,
    /// Bytes in use.
    pub db_size_in_use_bytes: i64,
    /// Server version.
    pub version: String,
    /// Leader member id (hex).
    pub leader: String,
    /// Members: name and client URLs.
    pub members: Vec<(String, Vec<String>)>,
    /// Alarms raised.
    pub errors: Vec<String>,
}

/// Counts of what the platform holds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Counts {
    /// Services registered.
    pub services: usize,
    /// Instances registered.
    pub instances: usize,
    /// Instances healthy.
    pub healthy_instances: usize,
    /// Config entries.
    pub configs: usize,
    /// Gateway routes in force on this node.
    pub routes: usize,
    /// Locks held.
    pub locks: usize,
}

/// A circuit breaker of the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    /// Route.
    pub route: String,
    /// Target.
    pub target: String,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
}

/// The overview page's data.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// This node.
    pub node: String,
    /// Live nodes and their roles.
    pub nodes: Vec<meshwork_coord::nodes::NodeInfo>,
    /// The store.
    pub store: StoreView,
    /// Counts.
    pub counts: Counts,
    /// Gateway counters, when this node runs it.
    pub gateway: Option<meshwork_gateway::GatewayCounters>,
    /// Breakers of the gateway's routes.
    pub breakers: Vec<BreakerView>,
}

/// One second's counters for live charts (rates are deltas between ticks).
#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Unix milliseconds.
    pub t_ms: u64,
    /// Gateway requests answered so far.
    pub requests_total: u64,
    /// Per route: requests, 5xx responses, rate-limited.
    pub routes: Vec<RouteTick>,
    /// Per upstream service: tries, failures and peak-EWMA latency (max over endpoints).
    pub services: Vec<ServiceTick>,
    /// Upper bounds (µs) of the route latency buckets; one more bucket counts the rest.
    pub latency_bounds_us: &'static [u64],
    /// Per topic of this node's broker (its own dead-letter topics left out).
    pub topics: Vec<TopicTick>,
    /// This node's cache, when it runs one.
    pub cache: Option<CacheTick>,
}

/// Per-topic figures in a [`Tick`].
#[derive(Debug, Clone, Serialize)]
pub struct TopicTick {
    /// Topic.
    pub topic: String,
    /// Messages published so far (the sum of its partitions' ends).
    pub published: u64,
    /// Each group's backlog now (messages not yet finished).
    pub groups: Vec<GroupTick>,
}

/// A group's backlog in a [`TopicTick`].
#[derive(Debug, Clone, Serialize)]
pub struct GroupTick {
    /// Group.
    pub group: String,
    /// Messages not yet finished.
    pub backlog: u64,
    /// Messages in its dead-letter topic.
    pub dead_letters: u64,
}

/// The cache's figures in a [`Tick`].
#[derive(Debug, Clone, Serialize)]
pub struct CacheTick {
    /// Commands processed so far.
    pub commands: u64,
    /// Reads that found their key, so far.
    pub hits: u64,
    /// Reads that did not, so far.
    pub misses: u64,
    /// Approximate bytes of data held now.
    pub used_bytes: u64,
    /// Keys evicted under `maxmemory` so far.
    pub evicted: u64,
}

/// Per-route counters in a [`Tick`].
#[derive(Debug, Clone, Serialize)]
pub struct RouteTick {
    /// Route.
    pub route: String,
    /// Requests so far.
    pub requests: u64,
    /// 5xx responses so far.
    pub errors: u64,
    /// Rate-limited so far.
    pub rate_limited: u64,
    /// Requests per latency bucket so far (bounds: [`Tick::latency_bounds_us`]).
    pub latency: Vec<u64>,
}

/// Per-service counters in a [`Tick`].
#[derive(Debug, Clone, Serialize)]
pub struct ServiceTick {
    /// Cluster (`service:NAME` or `static:...`).
    pub service: String,
    /// Tries so far.
    pub requests: u64,
    /// Failed tries so far.
    pub failures: u64,
    /// Latency estimate, milliseconds.
    pub latency_ms: f64,
    /// Endpoints ejected now.
    pub ejected: usize,
}

impl ConsoleState {
    /// The store's status over the etcd API (works on the embedded store and on
    /// an external etcd cluster).
    pub async fn store_view(&self) -> StoreView {
        let b = &self.coord.backend;
        let status = b
            .call(|mut c| async move { c.maintenance.status(pb::StatusRequest {}).await })
            .await;
        let members = b
            .call(|mut c| async move {
                c.cluster
                    .member_list(pb::MemberListRequest::default())
                    .await
            })
            .await;
        let mut v = StoreView::default();
        if let Ok(s) = status {
            v.revision = s.header.map_or(0, |h| h.revision);
            v.db_size_bytes = s.db_size;
            v.db_size_in_use_bytes = s.db_size_in_use;
            v.version = s.version;
            v.leader = format!("{:x}", s.leader);
            v.errors = s.errors;
        }
        if let Ok(m) = members {
            v.members = m
                .members
                .into_iter()
                .map(|m| (m.name, m.client_ur_ls))
                .collect();
        }
        v
    }

    /// Everything the overview shows.
    pub async fn overview(&self) -> Overview {
        let services = self.coord.registry.services();
        let locks = lock::list_locks(&self.coord.backend)
            .await
            .map(|l| l.len())
            .unwrap_or(0);
        let counts = Counts {
            services: services.len(),
            instances: services.iter().map(|s| s.instances).sum(),
            healthy_instances: services.iter().map(|s| s.healthy).sum(),
            configs: self.coord.config.list(None, None).len(),
            routes: self.gateway.as_ref().map_or(0, |g| g.route_info().len()),
            locks,
        };
        Overview {
            node: self.coord.options.node_name.clone(),
            nodes: self.coord.membership.members(),
            store: self.store_view().await,
            counts,
            gateway: self.gateway.as_ref().map(|g| g.counters()),
            breakers: self.breakers(),
        }
    }

    /// Breakers of every route of this node's gateway.
    pub fn breakers(&self) -> Vec<BreakerView> {
        let Some(g) = &self.gateway else {
            return Vec::new();
        };
        g.route_info()
            .into_iter()
            .flat_map(|r| {
                r.breakers
                    .into_iter()
                    .map(move |(target, state)| BreakerView {
                        route: r.name.clone(),
                        target,
                        state,
                    })
            })
            .collect()
    }

    /// The counters of this second.
    pub fn tick(&self) -> Tick {
        let t_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let topics = self.mq.as_ref().map(topic_ticks).unwrap_or_default();
        let cache = self.cache.as_ref().map(|c| {
            let st = c.stats(0);
            CacheTick {
                commands: st.commands,
                hits: st.hits,
                misses: st.misses,
                used_bytes: st.used_bytes,
                evicted: st.evicted,
            }
        });
        let Some(g) = &self.gateway else {
            return Tick {
                t_ms,
                requests_total: 0,
                routes: Vec::new(),
                services: Vec::new(),
                latency_bounds_us: &meshwork_gateway::LATENCY_BUCKETS_US,
                topics,
                cache,
            };
        };
        Tick {
            t_ms,
            topics,
            cache,
            requests_total: g.counters().requests_total,
            routes: g
                .route_info()
                .into_iter()
                .map(|r| RouteTick {
                    route: r.name,
                    requests: r.counters.requests,
                    errors: r.counters.status_classes[4],
                    rate_limited: r.counters.rate_limited,
                    latency: r.counters.latency_buckets,
                })
                .collect(),
            services: g
                .upstreams()
                .into_iter()
                .map(|c| ServiceTick {
                    requests: c.endpoints.iter().map(|e| e.requests).sum(),
                    failures: c.endpoints.iter().map(|e| e.failures).sum(),
                    latency_ms: c
                        .endpoints
                        .iter()
                        .map(|e| e.latency_ewma_ms)
                        .fold(0.0, f64::max),
                    ejected: c.endpoints.iter().filter(|e| e.ejected).count(),
                    service: c.name,
                })
                .collect(),
            latency_bounds_us: &meshwork_gateway::LATENCY_BUCKETS_US,
        }
    }
}

/// The broker's topics for a [`Tick`].
fn topic_ticks(b: &meshwork_mq::Broker) -> Vec<TopicTick> {
    b.topics()
        .into_iter()
        .filter(|t| !t.internal)
        .map(|t| TopicTick {
            published: t.partitions.iter().map(|p| p.end).sum(),
            groups: t
                .groups
                .iter()
                .filter_map(|g| b.group_info(&t.name, g).ok())
                .map(|g| GroupTick {
                    group: g.group,
                    backlog: g.backlog,
                    dead_letters: g.dead_letters,
                })
                .collect(),
            topic: t.name,
        })
        .collect()
}

/// A key in a KV listing.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// The key (UTF-8, lossy).
    pub key: String,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// Revision that created it.
    pub create_revision: i64,
    /// Changes since creation.
    pub version: i64,
    /// Lease holding it (0: none).
    pub lease: i64,
}

/// A prefix's next level: sub-prefixes (up to the next `/`) and keys.
#[derive(Debug, Clone, Serialize)]
pub struct KvListing {
    /// The prefix listed.
    pub prefix: String,
    /// Revision read at.
    pub revision: i64,
    /// Sub-prefixes with their key counts.
    pub dirs: Vec<(String, usize)>,
    /// Keys directly at this level.
    pub keys: Vec<KeyInfo>,
    /// True when more than [`MAX_KV_KEYS`] keys matched (the listing is partial).
    pub truncated: bool,
}

/// One revision of a key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRevision {
    /// Revision of this change.
    pub mod_revision: i64,
    /// Version at this change.
    pub version: i64,
    /// Lease.
    pub lease: i64,
    /// The value as text (UTF-8, lossy), truncated to [`MAX_VALUE_SHOWN`] bytes.
    pub value: String,
    /// Value size, bytes.
    pub size: usize,
}

/// A key's current value and earlier revisions.
#[derive(Debug, Clone, Serialize)]
pub struct KeyHistory {
    /// The key.
    pub key: String,
    /// Newest first.
    pub revisions: Vec<KeyRevision>,
    /// True when older revisions were compacted away.
    pub compacted: bool,
}

fn revision_of(kv: &meshwork_coord::backend::KeyValue) -> KeyRevision {
    let shown = &kv.value[..kv.value.len().min(MAX_VALUE_SHOWN)];
    KeyRevision {
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
        value: crate::secrets::mask(&String::from_utf8_lossy(shown)),
        size: kv.value.len(),
    }
}

impl ConsoleState {
    /// The next level under `prefix`.
    pub async fn kv_list(&self, prefix: &str) -> Result<KvListing, ApiError> {
        let key = Bytes::from(prefix.to_string());
        let end = if prefix.is_empty() {
            Bytes::from_static(b"\0")
        } else {
            prefix_end(&key)
        };
        let k = if prefix.is_empty() {
            Bytes::from_static(b"\0")
        } else {
            key.clone()
        };
        let r = self
            .coord
            .backend
            .call(|mut c| {
                let (k, end) = (k.clone(), end.clone());
                async move {
                    c.kv.range(pb::RangeRequest {
                        key: k,
                        range_end: end,
                        keys_only: true,
                        limit: MAX_KV_KEYS,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        let mut dirs: BTreeMap<String, usize> = BTreeMap::new();
        let mut keys = Vec::new();
        for kv in &r.kvs {
            let full = String::from_utf8_lossy(&kv.key).into_owned();
            let rest = &full[prefix.len().min(full.len())..];
            match rest.find('/') {
                Some(i) if i + 1 < rest.len() => {
                    *dirs.entry(format!("{prefix}{}", &rest[..=i])).or_default() += 1;
                }
                _ => keys.push(KeyInfo {
                    key: full,
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    version: kv.version,
                    lease: kv.lease,
                }),
            }
        }
        Ok(KvListing {
            prefix: prefix.to_string(),
            revision: r.header.map_or(0, |h| h.revision),
            dirs: dirs.into_iter().collect(),
            keys,
            truncated: r.more,
        })
    }

    /// `key`'s value now and up to [`MAX_REVISIONS`] earlier ones.
    pub async fn kv_history(&self, key: &str) -> Result<KeyHistory, ApiError> {
        let k = Bytes::from(key.to_string());
        let mut revisions = Vec::new();
        let mut at = 0i64;
        let mut compacted = false;
        while revisions.len() < MAX_REVISIONS {
            let kk = k.clone();
            let r = self
                .coord
                .backend
                .call(|mut c| {
                    let kk = kk.clone();
                    async move {
                        c.kv.range(pb::RangeRequest {
                            key: kk,
                            revision: at,
                            ..Default::default()
                        })
                        .await
                    }
                })
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) if e.to_string().contains("compacted") => {
                    compacted = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            let Some(kv) = r.kvs.first() else { break };
            revisions.push(revision_of(kv));
            if kv.version <= 1 {
                break;
            }
            at = kv.mod_revision - 1;
        }
        if revisions.is_empty() && !compacted {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no key {key:?}"),
            ));
        }
        Ok(KeyHistory {
            key: key.to_string(),
            revisions,
            compacted,
        })
    }
}

/// Every election with a leader.
#[derive(Debug, Clone, Serialize)]
pub struct ElectionView {
    /// Election name.
    pub name: String,
    /// The leader's proclaimed value (masked if it looks secret).
    pub value: String,
    /// Fencing token of the term (the leader key's create revision).
    pub fencing_token: i64,
    /// The leader's lease.
    pub lease: i64,
    /// Candidates waiting.
    pub candidates: usize,
}

/// The locks page's data.
#[derive(Debug, Clone, Serialize)]
pub struct LocksView {
    /// Held locks.
    pub locks: Vec<lock::LockState>,
    /// Elections with a leader.
    pub elections: Vec<ElectionView>,
}

impl ConsoleState {
    /// Who holds what.
    pub async fn locks(&self) -> Result<LocksView, ApiError> {
        let locks = lock::list_locks(&self.coord.backend).await?;
        let (kvs, _) = self
            .coord
            .backend
            .get_prefix(lock::ELECTIONS_PREFIX, 0)
            .await?;
        let mut by_name: BTreeMap<String, Vec<meshwork_coord::backend::KeyValue>> = BTreeMap::new();
        for kv in kvs {
            let k = String::from_utf8_lossy(&kv.key).into_owned();
            if let Some((name, _)) = k
                .trim_start_matches(lock::ELECTIONS_PREFIX)
                .rsplit_once('/')
            {
                by_name.entry(name.to_string()).or_default().push(kv);
            }
        }
        let elections = by_name
            .into_iter()
            .filter_map(|(name, mut kvs)| {
                kvs.sort_by_key(|kv| kv.create_revision);
                let head = kvs.first()?;
                Some(ElectionView {
                    value: crate::secrets::mask(&String::from_utf8_lossy(&head.value)),
                    fencing_token: head.create_revision,
                    lease: head.lease,
                    candidates: kvs.len() - 1,
                    name,
                })
            })
            .collect();
        Ok(LocksView { locks, elections })
    }
}

#[derive(Deserialize)]
struct PrefixQuery {
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
}

#[derive(Deserialize)]
struct ValidateBody {
    content: String,
    format: String,
}

#[derive(Deserialize)]
struct LoginBody {
    user: String,
    password: String,
}

/// Every console API route as (method, OpenAPI path); `/openapi.json` lists
/// exactly these under `x-meshwork-role: console` (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/console/overview"),
    ("get", "/v1/console/stream"),
    ("get", "/v1/console/history"),
    ("get", "/v1/console/kv"),
    ("get", "/v1/console/kv/value"),
    ("get", "/v1/console/kv/watch"),
    ("get", "/v1/console/locks"),
    ("get", "/v1/console/cache"),
    ("post", "/v1/console/validate"),
    ("get", "/v1/console/session"),
    ("post", "/v1/console/login"),
    ("post", "/v1/console/logout"),
];

/// The API routes (mounted by [`crate::router`]).
pub(crate) fn routes() -> Router<ConsoleState> {
    Router::new()
        .route("/v1/console/overview", get(overview))
        .route("/v1/console/stream", get(stream))
        .route("/v1/console/history", get(history))
        .route("/v1/console/kv", get(kv_list))
        .route("/v1/console/kv/value", get(kv_value))
        .route("/v1/console/kv/watch", get(kv_watch))
        .route("/v1/console/locks", get(locks))
        .route("/v1/console/cache", get(crate::cache::json))
        .route("/v1/console/validate", post(validate))
        .route("/v1/console/session", get(session))
        .route("/v1/console/login", post(login))
        .route("/v1/console/logout", post(logout))
}

async fn overview(State(s): State<ConsoleState>) -> axum::Json<Overview> {
    axum::Json(s.overview().await)
}

async fn stream(State(s): State<ConsoleState>) -> Response {
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)))
            .map(move |_| SseItem {
                event: "tick",
                id: None,
                data: serde_json::to_value(s.tick()).unwrap_or_default(),
            });
    sse(ticks)
}

async fn history(State(s): State<ConsoleState>) -> Response {
    axum::Json(serde_json::json!({
        "interval_ms": crate::HISTORY_EVERY.as_millis() as u64,
        "ticks": s.history.ticks(),
    }))
    .into_response()
}

fn check_prefix(p: &str) -> Result<(), ApiError> {
    if p.len() > 4096 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "prefix is limited to 4096 bytes",
        ));
    }
    Ok(())
}

async fn kv_list(
    State(s): State<ConsoleState>,
    Query(q): Query<PrefixQuery>,
) -> Result<axum::Json<KvListing>, ApiError> {
    check_prefix(&q.prefix)?;
    Ok(axum::Json(s.kv_list(&q.prefix).await?))
}

async fn kv_value(
    State(s): State<ConsoleState>,
    Query(q): Query<KeyQuery>,
) -> Result<axum::Json<KeyHistory>, ApiError> {
    if q.key.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "key must not be empty",
        ));
    }
    check_prefix(&q.key)?;
    Ok(axum::Json(s.kv_history(&q.key).await?))
}

async fn kv_watch(
    State(s): State<ConsoleState>,
    Query(q): Query<PrefixQuery>,
) -> Result<Response, ApiError> {
    check_prefix(&q.prefix)?;
    let key = Bytes::from(if q.prefix.is_empty() {
        "\0".to_string()
    } else {
        q.prefix.clone()
    });
    let end = if q.prefix.is_empty() {
        Bytes::from_static(b"\0")
    } else {
        prefix_end(&key)
    };
    let w = s.coord.backend.watch_range(key, end, 0);
    let events = futures_util::stream::unfold(w, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    })
    .flat_map(|item| {
        let v: Vec<SseItem> = match item {
            meshwork_coord::backend::WatchItem::Events { events, .. } => events
                .into_iter()
                .filter_map(|e| {
                    let deleted = is_delete(&e);
                    let kv = e.kv?;
                    let shown = &kv.value[..kv.value.len().min(MAX_VALUE_SHOWN)];
                    Some(SseItem {
                        event: "change",
                        id: Some(kv.mod_revision.to_string()),
                        data: serde_json::json!({
                            "type": if deleted { "delete" } else { "put" },
                            "key": String::from_utf8_lossy(&kv.key),
                            "mod_revision": kv.mod_revision,
                            "value": crate::secrets::mask(&String::from_utf8_lossy(shown)),
                        }),
                    })
                })
                .collect(),
            meshwork_coord::backend::WatchItem::Reset { .. } => vec![SseItem {
                event: "reset",
                id: None,
                data: serde_json::json!({}),
            }],
        };
        futures_util::stream::iter(v)
    });
    Ok(sse(events))
}

async fn locks(State(s): State<ConsoleState>) -> Result<axum::Json<LocksView>, ApiError> {
    Ok(axum::Json(s.locks().await?))
}

async fn validate(body: Bytes) -> Result<Response, ApiError> {
    let b: ValidateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {{\"content\", \"format\"}}: {e}"),
        )
    })?;
    let format: Format =
        b.format
            .parse()
            .map_err(|e: meshwork_coord::config::format::UnknownFormat| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_argument", e.to_string())
            })?;
    if crate::secrets::holds_mask(&b.content) {
        return Ok(axum::Json(serde_json::json!({
            "ok": false,
            "message": "the content still holds masked secret values (••••••): type the secrets again",
        }))
        .into_response());
    }
    Ok(
        match meshwork_coord::config::format::validate(format, &b.content) {
            Ok(()) => axum::Json(serde_json::json!({ "ok": true })).into_response(),
            Err(e) => axum::Json(serde_json::json!({
                "ok": false,
                "line": e.line,
                "column": e.column,
                "message": e.to_string(),
            }))
            .into_response(),
        },
    )
}

async fn session(
    State(s): State<ConsoleState>,
    headers: HeaderMap,
) -> axum::Json<serde_json::Value> {
    let user = s.auth.as_ref().and_then(|a| a.user_of(&headers));
    axum::Json(serde_json::json!({
        "auth_required": s.auth.is_some(),
        "user": user,
    }))
}

fn session_cookie(value: &str, max_age: u64) -> String {
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

async fn login(
    State(s): State<ConsoleState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(auth) = &s.auth else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "auth_not_configured",
            "no console login is configured: writes are open",
        ));
    };
    let b: LoginBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("expected {{\"user\", \"password\"}}: {e}"),
        )
    })?;
    let ip = peer.map(|p| p.0.0.ip());
    let who = match auth.login(&b.user, &b.password, ip).await {
        Ok(Some(who)) => who,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "wrong user or password",
            ));
        }
        Err(wait) => return Ok(crate::auth::throttled(&headers, wait)),
    };
    Ok((
        [(
            header::SET_COOKIE,
            session_cookie(&auth.session_for(&who), SESSION_TTL.as_secs()),
        )],
        axum::Json(serde_json::json!({ "user": b.user })),
    )
        .into_response())
}

async fn logout() -> Response {
    (
        [(header::SET_COOKIE, session_cookie("", 0))],
        axum::Json(serde_json::json!({ "user": null })),
    )
        .into_response()
}
