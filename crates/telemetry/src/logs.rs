//! Log lines tied to traces: a `tracing` layer ([`TraceLogLayer`]) that keeps
//! the process's own log lines written inside a span carrying a `trace_id`
//! field (the gateway's request span, the SDK's server span, the transaction
//! coordinator's branch calls) in a bounded ring ([`TraceLogs`]), so that a
//! trace's view can show them next to its spans. The fmt layer prints the same
//! lines with the span's fields (`trace_id`, `span_id`) in text and JSON.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Lines kept by default.
pub const DEFAULT_LINES: usize = 10_000;
/// Longest line kept (longer ones are cut).
pub const MAX_LINE_BYTES: usize = 2048;

/// One log line written inside a traced span.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// The trace (32 hex digits).
    pub trace_id: String,
    /// The span the line was written in, when it carries a `span_id` field.
    pub span_id: String,
    /// When, ms since the epoch.
    pub time_ms: u64,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module that wrote it.
    pub target: String,
    /// The message and its fields, as the text format writes them.
    pub message: String,
}

/// A bounded ring of recent traced log lines.
pub struct TraceLogs {
    lines: Mutex<VecDeque<LogLine>>,
    capacity: usize,
}

impl TraceLogs {
    /// A ring keeping the newest `capacity` lines.
    pub fn new(capacity: usize) -> Arc<TraceLogs> {
        Arc::new(TraceLogs {
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
        })
    }

    fn push(&self, line: LogLine) {
        let mut l = self.lines.lock();
        if l.len() >= self.capacity {
            l.pop_front();
        }
        l.push_back(line);
    }

    /// The lines of trace `trace_id` (lower-case hex), oldest first.
    pub fn for_trace(&self, trace_id: &str) -> Vec<LogLine> {
        self.lines
            .lock()
            .iter()
            .filter(|l| l.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

static GLOBAL: OnceLock<Arc<TraceLogs>> = OnceLock::new();

/// The process's ring, once [`TraceLogLayer::global`] installed one.
pub fn global() -> Option<&'static Arc<TraceLogs>> {
    GLOBAL.get()
}

/// The ids a traced span carries (kept in its extensions).
struct SpanIds {
    trace_id: String,
    span_id: String,
}

#[derive(Default)]
struct IdVisitor {
    trace_id: Option<String>,
    span_id: Option<String>,
}

impl Visit for IdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value.to_string()),
            "span_id" => self.span_id = Some(value.to_string()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "trace_id" => self.trace_id = Some(format!("{value:?}")),
            "span_id" => self.span_id = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.0.len() >= MAX_LINE_BYTES {
            return;
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if self.0.len() >= MAX_LINE_BYTES {
            return;
        }
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// The layer that fills a [`TraceLogs`] ring.
pub struct TraceLogLayer {
    logs: Arc<TraceLogs>,
}

impl TraceLogLayer {
    /// A layer filling `logs`.
    pub fn new(logs: Arc<TraceLogs>) -> Self {
        TraceLogLayer { logs }
    }

    /// A layer filling the process's ring ([`global`]), created with
    /// `capacity` lines on the first call.
    pub fn global(capacity: usize) -> Self {
        TraceLogLayer {
            logs: GLOBAL.get_or_init(|| TraceLogs::new(capacity)).clone(),
        }
    }
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl<S> Layer<S> for TraceLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut v = IdVisitor::default();
        attrs.record(&mut v);
        if let Some(trace_id) = v.trace_id.filter(|t| is_hex_id(t))
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(SpanIds {
                trace_id,
                span_id: v.span_id.unwrap_or_default(),
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        let mut ids = None;
        for span in scope {
            if let Some(i) = span.extensions().get::<SpanIds>() {
                ids = Some((i.trace_id.clone(), i.span_id.clone()));
                break;
            }
        }
        let Some((trace_id, span_id)) = ids else {
            return;
        };
        let mut m = MessageVisitor(String::new());
        event.record(&mut m);
        let mut message = m.0;
        if message.len() > MAX_LINE_BYTES {
            let mut end = MAX_LINE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let meta = event.metadata();
        self.logs.push(LogLine {
            trace_id,
            span_id,
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn lines_inside_a_traced_span_are_kept_and_the_ring_is_bounded() {
        let logs = TraceLogs::new(3);
        let sub = tracing_subscriber::registry().with(TraceLogLayer::new(logs.clone()));
        tracing::subscriber::with_default(sub, || {
            tracing::info!("outside any span");
            let t = "4bf92f3577b34da6a3ce929d0e0e4736";
            let span = tracing::info_span!("req", trace_id = %t, span_id = "00f067aa0ba902b7");
            let _g = span.enter();
            let inner = tracing::info_span!("inner");
            let _i = inner.enter();
            for n in 0..4 {
                tracing::warn!(attempt = n, "upstream failed");
            }
        });
        let got = logs.for_trace("4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].message, "upstream failed attempt=1");
        assert_eq!(got[0].level, "WARN");
        assert_eq!(got[0].span_id, "00f067aa0ba902b7");
        assert!(
            logs.for_trace("ffffffffffffffffffffffffffffffff")
                .is_empty()
        );
    }
}
