//! Counters and the transactions' lock split per worker, so that two workers never
//! write the same cache line on every command (a shared atomic costs a transfer of
//! the line between cores each time both are busy).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Slots per striped value; workers past the first 15 share slots (still correct).
pub const SLOTS: usize = 16;
/// The slot of commands the node runs itself ([`crate::Cache::query`]).
pub const INTERNAL: usize = SLOTS - 1;

/// One value alone on its cache lines (two, against the adjacent-line prefetcher).
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// A counter each worker adds to in its own slot; reads sum the slots.
pub struct Striped {
    slots: [Padded<AtomicU64>; SLOTS],
}

impl Default for Striped {
    fn default() -> Self {
        Striped {
            slots: std::array::from_fn(|_| Padded::default()),
        }
    }
}

impl Striped {
    /// Adds `v` in `slot`'s share.
    pub fn add(&self, slot: usize, v: u64) {
        self.slots[slot % SLOTS].0.fetch_add(v, Ordering::Relaxed);
    }

    /// The sum.
    pub fn get(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Back to zero (`CONFIG RESETSTAT`).
    pub fn reset(&self) {
        for s in &self.slots {
            s.0.store(0, Ordering::Relaxed);
        }
    }
}

/// A reader-writer lock per slot: a command takes its worker's shared, `EXEC`
/// takes every slot's exclusively, in order.
pub struct StripedLock {
    slots: [Padded<RwLock<()>>; SLOTS],
}

impl Default for StripedLock {
    fn default() -> Self {
        StripedLock {
            slots: std::array::from_fn(|_| Padded::default()),
        }
    }
}

impl StripedLock {
    /// Shared, for one command of `slot`'s worker.
    pub fn read(&self, slot: usize) -> RwLockReadGuard<'_, ()> {
        self.slots[slot % SLOTS].0.read()
    }

    /// Exclusive: no command of any worker runs until the guards drop.
    pub fn write(&self) -> Vec<RwLockWriteGuard<'_, ()>> {
        self.slots.iter().map(|s| s.0.write()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_add_up_and_the_writer_excludes_every_reader() {
        let c = Striped::default();
        for slot in 0..40 {
            c.add(slot, 2);
        }
        assert_eq!(c.get(), 80);
        c.reset();
        assert_eq!(c.get(), 0);
        let l = StripedLock::default();
        let r = l.read(3);
        assert!(l.slots[3].0.try_write().is_none());
        drop(r);
        let w = l.write();
        assert!(l.slots.iter().all(|s| s.0.try_read().is_none()));
        drop(w);
        assert!(l.slots[0].0.try_read().is_some());
    }
}
