//! A consumer group's cursor over each partition: which messages are done, which are out
//! with a consumer (and until when), how often each was delivered.
//!
//! Per partition, every offset below `floor` is finished (acked, filtered out or dead-
//! lettered); `slots` holds one entry per offset in `[floor, next)`; offsets from `next`
//! on were never read by the group. Each pending slot has a timer: the time it may be
//! delivered (again): its ack deadline while a consumer holds it, a nack's delay, or a
//! delayed message's time. Memory is bounded by `max_window` slots per partition,
//! whatever the backlog.
//!
//! Every change is described by an [`Op`] that goes to the broker's journal before the
//! call that made it answers; ops are absolute and finishing is terminal, so replaying
//! one twice, or after a snapshot that already holds it, changes nothing.

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::Bytes;

use crate::config::{GroupConfig, GroupMode};
use crate::error::{MqError, Result};

/// `visible_at` of a message held back behind an earlier one with its key (ordered groups).
pub(crate) const BLOCKED: u64 = u64::MAX;

/// Ordered groups: each key's unfinished offsets, oldest first. Only the first of a key
/// may be out with a consumer; the others wait `BLOCKED` until it is finished.
#[derive(Debug, Default)]
pub(crate) struct KeyQueues {
    queues: HashMap<Bytes, VecDeque<u64>>,
    key_of: HashMap<u64, Bytes>,
}

/// One offset's state inside the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Finished: acked, filtered out or dead-lettered.
    pub(crate) done: bool,
    /// Times delivered.
    pub(crate) deliveries: u16,
    /// When it may be delivered (again), ms since the epoch.
    pub(crate) visible_at: u64,
}

impl Slot {
    const FRESH: Slot = Slot {
        done: false,
        deliveries: 0,
        visible_at: 0,
    };
}

/// A group's position in one partition.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    pub(crate) floor: u64,
    pub(crate) next: u64,
    pub(crate) slots: VecDeque<Slot>,
    /// `(visible_at, offset)` of every pending slot.
    pub(crate) timers: BTreeSet<(u64, u64)>,
    /// `(visible_at, offset)` of every pending slot delivered at least once (its ack
    /// deadline or nack delay): apart from `timers`, so that a group at `max_unacked`
    /// finds its redeliveries without walking the fresh backlog.
    pub(crate) retimers: BTreeSet<(u64, u64)>,
    /// Pending slots delivered at least once (out with a consumer or waiting to go again).
    pub(crate) unacked: u32,
    /// Ordered groups only: the keys of unfinished messages (in memory; rebuilt on open).
    pub(crate) keys: Option<KeyQueues>,
}

impl Cursor {
    /// A cursor starting at `offset`; `ordered` keeps one message per key out at a time.
    pub(crate) fn at(offset: u64, ordered: bool) -> Cursor {
        Cursor {
            floor: offset,
            next: offset,
            keys: ordered.then(KeyQueues::default),
            ..Cursor::default()
        }
    }

    /// Ordered groups: whether `key` has an unfinished message (which the next one waits for).
    pub(crate) fn key_busy(&self, key: &[u8]) -> bool {
        self.keys
            .as_ref()
            .is_some_and(|k| k.queues.get(key).is_some_and(|q| !q.is_empty()))
    }

    /// Ordered groups: records that the unfinished `offset` has `key`.
    pub(crate) fn track_key(&mut self, offset: u64, key: Bytes) {
        if let Some(k) = self.keys.as_mut() {
            k.queues.entry(key.clone()).or_default().push_back(offset);
            k.key_of.insert(offset, key);
        }
    }

