//! The bit layout of an id, `[0 | time | worker | sequence]`: [`IdLayout`] validates a
//! split and composes and decomposes ids under it. Pure arithmetic, no clock.

use serde::{Deserialize, Serialize};

use crate::error::{CoordError, Result};

/// How the 63 usable bits of an id are split: time (the rest), worker, sequence.
///
/// Every node of a cluster must use the same layout: worker ids are only unique
/// under one layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdLayout {
    /// Bits of the worker id (1..=16): at most 2^worker_bits generators run at once.
    pub worker_bits: u8,
    /// Bits of the sequence (8..=16): at most 2^sequence_bits ids per ms per worker.
    pub sequence_bits: u8,
    /// The epoch, in ms since the Unix epoch; id timestamps count from it.
    pub epoch_ms: u64,
}

impl Default for IdLayout {
    fn default() -> Self {
        IdLayout {
            worker_bits: 10,
            sequence_bits: 13,
            epoch_ms: IdLayout::DEFAULT_EPOCH_MS,
        }
    }
}

impl IdLayout {
    /// The default epoch: 2025-01-01T00:00:00Z.
    pub const DEFAULT_EPOCH_MS: u64 = 1_735_689_600_000;
    /// The fewest timestamp bits a layout may keep (2^38 ms is about 8.7 years).
    pub const MIN_TIME_BITS: u8 = 38;

    /// Bits of the timestamp: `63 - worker_bits - sequence_bits` (40 by default,
    /// about 34.8 years of milliseconds from the epoch).
    pub fn time_bits(&self) -> u8 {
        63u8.saturating_sub(self.worker_bits)
            .saturating_sub(self.sequence_bits)
    }

    /// How many worker ids exist (`2^worker_bits`).
    pub fn workers(&self) -> u32 {
        1u32.checked_shl(u32::from(self.worker_bits))
            .unwrap_or(u32::MAX)
    }

    /// How many ids one worker can issue per millisecond (`2^sequence_bits`).
    pub fn ids_per_ms(&self) -> u32 {
        1u32.checked_shl(u32::from(self.sequence_bits))
            .unwrap_or(u32::MAX)
    }

    /// The first Unix ms the layout cannot represent (`epoch + 2^time_bits`).
    pub fn end_ms(&self) -> u64 {
        self.epoch_ms
            .saturating_add(1u64.checked_shl(u32::from(self.time_bits())).unwrap_or(0))
    }

    /// Checks the bit widths (worker 1..=16, sequence 8..=16, time at least 38).
    pub fn validate(&self) -> Result<()> {
        if !(1..=16).contains(&self.worker_bits) {
            return Err(CoordError::invalid(format!(
                "id layout: worker_bits must be 1..=16, got {}",
                self.worker_bits
            )));
        }
        if !(8..=16).contains(&self.sequence_bits) {
            return Err(CoordError::invalid(format!(
                "id layout: sequence_bits must be 8..=16, got {}",
                self.sequence_bits
            )));
        }
        let time_bits = self.time_bits();
        if time_bits < Self::MIN_TIME_BITS {
            return Err(CoordError::invalid(format!(
                "id layout: worker_bits + sequence_bits = {} leaves {time_bits} timestamp bits; \
                 at least {} are needed (at most {} for worker + sequence)",
                self.worker_bits + self.sequence_bits,
                Self::MIN_TIME_BITS,
                63 - Self::MIN_TIME_BITS
            )));
        }
        if self.epoch_ms.checked_add(1u64 << time_bits).is_none() {
            return Err(CoordError::invalid(format!(
                "id layout: epoch_ms {} is too large",
                self.epoch_ms
            )));
        }
        Ok(())
    }

    /// Builds the id of (`timestamp_ms` in Unix ms, `worker`, `sequence`); fails when a
    /// part is out of the layout's range.
    pub fn compose(&self, timestamp_ms: u64, worker: u32, sequence: u32) -> Result<i64> {
        self.validate()?;
        if timestamp_ms < self.epoch_ms || timestamp_ms >= self.end_ms() {
            return Err(CoordError::invalid(format!(
                "timestamp {timestamp_ms} ms is outside the id layout's range [{}, {})",
                self.epoch_ms,
                self.end_ms()
            )));
        }
        if worker >= self.workers() {
            return Err(CoordError::invalid(format!(
                "worker {worker} does not fit in {} worker bits",
                self.worker_bits
            )));
        }
        if sequence >= self.ids_per_ms() {
            return Err(CoordError::invalid(format!(
                "sequence {sequence} does not fit in {} sequence bits",
                self.sequence_bits
            )));
        }
        let t = timestamp_ms - self.epoch_ms;
        let s = u32::from(self.sequence_bits);
        let w = u32::from(self.worker_bits);
        let id = (t << (s + w)) | (u64::from(worker) << s) | u64::from(sequence);
        i64::try_from(id).map_err(|_| CoordError::invalid("id does not fit in 63 bits"))
    }

    /// Splits an id into `(timestamp_ms, worker, sequence)`, the timestamp in Unix ms
    /// (the epoch added back). The layout must be valid; the sign bit is ignored
    /// (no issued id is negative): use [`IdLayout::try_decompose`] on untrusted input.
    pub fn decompose(&self, id: i64) -> (u64, u32, u32) {
        self.try_decompose(id & i64::MAX)
            .unwrap_or((self.epoch_ms, 0, 0))
    }

