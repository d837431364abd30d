//! Progressive delivery: a rollout shifts a service's traffic from the
//! versions it runs to a new one (by the instances' `version` field), step by
//! step (canary) or all at once after a health gate (blue-green), and at each
//! step compares the new version's error rate and p99 with the stable
//! version's, from the gateways' own counters. It promotes, holds, pauses or
//! rolls back by itself, and records each decision with its numbers.
//!
//! Layout in the store: the rollout of a service at
//! `/meshwork/rollouts/r/{service}` (spec and status, one JSON record, written
//! with a compare on its revision); each gateway's figures for the current
//! window at `/meshwork/rollouts/stats/{service}/{node}` on the gateway's
//! session lease. Gateways and SDK clients read the record's [`Split`]; the
//! controller on the node that owns the service's rollout (rendezvous over
//! the live coordination nodes) ticks it once a second.

#[cfg(feature = "server")]
pub mod controller;
pub mod machine;
pub mod tally;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::backend::{Backend, Event, KeyValue, Mirror, MirrorHandler, is_delete, mirror, txn};
use crate::error::{CoordError, Result};

/// Where rollouts are kept, one key per service.
pub const ROLLOUTS_PREFIX: &str = "/meshwork/rollouts/r/";
/// Where gateways publish their per-window figures.
pub const STATS_PREFIX: &str = "/meshwork/rollouts/stats/";
/// Most steps in a canary.
pub const MAX_STEPS: usize = 20;
/// Shortest step interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest step interval (a day).
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Default canary steps, percent.
pub const DEFAULT_STEPS: [u8; 4] = [5, 25, 50, 100];
/// Default step interval, ms.
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
/// Default wait for the new version's healthy instances, ms.
pub const DEFAULT_DEADLINE_MS: u64 = 600_000;
/// Longest a header or cookie pin's name or value may be.
pub const MAX_PIN_LEN: usize = 128;

/// The key of `service`'s rollout.
pub fn rollout_key(service: &str) -> String {
    format!("{ROLLOUTS_PREFIX}{service}")
}

/// The prefix of `service`'s gateway figures.
pub fn stats_prefix(service: &str) -> String {
    format!("{STATS_PREFIX}{service}/")
}

/// How traffic moves to the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Step by step through `steps`.
    #[default]
    Canary,
    /// All at once when enough instances of the new version are healthy;
    /// instant rollback.
    BlueGreen,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for healthy instances of the new version (weight 0).
    Waiting,
    /// Shifting traffic and analysing.
    Progressing,
    /// Stopped by an operator or a failure without automatic rollback.
    Paused,
    /// Done: the new version takes every request.
    Promoted,
    /// Done: every request goes to the stable version.
    RolledBack,
}

impl Phase {
    /// The phase's name in the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
        }
    }

    /// Whether nothing moves it any more.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Moved to a step (a weight).
    Advance,
    /// Kept the step: too little traffic to judge.
    Hold,
    /// Every request to the new version; done.
    Promote,
    /// Every request to the stable version; done.
    Rollback,
    /// Stopped deciding.
    Pause,
    /// Decides again.
    Resume,
}

impl Action {
    /// The action's name in the API and in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Advance => "advance",
            Action::Hold => "hold",
            Action::Promote => "promote",
            Action::Rollback => "rollback",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

/// When a new version fails its analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Analysis {
    /// Most the new version's error rate may exceed the stable version's,
    /// as a fraction (0.02 = two percentage points).
    pub max_error_rate_increase: f64,
    /// Most the new version's p99 may be, as a multiple of the stable one's...
    pub max_p99_ratio: f64,
    /// ...when it is also more than this many milliseconds above it.
    pub p99_slack_ms: f64,
    /// Requests to the new version a window needs before it is judged.
    pub min_requests: u64,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            max_error_rate_increase: 0.02,
            max_p99_ratio: 1.5,
            p99_slack_ms: 25.0,
            min_requests: 20,
        }
    }
}

/// Requests that always go to the new version: a header or a cookie with
/// this value (testers, internal users, a sticky beta group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// `header` or `cookie`.
    pub kind: PinKind,
    /// The header's or cookie's name.
    pub name: String,
    /// The value that pins.
    pub value: String,
}