    /// Ordered groups: `offset` is finished; the next message of its key may go.
    fn release_key(&mut self, offset: u64) {
        let Some(k) = self.keys.as_mut() else { return };
        let Some(key) = k.key_of.remove(&offset) else {
            return;
        };
        let Some(q) = k.queues.get_mut(&key) else {
            return;
        };
        let was_head = q.front() == Some(&offset);
        q.retain(|&o| o != offset);
        let next = if was_head { q.front().copied() } else { None };
        if q.is_empty() {
            k.queues.remove(&key);
        }
        if let Some(n) = next
            && n >= self.floor
            && let Some(slot) = self.slots.get_mut((n - self.floor) as usize)
            && !slot.done
            && slot.visible_at == BLOCKED
        {
            self.timers.remove(&(BLOCKED, n));
            slot.visible_at = 0;
            self.timers.insert((0, n));
        }
    }

    /// Fresh (never delivered) slots due by `now`, counted up to `limit`.
    pub(crate) fn due_fresh(&self, now: u64, limit: usize) -> usize {
        let mut n = 0;
        for &(vis, _) in &self.timers {
            if vis > now || n >= limit {
                break;
            }
            n += 1;
        }
        n
    }

    /// After recovery: gives each fresh slot its time and, for ordered groups, rebuilds
    /// the key queues (all but each key's first held back). `info` reads an offset's
    /// message: `(key, time if fresh, filtered out)`.
    pub(crate) fn rebuild(&mut self, mut info: impl FnMut(u64) -> Option<(Bytes, u64, bool)>) {
        if self.keys.is_some() {
            self.keys = Some(KeyQueues::default());
        }
        // The floor does not move inside the loop (finish_keep), so `i` stays valid.
        for i in 0..self.slots.len() {
            let slot = self.slots[i];
            let offset = self.floor + i as u64;
            if slot.done {
                continue;
            }
            let Some((key, visible, filtered)) = info(offset) else {
                continue;
            };
            if filtered && slot.deliveries == 0 {
                self.finish_keep(offset);
                continue;
            }
            let keyed = self.keys.is_some() && !key.is_empty();
            if slot.deliveries == 0 {
                let vis = if keyed && self.key_busy(&key) {
                    BLOCKED
                } else {
                    visible
                };
                self.timers.remove(&(slot.visible_at, offset));
                self.slots[i].visible_at = vis;
                self.timers.insert((vis, offset));
            }
            if keyed {
                self.track_key(offset, key);
            }
        }
        self.advance();
    }

    /// The slot of `offset`, creating fresh slots up to it when it is at or past `next`.
    /// `None` below the floor (finished long ago).
    fn slot_mut(&mut self, offset: u64) -> Option<&mut Slot> {
        if offset < self.floor {
            return None;
        }
        while self.next <= offset {
            self.slots.push_back(Slot::FRESH);
            self.timers.insert((0, self.next));
            self.next += 1;
        }
        self.slots.get_mut((offset - self.floor) as usize)
    }

    /// Removes a pending slot's timer.
    fn untime(&mut self, slot: Slot, offset: u64) {
        if slot.deliveries == 0 {
            self.timers.remove(&(slot.visible_at, offset));
        } else {
            self.retimers.remove(&(slot.visible_at, offset));
        }
    }

    /// Adds a pending slot's timer.
    fn time(&mut self, slot: Slot, offset: u64) {
        if slot.deliveries == 0 {
            self.timers.insert((slot.visible_at, offset));
        } else {
            self.retimers.insert((slot.visible_at, offset));
        }
    }

