//! One HELP text per metric Meshwork writes, by name: Prometheus' conventions
//! ask for one meaning per name and a help text on each (`promtool check
//! metrics`). [`describe_all`] registers them with the installed recorder;
//! call it once the Prometheus recorder is installed.

/// A metric's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (latencies in seconds: histograms with buckets).
    Histogram,
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every metric: kind, name, help.
pub const METRICS: &[(Kind, &str, &str)] = &[
    // Store and etcd API.
    (
        C,
        "meshwork_store_puts_total",
        "Put requests applied by the embedded store.",
    ),
    (
        C,
        "meshwork_store_ranges_total",
        "Range (get) requests served by the embedded store.",
    ),
    (
        C,
        "meshwork_store_txns_total",
        "Txn requests applied by the embedded store.",
    ),
    (
        C,
        "meshwork_store_leases_expired_total",
        "Leases that ran out and were revoked with their keys.",
    ),
    (
        C,
        "meshwork_store_refused_batches_total",
        "Write batches refused (quota exceeded or the store stopped).",
    ),
    (
        C,
        "meshwork_store_watch_slow_total",
        "Watchers that fell behind their buffer and catch up from disk.",
    ),
    (
        H,
        "meshwork_store_commit_seconds",
        "Time of one group commit: apply, write-ahead log append and fsync.",
    ),
    (
        H,
        "meshwork_store_commit_batch_requests",
        "Write requests folded into one group commit.",
    ),
    (
        G,
        "meshwork_store_revision",
        "The store's current revision.",
    ),
    (
        G,
        "meshwork_store_db_size_bytes",
        "Size of the store's database file.",
    ),
    (
        G,
        "meshwork_listener_connections",
        "Connections open on a listener (label listener: http or etcd).",
    ),
    (
        C,
        "meshwork_listener_refused_connections_total",
        "Connections accepted and closed at once because the listener was at its limit.",
    ),
    (
        C,
        "meshwork_listener_timeouts_total",
        "Requests or connections closed by a header, body or idle deadline.",
    ),
    (
        C,
        "meshwork_listener_tls_failures_total",
        "TLS handshakes that failed (plaintext to a TLS port, an unknown client certificate, a protocol error).",
    ),
    (
        C,
        "meshwork_audit_entries_total",
        "Audit log entries written to the store.",
    ),
    (
        C,
        "meshwork_audit_dropped_total",
        "Audit log entries dropped: the queue was full or the store refused the write.",
    ),
    (
        C,
        "meshwork_api_rate_limited_total",
        "HTTP API calls refused because their token or login called faster than [console] token_rate_per_sec.",
    ),
    (
        C,
        "meshwork_listener_accept_errors_total",
        "Errors accepting connections (such as too many open files), waited out.",
    ),
    // Coordination.
    (
        G,
        "meshwork_cluster_nodes",
        "Nodes with a live membership session.",
    ),
    (
        C,
        "meshwork_coord_session_heals_total",
        "Times this node re-created its lost membership session.",
    ),
    (
        G,
        "meshwork_registry_services",
        "Services in the registry (on a node).",
    ),
    (
        G,
        "meshwork_registry_instances",
        "Instances in the registry (on a node).",
    ),
    (
        G,
        "meshwork_registry_revision",
        "Store revision of the registry copy this node serves from.",
    ),
    (
        G,
        "meshwork_discovery_instances",
        "Instances of a service in a client's local copy of its registry entry (what its discovery sees).",
    ),
    (
        G,
        "meshwork_discovery_revision",
        "Store revision of a client's local copy of a service's registry entry.",
    ),
    (
        C,
        "meshwork_health_checks_total",
        "Active health checks run by this node (label result: pass or fail).",
    ),
    (
        G,
        "meshwork_config_entries",
        "Configuration entries in the config center.",
    ),
    (
        G,
        "meshwork_config_gray_releases",
        "Configuration entries with a gray release in progress.",
    ),
    (
        C,
        "meshwork_config_publishes_total",
        "Configuration publishes accepted.",
    ),
    (
        C,
        "meshwork_config_decode_errors_total",
        "Configuration values a subscriber could not decode into its type.",
    ),
    (
        G,
        "meshwork_sdk_control_plane_up",
        "1 while the SDK reaches the control plane, 0 while it serves from its local copy.",
    ),
    // Resilience layers (gateway and SDK).
    (
        G,
        "meshwork_breaker_state",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
    ),
    (
        C,
        "meshwork_breaker_rejected_total",
        "Calls refused by an open circuit breaker.",
    ),
    (
        C,
        "meshwork_breaker_calls_total",
        "Calls through a circuit breaker (label outcome: success, failure or ignored).",
    ),
    (
        C,
        "meshwork_breaker_transitions_total",
        "Circuit breaker state changes (label to: the new state).",
    ),
    (
        C,
        "meshwork_bulkhead_rejected_total",
        "Calls refused by a full bulkhead.",
    ),
    (
        C,
        "meshwork_rate_limited_total",
        "Calls refused by a rate limiter.",
    ),
    (
        G,
        "meshwork_adaptive_limit",
        "Current limit of an adaptive concurrency limiter.",
    ),
    (
        C,
        "meshwork_shed_total",
        "Calls shed by a concurrency limiter (label by: the limiter).",
    ),
    (
        C,
        "meshwork_fallback_total",
        "Calls answered by a fallback after the call failed.",
    ),
    (C, "meshwork_retry_attempts_total", "Retries sent."),
    (
        C,
        "meshwork_retry_budget_exhausted_total",
        "Retries not sent because the retry budget was spent.",
    ),
    (
        C,
        "meshwork_outlier_ejections_total",
        "Endpoints ejected by outlier detection.",
    ),
    // Gateway.
    (
        C,
        "meshwork_gateway_requests_total",
        "Requests answered by the gateway, per route and status class.",
    ),
    (
        H,
        "meshwork_gateway_request_duration_seconds",
        "Time from a request's head to its response head, per route.",
    ),
    (
        C,
        "meshwork_gateway_upstream_requests_total",
        "Tries sent to upstream endpoints, per cluster and outcome.",
    ),
    (
        H,
        "meshwork_gateway_upstream_duration_seconds",
        "Time of one upstream try, per cluster.",
    ),
    (
        G,
        "meshwork_gateway_active_connections",
        "Client connections open on the gateway.",
    ),
    (
        G,
        "meshwork_gateway_breaker_state",
        "A route's circuit breaker state: 0 closed, 1 open, 2 half-open.",
    ),
    (
        C,
        "meshwork_gateway_rate_limited_total",
        "Requests refused by a route's rate limit.",
    ),
    (
        C,
        "meshwork_gateway_client_faults_total",
        "Requests whose client body failed (aborted, malformed, too large or too slow).",
    ),
    (
        C,
        "meshwork_rollout_decisions_total",
        "Rollout decisions taken by this node's controller, by service and action (advance, hold, promote, rollback, pause).",
    ),
    (
        G,
        "meshwork_rollout_weight_percent",
        "The new version's share of a service's traffic in its rollout, percent, as last written by this node's controller.",
    ),
    (
        C,
        "meshwork_gateway_ejections_total",
        "Upstream endpoints ejected by the gateway's outlier detection.",
    ),
    (
        C,
        "meshwork_gateway_route_apply_errors_total",
        "Route sets refused when applied (the previous set keeps serving).",
    ),
    // Transactions.
    (
        C,
        "meshwork_txn_started_total",
        "Distributed transactions started.",
    ),
    (
        C,
        "meshwork_txn_finished_total",
        "Distributed transactions finished (label status).",
    ),
    (
        C,
        "meshwork_txn_expired_total",
        "Transactions past their deadline (then compensated or aborted).",
    ),
    (
        C,
        "meshwork_txn_takeovers_total",
        "Transactions of a dead coordinator taken over by this node.",
    ),
    (
        G,
        "meshwork_txn_driving",
        "Transactions this node drives now.",
    ),
    (
        H,
        "meshwork_txn_duration_seconds",
        "Time from a transaction's start to its final state.",
    ),
    (
        H,
        "meshwork_txn_call_seconds",
        "Time of one branch call to a participant.",
    ),
    // Message broker.
    (
        C,
        "meshwork_mq_published_total",
        "Messages published, per topic.",
    ),
    (
        C,
        "meshwork_mq_delivered_total",
        "Deliveries to consumers, per topic and group.",
    ),
    (
        C,
        "meshwork_mq_redelivered_total",
        "Redeliveries (after a nack or an ack deadline), per topic and group.",
    ),
    (
        C,
        "meshwork_mq_acked_total",
        "Messages acked, per topic and group.",
    ),
    (
        C,
        "meshwork_mq_nacked_total",
        "Messages nacked, per topic and group.",
    ),
    (
        C,
        "meshwork_mq_dead_lettered_total",
        "Messages moved to a dead-letter topic, per topic and group.",
    ),
    (
        C,
        "meshwork_mq_duplicates_total",
        "Publishes dropped as duplicates of a recent message id.",
    ),
    (
        H,
        "meshwork_mq_commit_seconds",
        "Time of one broker group commit (write and fsync).",
    ),
    (
        G,
        "meshwork_mq_backlog_messages",
        "Messages not yet delivered, per topic and group.",
    ),
    (
        G,
        "meshwork_mq_unacked_messages",
        "Messages delivered and not yet acked, per topic and group.",
    ),
    (
        G,
        "meshwork_mq_dead_letters",
        "Messages in a group's dead-letter topic.",
    ),
    (
        G,
        "meshwork_mq_oldest_unfinished_age_seconds",
        "Age of a group's oldest message not yet acked.",
    ),
    (
        G,
        "meshwork_mq_log_bytes",
        "Bytes of a topic's log on disk.",
    ),
    (
        C,
        "meshwork_mq_half_prepared_total",
        "Half (transactional) messages prepared.",
    ),
    (
        C,
        "meshwork_mq_half_resolved_total",
        "Half messages committed or rolled back.",
    ),
    (
        C,
        "meshwork_mq_half_checks_total",
        "Check-backs sent to producers about unresolved half messages.",
    ),
    (
        C,
        "meshwork_mq_half_expired_total",
        "Half messages rolled back after their last check-back.",
    ),
    (
        G,
        "meshwork_mq_half_pending",
        "Half messages waiting for their producer's verdict.",
    ),
    (
        C,
        "meshwork_mq_meta_conflicts_total",
        "Topic or group settings that differed between the store and the broker.",
    ),
    // Cache.
    (
        C,
        "meshwork_cache_commands_total",
        "Commands run by the cache node.",
    ),
    (
        C,
        "meshwork_cache_keyspace_hits_total",
        "Key lookups that found the key.",
    ),
    (
        C,
        "meshwork_cache_keyspace_misses_total",
        "Key lookups that did not find the key.",
    ),
    (
        C,
        "meshwork_cache_expired_keys_total",
        "Keys removed because they expired.",
    ),
    (
        C,
        "meshwork_cache_evicted_keys_total",
        "Keys evicted to stay under maxmemory.",
    ),
    (
        C,
        "meshwork_cache_pubsub_cut_total",
        "Subscribers cut off because they did not read their messages.",
    ),
    (G, "meshwork_cache_keys", "Keys held by the cache node."),
    (
        G,
        "meshwork_cache_used_bytes",
        "Bytes of data the cache node accounts for (what maxmemory is checked against).",
    ),
    (
        G,
        "meshwork_cache_maxmemory_bytes",
        "The cache node's maxmemory (0: no limit).",
    ),
    (
        G,
        "meshwork_cache_clients",
        "Clients connected to the cache node.",
    ),
    // SDK.
    (
        C,
        "meshwork_sdk_server_requests_total",
        "Requests served by a service, per route, method and status.",
    ),
    (
        H,
        "meshwork_sdk_server_request_duration_seconds",
        "Time to serve a request, per route and method.",
    ),
    (
        H,
        "meshwork_sdk_call_duration_seconds",
        "Time of a call to another service (retries included), per service and outcome.",
    ),
    (
        C,
        "meshwork_sdk_fallbacks_total",
        "Calls answered by a target's fallback.",
    ),
    (
        C,
        "meshwork_sdk_cache_requests_total",
        "Two-level cache reads, per cache and result (l1, l2, load, negative).",
    ),
    (
        C,
        "meshwork_sdk_cache_loads_total",
        "Two-level cache loads from the source, per cache and outcome.",
    ),
    (
        H,
        "meshwork_sdk_cache_load_seconds",
        "Time of a two-level cache load from the source.",
    ),
    // Traces.
    (
        C,
        "meshwork_trace_spans_exported_total",
        "Spans this process exported.",
    ),
    (
        C,
        "meshwork_trace_spans_dropped_total",
        "Spans this process dropped because its export queue was full.",
    ),
    (
        C,
        "meshwork_trace_spans_export_failed_total",
        "Spans in export batches the collector refused or did not answer.",
    ),
    (
        C,
        "meshwork_traces_spans_received_total",
        "Spans received by the trace store.",
    ),
    (
        C,
        "meshwork_traces_spans_rejected_total",
        "Spans refused by the trace store (label reason: invalid or busy).",
    ),
    (
        C,
        "meshwork_traces_spans_expired_total",
        "Spans removed by the trace store's retention.",
    ),
    (
        C,
        "meshwork_traces_spans_sampled_out_total",
        "Spans of traces the trace store's tail sampling dropped.",
    ),
    (G, "meshwork_traces_spans", "Spans in the trace store."),
    (G, "meshwork_traces_traces", "Traces in the trace store."),
    (
        G,
        "meshwork_traces_disk_bytes",
        "Bytes of the trace store's segments on disk.",
    ),
    // Service identity.
    (
        C,
        "meshwork_identity_issued_total",
        "Service certificates this node's issuer signed.",
    ),
    // The demo shop.
    (
        C,
        "shop_orders_total",
        "Orders placed in the demo shop (label outcome).",
    ),
];