/// What a [`Pin`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinKind {
    /// A request header.
    Header,
    /// A cookie.
    Cookie,
}

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The service.
    pub service: String,
    /// The new version (instances' `version` field).
    pub to_version: String,
    /// Canary or blue-green.
    #[serde(default)]
    pub strategy: Strategy,
    /// Canary weights in percent, increasing, the last 100.
    #[serde(default)]
    pub steps: Vec<u8>,
    /// How long each step (and blue-green's switch) is watched, ms.
    pub interval_ms: u64,
    /// The thresholds.
    #[serde(default)]
    pub analysis: Analysis,
    /// Roll back on a failed analysis (otherwise pause).
    pub auto_rollback: bool,
    /// Healthy instances of the new version the first step waits for.
    pub min_healthy: u32,
    /// Longest the first step waits for them, ms, before the rollout fails.
    pub deadline_ms: u64,
    /// Requests pinned to the new version.
    #[serde(default)]
    pub pin: Option<Pin>,
}

impl Spec {
    /// The weights the rollout goes through.
    pub fn weights(&self) -> Vec<u8> {
        match self.strategy {
            Strategy::Canary => self.steps.clone(),
            Strategy::BlueGreen => vec![100],
        }
    }

    /// Checks every field; the message names what to fix.
    pub fn validate(&self) -> Result<()> {
        crate::registry::model::validate_service_name(&self.service)?;
        if self.to_version.is_empty()
            || self.to_version.len() > 64
            || !self.to_version.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CoordError::invalid(
                "to_version: the new version needs 1 to 64 visible ASCII characters (no spaces)",
            ));
        }
        if self.strategy == Strategy::Canary {
            if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
                return Err(CoordError::invalid(format!(
                    "steps: a canary needs 1 to {MAX_STEPS} steps"
                )));
            }
            if self.steps.windows(2).any(|w| w[0] >= w[1])
                || self.steps.first().is_some_and(|&s| s == 0)
                || self.steps.last() != Some(&100)
            {
                return Err(CoordError::invalid(format!(
                    "steps {:?}: use increasing percentages above 0 that end at 100 (e.g. 5,25,50,100)",
                    self.steps
                )));
            }
        } else if !self.steps.is_empty() {
            return Err(CoordError::invalid(
                "steps: a blue-green rollout has no steps (it switches at once)",
            ));
        }
        let ms = |d: Duration| d.as_millis() as u64;
        if !(ms(MIN_INTERVAL)..=ms(MAX_INTERVAL)).contains(&self.interval_ms) {
            return Err(CoordError::invalid(format!(
                "interval_ms {} is out of range {}..={}",
                self.interval_ms,
                ms(MIN_INTERVAL),
                ms(MAX_INTERVAL)
            )));
        }
        if !(ms(MIN_INTERVAL)..=7 * ms(MAX_INTERVAL)).contains(&self.deadline_ms) {
            return Err(CoordError::invalid(format!(
                "deadline_ms {} is out of range {}..={}",
                self.deadline_ms,
                ms(MIN_INTERVAL),
                7 * ms(MAX_INTERVAL)
            )));
        }
        if self.min_healthy == 0 || self.min_healthy > 10_000 {
            return Err(CoordError::invalid("min_healthy is out of range 1..=10000"));
        }
        let a = &self.analysis;
        if !(0.0..=0.5).contains(&a.max_error_rate_increase) {
            return Err(CoordError::invalid(
                "analysis.max_error_rate_increase is a fraction in 0..=0.5 (0.02 = 2 points)",
            ));
        }
        if !(a.max_p99_ratio >= 1.0 && a.max_p99_ratio <= 1000.0) {
            return Err(CoordError::invalid(
                "analysis.max_p99_ratio is out of range 1..=1000",
            ));
        }
        if !(a.p99_slack_ms >= 0.0 && a.p99_slack_ms <= 3_600_000.0) {
            return Err(CoordError::invalid(
                "analysis.p99_slack_ms is out of range 0..=3600000",
            ));
        }
        if a.min_requests == 0 || a.min_requests > 1_000_000 {
            return Err(CoordError::invalid(
                "analysis.min_requests is out of range 1..=1000000",
            ));
        }
        if let Some(p) = &self.pin {
            let token = |s: &str| {
                !s.is_empty()
                    && s.len() <= MAX_PIN_LEN
                    && s.bytes()
                        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
            };
            if !token(&p.name) || !token(&p.value) || p.name.contains('=') {
                return Err(CoordError::invalid(format!(
                    "pin: name and value need 1 to {MAX_PIN_LEN} visible ASCII characters without ';' or ',' (and no '=' in the name)"
                )));
            }
            if p.kind == PinKind::Header && http_token(&p.name).is_none() {
                return Err(CoordError::invalid(format!(
                    "pin: {:?} is not a header name",
                    p.name
                )));
            }
        }
        Ok(())
    }
}