    /// The earliest pending timer: redeliveries always, fresh messages only when
    /// `fresh` (the group is below `max_unacked`).
    pub(crate) fn next_due(&self, fresh: bool) -> Option<(u64, u64)> {
        let re = self.retimers.first().copied();
        let fr = if fresh {
            self.timers.first().copied()
        } else {
            None
        };
        match (re, fr) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the last slot (a log whose tail was lost outside the broker).
    pub(crate) fn pop_back(&mut self) {
        if let Some(s) = self.slots.pop_back() {
            self.next -= 1;
            if !s.done {
                self.untime(s, self.next);
                if s.deliveries > 0 {
                    self.unacked -= 1;
                }
            }
        }
    }

    /// Appends a newly read offset (must be `next`).
    pub(crate) fn push(&mut self, slot: Slot) {
        if !slot.done {
            self.time(slot, self.next);
            if slot.deliveries > 0 {
                self.unacked += 1;
            }
        }
        self.slots.push_back(slot);
        self.next += 1;
    }

    /// Sets a pending slot's deliveries and next visible time; false if it is finished.
    pub(crate) fn set(&mut self, offset: u64, deliveries: u16, visible_at: u64) -> bool {
        let Some(slot) = self.slot_mut(offset) else {
            return false;
        };
        if slot.done {
            return false;
        }
        let old = *slot;
        slot.deliveries = old.deliveries.max(deliveries);
        slot.visible_at = visible_at;
        let new = *slot;
        self.untime(old, offset);
        self.time(new, offset);
        if old.deliveries == 0 && new.deliveries > 0 {
            self.unacked += 1;
        }
        true
    }

    /// Finishes an offset; false if it already was.
    pub(crate) fn finish(&mut self, offset: u64) -> bool {
        let done = self.finish_keep(offset);
        self.advance();
        done
    }

    /// Finishes an offset without moving the floor (callers walking the window).
    fn finish_keep(&mut self, offset: u64) -> bool {
        let Some(slot) = self.slot_mut(offset) else {
            return false;
        };
        if slot.done {
            return false;
        }
        let old = *slot;
        slot.done = true;
        self.untime(old, offset);
        if old.deliveries > 0 {
            self.unacked -= 1;
        }
        self.release_key(offset);
        true
    }

    /// Moves the floor past finished slots.
    pub(crate) fn advance(&mut self) {
        while self.slots.front().is_some_and(|s| s.done) {
            self.slots.pop_front();
            self.floor += 1;
        }
    }

    /// The slot of an offset the group read, for an ack, nack or extension.
    pub(crate) fn delivered(&self, offset: u64) -> Option<Slot> {
        if offset < self.floor {
            return Some(Slot {
                done: true,
                ..Slot::FRESH
            });
        }
        self.slots.get((offset - self.floor) as usize).copied()
    }

    /// Skips everything below `start` (retention deleted it).
    pub(crate) fn skip_to(&mut self, start: u64) -> u64 {
        let mut lost = 0;
        while self.floor < start {
            if self.slots.front().is_some_and(|s| !s.done) {
                self.release_key(self.floor);
            }
            if let Some(s) = self.slots.pop_front() {
                if !s.done {
                    lost += 1;
                    self.untime(s, self.floor);
                    if s.deliveries > 0 {
                        self.unacked -= 1;
                    }
                }
                self.floor += 1;
            } else {
                lost += start - self.floor;
                self.floor = start;
            }
        }
        self.next = self.next.max(self.floor);
        lost
    }
}

/// A change to a group's state, as journaled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// A pending message's deliveries and next visible time.
    Set {
        part: u32,
        offset: u64,
        deliveries: u16,
        visible_at: u64,
    },
    /// Offsets `from..to` finished.
    Finish { part: u32, from: u64, to: u64 },
}

const OP_SET: u8 = 1;
const OP_FINISH: u8 = 2;

/// Encodes a batch of one group's ops as a journal payload.
pub(crate) fn encode_ops(topic: &str, group: &str, ops: &[Op], out: &mut Vec<u8>) {
    // Names are validated to at most 120 bytes; internal ones (`__dlq~t~g`) stay below 255.
    out.push(topic.len() as u8);
    out.extend_from_slice(topic.as_bytes());
    out.push(group.len() as u8);
    out.extend_from_slice(group.as_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        match *op {
            Op::Set {
                part,
                offset,
                deliveries,
                visible_at,
            } => {
                out.push(OP_SET);
                out.extend_from_slice(&part.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&deliveries.to_le_bytes());
                out.extend_from_slice(&visible_at.to_le_bytes());
            }
            Op::Finish { part, from, to } => {
                out.push(OP_FINISH);
                out.extend_from_slice(&part.to_le_bytes());
                out.extend_from_slice(&from.to_le_bytes());
                out.extend_from_slice(&to.to_le_bytes());
            }
        }
    }
}

