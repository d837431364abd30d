//! Power of two choices over peak-EWMA load (Finagle's and linkerd's
//! default): pick two available endpoints at random, send to the one with
//! the lower `latency estimate x (in-flight + 1)`.
//!
//! The latency estimate ([`PeakEwma`]) jumps up to any slower sample at once
//! (the "peak") and decays towards faster samples and, between samples, towards
//! zero with time constant `decay`, so an endpoint that was slow once is tried
//! again after a while.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::random::pick_available;
use super::{EndpointId, PickContext, Picker};

/// Load of one endpoint: in-flight count and peak-EWMA latency.
#[derive(Debug)]
pub struct PeakEwma {
    base: Instant,
    decay_nanos: f64,
    in_flight: AtomicU64,
    /// f64 bits of the estimate, nanoseconds.
    estimate: AtomicU64,
    /// Nanoseconds since `base` of the last update.
    stamp: AtomicU64,
}

impl PeakEwma {
    /// Starts at `default_rtt`.
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            base: now,
            decay_nanos: decay.as_nanos().max(1) as f64,
            in_flight: AtomicU64::new(0),
            estimate: AtomicU64::new((default_rtt.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(0),
        }
    }

    fn since(&self, now: Instant) -> u64 {
        crate::nanos_since(self.base, now)
    }

    /// The decayed latency estimate at `now`, nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        let est = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let dt = self
            .since(now)
            .saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        est * (-dt / self.decay_nanos).exp()
    }

    /// `estimate x (in_flight + 1)`; the lower, the better.
    pub fn load(&self, now: Instant) -> f64 {
        let pending = self.in_flight.load(Ordering::Relaxed) as f64;
        // A floor of 1 ns keeps in-flight counts meaningful at zero latency.
        self.estimate(now).max(1.0) * (pending + 1.0)
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A call starts.
    pub fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call that took `rtt` ends.
    pub fn end(&self, rtt: Duration, now: Instant) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let rtt = rtt.as_nanos() as f64;
        let current = self.estimate(now);
        let next = if rtt > current {
            rtt
        } else {
            let dt = self
                .since(now)
                .saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
            let w = (-dt / self.decay_nanos).exp();
            current * w + rtt * (1.0 - w)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(self.since(now), Ordering::Relaxed);
    }

    /// A call ended without a latency sample (cancelled).
    pub fn cancel(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// P2C picker; the load of each endpoint comes from the context.
#[derive(Debug, Default, Clone)]
pub struct P2c {
    ids: Vec<EndpointId>,
}

impl Picker for P2c {
    fn insert(&mut self, id: EndpointId, _key_hash: u64, _weight: u32) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }
    fn remove(&mut self, id: EndpointId) {
        self.ids.retain(|&x| x != id);
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        let ([a, b], found) = pick_available::<2>(&self.ids, ctx);
        match found {
            0 => None,
            1 => Some(a),
            _ => Some(if (ctx.load)(b) < (ctx.load)(a) { b } else { a }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_then_decay() {
        let t0 = Instant::now();
        let e = PeakEwma::new(Duration::from_millis(10), Duration::from_secs(1), t0);
        e.start();
        e.end(Duration::from_millis(100), t0);
        assert_eq!(e.estimate(t0), 100e6, "peaks at once");
        e.start();
        assert_eq!(e.load(t0), 200e6, "in-flight doubles the cost");
        e.end(Duration::from_millis(10), t0 + Duration::from_secs(1));
        let est = e.estimate(t0 + Duration::from_secs(1));
        assert!(est < 50e6, "{est}");
    }

    #[test]
    fn picks_the_lighter_of_two() {
        let mut p = P2c::default();
        p.insert(EndpointId(0), 0, 1);
        p.insert(EndpointId(1), 0, 1);
        let available = |_: EndpointId| true;
        let load = |id: EndpointId| if id.0 == 0 { 10.0 } else { 1.0 };
        let ctx = PickContext {
            request_hash: None,
            available: &available,
            load: &load,
        };
        for _ in 0..100 {
            assert_eq!(p.pick(&ctx), Some(EndpointId(1)));
        }
    }
}