    /// [`IdLayout::decompose`] that fails clearly for a negative id or an invalid
    /// layout; any non-negative id decomposes, whether or not it was ever issued.
    pub fn try_decompose(&self, id: i64) -> Result<(u64, u32, u32)> {
        self.validate()?;
        let Ok(u) = u64::try_from(id) else {
            return Err(CoordError::invalid(format!(
                "id {id} is negative; ids are positive 63-bit integers"
            )));
        };
        let s = u32::from(self.sequence_bits);
        let w = u32::from(self.worker_bits);
        let sequence = u & ((1u64 << s) - 1);
        let worker = (u >> s) & ((1u64 << w) - 1);
        let t = u >> (s + w);
        // Both fit in 16 bits (validated).
        let worker = u32::try_from(worker).unwrap_or(u32::MAX);
        let sequence = u32::try_from(sequence).unwrap_or(u32::MAX);
        Ok((self.epoch_ms.saturating_add(t), worker, sequence))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn default_layout_is_40_10_13_from_2025() {
        let l = IdLayout::default();
        l.validate().unwrap();
        assert_eq!(l.time_bits(), 40);
        assert_eq!(l.workers(), 1024);
        assert_eq!(l.ids_per_ms(), 8192);
        assert_eq!(l.epoch_ms, 1_735_689_600_000);
        // ~34.8 years of ms.
        let years = (l.end_ms() - l.epoch_ms) as f64 / (365.25 * 86_400_000.0);
        assert!((34.0..35.0).contains(&years), "{years}");
        let id = l.compose(l.epoch_ms + 5, 3, 9).unwrap();
        assert_eq!(id, (5 << 23) | (3 << 13) | 9);
        assert_eq!(l.decompose(id), (l.epoch_ms + 5, 3, 9));
        // The largest id is positive.
        let max = l.compose(l.end_ms() - 1, 1023, 8191).unwrap();
        assert_eq!(max, i64::MAX);
    }

    #[test]
    fn invalid_layouts_and_parts_are_refused_clearly() {
        let bad = |w, s| IdLayout {
            worker_bits: w,
            sequence_bits: s,
            ..IdLayout::default()
        };
        for (l, needle) in [
            (bad(0, 13), "worker_bits must be 1..=16"),
            (bad(17, 13), "worker_bits must be 1..=16"),
            (bad(10, 7), "sequence_bits must be 8..=16"),
            (bad(10, 17), "sequence_bits must be 8..=16"),
            (bad(16, 16), "leaves 31 timestamp bits"),
            (
                IdLayout {
                    epoch_ms: u64::MAX - 5,
                    ..IdLayout::default()
                },
                "too large",
            ),
        ] {
            let e = l.validate().unwrap_err();
            assert!(matches!(e, CoordError::Invalid(_)));
            assert!(e.to_string().contains(needle), "{e}");
        }
        bad(12, 13).validate().unwrap(); // 38 time bits: the minimum
        let l = IdLayout::default();
        assert!(
            l.try_decompose(-1)
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        assert!(l.compose(l.epoch_ms - 1, 0, 0).is_err());
        assert!(l.compose(l.end_ms(), 0, 0).is_err());
        assert!(l.compose(l.epoch_ms, 1024, 0).is_err());
        assert!(l.compose(l.epoch_ms, 0, 8192).is_err());
    }

    fn layout_and_parts() -> impl Strategy<Value = (IdLayout, u64, u32, u32)> {
        (1u8..=16, 8u8..=16, 0u64..=IdLayout::DEFAULT_EPOCH_MS * 2)
            .prop_filter("time bits >= 38", |(w, s, _)| 63 - w - s >= 38)
            .prop_flat_map(|(w, s, epoch)| {
                let l = IdLayout {
                    worker_bits: w,
                    sequence_bits: s,
                    epoch_ms: epoch,
                };
                let (t, w, s) = (l.time_bits(), l.workers(), l.ids_per_ms());
                (Just(l), 0u64..(1u64 << t), 0u32..w, 0u32..s)
            })
    }

    proptest! {
        #[test]
        fn compose_decompose_round_trip((l, t, w, s) in layout_and_parts()) {
            let id = l.compose(l.epoch_ms + t, w, s).unwrap();
            prop_assert!(id >= 0);
            prop_assert_eq!(l.decompose(id), (l.epoch_ms + t, w, s));
        }

        #[test]
        fn ids_order_by_time_then_sequence(
            (l, t, w, s) in layout_and_parts(),
            dt in 0u64..1000,
            ds in 1u32..100,
        ) {
            let a = l.compose(l.epoch_ms + t, w, s).unwrap();
            if s + ds < l.ids_per_ms() {
                prop_assert!(l.compose(l.epoch_ms + t, w, s + ds).unwrap() > a);
            }
            if t + dt + 1 < (1u64 << l.time_bits()) {
                prop_assert!(l.compose(l.epoch_ms + t + dt + 1, w, 0).unwrap() > a);
            }
        }

        #[test]
        fn any_positive_id_decomposes_back((l, _t, _w, _s) in layout_and_parts(), id in 0i64..=i64::MAX) {
            let (ts, w, s) = l.decompose(id);
            prop_assert_eq!(l.try_decompose(id).unwrap(), (ts, w, s));
            prop_assert_eq!(l.compose(ts, w, s).unwrap(), id);
        }
    }
}