/// Decodes a journal payload: `(topic, group, ops)`.
pub(crate) fn decode_ops(mut b: &[u8]) -> Result<(String, String, Vec<Op>)> {
    let bad = || MqError::Storage("damaged journal record".into());
    let mut take = |n: usize| -> Result<&[u8]> {
        if b.len() < n {
            return Err(bad());
        }
        let (h, t) = b.split_at(n);
        b = t;
        Ok(h)
    };
    let n = take(1)?[0] as usize;
    let topic = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad())?;
    let n = take(1)?[0] as usize;
    let group = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad())?;
    let count = u32::from_le_bytes(arr(take(4)?)) as usize;
    let mut ops = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let tag = take(1)?[0];
        let part = u32::from_le_bytes(arr(take(4)?));
        let offset = u64::from_le_bytes(arr(take(8)?));
        match tag {
            OP_SET => {
                let deliveries = u16::from_le_bytes(arr(take(2)?));
                let visible_at = u64::from_le_bytes(arr(take(8)?));
                ops.push(Op::Set {
                    part,
                    offset,
                    deliveries,
                    visible_at,
                });
            }
            OP_FINISH => {
                let to = u64::from_le_bytes(arr(take(8)?));
                ops.push(Op::Finish {
                    part,
                    from: offset,
                    to,
                });
            }
            _ => return Err(bad()),
        }
    }
    Ok((topic, group, ops))
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    a
}

/// A group's state: one cursor per partition.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub(crate) config: GroupConfig,
    pub(crate) cursors: Vec<Cursor>,
    /// Partition the next fetch starts at (spreads reads over partitions).
    pub(crate) turn: usize,
}

