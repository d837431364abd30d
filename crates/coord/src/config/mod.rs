//! The configuration center: entries addressed by namespace / group / data id (the
//! Nacos model), validated in their format, versioned with full history, published
//! with compare-and-set, rolled back, released to a canary subset (gray release),
//! and delivered to subscribers by watch or checksum-based long-poll.
//!
//! Key space:
//!
//! ```text
//! /meshwork/config/live/items/{ns}/{group}/{id}      ConfigEntry (current version)
//! /meshwork/config/live/beta/{ns}/{group}/{id}       BetaEntry (gray release)
//! /meshwork/config/history/{ns}/{group}/{id}/{v:012} ConfigVersion (every version)
//! /meshwork/config/live/keyring                       Keyring (data keys of secret entries)
//! ```
//!
//! Entries marked secret are stored sealed (see [`secret`]): the store, its
//! snapshots and the history hold only ciphertext.
//!
//! A publish is one transaction: the entry (guarded by its mod revision) and its
//! history record, so history never misses a version. Every node keeps the `live`
//! part in memory by watch; history is read on demand.

#[cfg(feature = "server")]
pub mod diff;
pub mod format;
pub mod secret;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::backend::{
    Backend, Event, KeyValue, LOAD_LIMIT, Mirror, MirrorHandler, is_delete, mirror, prefix_end, txn,
};
use crate::error::{CoordError, Result};
use crate::registry::model::{now_ms, validate_name};
pub use format::Format;
use meshwork_etcd::proto::etcdserverpb as pb;

const LIVE_PREFIX: &str = "/meshwork/config/live/";
const ITEMS: &str = "/meshwork/config/live/items/";
const BETA: &str = "/meshwork/config/live/beta/";
const HISTORY: &str = "/meshwork/config/history/";
const KEYRING: &str = "/meshwork/config/live/keyring";

/// Limits of the configuration center.
#[derive(Debug, Clone)]
pub struct ConfigOptions {
    /// Largest content of one entry, bytes. A publish writes the content twice (entry
    /// and history) in one transaction, so keep 2x this under the store's request limit.
    pub max_content: usize,
    /// Longest long-poll wait.
    pub max_wait: Duration,
    /// Master keys that seal and open secret entries (none: secret entries
    /// can be neither published nor read by this process).
    pub secret_keys: secret::MasterKeys,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        ConfigOptions {
            max_content: 512 * 1024,
            max_wait: Duration::from_secs(120),
            secret_keys: secret::MasterKeys::default(),
        }
    }
}

/// Where an entry lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConfigKey {
    /// Namespace (tenant, environment).
    pub namespace: String,
    /// Group.
    pub group: String,
    /// Data id.
    pub data_id: String,
}

impl ConfigKey {
    /// Builds and validates a key.
    pub fn new(namespace: &str, group: &str, data_id: &str) -> Result<ConfigKey> {
        let simple = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        validate_name("namespace", namespace, 128, simple)?;
        validate_name("group", group, 128, simple)?;
        validate_name("data id", data_id, 256, |c| simple(c) || c == ':')?;
        Ok(ConfigKey {
            namespace: namespace.to_string(),
            group: group.to_string(),
            data_id: data_id.to_string(),
        })
    }

    /// Parses `namespace/group/data_id`.
    pub fn parse(path: &str) -> Result<ConfigKey> {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            [ns, g, id] => ConfigKey::new(ns, g, id),
            _ => Err(CoordError::invalid(format!(
                "config path {path:?} must be namespace/group/data_id"
            ))),
        }
    }

    fn suffix(&self) -> String {
        format!("{}/{}/{}", self.namespace, self.group, self.data_id)
    }

    fn item_key(&self) -> String {
        format!("{ITEMS}{}", self.suffix())
    }
    fn beta_key(&self) -> String {
        format!("{BETA}{}", self.suffix())
    }
    fn history_prefix(&self) -> String {
        format!("{HISTORY}{}/", self.suffix())
    }
    fn history_key(&self, v: u64) -> String {
        format!("{HISTORY}{}/{v:012}", self.suffix())
    }
}

impl std::fmt::Display for ConfigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.suffix())
    }
}

/// The current version of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// Where it lives.
    #[serde(flatten)]
    pub key: ConfigKey,
    /// The content.
    pub content: String,
    /// Its format.
    pub format: Format,
    /// SHA-256 of the content, hex.
    pub checksum: String,
    /// Version number, 1 for the first publish, +1 per change.
    pub version: u64,
    /// Who published it.
    pub author: String,
    /// What changed.
    pub description: String,
    /// When, Unix milliseconds.
    pub updated_at_ms: u64,
    /// Whether the content is a secret: encrypted at rest, masked in the
    /// console, readable only with the `secrets:read` scope.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
    /// The sealed content of a secret entry, as stored (never in API answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<secret::Sealed>,
}