/// Registers every help text with the installed recorder.
pub fn describe_all() {
    for &(kind, name, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Bucket bounds (seconds) of every latency histogram (`*_seconds`): 0.5 ms
/// to 30 s, about 2.5x apart, enough for `histogram_quantile` across nodes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The Prometheus recorder's builder: latency histograms (`*_seconds`) with
/// [`LATENCY_BUCKETS`] (not summaries, so they aggregate across nodes), the
/// commit batch sizes with [`BATCH_BUCKETS`].
pub fn builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let b = PrometheusBuilder::new();
    let b = match b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS) {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    };
    match b.set_buckets_for_metric(
        Matcher::Full("meshwork_store_commit_batch_requests".into()),
        BATCH_BUCKETS,
    ) {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    }
}

/// The bucket bounds [`builder`] gives the histogram `name`, `None` if it
/// is not one of ours.
pub fn buckets_for(name: &str) -> Option<&'static [f64]> {
    if name == "meshwork_store_commit_batch_requests" {
        Some(BATCH_BUCKETS)
    } else if name.ends_with("_seconds") {
        Some(LATENCY_BUCKETS)
    } else {
        None
    }
}

/// Bucket bounds of the group-commit batch size histogram.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// The process and build metrics every Prometheus client library writes,
/// in the text format: `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
/// `process_threads` (Linux, from `/proc/self`), and `{prefix}_build_info`
/// with the version.
pub fn process_text(prefix: &str, version: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    if let Some(p) = proc_stats() {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            p.cpu_secs,
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.rss_bytes,
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.vsize_bytes,
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_secs,
        );
        metric(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            p.threads,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    if let Some(max) = max_fds() {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
    let _ = write!(
        out,
        "# HELP {prefix}_build_info A metric with a constant '1' value labeled by the version that built it.\n# TYPE {prefix}_build_info gauge\n{prefix}_build_info{{version=\"{version}\"}} 1\n"
    );
    out
}

/// `AT_CLKTCK` in the ELF auxiliary vector: the kernel's clock ticks per second.
const AT_CLKTCK: u64 = 17;

/// Clock ticks per second of `/proc`'s CPU times: the kernel's `AT_CLKTCK`
/// from `/proc/self/auxv`, or the usual 100 when it cannot be read.
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::fs::read("/proc/self/auxv")
            .ok()
            .and_then(|b| auxv_value(&b, AT_CLKTCK))
            .filter(|t| *t > 0)
            .map_or(100.0, |t| t as f64)
    })
}