/// `name` lower-cased when it is a valid header name.
fn http_token(name: &str) -> Option<String> {
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        .then(|| name.to_ascii_lowercase())
}

/// One version's figures over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Tries sent to it.
    pub requests: u64,
    /// Tries answered with a 5xx or failed (connection errors, timeouts).
    pub failures: u64,
    /// The 99th percentile latency, ms (`None` without requests).
    pub p99_ms: Option<f64>,
    /// The latency distribution p99 comes from: non-empty buckets as
    /// (index, count) ([`latency_bucket`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<(u8, u64)>,
}

impl Window {
    /// Requests with a latency counted.
    pub fn timed(&self) -> u64 {
        self.latency
            .iter()
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }

    /// Requests certainly slower than `ms`: those in buckets whose lower
    /// bound is `ms` or more (a bucket spans 25 %, so some slower ones in
    /// the bucket holding `ms` are not counted).
    pub fn slower_than(&self, ms: f64) -> u64 {
        self.latency
            .iter()
            .filter(|(i, _)| *i > 0 && bucket_bound_ms(usize::from(*i) - 1) >= ms)
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }

    /// Failures per request (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.failures as f64 / self.requests as f64
        }
    }
}

/// One decision with the numbers it was taken on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When, Unix ms.
    pub at_ms: u64,
    /// What it did.
    pub action: Action,
    /// The step index after it.
    pub step: u32,
    /// The new version's weight after it, percent.
    pub weight: u8,
    /// Why, in words.
    pub reason: String,
    /// The new version's figures it judged.
    pub canary: Window,
    /// The stable version's figures it judged.
    pub stable: Window,
    /// The operator, for a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// Where the rollout is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// The current step's index.
    pub step: u32,
    /// The new version's share of the traffic now, percent.
    pub weight: u8,
    /// The current counting window (gateways count afresh when it changes).
    pub window: u32,
    /// When the current window started, Unix ms.
    pub window_started_ms: u64,
    /// When the rollout started, Unix ms.
    pub started_ms: u64,
    /// A hold was recorded in this window.
    #[serde(default)]
    pub held: bool,
    /// The new version's figures in the current window (the live comparison).
    pub canary: Window,
    /// The stable version's figures in the current window.
    pub stable: Window,
    /// The stable version's last window with enough requests: the reference
    /// when it gets too little traffic of its own (at 100 %).
    #[serde(default)]
    pub baseline: Option<Window>,
    /// Every decision, oldest first (at most [`machine::MAX_DECISIONS`]).
    pub decisions: Vec<Decision>,
}

/// A rollout: what was asked and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Unique per rollout (gateways' figures name it).
    pub id: String,
    /// What was asked.
    pub spec: Spec,
    /// Where it is.
    pub status: Status,
}

impl Rollout {
    /// A rollout waiting for its first step, started at `now_ms`.
    pub fn new(id: String, spec: Spec, now_ms: u64) -> Rollout {
        Rollout {
            id,
            spec,
            status: Status {
                phase: Phase::Waiting,
                step: 0,
                weight: 0,
                window: 1,
                window_started_ms: now_ms,
                started_ms: now_ms,
                held: false,
                canary: Window::default(),
                stable: Window::default(),
                baseline: None,
                decisions: Vec::new(),
            },
        }
    }

    /// What gateways and clients route by.
    pub fn split(&self) -> Split {
        Split {
            id: self.id.clone(),
            window: self.status.window,
            to_version: self.spec.to_version.clone(),
            weight: self.status.weight,
            pin: self.spec.pin.clone().map(|mut p| {
                if p.kind == PinKind::Header {
                    p.name = p.name.to_ascii_lowercase();
                }
                p
            }),
            counting: !self.status.phase.is_terminal(),
        }
    }
}