impl ConfigEntry {
    /// The entry as an API may show it: no sealed bytes, and no content when
    /// `hide` (a list, a history, a secret).
    fn shown(mut self, hide: bool) -> ConfigEntry {
        self.sealed = None;
        if hide {
            self.content = String::new();
        }
        self
    }
}

/// One version in an entry's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigVersion {
    /// The entry as of this version (content empty for a delete).
    #[serde(flatten)]
    pub entry: ConfigEntry,
    /// `publish`, `rollback` or `delete`.
    pub op: String,
    /// For a rollback: the version whose content was restored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restored_from: Option<u64>,
}

/// A gray (canary) release: content served only to matching clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BetaEntry {
    /// Where it lives.
    #[serde(flatten)]
    pub key: ConfigKey,
    /// Beta content.
    pub content: String,
    /// Its format.
    pub format: Format,
    /// SHA-256 of the content, hex.
    pub checksum: String,
    /// Client addresses (IPs) that get the beta.
    pub addresses: Vec<String>,
    /// Clients whose labels include all of these get the beta.
    pub labels: BTreeMap<String, String>,
    /// Who started it.
    pub author: String,
    /// When, Unix milliseconds.
    pub created_at_ms: u64,
}

/// Who is asking, for gray-release matching.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientIdentity {
    /// The client's address (IP).
    #[serde(default)]
    pub address: String,
    /// The client's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl BetaEntry {
    /// True when `client` should get the beta content.
    pub fn matches(&self, client: &ClientIdentity) -> bool {
        (!client.address.is_empty() && self.addresses.iter().any(|a| a == &client.address))
            || (!self.labels.is_empty()
                && self
                    .labels
                    .iter()
                    .all(|(k, v)| client.labels.get(k) == Some(v)))
    }
}

/// A publish request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// New content.
    pub content: String,
    /// Its format (validated).
    #[serde(default)]
    pub format: Format,
    /// Who publishes.
    #[serde(default)]
    pub author: String,
    /// What changed.
    #[serde(default)]
    pub description: String,
    /// Compare-and-set: publish only if the current version is this (0 = absent).
    #[serde(default)]
    pub if_version: Option<u64>,
    /// Mark the entry secret (true) or not (false); absent keeps what it is.
    #[serde(default)]
    pub secret: Option<bool>,
}

/// A gray-release request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BetaRequest {
    /// Beta content.
    pub content: String,
    /// Its format (validated).
    #[serde(default)]
    pub format: Format,
    /// Client addresses to serve it to.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Client labels to serve it to.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Who.
    #[serde(default)]
    pub author: String,
}

/// The effective content for one client.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    /// The entry (its content replaced by the beta content when the client matches).
    #[serde(flatten)]
    pub entry: ConfigEntry,
    /// True when the beta content is served.
    pub beta: bool,
    /// Why a secret entry's content could not be opened (it is then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked: Option<String>,
}

/// What sealed content is bound to: the entry and its version, so a sealed
/// value opens neither on another entry nor as another version of its own.
fn sealed_as(key: &ConfigKey, version: u64) -> String {
    format!("{}@{version}", key.suffix())
}

/// A secret entry served without its content, and why.
fn locked(mut entry: ConfigEntry, why: String) -> Served {
    entry.content = String::new();
    Served {
        entry,
        beta: false,
        locked: Some(why),
    }
}

/// Result of a publish.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The entry now current.
    pub entry: ConfigEntry,
    /// False when the content was already current (nothing written).
    pub changed: bool,
}