/// The value of `key` in an auxiliary vector (native-endian word pairs).
fn auxv_value(auxv: &[u8], key: u64) -> Option<u64> {
    const W: usize = std::mem::size_of::<usize>();
    auxv.chunks_exact(2 * W).find_map(|pair| {
        let word = |b: &[u8]| {
            let mut a = [0u8; W];
            a.copy_from_slice(b);
            usize::from_ne_bytes(a) as u64
        };
        (word(&pair[..W]) == key).then(|| word(&pair[W..]))
    })
}

/// Fields of `/proc/{pid}/stat` from the state (field 3) on: the command
/// name before them is in parentheses and may hold spaces.
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// CPU seconds (user + system) of `/proc/{pid}` (`self` for this process;
/// `machine` for every busy CPU of the machine, from `/proc/stat`).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    if pid == "machine" {
        let s = std::fs::read_to_string("/proc/stat").ok()?;
        let f: Vec<f64> = s
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<Vec<f64>>>()?;
        let idle = f.get(3)? + f.get(4)?;
        return Some((f.iter().sum::<f64>() - idle) / clock_ticks());
    }
    let f = stat_fields(pid)?;
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clock_ticks())
}

/// A `/proc/{pid}/status` field in KiB (`VmRSS`, `VmHWM`, ...) or as a count (`Threads`).
pub fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