impl GroupState {
    /// Applies journaled ops (recovery).
    pub(crate) fn replay(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::Set {
                    part,
                    offset,
                    deliveries,
                    visible_at,
                } => {
                    if let Some(c) = self.cursors.get_mut(part as usize) {
                        c.set(offset, deliveries, visible_at);
                    }
                }
                Op::Finish { part, from, to } => {
                    if let Some(c) = self.cursors.get_mut(part as usize) {
                        for o in from.max(c.floor)..to {
                            c.finish(o);
                        }
                    }
                }
            }
        }
    }

    /// Messages delivered and not yet acked, over all partitions.
    pub(crate) fn unacked(&self) -> u32 {
        self.cursors.iter().map(|c| c.unacked).sum()
    }

    /// Appends the snapshot encoding of the cursors.
    pub(crate) fn encode_snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.cursors.len() as u32).to_le_bytes());
        for c in &self.cursors {
            out.extend_from_slice(&c.floor.to_le_bytes());
            out.extend_from_slice(&(c.slots.len() as u32).to_le_bytes());
            for s in &c.slots {
                out.push(u8::from(s.done));
                out.extend_from_slice(&s.deliveries.to_le_bytes());
                out.extend_from_slice(&s.visible_at.to_le_bytes());
            }
        }
    }

    /// Restores cursors from a snapshot encoding; returns the bytes read.
    pub(crate) fn decode_snapshot(&mut self, b: &[u8]) -> Result<usize> {
        let bad = || MqError::Storage("damaged group snapshot".into());
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = b.get(at..at + n).ok_or_else(bad)?;
            at += n;
            Ok(s)
        };
        let parts = u32::from_le_bytes(arr(take(4)?)) as usize;
        let mut cursors = Vec::with_capacity(parts.min(1024));
        for _ in 0..parts {
            let floor = u64::from_le_bytes(arr(take(8)?));
            let n = u32::from_le_bytes(arr(take(4)?));
            let mut c = Cursor::at(floor, self.config.mode == GroupMode::Ordered);
            for _ in 0..n {
                let done = take(1)?[0] != 0;
                let deliveries = u16::from_le_bytes(arr(take(2)?));
                let visible_at = u64::from_le_bytes(arr(take(8)?));
                c.push(Slot {
                    done,
                    deliveries,
                    visible_at,
                });
            }
            c.advance();
            cursors.push(c);
        }
        // A snapshot of a topic that has more partitions now keeps the new cursors.
        for (i, c) in cursors.into_iter().enumerate() {
            if let Some(slot) = self.cursors.get_mut(i) {
                *slot = c;
            }
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_and_replay_is_idempotent() {
        let ops = vec![
            Op::Set {
                part: 0,
                offset: 3,
                deliveries: 1,
                visible_at: 100,
            },
            Op::Finish {
                part: 0,
                from: 0,
                to: 3,
            },
            Op::Finish {
                part: 0,
                from: 3,
                to: 4,
            },
        ];
        let mut buf = Vec::new();
        encode_ops("t", "g", &ops, &mut buf);
        let (t, g, back) = decode_ops(&buf).expect("decode");
        assert_eq!((t.as_str(), g.as_str()), ("t", "g"));
        assert_eq!(back, ops);
        let mut st = GroupState {
            config: GroupConfig::default(),
            cursors: vec![Cursor::at(0, false)],
            turn: 0,
        };
        st.replay(&ops);
        st.replay(&ops);
        assert_eq!(st.cursors[0].floor, 4);
        assert_eq!(st.cursors[0].unacked, 0);
        assert!(st.cursors[0].timers.is_empty() && st.cursors[0].retimers.is_empty());
        for cut in 0..buf.len() {
            assert!(decode_ops(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn gaps_are_fresh_and_snapshot_round_trips() {
        let mut c = Cursor::at(10, false);
        assert!(c.set(12, 2, 500));
        assert_eq!(c.next, 13);
        assert_eq!(c.unacked, 1);
        // 10 and 11: read but not known delivered, so deliverable now.
        assert_eq!(
            c.timers.iter().take(2).copied().collect::<Vec<_>>(),
            vec![(0, 10), (0, 11)]
        );
        assert!(c.finish(10));
        assert_eq!(c.floor, 11);
        assert!(!c.finish(10));
        let st = GroupState {
            config: GroupConfig::default(),
            cursors: vec![c],
            turn: 0,
        };
        let mut buf = Vec::new();
        st.encode_snapshot(&mut buf);
        let mut back = GroupState {
            config: GroupConfig::default(),
            cursors: vec![Cursor::at(0, false)],
            turn: 0,
        };
        assert_eq!(back.decode_snapshot(&buf).expect("decode"), buf.len());
        let (a, b) = (&st.cursors[0], &back.cursors[0]);
        assert_eq!(
            (a.floor, a.next, a.unacked, &a.slots, &a.timers, &a.retimers),
            (b.floor, b.next, b.unacked, &b.slots, &b.timers, &b.retimers)
        );
    }

    #[test]
    fn rebuild_finishes_filtered_slots_anywhere_in_the_window_without_skipping() {
        // Fresh gap slots (as a replayed `Set` leaves them), the first and third filtered.
        let mut c = Cursor::at(0, true);
        assert!(c.set(4, 1, 100));
        let keys = |o: u64| -> Option<(Bytes, u64, bool)> {
            Some((
                Bytes::from(if o.is_multiple_of(2) { "k" } else { "j" }),
                5,
                o == 0 || o == 2,
            ))
        };
        c.rebuild(keys);
        // 0 and 2 finished (floor past 0), 1 and 3 fresh at 5; 3 waits behind 1 (key "j").
        assert_eq!(c.floor, 1);
        assert_eq!(c.delivered(2).map(|s| s.done), Some(true));
        assert_eq!(c.delivered(1).map(|s| s.visible_at), Some(5));
        assert_eq!(c.delivered(3).map(|s| s.visible_at), Some(BLOCKED));
        assert_eq!(c.unacked, 1);
    }
}