/// SHA-256 of `content`, hex.
pub fn checksum(content: &str) -> String {
    hex(&Sha256::digest(content.as_bytes()))
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[derive(Default)]
struct Live {
    items: BTreeMap<ConfigKey, (ConfigEntry, i64)>,
    beta: HashMap<ConfigKey, BetaEntry>,
    keyring: Option<(secret::Keyring, i64)>,
    bad_records: u64,
}

struct LiveCache {
    live: Live,
    tx: watch::Sender<u64>,
    generation: u64,
}

fn parse_live_key(key: &[u8]) -> Option<(bool, ConfigKey)> {
    let s = std::str::from_utf8(key).ok()?;
    let (beta, rest) = if let Some(r) = s.strip_prefix(ITEMS) {
        (false, r)
    } else {
        (true, s.strip_prefix(BETA)?)
    };
    let mut it = rest.splitn(3, '/');
    Some((
        beta,
        ConfigKey {
            namespace: it.next()?.to_string(),
            group: it.next()?.to_string(),
            data_id: it.next()?.to_string(),
        },
    ))
}

impl LiveCache {
    fn put(&mut self, kv: &KeyValue) {
        if kv.key == KEYRING.as_bytes() {
            match serde_json::from_slice::<secret::Keyring>(&kv.value) {
                Ok(r) => self.live.keyring = Some((r, kv.mod_revision)),
                Err(_) => self.live.bad_records += 1,
            }
            return;
        }
        let Some((beta, key)) = parse_live_key(&kv.key) else {
            return;
        };
        if beta {
            match serde_json::from_slice::<BetaEntry>(&kv.value) {
                Ok(b) => {
                    self.live.beta.insert(key, b);
                }
                Err(_) => self.live.bad_records += 1,
            }
        } else {
            match serde_json::from_slice::<ConfigEntry>(&kv.value) {
                Ok(e) => {
                    self.live.items.insert(key, (e, kv.mod_revision));
                }
                Err(_) => self.live.bad_records += 1,
            }
        }
    }

    fn bump(&mut self) {
        metrics::gauge!("meshwork_config_entries").set(self.live.items.len() as f64);
        metrics::gauge!("meshwork_config_gray_releases").set(self.live.beta.len() as f64);
        self.generation += 1;
        self.tx.send_replace(self.generation);
    }
}

impl MirrorHandler for LiveCache {
    fn reset(&mut self, kvs: Vec<KeyValue>, _revision: i64) {
        self.live = Live::default();
        for kv in &kvs {
            self.put(kv);
        }
        self.bump();
    }

    fn apply(&mut self, events: Vec<Event>, _revision: i64) {
        for e in &events {
            let Some(kv) = e.kv.as_ref() else { continue };
            if is_delete(e) {
                if kv.key == KEYRING.as_bytes() {
                    self.live.keyring = None;
                }
                if let Some((beta, key)) = parse_live_key(&kv.key) {
                    if beta {
                        self.live.beta.remove(&key);
                    } else {
                        self.live.items.remove(&key);
                    }
                }
            } else {
                self.put(kv);
            }
        }
        self.bump();
    }
}

/// A listener's view of one entry: the checksum it holds ("" = it has none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listening {
    /// The entry.
    #[serde(flatten)]
    pub key: ConfigKey,
    /// Checksum the client holds.
    #[serde(default)]
    pub checksum: String,
}

