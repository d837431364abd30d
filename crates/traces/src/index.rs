//! The in-memory index over every stored span: traces by id and by start
//! time, each with its spans' services, operations, durations, status and
//! attribute hashes, and where each span lies on disk. Rebuilt from the
//! segments at start; entries leave with the segment that holds them.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::model::SpanMeta;

/// Operation names kept in the index at most; names past it (a service
/// putting ids in span names) are matched on disk instead.
pub(crate) const MAX_OPERATIONS: usize = 100_000;
/// The id of an operation name the index did not keep.
const OTHER_OP: u32 = u32::MAX;

/// Where a span lies: segment, offset and length of its record's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) seg: u32,
    pub(crate) off: u32,
    pub(crate) len: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct SpanRef {
    pub(crate) loc: Loc,
    pub(crate) service: u32,
    pub(crate) op: u32,
    pub(crate) start_ns: u64,
    pub(crate) dur_ns: u64,
    pub(crate) span_id: u64,
    pub(crate) parent: u64,
    pub(crate) error: bool,
}

#[derive(Default)]
pub(crate) struct TraceEntry {
    pub(crate) start_ns: u64,
    pub(crate) end_ns: u64,
    pub(crate) spans: Vec<SpanRef>,
    /// Sorted, deduplicated attribute hashes of all its spans.
    pub(crate) attrs: Vec<u32>,
}

/// A search over the index.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Some span of the trace is from this service.
    pub service: Option<String>,
    /// ... with this span name (with `service`, of that service).
    pub operation: Option<String>,
    /// ... lasting at least this long (ns).
    pub min_duration_ns: Option<u64>,
    /// ... lasting at most this long (ns).
    pub max_duration_ns: Option<u64>,
    /// `Some(true)`: the trace has an error span; `Some(false)`: it has none.
    pub error: Option<bool>,
    /// Attributes `key=value` the trace's spans carry (all of them must be found).
    pub attributes: Vec<(String, String)>,
    /// Traces starting at or after this time (ns since the epoch).
    pub start_ns: Option<u64>,
    /// Traces starting at or before this time (ns since the epoch).
    pub end_ns: Option<u64>,
    /// At most this many traces, newest first (or slowest first).
    pub limit: usize,
    /// Slowest first instead of newest first (over at most
    /// [`MAX_SORTED_CANDIDATES`] matching traces, the newest).
    pub slowest_first: bool,
}

/// Matching traces a slowest-first search looks at, at most.
pub const MAX_SORTED_CANDIDATES: usize = 200_000;

/// One trace in a search result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TraceSummary {
    /// The trace id (32 hex digits).
    pub trace_id: String,
    /// The root span's service (or the earliest span's when the root is missing).
    pub root_service: String,
    /// The root span's name.
    pub root_operation: String,
    /// Start of the earliest span, ns since the epoch (as a string: it exceeds 2^53).
    pub start_unix_nano: String,
    /// Start in ms since the epoch.
    pub start_ms: f64,
    /// From the earliest start to the latest end, ms.
    pub duration_ms: f64,
    /// Spans stored.
    pub spans: usize,
    /// Spans with an error status.
    pub errors: usize,
    /// Services taking part, with their span counts.
    pub services: BTreeMap<String, usize>,
}

/// A service-to-service edge of the dependency graph.
#[derive(Clone, Debug, serde::Serialize, PartialEq, Eq)]
pub struct Edge {
    /// The calling service (the parent span's).
    pub parent: String,
    /// The called service (the child span's).
    pub child: String,
    /// Child spans seen.
    pub calls: u64,
    /// Of which with an error status.
    pub errors: u64,
}

