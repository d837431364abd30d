//! Consistent hashing on a ring (ketama): each endpoint owns
//! `vnodes_per_weight x weight` points placed by hashing its key; a request
//! goes to the first point clockwise from its hash. Points depend only on the
//! endpoint's own key, so adding or removing one endpoint moves only the keys
//! it gains or loses, about `1/n` of them (property-tested). Unavailable
//! endpoints are skipped by walking on clockwise.

use std::collections::HashMap;

use super::hash::mix;
use super::{EndpointId, PickContext, Picker};

/// Most points one endpoint may own.
const MAX_POINTS_PER_ENDPOINT: u64 = 100_000;

/// Ring picker.
#[derive(Debug, Clone)]
pub struct Ring {
    vnodes_per_weight: u32,
    members: HashMap<EndpointId, (u64, u32)>,
    points: Vec<(u64, EndpointId)>,
}

impl Default for Ring {
    fn default() -> Self {
        Self::new(160)
    }
}

impl Ring {
    /// A ring with `vnodes_per_weight` points per unit of weight (ketama uses 160).
    pub fn new(vnodes_per_weight: u32) -> Self {
        Self {
            vnodes_per_weight: vnodes_per_weight.max(1),
            members: HashMap::new(),
            points: Vec::new(),
        }
    }

    fn rebuild(&mut self) {
        self.points.clear();
        for (&id, &(key_hash, weight)) in &self.members {
            let n = (u64::from(self.vnodes_per_weight) * u64::from(weight))
                .min(MAX_POINTS_PER_ENDPOINT);
            self.points
                .extend((0..n).map(|i| (mix(key_hash ^ mix(i + 1)), id)));
        }
        // Ties (astronomically rare) broken by id for determinism.
        self.points.sort_unstable();
    }
}

impl Picker for Ring {
    fn insert(&mut self, id: EndpointId, key_hash: u64, weight: u32) {
        self.members.insert(id, (key_hash, weight));
        self.rebuild();
    }
    fn remove(&mut self, id: EndpointId) {
        if self.members.remove(&id).is_some() {
            self.rebuild();
        }
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        if self.points.is_empty() {
            return None;
        }
        let h = ctx.request_hash.unwrap_or_else(rand::random);
        let start = self.points.partition_point(|p| p.0 < h);
        let n = self.points.len();
        (0..n)
            .map(|i| self.points[(start + i) % n].1)
            .find(|&id| (ctx.available)(id))
    }
}