struct ProcStats {
    cpu_secs: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    start_secs: f64,
    threads: f64,
}

fn proc_stats() -> Option<ProcStats> {
    let f = stat_fields("self")?;
    let start_ticks: f64 = f.get(19)?.parse().ok()?;
    Some(ProcStats {
        cpu_secs: cpu_secs("self")?,
        rss_bytes: status_kb("self", "VmRSS")? as f64 * 1024.0,
        vsize_bytes: status_kb("self", "VmSize")? as f64 * 1024.0,
        start_secs: boot_time()? + start_ticks / clock_ticks(),
        threads: status_kb("self", "Threads")? as f64,
    })
}

fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<f64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_name_is_described_once_with_its_conventions() {
        let mut seen = std::collections::HashSet::new();
        for &(kind, name, help) in METRICS {
            assert!(seen.insert(name), "{name} twice");
            assert!(!help.is_empty() && help.ends_with('.'), "{name}: {help:?}");
            assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}");
        }
    }

    #[test]
    fn the_clock_tick_is_read_from_the_auxiliary_vector() {
        // Linux puts AT_CLKTCK in every process's auxv (100 on common kernels).
        let auxv = std::fs::read("/proc/self/auxv").unwrap();
        let t = auxv_value(&auxv, AT_CLKTCK).unwrap();
        assert!(t > 0);
        assert_eq!(clock_ticks(), t as f64);
        let w = std::mem::size_of::<usize>();
        let mut fake = Vec::new();
        for (k, v) in [(3usize, 7usize), (17, 250), (0, 0)] {
            fake.extend_from_slice(&k.to_ne_bytes());
            fake.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(fake.len(), 6 * w);
        assert_eq!(auxv_value(&fake, AT_CLKTCK), Some(250));
        assert_eq!(auxv_value(&fake, 99), None);
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let t = process_text("meshwork", "1.2.3");
        for want in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "meshwork_build_info{version=\"1.2.3\"} 1",
        ] {
            assert!(t.contains(want), "{want} in {t}");
        }
    }
}
