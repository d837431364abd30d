//! Smooth weighted round robin (nginx's algorithm): each pick adds every
//! available endpoint's weight to its running score, picks the highest and
//! subtracts the total from it. Weights 5:1:1 give `a a b a c a a`, not
//! `a a a a a b c`.

use super::{EndpointId, PickContext, Picker};

#[derive(Debug, Clone)]
struct Entry {
    id: EndpointId,
    weight: i64,
    current: i64,
}

/// Smooth WRR picker.
#[derive(Debug, Default, Clone)]
pub struct SmoothWrr {
    entries: Vec<Entry>,
}

impl Picker for SmoothWrr {
    fn insert(&mut self, id: EndpointId, _key_hash: u64, weight: u32) {
        self.remove(id);
        self.entries.push(Entry {
            id,
            weight: i64::from(weight),
            current: 0,
        });
    }
    fn remove(&mut self, id: EndpointId) {
        self.entries.retain(|e| e.id != id);
    }
    fn set_weight(&mut self, id: EndpointId, _key_hash: u64, weight: u32) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.weight = i64::from(weight);
        }
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        let mut total = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, e) in self.entries.iter_mut().enumerate() {
            if e.weight == 0 || !(ctx.available)(e.id) {
                continue;
            }
            e.current += e.weight;
            total += e.weight;
            if best.is_none_or(|(_, c)| e.current > c) {
                best = Some((i, e.current));
            }
        }
        let (b, _) = best?;
        self.entries[b].current -= total;
        Some(self.entries[b].id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_sequence() {
        let mut w = SmoothWrr::default();
        w.insert(EndpointId(0), 0, 5);
        w.insert(EndpointId(1), 0, 1);
        w.insert(EndpointId(2), 0, 1);
        let available = |_: EndpointId| true;
        let load = |_: EndpointId| 0.0;
        let ctx = PickContext {
            request_hash: None,
            available: &available,
            load: &load,
        };
        let seq: Vec<u32> = (0..7).map(|_| w.pick(&ctx).unwrap().0).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }
}