impl Pin {
    /// Whether a request with `headers` carries the pin (header names are
    /// matched case-insensitively, cookie names exactly).
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        match self.kind {
            PinKind::Header => headers
                .get_all(self.name.as_str())
                .iter()
                .any(|v| v.as_bytes() == self.value.as_bytes()),
            PinKind::Cookie => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().split_once('='))
                .any(|(n, v)| n == self.name && v.trim_matches('"') == self.value),
        }
    }
}

impl Split {
    /// Whether a request goes to the new version: pinned by its header or
    /// cookie, else by the weight (a retry prefers the stable version
    /// while both take traffic). A pinned request reaches the new version
    /// even before the first step, but not after a rollback.
    pub fn wants_new(&self, headers: &http::HeaderMap, retry: bool) -> bool {
        self.wants_new_by(headers, retry, None)
    }

    /// As [`Split::wants_new`], drawing the weight from `hash` when the
    /// request has one (a consistent-hash route: one key, one version).
    pub fn wants_new_by(&self, headers: &http::HeaderMap, retry: bool, hash: Option<u64>) -> bool {
        if self.weight > 0 && self.weight < 100 && retry {
            return false;
        }
        let rolled_back = self.weight == 0 && !self.counting;
        if self.weight < 100
            && !rolled_back
            && self.pin.as_ref().is_some_and(|p| p.matches(headers))
        {
            return true;
        }
        match self.weight {
            0 => false,
            100.. => true,
            w => match hash {
                // A different mix than the ring's, so the split is not
                // correlated with the endpoint the key lands on.
                Some(h) => (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100 < u64::from(w),
                None => rand::random_range(0..100u8) < w,
            },
        }
    }

    /// Whether an instance with `version` runs the new version.
    pub fn is_new(&self, version: Option<&str>) -> bool {
        version == Some(self.to_version.as_str())
    }
}

/// How traffic is split now: what a gateway or a client needs of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The rollout.
    pub id: String,
    /// The counting window.
    pub window: u32,
    /// Instances with this version are the new version; all others stable.
    pub to_version: String,
    /// The new version's share, percent.
    pub weight: u8,
    /// Requests pinned to the new version.
    pub pin: Option<Pin>,
    /// Whether gateways count and publish figures for it.
    pub counting: bool,
}

/// Latency buckets of the figures gateways publish: bucket `i` counts
/// latencies up to `50 µs × 1.25^i`; the last counts everything slower.
pub const LATENCY_BUCKETS: usize = 64;

/// The bucket of a latency in microseconds.
pub fn latency_bucket(us: u64) -> usize {
    if us <= 50 {
        return 0;
    }
    let i = ((us as f64 / 50.0).ln() / 1.25f64.ln()).ceil() as usize;
    i.min(LATENCY_BUCKETS - 1)
}

fn bucket_bound_ms(i: usize) -> f64 {
    0.05 * 1.25f64.powi(i as i32)
}

/// One version's counts as a gateway publishes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Tries.
    pub requests: u64,
    /// Failed tries.
    pub failures: u64,
    /// Non-empty latency buckets as (index, count).
    #[serde(default)]
    pub latency: Vec<(u8, u64)>,
}

impl Counts {
    fn add(&mut self, o: &Counts, buckets: &mut [u64; LATENCY_BUCKETS]) {
        // Figures come from the store: saturate rather than trust them.
        self.requests = self.requests.saturating_add(o.requests);
        self.failures = self.failures.saturating_add(o.failures);
        for &(i, c) in &o.latency {
            if let Some(b) = buckets.get_mut(i as usize) {
                *b = b.saturating_add(c);
            }
        }
    }
}

/// A gateway's figures for one window of one rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// The rollout.
    pub id: String,
    /// The window.
    pub window: u32,
    /// The new version's counts.
    pub canary: Counts,
    /// The stable version's counts.
    pub stable: Counts,
}

/// The p99 of bucketed latencies, ms, interpolated inside its bucket.
pub fn p99_ms(buckets: &[u64; LATENCY_BUCKETS]) -> Option<f64> {
    let total: u64 = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * 0.99).ceil().max(1.0);
    let mut seen = 0.0;
    for (i, &c) in buckets.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if seen + c as f64 >= rank {
            let lo = if i == 0 { 0.0 } else { bucket_bound_ms(i - 1) };
            let hi = bucket_bound_ms(i);
            return Some(lo + (hi - lo) * ((rank - seen) / c as f64));
        }
        seen += c as f64;
    }
    None
}

