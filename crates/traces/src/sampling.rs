//! Tail sampling: spans wait in memory until their trace has been quiet for
//! `decision_wait`, then the whole trace is kept or dropped — kept when a span
//! failed or the trace lasted at least `slow`, else kept with probability
//! `keep_ratio` decided by the trace id (so every node decides the same).
//! Spans of a trace that arrive after its decision follow it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::model::Prepared;

/// The tail sampler's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TailSampling {
    /// How long a trace must be quiet (no new span) before its decision.
    pub decision_wait: Duration,
    /// Share of the traces neither failed nor slow that are kept (0.0-1.0).
    pub keep_ratio: f64,
    /// A trace at least this long (earliest start to latest end) is kept.
    pub slow: Duration,
    /// Spans waiting for a decision at most; past it the oldest traces are
    /// decided early.
    pub max_pending_spans: usize,
}

impl Default for TailSampling {
    fn default() -> Self {
        TailSampling {
            decision_wait: Duration::from_secs(5),
            keep_ratio: 0.1,
            slow: Duration::from_millis(500),
            max_pending_spans: 200_000,
        }
    }
}

struct Pending {
    last_seen: Instant,
    spans: Vec<Prepared>,
    error: bool,
    start: u64,
    end: u64,
}

/// Traces waiting for their decision, and recent decisions.
pub(crate) struct Sampler {
    cfg: TailSampling,
    pending: HashMap<[u8; 16], Pending>,
    /// Order of arrival (a trace may appear again after being decided early).
    order: VecDeque<[u8; 16]>,
    spans: usize,
    /// Decisions kept for late spans: trace -> (kept, when decided).
    decided: HashMap<[u8; 16], (bool, Instant)>,
    decided_order: VecDeque<[u8; 16]>,
}

/// Traces decided.
#[derive(Default)]
pub(crate) struct Decided {
    /// Spans of kept traces, to write.
    pub(crate) keep: Vec<Prepared>,
    /// Spans of dropped traces.
    pub(crate) dropped: usize,
}

/// Most decisions remembered for late spans.
const MAX_DECIDED: usize = 100_000;

impl Sampler {
    pub(crate) fn new(cfg: TailSampling) -> Sampler {
        Sampler {
            cfg,
            pending: HashMap::new(),
            order: VecDeque::new(),
            spans: 0,
            decided: HashMap::new(),
            decided_order: VecDeque::new(),
        }
    }

    /// Spans waiting.
    pub(crate) fn pending_spans(&self) -> usize {
        self.spans
    }

    /// Takes spans in; those of already decided traces follow the decision
    /// at once. Returns what that (and the pending bound) decided.
    pub(crate) fn add(&mut self, spans: Vec<Prepared>, now: Instant) -> Decided {
        let mut out = Decided::default();
        for p in spans {
            let id = p.meta.trace_id;
            if let Some(&(kept, _)) = self.decided.get(&id) {
                if kept {
                    out.keep.push(p);
                } else {
                    out.dropped += 1;
                }
                continue;
            }
            let e = self.pending.entry(id).or_insert_with(|| {
                self.order.push_back(id);
                Pending {
                    last_seen: now,
                    spans: Vec::new(),
                    error: false,
                    start: u64::MAX,
                    end: 0,
                }
            });
            e.last_seen = now;
            e.error |= p.meta.error;
            e.start = e.start.min(p.meta.start_ns);
            e.end = e.end.max(p.meta.end_ns);
            e.spans.push(p);
            self.spans += 1;
        }
        while self.spans > self.cfg.max_pending_spans {
            let Some(id) = self.order.pop_front() else {
                break;
            };
            self.decide(id, now, &mut out);
        }
        out
    }