/// Interned names.
#[derive(Default)]
struct Names {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn id(&mut self, name: &str, cap: usize) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if self.names.len() >= cap {
            return OTHER_OP;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    fn get(&self, id: u32) -> &str {
        self.names
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// The index.
#[derive(Default)]
pub(crate) struct Index {
    services: Names,
    /// Operation names per (service, name), as "service\0name".
    ops: Names,
    /// Each service's operation ids.
    service_ops: HashMap<u32, HashSet<u32>>,
    traces: HashMap<[u8; 16], TraceEntry>,
    by_start: BTreeMap<(u64, [u8; 16]), ()>,
    /// Traces with spans in each segment.
    seg_traces: HashMap<u32, HashSet<[u8; 16]>>,
    spans: usize,
}

impl Index {
    /// Adds a span stored at `loc`.
    pub(crate) fn insert(&mut self, m: &SpanMeta, loc: Loc) {
        let service = self.services.id(&m.service, u32::MAX as usize - 1);
        let op = self
            .ops
            .id(&format!("{}\0{}", m.service, m.name), MAX_OPERATIONS);
        if op != OTHER_OP {
            self.service_ops.entry(service).or_default().insert(op);
        }
        let r = SpanRef {
            loc,
            service,
            op,
            start_ns: m.start_ns,
            dur_ns: m.end_ns.saturating_sub(m.start_ns),
            span_id: m.span_id,
            parent: m.parent,
            error: m.error,
        };
        let t = self.traces.entry(m.trace_id).or_default();
        let fresh = t.spans.is_empty();
        let old_start = t.start_ns;
        if fresh || m.start_ns < t.start_ns {
            t.start_ns = m.start_ns;
        }
        t.end_ns = t.end_ns.max(m.end_ns);
        t.spans.push(r);
        for h in &m.attrs {
            if let Err(i) = t.attrs.binary_search(h) {
                t.attrs.insert(i, *h);
            }
        }
        if fresh || t.start_ns != old_start {
            if !fresh {
                self.by_start.remove(&(old_start, m.trace_id));
            }
            self.by_start.insert((t.start_ns, m.trace_id), ());
        }
        self.seg_traces
            .entry(loc.seg)
            .or_default()
            .insert(m.trace_id);
        self.spans += 1;
    }

    /// Drops every span stored in segment `seg`; returns how many.
    pub(crate) fn drop_segment(&mut self, seg: u32) -> usize {
        let Some(ids) = self.seg_traces.remove(&seg) else {
            return 0;
        };
        let mut dropped = 0;
        for id in ids {
            let Some(t) = self.traces.get_mut(&id) else {
                continue;
            };
            let before = t.spans.len();
            t.spans.retain(|s| s.loc.seg != seg);
            dropped += before - t.spans.len();
            self.by_start.remove(&(t.start_ns, id));
            if t.spans.is_empty() {
                self.traces.remove(&id);
                continue;
            }
            // The attribute hashes stay: a superset only costs a disk check.
            t.start_ns = t.spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
            t.end_ns = t
                .spans
                .iter()
                .map(|s| s.start_ns + s.dur_ns)
                .max()
                .unwrap_or(0);
            self.by_start.insert((t.start_ns, id), ());
        }
        self.spans -= dropped;
        dropped
    }

    /// Spans indexed.
    pub(crate) fn span_count(&self) -> usize {
        self.spans
    }

    /// Traces indexed.
    pub(crate) fn trace_count(&self) -> usize {
        self.traces.len()
    }

    /// A trace's entry.
    pub(crate) fn trace(&self, id: &[u8; 16]) -> Option<&TraceEntry> {
        self.traces.get(id)
    }

    /// The services, each with its operation names, sorted.
    pub(crate) fn services(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .services
            .names
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut ops: Vec<String> = self
                    .service_ops
                    .get(&(i as u32))
                    .map(|ops| {
                        ops.iter()
                            .map(|&o| {
                                let full = self.ops.get(o);
                                full.split_once('\0').map_or(full, |(_, n)| n).to_string()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ops.sort();
                (s.clone(), ops)
            })
            .collect();
        out.sort();
        out
    }

    /// Candidates of a search, newest first: each trace id with the spans
    /// that matched the span-level filters. `on_disk` is whether each
    /// candidate still needs its operation name or attributes checked on disk
    /// (the caller does, and stops at the limit).
    pub(crate) fn candidates<'a>(
        &'a self,
        q: &'a Query,
    ) -> impl Iterator<Item = ([u8; 16], &'a TraceEntry, bool)> + 'a {
        let service = q.service.as_deref().map(|s| self.services.ids.get(s));
        let op = match (&q.service, &q.operation) {
            (Some(s), Some(o)) => Some(self.ops.ids.get(&format!("{s}\0{o}")).copied()),
            _ => None,
        };
        // Unknown service: nothing matches. Unknown operation of a known
        // service: only names past the interning cap can still match.
        let impossible = matches!(service, Some(None))
            || (matches!(op, Some(None))
                && self.ops.names.len() < MAX_OPERATIONS
                && q.operation.is_some());
        let service = service.flatten().copied();
        let op_id = op.flatten();
        let attr_hashes: Vec<u32> = q
            .attributes
            .iter()
            .map(|(k, v)| crate::model::pair_hash(k, v))
            .collect();
        let lo = q.start_ns.unwrap_or(0);
        let hi = q.end_ns.unwrap_or(u64::MAX);
        let range = if impossible || lo > hi {
            None
        } else {
            Some(self.by_start.range((lo, [0; 16])..=(hi, [0xff; 16])))
        };
        range
            .into_iter()
            .flatten()
            .rev()
            .filter_map(move |((_, id), _)| {
                let t = self.traces.get(id)?;
                if !attr_hashes.iter().all(|h| t.attrs.binary_search(h).is_ok()) {
                    return None;
                }
                match q.error {
                    Some(true) if !t.spans.iter().any(|s| s.error) => return None,
                    Some(false) if t.spans.iter().any(|s| s.error) => return None,
                    _ => {}
                }
                let mut needs_disk = !attr_hashes.is_empty();
                let any = t.spans.iter().any(|s| {
                    if service.is_some_and(|sv| sv != s.service) {
                        return false;
                    }
                    if q.min_duration_ns.is_some_and(|m| s.dur_ns < m) {
                        return false;
                    }
                    if q.max_duration_ns.is_some_and(|m| s.dur_ns > m) {
                        return false;
                    }
                    if q.operation.is_some() {
                        match op_id {
                            Some(o) if o == s.op => {}
                            _ if s.op == OTHER_OP => needs_disk = true,
                            _ => return false,
                        }
                    }
                    true
                });
                any.then_some((*id, t, needs_disk))
            })
    }

    /// The summary of a trace.
    pub(crate) fn summary(&self, id: &[u8; 16], t: &TraceEntry) -> TraceSummary {
        let ids: HashSet<u64> = t.spans.iter().map(|s| s.span_id).collect();
        let root = t
            .spans
            .iter()
            .filter(|s| s.parent == 0 || !ids.contains(&s.parent))
            .min_by_key(|s| (s.parent != 0, s.start_ns))
            .or_else(|| t.spans.first());
        let mut services = BTreeMap::new();
        for s in &t.spans {
            *services
                .entry(self.services.get(s.service).to_string())
                .or_insert(0) += 1;
        }
        let op_name = |o: u32| {
            let full = self.ops.get(o);
            full.split_once('\0').map_or(full, |(_, n)| n).to_string()
        };
        TraceSummary {
            trace_id: crate::hex(id),
            root_service: root
                .map(|r| self.services.get(r.service).to_string())
                .unwrap_or_default(),
            root_operation: root.map(|r| op_name(r.op)).unwrap_or_default(),
            start_unix_nano: t.start_ns.to_string(),
            start_ms: t.start_ns as f64 / 1e6,
            duration_ms: t.end_ns.saturating_sub(t.start_ns) as f64 / 1e6,
            spans: t.spans.len(),
            errors: t.spans.iter().filter(|s| s.error).count(),
            services,
        }
    }

    /// The service dependency graph over traces starting in `[lo, hi]` (at
    /// most `max_traces` of them, newest first): one edge per pair of
    /// services where a span of the second has a parent span of the first.
    pub(crate) fn dependencies(&self, lo: u64, hi: u64, max_traces: usize) -> (Vec<Edge>, usize) {
        let mut edges: BTreeMap<(u32, u32), (u64, u64)> = BTreeMap::new();
        let mut seen = 0;
        if lo <= hi {
            for ((_, id), _) in self
                .by_start
                .range((lo, [0; 16])..=(hi, [0xff; 16]))
                .rev()
                .take(max_traces)
            {
                let Some(t) = self.traces.get(id) else {
                    continue;
                };
                seen += 1;
                let service_of: HashMap<u64, u32> =
                    t.spans.iter().map(|s| (s.span_id, s.service)).collect();
                for s in &t.spans {
                    if let Some(&p) = service_of.get(&s.parent)
                        && p != s.service
                    {
                        let e = edges.entry((p, s.service)).or_default();
                        e.0 += 1;
                        e.1 += u64::from(s.error);
                    }
                }
            }
        }
        let edges = edges
            .into_iter()
            .map(|((p, c), (calls, errors))| Edge {
                parent: self.services.get(p).to_string(),
                child: self.services.get(c).to_string(),
                calls,
                errors,
            })
            .collect();
        (edges, seen)
    }

    /// The name of service `id`.
    pub(crate) fn service_name(&self, id: u32) -> &str {
        self.services.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(trace: u8, span: u64, parent: u64, service: &str, name: &str, start: u64) -> SpanMeta {
        SpanMeta {
            trace_id: [trace; 16],
            span_id: span,
            parent,
            service: service.into(),
            name: name.into(),
            start_ns: start,
            end_ns: start + 10,
            error: name == "boom",
            attrs: vec![],
        }
    }

    fn loc(seg: u32) -> Loc {
        Loc {
            seg,
            off: 0,
            len: 1,
        }
    }

    #[test]
    fn search_filters_newest_first_and_segments_drop_their_spans() {
        let mut ix = Index::default();
        ix.insert(&meta(1, 1, 0, "gw", "GET /a", 100), loc(1));
        ix.insert(&meta(1, 2, 1, "order", "boom", 105), loc(1));
        ix.insert(&meta(2, 3, 0, "gw", "GET /b", 200), loc(2));
        let all = Query {
            limit: 10,
            ..Query::default()
        };
        let ids: Vec<u8> = ix.candidates(&all).map(|(id, _, _)| id[0]).collect();
        assert_eq!(ids, vec![2, 1]);
        let errors = Query {
            error: Some(true),
            ..all.clone()
        };
        let ids: Vec<u8> = ix.candidates(&errors).map(|(id, _, _)| id[0]).collect();
        assert_eq!(ids, vec![1]);
        let op = Query {
            service: Some("gw".into()),
            operation: Some("GET /b".into()),
            ..all.clone()
        };
        let ids: Vec<u8> = ix.candidates(&op).map(|(id, _, _)| id[0]).collect();
        assert_eq!(ids, vec![2]);
        let unknown = Query {
            service: Some("nope".into()),
            ..all.clone()
        };
        assert_eq!(ix.candidates(&unknown).count(), 0);
        let (edges, seen) = ix.dependencies(0, u64::MAX, 100);
        assert_eq!(seen, 2);
        assert_eq!(
            edges,
            vec![Edge {
                parent: "gw".into(),
                child: "order".into(),
                calls: 1,
                errors: 1
            }]
        );
        let s = ix.summary(&[1; 16], ix.trace(&[1; 16]).expect("trace 1"));
        assert_eq!(
            (s.root_service.as_str(), s.root_operation.as_str()),
            ("gw", "GET /a")
        );
        assert_eq!((s.spans, s.errors), (2, 1));
        assert_eq!(ix.drop_segment(1), 2);
        assert_eq!((ix.span_count(), ix.trace_count()), (1, 1));
        let ids: Vec<u8> = ix.candidates(&all).map(|(id, _, _)| id[0]).collect();
        assert_eq!(ids, vec![2]);
    }
}