/// The new and stable versions' windows summed over every gateway's
/// figures for rollout `id`'s window `window`.
pub fn sum_figures<'a>(
    figures: impl Iterator<Item = &'a Figures>,
    id: &str,
    window: u32,
) -> (Window, Window) {
    let (mut c, mut s) = (Counts::default(), Counts::default());
    let (mut cb, mut sb) = ([0u64; LATENCY_BUCKETS], [0u64; LATENCY_BUCKETS]);
    for f in figures.filter(|f| f.id == id && f.window == window) {
        c.add(&f.canary, &mut cb);
        s.add(&f.stable, &mut sb);
    }
    let w = |c: Counts, b: &[u64; LATENCY_BUCKETS]| Window {
        requests: c.requests,
        failures: c.failures,
        p99_ms: p99_ms(b),
        latency: (0u8..)
            .zip(b.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i, *n))
            .collect(),
    };
    (w(c, &cb), w(s, &sb))
}

#[derive(Default)]
struct Copy {
    by_service: HashMap<String, (Arc<Rollout>, i64)>,
}

impl Copy {
    fn put(&mut self, kv: &KeyValue) {
        let Some(service) = std::str::from_utf8(&kv.key)
            .ok()
            .and_then(|k| k.strip_prefix(ROLLOUTS_PREFIX))
        else {
            return;
        };
        match serde_json::from_slice::<Rollout>(&kv.value) {
            Ok(r) => {
                self.by_service
                    .insert(service.to_string(), (Arc::new(r), kv.mod_revision));
            }
            Err(e) => tracing::warn!(service, error = %e, "unreadable rollout; ignored"),
        }
    }
}

struct Handler {
    copy: Arc<parking_lot::Mutex<Copy>>,
    changes: watch::Sender<u64>,
}

impl MirrorHandler for Handler {
    fn reset(&mut self, kvs: Vec<KeyValue>, _revision: i64) {
        let mut copy = self.copy.lock();
        copy.by_service.clear();
        for kv in &kvs {
            copy.put(kv);
        }
        self.changes.send_modify(|n| *n += 1);
    }

    fn apply(&mut self, events: Vec<Event>, _revision: i64) {
        let mut copy = self.copy.lock();
        for e in events {
            let delete = is_delete(&e);
            let Some(kv) = e.kv else { continue };
            if delete {
                if let Some(s) = std::str::from_utf8(&kv.key)
                    .ok()
                    .and_then(|k| k.strip_prefix(ROLLOUTS_PREFIX))
                {
                    copy.by_service.remove(s);
                }
            } else {
                copy.put(&kv);
            }
        }
        self.changes.send_modify(|n| *n += 1);
    }
}

/// Every rollout, as a watched copy; starts, commands and removals go through
/// the store with a compare on the record. Cheap to clone.
#[derive(Clone)]
pub struct Rollouts {
    backend: Backend,
    copy: Arc<parking_lot::Mutex<Copy>>,
    changes: watch::Receiver<u64>,
    mirror: Arc<Mirror>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts")
            .field("count", &self.copy.lock().by_service.len())
            .finish()
    }
}

/// Most rollouts kept at once (finished ones count until removed).
pub const MAX_ROLLOUTS: usize = 1_000;

impl Rollouts {
    /// Starts the watched copy; waits (briefly) for its first load.
    pub async fn open(backend: &Backend) -> Result<Rollouts> {
        let copy = Arc::new(parking_lot::Mutex::new(Copy::default()));
        let (tx, changes) = watch::channel(0);
        let m = mirror(
            backend,
            ROLLOUTS_PREFIX,
            Arc::new(parking_lot::Mutex::new(Handler {
                copy: copy.clone(),
                changes: tx,
            })),
        );
        if !m.loaded(Duration::from_secs(10)).await {
            return Err(CoordError::Unavailable(
                "loading the rollouts from the store timed out".into(),
            ));
        }
        Ok(Rollouts {
            backend: backend.clone(),
            copy,
            changes,
            mirror: Arc::new(m),
        })
    }

    /// Ticks on every change of any rollout.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The rollout of `service` and its record's revision.
    pub fn get(&self, service: &str) -> Option<(Arc<Rollout>, i64)> {
        self.copy.lock().by_service.get(service).cloned()
    }