/// The configuration center.
#[derive(Clone)]
pub struct ConfigCenter {
    backend: Backend,
    cache: Arc<Mutex<LiveCache>>,
    changes: watch::Receiver<u64>,
    mirror: Arc<Mirror>,
    vault: Arc<secret::Vault>,
    opts: ConfigOptions,
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> CoordError {
    CoordError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl ConfigCenter {
    /// Opens the configuration center and waits for the local copy to load.
    pub async fn open(backend: &Backend, opts: ConfigOptions) -> Result<ConfigCenter> {
        let (tx, changes) = watch::channel(0u64);
        let cache = Arc::new(Mutex::new(LiveCache {
            live: Live::default(),
            tx,
            generation: 0,
        }));
        let mirror = mirror(backend, LIVE_PREFIX, cache.clone());
        let c = ConfigCenter {
            backend: backend.clone(),
            cache,
            changes,
            mirror: Arc::new(mirror),
            vault: Arc::new(secret::Vault::new(opts.secret_keys.clone())),
            opts,
        };
        if !c.mirror.loaded(LOAD_LIMIT).await {
            return Err(CoordError::Unavailable(format!(
                "the configuration could not be loaded from the store within {} s",
                LOAD_LIMIT.as_secs()
            )));
        }
        Ok(c)
    }

    /// The limits in force.
    pub fn options(&self) -> &ConfigOptions {
        &self.opts
    }

    fn check_content(&self, content: &str, format: Format) -> Result<()> {
        if content.len() > self.opts.max_content {
            return Err(CoordError::TooLarge(format!(
                "content is {} bytes; the limit is {} (config.max_content)",
                content.len(),
                self.opts.max_content
            )));
        }
        format::validate(format, content)?;
        Ok(())
    }

    /// The current entry, from the local copy (a secret one without its content).
    pub fn get(&self, key: &ConfigKey) -> Option<ConfigEntry> {
        self.cache
            .lock()
            .live
            .items
            .get(key)
            .map(|(e, _)| e.clone().shown(false))
    }

    /// The content `client` should see: the beta when it matches a gray release;
    /// a secret entry opened (or, when it cannot be, empty and `locked`).
    pub fn get_for(&self, key: &ConfigKey, client: &ClientIdentity) -> Option<Served> {
        let c = self.cache.lock();
        let (entry, _) = c.live.items.get(key)?;
        let mut entry = entry.clone();
        if let Some(sealed) = entry.sealed.take() {
            let ring = c.live.keyring.as_ref().map(|(r, _)| r);
            match ring.map(|r| self.vault.open(r, &sealed_as(key, entry.version), &sealed)) {
                Some(Ok(plain)) => entry.content = plain,
                Some(Err(e)) => return Some(locked(entry, e.to_string())),
                None => return Some(locked(entry, "the keyring is missing".into())),
            }
        }
        let beta = match c.live.beta.get(key) {
            Some(b) if b.matches(client) => {
                entry.content = b.content.clone();
                entry.checksum = b.checksum.clone();
                entry.format = b.format;
                true
            }
            _ => false,
        };
        Some(Served {
            entry,
            beta,
            locked: None,
        })
    }

    /// The gray release of an entry, if one is running.
    pub fn beta(&self, key: &ConfigKey) -> Option<BetaEntry> {
        self.cache.lock().live.beta.get(key).cloned()
    }

    /// Entries (without content) in a namespace and optionally a group.
    pub fn list(&self, namespace: Option<&str>, group: Option<&str>) -> Vec<ConfigEntry> {
        let c = self.cache.lock();
        c.live
            .items
            .values()
            .filter(|(e, _)| {
                namespace.is_none_or(|n| e.key.namespace == n)
                    && group.is_none_or(|g| e.key.group == g)
            })
            .map(|(e, _)| e.clone().shown(true))
            .collect()
    }

    /// Namespaces with at least one entry, each with its entry count.
    pub fn namespaces(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for k in self.cache.lock().live.items.keys() {
            *m.entry(k.namespace.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Publishes new content (optionally compare-and-set on the version).
    pub async fn publish(&self, key: &ConfigKey, p: Publish) -> Result<Published> {
        self.check_content(&p.content, p.format)?;
        if p.author.len() > 256 || p.description.len() > 4096 {
            return Err(CoordError::invalid(
                "author is limited to 256 bytes and description to 4096",
            ));
        }
        self.write_version(
            key,
            Some(p.content),
            p.format,
            &p.author,
            &p.description,
            p.if_version,
            "publish",
            None,
            p.secret,
        )
        .await
    }

    /// Restores the content of `version` as a new version.
    pub async fn rollback(&self, key: &ConfigKey, version: u64, author: &str) -> Result<Published> {
        let v = self.version(key, version).await?;
        if v.op == "delete" {
            return Err(CoordError::invalid(format!(
                "version {version} of {key} is a delete; roll back to a version with content"
            )));
        }
        self.write_version(
            key,
            Some(v.entry.content),
            v.entry.format,
            author,
            &format!("rollback to version {version}"),
            None,
            "rollback",
            Some(version),
            // Content that was secret stays secret; else the entry keeps its mark.
            v.entry.secret.then_some(true),
        )
        .await
    }

    /// Deletes an entry (its history stays; a delete is a version too).
    pub async fn delete(
        &self,
        key: &ConfigKey,
        author: &str,
        if_version: Option<u64>,
    ) -> Result<u64> {
        let r = self
            .write_version(
                key,
                None,
                Format::Text,
                author,
                "deleted",
                if_version,
                "delete",
                None,
                None,
            )
            .await?;
        Ok(r.entry.version)
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_version(
        &self,
        key: &ConfigKey,
        content: Option<String>,
        format: Format,
        author: &str,
        description: &str,
        if_version: Option<u64>,
        op: &str,
        restored_from: Option<u64>,
        secret: Option<bool>,
    ) -> Result<Published> {
        free_text("author", author, 256, false)?;
        free_text("description", description, 4096, true)?;
        let item_key = key.item_key();
        for _ in 0..32 {
            let (cur, _) = self.backend.get(item_key.clone()).await?;
            let cur_entry = match &cur {
                Some(kv) => Some(
                    serde_json::from_slice::<ConfigEntry>(&kv.value)
                        .map_err(|e| corrupt(&item_key, e))?,
                ),
                None => None,
            };
            let cur_version = cur_entry.as_ref().map(|e| e.version).unwrap_or(0);
            if let Some(want) = if_version
                && want != cur_version
            {
                return Err(CoordError::Conflict(format!(
                    "{key} is at version {cur_version}, not {want}; re-read it and publish again"
                )));
            }
            let Some(content) = content.clone() else {
                // Delete.
                let Some(cur_entry) = cur_entry else {
                    return Err(CoordError::NotFound(format!("no config entry {key}")));
                };
                let version = self.last_version(key).await?.max(cur_version) + 1;
                let rec = ConfigVersion {
                    entry: ConfigEntry {
                        content: String::new(),
                        checksum: String::new(),
                        sealed: None,
                        version,
                        author: author.to_string(),
                        description: description.to_string(),
                        updated_at_ms: now_ms(),
                        ..cur_entry.clone()
                    },
                    op: op.to_string(),
                    restored_from: None,
                };
                let hist =
                    serde_json::to_vec(&rec).map_err(|e| CoordError::invalid(e.to_string()))?;
                let mod_rev = cur.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
                let r = self
                    .backend
                    .txn(pb::TxnRequest {
                        compare: vec![
                            txn::mod_rev_is(item_key.clone(), mod_rev),
                            txn::absent(key.history_key(version)),
                        ],
                        success: vec![
                            txn::delete(item_key.clone()),
                            txn::delete(key.beta_key()),
                            txn::put(key.history_key(version), hist, 0),
                        ],
                        failure: vec![],
                    })
                    .await?;
                if r.succeeded {
                    self.mirror.wait_for(txn::revision(&r)).await;
                    return Ok(Published {
                        entry: rec.entry,
                        changed: true,
                    });
                }
                continue;
            };
            let secret = secret.unwrap_or_else(|| cur_entry.as_ref().is_some_and(|e| e.secret));
            // A secret is never compared: "unchanged" would confirm a guess to
            // a writer who may not read it. Each publish of one is a version.
            if let Some(e) = &cur_entry
                && e.format == format
                && !e.secret
                && !secret
                && op == "publish"
                && e.checksum == checksum(&content)
            {
                // Already current (also what a retried publish whose first attempt
                // landed sees): nothing to write.
                return Ok(Published {
                    entry: e.clone().shown(secret),
                    changed: false,
                });
            }
            let version = if cur_entry.is_some() {
                cur_version + 1
            } else {
                self.last_version(key).await? + 1
            };
            let (content, sum, sealed) = if secret {
                if content.len() > self.opts.max_content / 4 * 3 {
                    return Err(CoordError::TooLarge(format!(
                        "secret content is {} bytes; the limit is {} (3/4 of config.max_content: \
                         sealed content is stored in base64)",
                        content.len(),
                        self.opts.max_content / 4 * 3
                    )));
                }
                let ring = self.ensure_keyring().await?;
                let s = self.vault.seal(&ring, &sealed_as(key, version), &content)?;
                (String::new(), s.checksum(), Some(s))
            } else {
                let sum = checksum(&content);
                (content, sum, None)
            };
            let entry = ConfigEntry {
                key: key.clone(),
                content,
                format,
                checksum: sum,
                version,
                author: author.to_string(),
                description: description.to_string(),
                updated_at_ms: now_ms(),
                secret,
                sealed,
            };
            let rec = ConfigVersion {
                entry: entry.clone(),
                op: op.to_string(),
                restored_from,
            };
            let value =
                serde_json::to_vec(&entry).map_err(|e| CoordError::invalid(e.to_string()))?;
            let hist = serde_json::to_vec(&rec).map_err(|e| CoordError::invalid(e.to_string()))?;
            let mod_rev = cur.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
            let mut success = vec![
                txn::put(item_key.clone(), value, 0),
                txn::put(key.history_key(version), hist, 0),
            ];
            if secret {
                // A gray release's content is kept in clear: none outlives
                // the entry becoming secret.
                success.push(txn::delete(key.beta_key()));
            }
            let r = self
                .backend
                .txn(pb::TxnRequest {
                    // The history slot must be free too: "absent" can match two
                    // different moments of an entry that was deleted in between.
                    compare: vec![
                        txn::mod_rev_is(item_key.clone(), mod_rev),
                        txn::absent(key.history_key(version)),
                    ],
                    success,
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                self.mirror.wait_for(txn::revision(&r)).await;
                metrics::counter!("meshwork_config_publishes_total").increment(1);
                return Ok(Published {
                    entry: entry.shown(false),
                    changed: true,
                });
            }
        }
        Err(CoordError::Conflict(format!(
            "{key} kept changing under concurrent publishes; try again"
        )))
    }

    async fn last_version(&self, key: &ConfigKey) -> Result<u64> {
        let prefix = key.history_prefix();
        let end = prefix_end(prefix.as_bytes());
        let r = self
            .backend
            .call(|mut c| {
                let (k, e) = (prefix.clone(), end.clone());
                async move {
                    c.kv.range(pb::RangeRequest {
                        key: k.into(),
                        range_end: e,
                        limit: 1,
                        sort_order: pb::range_request::SortOrder::Descend as i32,
                        sort_target: pb::range_request::SortTarget::Key as i32,
                        keys_only: true,
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
        Ok(r.kvs
            .first()
            .and_then(|kv| std::str::from_utf8(&kv.key).ok())
            .and_then(|k| k.rsplit('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Every version of an entry, newest first (at most `limit`).
    pub async fn history(&self, key: &ConfigKey, limit: usize) -> Result<Vec<ConfigVersion>> {
        let (kvs, _) = self.backend.get_prefix(key.history_prefix(), 0).await?;
        let mut out = Vec::with_capacity(kvs.len().min(limit));
        for kv in kvs.iter().rev().take(limit) {
            let mut v: ConfigVersion = serde_json::from_slice(&kv.value)
                .map_err(|e| corrupt(&String::from_utf8_lossy(&kv.key), e))?;
            v.entry = v.entry.shown(true);
            out.push(v);
        }
        Ok(out)
    }

    /// One version of an entry, with its content (a secret one opened).
    pub async fn version(&self, key: &ConfigKey, version: u64) -> Result<ConfigVersion> {
        let hk = key.history_key(version);
        let (kv, _) = self.backend.get(hk.clone()).await?;
        let kv =
            kv.ok_or_else(|| CoordError::NotFound(format!("{key} has no version {version}")))?;
        let mut v: ConfigVersion =
            serde_json::from_slice(&kv.value).map_err(|e| corrupt(&hk, e))?;
        if let Some(sealed) = v.entry.sealed.take() {
            v.entry.content = self.open_sealed(key, v.entry.version, &sealed).await?;
        }
        Ok(v)
    }

    /// Opens `sealed` content of `key`, reading the keyring from the store when
    /// the local copy does not know its data key yet.
    async fn open_sealed(
        &self,
        key: &ConfigKey,
        version: u64,
        sealed: &secret::Sealed,
    ) -> Result<String> {
        let cached = self.cache.lock().live.keyring.clone();
        let ring = match cached {
            Some((r, _)) if r.keys.iter().any(|k| k.id == sealed.key) => r,
            _ => self
                .stored_keyring()
                .await?
                .map(|(r, _)| r)
                .unwrap_or_default(),
        };
        self.vault.open(&ring, &sealed_as(key, version), sealed)
    }

    /// Whether any current entry is sealed (then a missing keyring is an
    /// error, not something to make anew: a new one would open none of them).
    fn any_sealed(&self) -> bool {
        self.cache
            .lock()
            .live
            .items
            .values()
            .any(|(e, _)| e.sealed.is_some())
    }

    fn keyring_lost(&self) -> CoordError {
        corrupt(
            KEYRING,
            "the keyring is missing although secret entries exist; restore it from a backup \
             (a new one would open none of them)",
        )
    }

    async fn stored_keyring(&self) -> Result<Option<(secret::Keyring, i64)>> {
        let (kv, _) = self.backend.get(KEYRING.to_string()).await?;
        kv.map(|kv| {
            serde_json::from_slice(&kv.value)
                .map(|r| (r, kv.mod_revision))
                .map_err(|e| corrupt(KEYRING, e))
        })
        .transpose()
    }

    /// The keyring, made with a first data key when there is none.
    async fn ensure_keyring(&self) -> Result<secret::Keyring> {
        if let Some((r, _)) = self.cache.lock().live.keyring.clone() {
            return Ok(r);
        }
        if self.any_sealed() {
            return Err(self.keyring_lost());
        }
        let dk = self.vault.new_data_key()?;
        let ring = secret::Keyring {
            active: dk.id.clone(),
            keys: vec![dk],
        };
        let value = serde_json::to_vec(&ring).map_err(|e| CoordError::invalid(e.to_string()))?;
        let r = self
            .backend
            .txn(pb::TxnRequest {
                compare: vec![txn::absent(KEYRING.to_string())],
                success: vec![txn::put(KEYRING.to_string(), value, 0)],
                failure: vec![],
            })
            .await?;
        if r.succeeded {
            self.mirror.wait_for(txn::revision(&r)).await;
            return Ok(ring);
        }
        // Another node made it first: use that one.
        self.stored_keyring()
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| CoordError::Conflict("the keyring was deleted while being made".into()))
    }

    /// Rotates the secrets' keys: every data key rewrapped under the primary
    /// master key, a new active data key, and every secret entry resealed under it.
    pub async fn rotate_secrets(&self) -> Result<secret::Rotated> {
        let mut attempt = 0;
        let (ring, rewrapped) = loop {
            attempt += 1;
            let (mut ring, mod_rev) = match self.stored_keyring().await? {
                Some(r) => r,
                None if self.any_sealed() => return Err(self.keyring_lost()),
                None => Default::default(),
            };
            let mut rewrapped = 0;
            for k in &mut ring.keys {
                let new = self.vault.rewrap(k)?;
                if new != *k {
                    rewrapped += 1;
                    *k = new;
                }
            }
            let dk = self.vault.new_data_key()?;
            ring.active = dk.id.clone();
            ring.keys.push(dk);
            let value =
                serde_json::to_vec(&ring).map_err(|e| CoordError::invalid(e.to_string()))?;
            let r = self
                .backend
                .txn(pb::TxnRequest {
                    compare: vec![txn::mod_rev_is(KEYRING.to_string(), mod_rev)],
                    success: vec![txn::put(KEYRING.to_string(), value, 0)],
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                self.mirror.wait_for(txn::revision(&r)).await;
                break (ring, rewrapped);
            }
            if attempt >= 8 {
                return Err(CoordError::Conflict(
                    "the keyring kept changing under concurrent rotations; try again".into(),
                ));
            }
        };
        let secrets: Vec<(ConfigEntry, i64)> = self
            .cache
            .lock()
            .live
            .items
            .values()
            .filter(|(e, _)| e.sealed.is_some())
            .cloned()
            .collect();
        let (mut resealed, mut skipped, mut unreadable) = (0, 0, Vec::new());
        for (mut e, mod_rev) in secrets {
            let Some(old) = e.sealed.take() else { continue };
            if old.key == ring.active {
                continue;
            }
            let as_ = sealed_as(&e.key, e.version);
            let plain = match self.vault.open(&ring, &as_, &old) {
                Ok(p) => p,
                Err(err) => {
                    // One entry that does not open (tampered with, or under a
                    // key nobody has) does not hold the others back.
                    tracing::warn!(entry = %e.key, error = %err, "a secret entry does not open; left as it is");
                    unreadable.push(e.key.to_string());
                    continue;
                }
            };
            let s = self.vault.seal(&ring, &as_, &plain)?;
            e.checksum = s.checksum();
            e.sealed = Some(s);
            let value = serde_json::to_vec(&e).map_err(|e| CoordError::invalid(e.to_string()))?;
            let item_key = e.key.item_key();
            let r = self
                .backend
                .txn(pb::TxnRequest {
                    compare: vec![txn::mod_rev_is(item_key.clone(), mod_rev)],
                    success: vec![txn::put(item_key, value, 0)],
                    failure: vec![],
                })
                .await?;
            if r.succeeded {
                resealed += 1;
                self.mirror.wait_for(txn::revision(&r)).await;
            } else {
                skipped += 1;
            }
        }
        tracing::info!(active = %ring.active, rewrapped, resealed, skipped, "rotated the secrets' data key");
        Ok(secret::Rotated {
            active: ring.active,
            rewrapped,
            resealed,
            skipped,
            unreadable,
        })
    }

    /// The secrets' keys as this node sees them (ids only, never key material).
    pub fn secrets_status(&self) -> secret::SecretsStatus {
        let c = self.cache.lock();
        let masters = &self.vault.masters().0;
        let mut per_key: HashMap<&str, usize> = HashMap::new();
        let mut entries = 0;
        for (e, _) in c.live.items.values() {
            if let Some(s) = &e.sealed {
                entries += 1;
                *per_key.entry(s.key.as_str()).or_default() += 1;
            }
        }
        let ring = c.live.keyring.as_ref().map(|(r, _)| r);
        secret::SecretsStatus {
            enabled: self.vault.enabled(),
            master: masters.first().map(|m| m.id().to_string()),
            previous: masters.iter().skip(1).map(|m| m.id().to_string()).collect(),
            active: ring.map(|r| r.active.clone()),
            keys: ring
                .map(|r| {
                    r.keys
                        .iter()
                        .map(|k| secret::KeyStatus {
                            id: k.id.clone(),
                            master: k.master.clone(),
                            usable: masters.iter().any(|m| m.id() == k.master),
                            created_at_ms: k.created_at_ms,
                            entries: per_key.get(k.id.as_str()).copied().unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            entries,
        }
    }

    /// A unified diff and side-by-side rows between two versions.
    #[cfg(feature = "server")]
    pub async fn diff(&self, key: &ConfigKey, from: u64, to: u64) -> Result<VersionDiff> {
        let a = self.version(key, from).await?;
        let b = self.version(key, to).await?;
        Ok(VersionDiff {
            from,
            to,
            secret: a.entry.secret || b.entry.secret,
            unified: diff::unified(
                &a.entry.content,
                &b.entry.content,
                &format!("{key}@{from}"),
                &format!("{key}@{to}"),
                3,
            ),
            rows: diff::side_by_side(&a.entry.content, &b.entry.content),
        })
    }

    /// Starts (or replaces) a gray release of an existing entry.
    pub async fn start_beta(&self, key: &ConfigKey, req: BetaRequest) -> Result<BetaEntry> {
        self.check_content(&req.content, req.format)?;
        if req.addresses.is_empty() && req.labels.is_empty() {
            return Err(CoordError::invalid(
                "a gray release needs at least one client address or label to target",
            ));
        }
        if req.addresses.len() > 1000 || req.labels.len() > 64 {
            return Err(CoordError::invalid(
                "a gray release targets at most 1000 addresses and 64 labels",
            ));
        }
        free_text("author", &req.author, 256, false)?;
        // Read from the store and guard the write with its revision: an entry
        // made secret meanwhile gets no gray release (it would be in clear).
        let item_key = key.item_key();
        let (item, _) = self.backend.get(item_key.clone()).await?;
        let Some(item) = item else {
            return Err(CoordError::NotFound(format!(
                "no config entry {key}: publish it before a gray release"
            )));
        };
        let cur: ConfigEntry =
            serde_json::from_slice(&item.value).map_err(|e| corrupt(&item_key, e))?;
        if cur.secret {
            return Err(CoordError::invalid(format!(
                "{key} is a secret entry; gray releases of secrets are not supported \
                 (publish the new secret to a separate entry and switch readers to it)"
            )));
        }
        let beta = BetaEntry {
            key: key.clone(),
            checksum: checksum(&req.content),
            content: req.content,
            format: req.format,
            addresses: req.addresses,
            labels: req.labels,
            author: req.author,
            created_at_ms: now_ms(),
        };
        let value = serde_json::to_vec(&beta).map_err(|e| CoordError::invalid(e.to_string()))?;
        let r = self
            .backend
            .txn(pb::TxnRequest {
                compare: vec![txn::mod_rev_is(item_key, item.mod_revision)],
                success: vec![txn::put(key.beta_key(), value, 0)],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(CoordError::Conflict(format!(
                "{key} changed while the gray release was being started; try again"
            )));
        }
        self.mirror.wait_for(txn::revision(&r)).await;
        Ok(beta)
    }

    /// Ends a gray release: `promote` publishes the beta content to everyone as a new
    /// version; otherwise it is withdrawn.
    pub async fn end_beta(
        &self,
        key: &ConfigKey,
        promote: bool,
        author: &str,
    ) -> Result<Option<Published>> {
        // Read the beta from the store, not the local copy, and end exactly that one.
        let beta_key = key.beta_key();
        let (kv, _) = self.backend.get(beta_key.clone()).await?;
        let kv = kv.ok_or_else(|| CoordError::NotFound(format!("{key} has no gray release")))?;
        let beta: BetaEntry =
            serde_json::from_slice(&kv.value).map_err(|e| corrupt(&beta_key, e))?;
        let published = if promote {
            Some(
                self.write_version(
                    key,
                    Some(beta.content.clone()),
                    beta.format,
                    author,
                    "promoted gray release",
                    None,
                    "publish",
                    None,
                    None,
                )
                .await?,
            )
        } else {
            None
        };
        let r = self
            .backend
            .txn(pb::TxnRequest {
                compare: vec![txn::mod_rev_is(beta_key.clone(), kv.mod_revision)],
                success: vec![txn::delete(beta_key)],
                failure: vec![],
            })
            .await?;
        if !r.succeeded {
            return Err(CoordError::Conflict(format!(
                "the gray release of {key} was replaced while it was being ended; the new one stays{}",
                if promote {
                    " (the content read before was promoted)"
                } else {
                    ""
                }
            )));
        }
        self.mirror.wait_for(txn::revision(&r)).await;
        Ok(published)
    }

    /// The entries among `items` whose checksum for `client` differs from the one held
    /// (compared in place: no content is copied).
    pub fn changed(&self, items: &[Listening], client: &ClientIdentity) -> Vec<ConfigKey> {
        let c = self.cache.lock();
        items
            .iter()
            .filter(|l| {
                let now = match c.live.items.get(&l.key) {
                    None => "",
                    Some((e, _)) => match c.live.beta.get(&l.key) {
                        Some(b) if b.matches(client) => b.checksum.as_str(),
                        _ => e.checksum.as_str(),
                    },
                };
                now != l.checksum
            })
            .map(|l| l.key.clone())
            .collect()
    }

    /// Long-poll: returns as soon as any of `items` differs for `client`, or empty
    /// after `wait`.
    pub async fn listen(
        &self,
        items: &[Listening],
        client: &ClientIdentity,
        wait: Duration,
    ) -> Vec<ConfigKey> {
        let mut rx = self.changes.clone();
        let wait = wait.min(self.opts.max_wait);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            rx.borrow_and_update();
            let c = self.changed(items, client);
            if !c.is_empty() {
                return c;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Vec::new(),
            }
        }
    }

    /// Follows one entry for `client`: the current content (None if absent), then
    /// each time its effective checksum changes.
    pub fn subscribe(
        &self,
        key: ConfigKey,
        client: ClientIdentity,
    ) -> impl futures_util::Stream<Item = Option<Served>> + Send + 'static {
        let this = self.clone();
        let rx = this.changes.clone();
        futures_util::stream::unfold((rx, None::<String>), move |(mut rx, last)| {
            let this = this.clone();
            let key = key.clone();
            let client = client.clone();
            async move {
                loop {
                    rx.borrow_and_update();
                    let cur = this.get_for(&key, &client);
                    let sum = cur
                        .as_ref()
                        .map(|s| s.entry.checksum.clone())
                        .unwrap_or_default();
                    if last.as_deref() != Some(sum.as_str()) {
                        return Some((cur, (rx, Some(sum))));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        })
    }

    /// Records that failed to decode.
    pub fn bad_records(&self) -> u64 {
        self.cache.lock().live.bad_records
    }
}

/// A diff between two versions.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Serialize)]
pub struct VersionDiff {
    /// Older version.
    pub from: u64,
    /// Newer version.
    pub to: u64,
    /// Either version is secret.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub secret: bool,
    /// Unified diff text.
    pub unified: String,
    /// Side-by-side rows.
    pub rows: Vec<diff::DiffRow>,
}

/// Checks free text for size and control characters (none in a one-line
/// field; tabs and newlines only in a multi-line one), so what a writer
/// sent cannot carry terminal escapes into `meshwork config history`.
fn free_text(what: &str, text: &str, max: usize, multiline: bool) -> Result<()> {
    if text.len() > max {
        return Err(CoordError::invalid(format!(
            "{what} is {} bytes; the limit is {max}",
            text.len()
        )));
    }
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && !(multiline && (c == '\n' || c == '\t')))
    {
        return Err(CoordError::invalid(format!(
            "{what} holds the control character U+{:04X}; send plain text",
            c as u32
        )));
    }
    Ok(())
}
