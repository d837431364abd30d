//! Maglev consistent hashing (Google's load balancer): a lookup table of a
//! prime size `M` filled by letting endpoints take turns claiming slots along
//! their own pseudo-random permutation. Lookup is one index: `table[h % M]`.
//! Load is spread evenly (each endpoint owns `M/n +- 1` slots, by weight);
//! adding or removing one endpoint moves about `1/n` of keys plus a small
//! extra disruption (property-tested with a bound). Unavailable endpoints are
//! skipped by probing the next slots.

use super::hash::mix;
use super::{EndpointId, PickContext, Picker};

/// Default table size (prime, > 100 x endpoints for good balance).
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;

/// Maglev picker.
#[derive(Debug, Clone)]
pub struct Maglev {
    size: u64,
    /// (key hash, id, weight), kept sorted by key hash so the table does not
    /// depend on insertion order.
    members: Vec<(u64, EndpointId, u32)>,
    table: Vec<EndpointId>,
}

impl Default for Maglev {
    fn default() -> Self {
        Self::new(DEFAULT_TABLE_SIZE)
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl Maglev {
    /// A table of `size` slots, rounded up to a prime.
    pub fn new(size: u64) -> Self {
        let mut size = size.max(3);
        while !is_prime(size) {
            size += 1;
        }
        Self {
            size,
            members: Vec::new(),
            table: Vec::new(),
        }
    }

    fn rebuild(&mut self) {
        let m = self.size;
        self.table.clear();
        let live: Vec<_> = self.members.iter().filter(|x| x.2 > 0).collect();
        if live.is_empty() {
            return;
        }
        let max_w = live.iter().map(|x| x.2).max().unwrap_or(1) as f64;
        let perm: Vec<(u64, u64)> = live
            .iter()
            .map(|&&(h, _, _)| (mix(h ^ 0x9e37) % m, mix(h ^ 0x7f4a) % (m - 1) + 1))
            .collect();
        let mut next = vec![0u64; live.len()];
        let mut credit = vec![0f64; live.len()];
        let mut entry: Vec<Option<EndpointId>> = vec![None; m as usize];
        let mut filled = 0;
        'fill: loop {
            for i in 0..live.len() {
                credit[i] += f64::from(live[i].2) / max_w;
                while credit[i] >= 1.0 {
                    credit[i] -= 1.0;
                    let (offset, skip) = perm[i];
                    let mut c = (offset + next[i] * skip) % m;
                    while entry[c as usize].is_some() {
                        next[i] += 1;
                        c = (offset + next[i] * skip) % m;
                    }
                    entry[c as usize] = Some(live[i].1);
                    next[i] += 1;
                    filled += 1;
                    if filled == m {
                        break 'fill;
                    }
                }
            }
        }
        self.table = entry.into_iter().map(|e| e.unwrap_or(live[0].1)).collect();
    }
}

impl Maglev {
    /// The lookup table (slot -> endpoint).
    pub fn slots(&self) -> &[EndpointId] {
        &self.table
    }
}

impl Picker for Maglev {
    fn insert(&mut self, id: EndpointId, key_hash: u64, weight: u32) {
        self.members.retain(|x| x.1 != id);
        let at = self
            .members
            .partition_point(|x| (x.0, x.1) < (key_hash, id));
        self.members.insert(at, (key_hash, id, weight));
        self.rebuild();
    }
    fn remove(&mut self, id: EndpointId) {
        let before = self.members.len();
        self.members.retain(|x| x.1 != id);
        if self.members.len() != before {
            self.rebuild();
        }
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        if self.table.is_empty() {
            return None;
        }
        let h = ctx.request_hash.unwrap_or_else(rand::random);
        let m = self.table.len();
        let start = (h % m as u64) as usize;
        let first = self.table[start];
        if (ctx.available)(first) {
            return Some(first);
        }
        // Probe onwards; each distinct endpoint is asked once.
        let mut refused = vec![first];
        for i in 1..m {
            let id = self.table[(start + i) % m];
            if refused.contains(&id) {
                continue;
            }
            if (ctx.available)(id) {
                return Some(id);
            }
            refused.push(id);
            if refused.len() == self.members.len() {
                return None;
            }
        }
        None
    }
}
