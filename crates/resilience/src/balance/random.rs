//! Uniformly random choice among available endpoints.

use rand::Rng;

use super::{EndpointId, PickContext, Picker};

/// Random picker.
#[derive(Debug, Default, Clone)]
pub struct RandomPicker {
    ids: Vec<EndpointId>,
}

impl Picker for RandomPicker {
    fn insert(&mut self, id: EndpointId, _key_hash: u64, _weight: u32) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }
    fn remove(&mut self, id: EndpointId) {
        self.ids.retain(|&x| x != id);
    }
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<EndpointId> {
        pick_available(&self.ids, ctx, 1).into_iter().next()
    }
}

/// Up to `n` distinct available ids chosen at random: a few random probes
/// first (cheap when most are available), then a filtered draw.
pub(crate) fn pick_available(
    ids: &[EndpointId],
    ctx: &PickContext<'_>,
    n: usize,
) -> Vec<EndpointId> {
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(n);
    if ids.is_empty() {
        return out;
    }
    for _ in 0..4 * n {
        let id = ids[rng.random_range(0..ids.len())];
        if !out.contains(&id) && (ctx.available)(id) {
            out.push(id);
            if out.len() == n {
                return out;
            }
        }
    }
    let mut rest: Vec<EndpointId> = ids
        .iter()
        .copied()
        .filter(|id| !out.contains(id) && (ctx.available)(*id))
        .collect();
    while out.len() < n && !rest.is_empty() {
        out.push(rest.swap_remove(rng.random_range(0..rest.len())));
    }
    out
}
