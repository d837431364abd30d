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
        let (picked, found) = pick_available::<1>(&self.ids, ctx);
        (found == 1).then_some(picked[0])
    }
}

/// Up to `N` distinct available ids chosen at random: a few random probes
/// first (no allocation; cheap when most are available), then a filtered
/// draw. Returns the ids and how many were found.
pub(crate) fn pick_available<const N: usize>(
    ids: &[EndpointId],
    ctx: &PickContext<'_>,
) -> ([EndpointId; N], usize) {
    let mut rng = rand::rng();
    let mut out = [EndpointId(0); N];
    let mut found = 0;
    if ids.is_empty() {
        return (out, 0);
    }
    for _ in 0..4 * N {
        let id = ids[rng.random_range(0..ids.len())];
        if !out[..found].contains(&id) && (ctx.available)(id) {
            out[found] = id;
            found += 1;
            if found == N {
                return (out, found);
            }
        }
    }
    let mut rest: Vec<EndpointId> = ids
        .iter()
        .copied()
        .filter(|id| !out[..found].contains(id) && (ctx.available)(*id))
        .collect();
    while found < N && !rest.is_empty() {
        out[found] = rest.swap_remove(rng.random_range(0..rest.len()));
        found += 1;
    }
    (out, found)
}