    /// Every rollout, by service.
    pub fn list(&self) -> Vec<Arc<Rollout>> {
        let mut v: Vec<Arc<Rollout>> = self
            .copy
            .lock()
            .by_service
            .values()
            .map(|(r, _)| r.clone())
            .collect();
        v.sort_by(|a, b| a.spec.service.cmp(&b.spec.service));
        v
    }

    /// Every split, by service.
    pub fn splits(&self) -> HashMap<String, Split> {
        self.copy
            .lock()
            .by_service
            .iter()
            .map(|(s, (r, _))| (s.clone(), r.split()))
            .collect()
    }

    /// Starts a rollout of `spec`; a service whose rollout has not finished
    /// is a conflict (a finished one is replaced).
    pub async fn start(&self, spec: Spec) -> Result<Rollout> {
        spec.validate()?;
        let key = rollout_key(&spec.service);
        let existing = self.get(&spec.service);
        if let Some((r, _)) = &existing
            && !r.status.phase.is_terminal()
        {
            return Err(CoordError::Conflict(format!(
                "{} has a rollout to version {} that is {}; abort or finish it first",
                spec.service,
                r.spec.to_version,
                r.status.phase.as_str()
            )));
        }
        if existing.is_none() && self.copy.lock().by_service.len() >= MAX_ROLLOUTS {
            return Err(CoordError::invalid(format!(
                "{MAX_ROLLOUTS} rollouts exist; remove finished ones first"
            )));
        }
        let id = format!("{:016x}", rand::random::<u64>());
        let r = Rollout::new(id, spec, crate::registry::model::now_ms());
        let compare = match &existing {
            Some((_, rev)) => txn::mod_rev_is(key.clone(), *rev),
            None => txn::absent(key.clone()),
        };
        self.write(&key, &r, compare).await?;
        Ok(r)
    }

