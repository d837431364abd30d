//! Exemplars: for each latency histogram series and bucket, the last sampled
//! trace whose observation fell in that bucket. When a scraper asks for the
//! OpenMetrics format (`Accept: application/openmetrics-text`, as Prometheus
//! does), [`openmetrics`] writes the metrics in that format with each
//! bucket's exemplar after its sample, so a spike on a latency chart links to
//! a trace that shows it.
//!
//! Exemplars cost nothing until the first OpenMetrics scrape: until then
//! [`offer`] and [`Histogram::record`] only record the histogram. After it,
//! a sampled observation takes one uncontended lock of its bucket (skipped,
//! not waited for, if another thread holds it).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::TraceContext;

/// The `Content-Type` of an OpenMetrics exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of the Prometheus text exposition.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Set by the first OpenMetrics scrape: from then on exemplars are kept.
static WANTED: AtomicBool = AtomicBool::new(false);

/// Whether an `Accept` header asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.5,text/plain;...`).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            let refused = params.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// One exemplar: the trace and span, the observed value, when (Unix seconds).
#[derive(Clone, Copy)]
struct Exemplar {
    trace_id: [u8; 32],
    span_id: [u8; 16],
    value: f64,
    at: f64,
}

/// A series' exemplars, one per bucket (the last is `+Inf`).
struct Slots {
    bounds: &'static [f64],
    last: Box<[Mutex<Option<Exemplar>>]>,
}

impl Slots {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            last: (0..=bounds.len()).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn put(&self, value: f64, trace: &TraceContext) {
        let (Ok(trace_id), Ok(span_id)) = (
            <[u8; 32]>::try_from(trace.trace_id.as_bytes()),
            <[u8; 16]>::try_from(trace.span_id.as_bytes()),
        ) else {
            return;
        };
        if !value.is_finite() {
            return;
        }
        // Buckets are cumulative and inclusive (`le`): the first bound >= value.
        let i = self.bounds.partition_point(|&b| b < value);
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(mut slot) = self.last.get(i).and_then(|s| s.try_lock()) {
            *slot = Some(Exemplar {
                trace_id,
                span_id,
                value,
                at,
            });
        }
    }

    fn get(&self, le: &str) -> Option<Exemplar> {
        let i = if le == "+Inf" {
            self.bounds.len()
        } else {
            let le: f64 = le.parse().ok()?;
            self.bounds.iter().position(|&b| b == le)?
        };
        *self.last.get(i)?.lock()
    }
}

/// Every series with exemplars, by its name and labels as the exporter
/// writes them (`name{k="v",...}`). Bounded by the number of series, as the
/// exporter's own registry is.
fn series() -> &'static Mutex<HashMap<String, Arc<Slots>>> {
    static SERIES: OnceLock<Mutex<HashMap<String, Arc<Slots>>>> = OnceLock::new();
    SERIES.get_or_init(Default::default)
}

fn series_key(key: &metrics::Key) -> String {
    let (name, labels) = metrics_exporter_prometheus::formatting::key_to_parts(key, None);
    format!("{name}{{{}}}", labels.join(","))
}

fn slots(name: &'static str, labels: Vec<metrics::Label>) -> Option<Arc<Slots>> {
    let bounds = crate::metrics::buckets_for(name)?;
    let key = series_key(&metrics::Key::from_parts(name, labels));
    Some(
        series()
            .lock()
            .entry(key)
            .or_insert_with(|| Arc::new(Slots::new(bounds)))
            .clone(),
    )
}

fn to_labels(labels: &[(&'static str, &str)]) -> Vec<metrics::Label> {
    labels
        .iter()
        .map(|&(k, v)| metrics::Label::new(k, v.to_owned()))
        .collect()
}

/// A histogram handle that also keeps its series' exemplars: for series
/// made once and recorded often (a gateway route, an upstream cluster).
#[derive(Clone)]
pub struct Histogram {
    inner: metrics::Histogram,
    slots: Option<Arc<Slots>>,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").finish_non_exhaustive()
    }
}

impl Histogram {
    /// The histogram `name` with `labels`, in the installed recorder.
    pub fn new(name: &'static str, labels: &[(&'static str, &str)]) -> Self {
        let labels = to_labels(labels);
        Self {
            inner: metrics::histogram!(name, labels.clone()),
            slots: slots(name, labels),
        }
    }

    /// Records `value`; if `trace` is sampled it becomes its bucket's
    /// exemplar (once exemplars are wanted).
    pub fn record(&self, value: f64, trace: Option<&TraceContext>) {
        self.inner.record(value);
        if let (Some(slots), Some(trace)) = (&self.slots, trace)
            && WANTED.load(Ordering::Relaxed)
            && trace.sampled()
        {
            slots.put(value, trace);
        }
    }
}

/// Offers a sampled trace as the exemplar of the series `name{labels}` for
/// an observation already recorded in its histogram (for series looked up
/// per call). Does nothing until exemplars are wanted or if the trace is not
/// sampled.
pub fn offer(
    name: &'static str,
    labels: &[(&'static str, &str)],
    value: f64,
    trace: &TraceContext,
) {
    if !WANTED.load(Ordering::Relaxed) || !trace.sampled() {
        return;
    }
    if let Some(slots) = slots(name, to_labels(labels)) {
        slots.put(value, trace);
    }
}

/// The exposition a scraper asked for with `accept`: `text` (Prometheus'
/// text format) as it is, or in OpenMetrics with exemplars. Returns the
/// `Content-Type` and the body.
pub fn exposition(accept: Option<&str>, text: String) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS_CONTENT_TYPE, openmetrics(&text))
    } else {
        (PROMETHEUS_CONTENT_TYPE, text)
    }
}