    /// Decides every trace quiet for `decision_wait`.
    pub(crate) fn due(&mut self, now: Instant) -> Decided {
        let mut out = Decided::default();
        let wait = self.cfg.decision_wait;
        // Arrival order approximates quietness: look from the oldest, put
        // back the ones that are still active.
        let mut still = VecDeque::new();
        while let Some(id) = self.order.pop_front() {
            match self.pending.get(&id) {
                None => {}
                Some(p) if now.duration_since(p.last_seen) >= wait => {
                    self.decide(id, now, &mut out)
                }
                Some(_) => still.push_back(id),
            }
        }
        self.order = still;
        // Forget old decisions.
        while let Some(id) = self.decided_order.front().copied() {
            let old = self
                .decided
                .get(&id)
                .is_none_or(|(_, at)| now.duration_since(*at) > wait * 4);
            if !old && self.decided.len() <= MAX_DECIDED {
                break;
            }
            self.decided_order.pop_front();
            self.decided.remove(&id);
        }
        out
    }

    /// Decides every pending trace now (on close).
    pub(crate) fn all(&mut self, now: Instant) -> Decided {
        let mut out = Decided::default();
        while let Some(id) = self.order.pop_front() {
            self.decide(id, now, &mut out);
        }
        out
    }

    fn decide(&mut self, id: [u8; 16], now: Instant, out: &mut Decided) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        self.spans -= p.spans.len();
        let slow = p.end.saturating_sub(p.start) >= self.cfg.slow.as_nanos() as u64;
        let keep = p.error || slow || ratio_keeps(&id, self.cfg.keep_ratio);
        if keep {
            out.keep.extend(p.spans);
        } else {
            out.dropped += p.spans.len();
        }
        self.decided.insert(id, (keep, now));
        self.decided_order.push_back(id);
    }
}

/// Whether `keep_ratio` keeps trace `id`: its last 8 bytes (random in W3C
/// ids) as a fraction.
fn ratio_keeps(id: &[u8; 16], keep_ratio: f64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&id[8..]);
    let x = u64::from_be_bytes(low) as f64 / u64::MAX as f64;
    keep_ratio >= 1.0 || x < keep_ratio
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpanMeta;

    fn span(trace: u8, start: u64, end: u64, error: bool) -> Prepared {
        let mut id = [trace; 16];
        id[8..].copy_from_slice(&u64::MAX.to_be_bytes());
        Prepared {
            bytes: vec![],
            meta: SpanMeta {
                trace_id: id,
                span_id: 1,
                parent: 0,
                service: "s".into(),
                name: "n".into(),
                start_ns: start,
                end_ns: end,
                error,
                attrs: vec![],
            },
        }
    }

    #[test]
    fn failed_and_slow_traces_are_kept_the_rest_sampled() {
        let mut s = Sampler::new(TailSampling {
            decision_wait: Duration::from_secs(5),
            keep_ratio: 0.0,
            slow: Duration::from_millis(500),
            max_pending_spans: 100,
        });
        let t0 = Instant::now();
        let ms = 1_000_000;
        let d = s.add(
            vec![
                span(1, 0, 10 * ms, false),
                span(1, ms, 2 * ms, false),
                span(2, 0, 10 * ms, false),
                span(2, ms, 2 * ms, true),
                span(3, 0, 900 * ms, false),
            ],
            t0,
        );
        assert_eq!((d.keep.len(), d.dropped, s.pending_spans()), (0, 0, 5));
        // Not quiet long enough yet.
        assert_eq!(s.due(t0 + Duration::from_secs(4)).keep.len(), 0);
        let d = s.due(t0 + Duration::from_secs(5));
        assert_eq!((d.keep.len(), d.dropped, s.pending_spans()), (3, 2, 0));
        // A late span follows its trace's decision.
        let d = s.add(vec![span(1, 0, ms, true), span(2, 0, ms, false)], t0);
        assert_eq!((d.keep.len(), d.dropped), (1, 1));
    }

    #[test]
    fn past_the_pending_bound_the_oldest_traces_are_decided_early() {
        let mut s = Sampler::new(TailSampling {
            max_pending_spans: 2,
            keep_ratio: 1.0,
            ..TailSampling::default()
        });
        let t0 = Instant::now();
        let d = s.add((1..=3).map(|t| span(t, 0, 1, false)).collect(), t0);
        assert_eq!((d.keep.len(), s.pending_spans()), (1, 2));
    }
}