    /// Writes `r` if its record is still at `compare`; a conflict otherwise.
    async fn write(
        &self,
        key: &str,
        r: &Rollout,
        compare: meshwork_etcd::proto::etcdserverpb::Compare,
    ) -> Result<()> {
        let value = serde_json::to_vec(r).map_err(|e| CoordError::Backend(e.to_string()))?;
        let resp = self
            .backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![compare],
                success: vec![txn::put(key.to_string(), value, 0)],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Conflict(format!(
                "the rollout of {} changed meanwhile; try again",
                r.spec.service
            )));
        }
        self.mirror.wait_for(txn::revision(&resp)).await;
        Ok(())
    }

    /// Writes `r` over the record at revision `rev` (the controller's and
    /// the commands' write).
    pub async fn update(&self, r: &Rollout, rev: i64) -> Result<()> {
        let key = rollout_key(&r.spec.service);
        self.write(&key, r, txn::mod_rev_is(key.clone(), rev)).await
    }

    /// Applies an operator's command to `service`'s rollout.
    pub async fn command(
        &self,
        service: &str,
        c: machine::Command,
        by: &str,
    ) -> Result<(Rollout, Decision)> {
        // The controller writes the record too: a command that lost the
        // race is applied again to the newer record.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (r, rev) = self
                .get(service)
                .ok_or_else(|| CoordError::NotFound(format!("{service} has no rollout")))?;
            let mut r = (*r).clone();
            let d = machine::command(&mut r, c, crate::registry::model::now_ms(), by)
                .map_err(|e| CoordError::Conflict(e.0))?;
            match self.update(&r, rev).await {
                Ok(()) => return Ok((r, d)),
                Err(CoordError::Conflict(_)) if attempt < 5 => {
                    // Let the watched copy catch up with the winner's write.
                    let (_, now) = self.backend.get(rollout_key(service)).await?;
                    self.mirror.wait_for(now).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes `service`'s rollout (its record and the gateways' figures);
    /// one still running is a conflict unless `force`. False when none.
    pub async fn remove(&self, service: &str, force: bool) -> Result<bool> {
        let Some((r, rev)) = self.get(service) else {
            return Ok(false);
        };
        if !force && !r.status.phase.is_terminal() {
            return Err(CoordError::Conflict(format!(
                "the rollout of {service} is {}; abort it first (or force)",
                r.status.phase.as_str()
            )));
        }
        let key = rollout_key(service);
        let stats = stats_prefix(service);
        let resp = self
            .backend
            .txn(meshwork_etcd::proto::etcdserverpb::TxnRequest {
                compare: vec![txn::mod_rev_is(key.clone(), rev)],
                success: vec![
                    txn::delete(key),
                    meshwork_etcd::proto::etcdserverpb::RequestOp {
                        request: Some(
                            meshwork_etcd::proto::etcdserverpb::request_op::Request::RequestDeleteRange(
                                meshwork_etcd::proto::etcdserverpb::DeleteRangeRequest {
                                    range_end: crate::backend::prefix_end(stats.as_bytes()),
                                    key: stats.into_bytes().into(),
                                    ..Default::default()
                                },
                            ),
                        ),
                    },
                ],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Conflict(format!(
                "the rollout of {service} changed meanwhile; try again"
            )));
        }
        self.mirror.wait_for(txn::revision(&resp)).await;
        Ok(true)
    }

    /// Every gateway's published figures for `service`.
    pub async fn figures(&self, service: &str) -> Result<Vec<Figures>> {
        let (kvs, _) = self.backend.load_prefix(stats_prefix(service)).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect())
    }

    /// Publishes a gateway's figures under its node name, on `lease`.
    pub async fn publish(
        &self,
        service: &str,
        node: &str,
        figures: &Figures,
        lease: i64,
    ) -> Result<()> {
        let value = serde_json::to_vec(figures).map_err(|e| CoordError::Backend(e.to_string()))?;
        self.backend
            .put(format!("{}{node}", stats_prefix(service)), value, lease)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn p99_interpolates_inside_fine_buckets() {
        let mut b = [0u64; LATENCY_BUCKETS];
        for us in [1_000u64; 99] {
            b[latency_bucket(us)] += 1;
        }
        b[latency_bucket(200_000)] += 1;
        let p = p99_ms(&b).unwrap();
        assert!((0.9..=1.15).contains(&p), "{p}");
        b[latency_bucket(200_000)] += 5;
        let p = p99_ms(&b).unwrap();
        assert!((186.0..=233.0).contains(&p), "{p}");
        assert_eq!(p99_ms(&[0; LATENCY_BUCKETS]), None);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn specs_are_validated_with_the_field_named() {
        let ok = Spec {
            service: "web".into(),
            to_version: "2".into(),
            strategy: Strategy::Canary,
            steps: vec![5, 50, 100],
            interval_ms: 60_000,
            analysis: Analysis::default(),
            auto_rollback: true,
            min_healthy: 1,
            deadline_ms: 600_000,
            pin: None,
        };
        ok.validate().unwrap();
        for (bad, field) in [
            (
                Spec {
                    steps: vec![5, 5, 100],
                    ..ok.clone()
                },
                "steps",
            ),
            (
                Spec {
                    steps: vec![5, 50],
                    ..ok.clone()
                },
                "steps",
            ),
            (
                Spec {
                    steps: vec![0, 100],
                    ..ok.clone()
                },
                "steps",
            ),
            (
                Spec {
                    interval_ms: 10,
                    ..ok.clone()
                },
                "interval_ms",
            ),
            (
                Spec {
                    to_version: String::new(),
                    ..ok.clone()
                },
                "to_version",
            ),
            (
                Spec {
                    pin: Some(Pin {
                        kind: PinKind::Header,
                        name: "x y".into(),
                        value: "1".into(),
                    }),
                    ..ok.clone()
                },
                "pin",
            ),
            (
                Spec {
                    strategy: Strategy::BlueGreen,
                    ..ok.clone()
                },
                "steps",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn figures_of_other_windows_are_not_summed() {
        let f = |window, requests| Figures {
            id: "a".into(),
            window,
            canary: Counts {
                requests,
                failures: 1,
                latency: vec![(10, requests)],
            },
            stable: Counts::default(),
        };
        let all = [f(2, 10), f(2, 5), f(1, 100)];
        let (c, s) = sum_figures(all.iter(), "a", 2);
        assert_eq!((c.requests, c.failures, s.requests), (15, 2, 0));
        assert!(c.p99_ms.is_some() && s.p99_ms.is_none());
        assert_eq!((c.latency.clone(), c.timed()), (vec![(10, 15)], 15));
        // Bucket 10 holds latencies above bucket 9's bound.
        assert_eq!(c.slower_than(bucket_bound_ms(9)), 15);
        assert_eq!(c.slower_than(bucket_bound_ms(9) + 0.001), 0);
    }
}