/// The metrics `text` (Prometheus text format, as the exporter and
/// [`crate::metrics::process_text`] write it) in the OpenMetrics 1.0 format:
/// counter families named without `_total`, `untyped` as `unknown`, no
/// blank lines, each histogram bucket followed by its exemplar where one is
/// kept, and the closing `# EOF`. Marks exemplars as wanted.
pub fn openmetrics(text: &str) -> String {
    WANTED.store(true, Ordering::Relaxed);
    let kinds: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .map(|(name, kind)| (name, kind.trim()))
        .collect();
    let family = |name: &str| match kinds.get(name) {
        Some(&"counter") => name.strip_suffix("_total").unwrap_or(name).to_owned(),
        _ => name.to_owned(),
    };
    let series = series().lock();
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let kind = match kind.trim() {
                "untyped" => "unknown",
                k => k,
            };
            let _ = writeln!(out, "# TYPE {} {kind}", family(name));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // OpenMetrics escapes quotes in help text too.
            let _ = writeln!(out, "# HELP {} {}", family(name), escape_quotes(help));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // A counter's sample is always `<family>_total`.
        if kinds.get(name) == Some(&"counter") && !name.ends_with("_total") {
            let _ = write!(out, "{name}_total{}", &line[name_end..]);
        } else {
            out.push_str(line);
        }
        if let Some(base) = name.strip_suffix("_bucket")
            && kinds.get(base) == Some(&"histogram")
            && let Some(e) = bucket_exemplar(&series, base, &line[name_end..])
        {
            let _ = write!(
                out,
                " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {:.3}",
                std::str::from_utf8(&e.trace_id).unwrap_or_default(),
                std::str::from_utf8(&e.span_id).unwrap_or_default(),
                e.value,
                e.at
            );
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// The exemplar of a bucket sample (`{k="v",le="0.005"} 3`) of `base`.
fn bucket_exemplar(
    series: &HashMap<String, Arc<Slots>>,
    base: &str,
    rest: &str,
) -> Option<Exemplar> {
    let labels = rest.strip_prefix('{')?;
    let close = labels.rfind('}')?;
    let labels = &labels[..close];
    // The exporter writes `le` last; its value has no quotes in it.
    let le_at = labels.rfind("le=\"")?;
    let le = labels[le_at + 4..].strip_suffix('"')?;
    let own = labels[..le_at].trim_end_matches(',');
    series.get(&format!("{base}{{{own}}}"))?.get(le)
}

fn escape_quotes(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut escaped = false;
    for c in help.chars() {
        if c == '"' && !escaped {
            out.push('\\');
        }
        escaped = c == '\\' && !escaped;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn sampled(trace: &str, span: &str) -> TraceContext {
        TraceContext {
            trace_id: trace.to_owned(),
            parent_id: None,
            span_id: span.to_owned(),
            flags: "01".to_owned(),
        }
    }

    #[test]
    fn accept_headers() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
        assert!(!wants_openmetrics(None));
    }

    /// Through the real exporter: a bucket's exemplar is the last sampled
    /// trace that fell in it; counters and other families are rewritten as
    /// OpenMetrics wants them.
    #[test]
    fn exemplars_follow_their_bucket_in_openmetrics() {
        let recorder = crate::metrics::builder().build_recorder();
        let handle = recorder.handle();
        let (t1, t2) = ("1".repeat(32), "2".repeat(32));
        metrics::with_local_recorder(&recorder, || {
            let _ = openmetrics(""); // exemplars are wanted from here on
            metrics::describe_counter!("demo_requests_total", "Requests \"served\".");
            metrics::counter!("demo_requests_total", "route" => "a\"b").increment(3);
            let h = Histogram::new("demo_request_duration_seconds", &[("route", "a\"b")]);
            h.record(0.004, Some(&sampled(&t1, &"a".repeat(16))));
            // Not sampled: counted, never an exemplar.
            let mut unsampled = sampled(&t2, &"b".repeat(16));
            unsampled.flags = "00".into();
            h.record(0.2, Some(&unsampled));
            h.record(0.003, None);
            metrics::histogram!("demo_call_seconds", "service" => "inv").record(42.0);
            offer(
                "demo_call_seconds",
                &[("service", "inv")],
                42.0,
                &sampled(&t2, &"c".repeat(16)),
            );
        });
        let text = openmetrics(&handle.render());
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(!text.contains("\n\n"), "{text}");
        assert!(text.contains("# TYPE demo_requests counter\n"), "{text}");
        assert!(
            text.contains("# HELP demo_requests Requests \\\"served\\\".\n"),
            "{text}"
        );
        assert!(
            text.contains("demo_requests_total{route=\"a\\\"b\"} 3\n"),
            "{text}"
        );
        let bucket = text
            .lines()
            .find(|l| {
                l.starts_with("demo_request_duration_seconds_bucket{route=\"a\\\"b\",le=\"0.005\"}")
            })
            .unwrap();
        assert!(
            bucket.contains(&format!(
                "}} 2 # {{trace_id=\"{t1}\",span_id=\"{}\"}} 0.004 ",
                "a".repeat(16)
            )),
            "{bucket}"
        );
        // The 0.25 bucket holds the unsampled 0.2: no exemplar.
        let quarter = text
            .lines()
            .find(|l| l.contains("le=\"0.25\"") && l.starts_with("demo_request_duration"))
            .unwrap();
        assert!(!quarter.contains('#'), "{quarter}");
        let inf = text
            .lines()
            .find(|l| l.starts_with("demo_call_seconds_bucket{service=\"inv\",le=\"+Inf\"}"))
            .unwrap();
        assert!(inf.contains(&format!("trace_id=\"{t2}\"")), "{inf}");
    }
}
