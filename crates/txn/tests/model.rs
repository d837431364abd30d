//! The machine under random schedules: random definitions (mode, stages,
//! optional compensations, retry limits) and random orders of answers,
//! timer ticks, late answers, operator aborts and coordinator takeovers (the
//! record serialized and read back, then resumed). Whatever the schedule,
//! the invariants of `machine.rs` must hold, checked against what the
//! participants saw — not against the machine's own bookkeeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use meshwork_txn::spec::{BranchSpec, Call, RetryPolicy};
use meshwork_txn::{Action, Event, Mode, Outcome, Phase, Recovery, Spec, Status, Txn};
use proptest::prelude::*;

/// One random choice the scheduler makes at each turn.
#[derive(Debug, Clone)]
enum Turn {
    /// Answer the pending call number `n % pending` with this outcome
    /// (0: done, 1: rejected, 2: unknown).
    Answer(usize, u8),
    /// Let `ms` pass and tick.
    Wait(u64),
    /// Deliver an answer to a call that is not pending (stale).
    Stale(usize, u8),
    /// Operator abort.
    Abort,
    /// The coordinator dies; another resumes from the record.
    Takeover,
}

fn turn() -> impl Strategy<Value = Turn> {
    prop_oneof![
        6 => (any::<usize>(), 0u8..3).prop_map(|(n, o)| Turn::Answer(n, o)),
        2 => (1u64..3000).prop_map(Turn::Wait),
        1 => (any::<usize>(), 0u8..3).prop_map(|(n, o)| Turn::Stale(n, o)),
        1 => Just(Turn::Abort),
        1 => Just(Turn::Takeover),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let mode = prop_oneof![Just(Mode::Saga), Just(Mode::Tcc), Just(Mode::TwoPc)];
    (
        mode,
        prop::collection::vec((0u32..3, any::<bool>()), 1..6),
        any::<bool>(),
        1u32..4,
        2_000u64..20_000,
    )
        .prop_map(|(mode, branches, forward, max_attempts, timeout_ms)| {
            let call = |p: &str| Call::post(format!("/{p}"));
            let two_phase = mode != Mode::Saga;
            Spec {
                mode,
                branches: branches
                    .iter()
                    .enumerate()
                    .map(|(i, (stage, has_undo))| BranchSpec {
                        name: format!("b{i}"),
                        service: "svc".into(),
                        stage: *stage,
                        action: call("action"),
                        confirm: two_phase.then(|| call("confirm")),
                        undo: (two_phase || *has_undo).then(|| call("undo")),
                        timeout_ms: 1000,
                    })
                    .collect(),
                timeout_ms,
                recovery: if forward && !two_phase {
                    Recovery::Forward
                } else {
                    Recovery::Backward
                },
                retry: RetryPolicy {
                    initial_backoff_ms: 10,
                    max_backoff_ms: 500,
                    multiplier: 2.0,
                    max_attempts,
                    stuck_after: 3,
                },
            }
        })
}

/// What the participants saw, per branch and phase: calls received and
/// calls that took effect.
#[derive(Default)]
struct World {
    /// (branch, phase) -> attempts received.
    received: BTreeMap<(usize, Phase), u32>,
    /// (branch, phase) that answered done.
    done: BTreeSet<(usize, Phase)>,
    /// Order in which undo calls were first received.
    undo_order: Vec<usize>,
    /// The first phase-two call seen (confirm or undo), if any.
    second_phase: Option<Phase>,
}

fn outcome(o: u8) -> Outcome {
    match o {
        0 => Outcome::Done,
        1 => Outcome::Rejected("no".into()),
        _ => Outcome::Unknown("timeout".into()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn invariants_hold_under_any_schedule(spec in spec(), turns in prop::collection::vec(turn(), 0..120)) {
        spec.validate().unwrap();
        let mut now = 1_000_000u64;
        let mut txn = Txn::new("t", spec.clone(), now);
        let mut world = World::default();
        let mut pending: Vec<(usize, Phase, u32)> = Vec::new();
        let mut wake: Option<u64> = None;
        let mut finished: Option<Status> = None;
        let mut decided: Option<Status> = None;

        let apply = |txn: &mut Txn, now: u64, ev: Event, pending: &mut Vec<(usize, Phase, u32)>,
                         world: &mut World, wake: &mut Option<u64>, finished: &mut Option<Status>| {
            let Ok(actions) = txn.step(now, ev) else { return };
            for a in actions {
                match a {
                    Action::Call { branch, phase, attempt } => {
                        *world.received.entry((branch, phase)).or_default() += 1;
                        // Phase two never mixes confirm and undo.
                        if phase != Phase::Action {
                            let first = *world.second_phase.get_or_insert(phase);
                            assert_eq!(phase, first, "confirm and undo in one transaction");
                        }
                        if phase == Phase::Undo && !world.undo_order.contains(&branch) {
                            world.undo_order.push(branch);
                        }
                        pending.retain(|&(b, _, _)| b != branch);
                        pending.push((branch, phase, attempt));
                    }
                    Action::WakeAt(at) => *wake = Some(at),
                    Action::Finished(s) => {
                        assert!(finished.is_none(), "finished twice");
                        *finished = Some(s);
                    }
                }
            }
        };

        apply(&mut txn, now, Event::Resume, &mut pending, &mut world, &mut wake, &mut finished);
        let mut turns = turns.into_iter();
        // After the random turns, answer everything done until the end.
        for step in 0..2000 {
            if finished.is_some() {
                break;
            }
            let t = turns.next().unwrap_or(if pending.is_empty() { Turn::Wait(600) } else { Turn::Answer(0, 0) });
            match t {
                Turn::Answer(n, o) if !pending.is_empty() => {
                    let (b, p, a) = pending.remove(n % pending.len());
                    let o = outcome(o);
                    if o == Outcome::Done {
                        world.done.insert((b, p));
                    }
                    now += 1;
                    apply(&mut txn, now, Event::Result { branch: b, phase: p, attempt: a, outcome: o },
                          &mut pending, &mut world, &mut wake, &mut finished);
                }
                Turn::Answer(..) | Turn::Wait(_) => {
                    let ms = if let Turn::Wait(ms) = t { ms } else { 1 };
                    now += ms;
                    if wake.is_some_and(|w| w <= now) {
                        wake = None;
                        apply(&mut txn, now, Event::Tick, &mut pending, &mut world, &mut wake, &mut finished);
                    }
                }
                Turn::Stale(n, o) => {
                    let b = n % spec.branches.len();
                    let p = [Phase::Action, Phase::Confirm, Phase::Undo][n % 3];
                    let current = pending.iter().any(|&(pb, pp, _)| pb == b && pp == p);
                    if !current {
                        let before = txn.clone();
                        apply(&mut txn, now, Event::Result { branch: b, phase: p, attempt: (n % 4) as u32 + 1, outcome: outcome(o) },
                              &mut pending, &mut world, &mut wake, &mut finished);
                        assert_eq!(txn.status, before.status, "a stale answer changed the status");
                    }
                }
                Turn::Abort => {
                    let was = txn.status;
                    let r = txn.clone().step(now, Event::Abort { reason: "operator".into() });
                    if was == Status::Committing {
                        assert!(r.is_err(), "abort accepted after the commit decision");
                    }
                    apply(&mut txn, now, Event::Abort { reason: "operator".into() },
                          &mut pending, &mut world, &mut wake, &mut finished);
                }
                Turn::Takeover => {
                    // Calls in flight are lost with the coordinator; the new
                    // one works from the persisted record only.
                    let json = serde_json::to_string(&txn).unwrap();
                    txn = serde_json::from_str(&json).unwrap();
                    pending.clear();
                    wake = None;
                    apply(&mut txn, now, Event::Resume, &mut pending, &mut world, &mut wake, &mut finished);
                    if wake.is_none() && pending.is_empty() && finished.is_none() {
                        // Nothing in flight and no timer: the resume must
                        // still make progress on the next tick.
                        apply(&mut txn, now, Event::Tick, &mut pending, &mut world, &mut wake, &mut finished);
                    }
                }
            }
            if matches!(txn.status, Status::Committing | Status::Aborting) {
                let d = decided.get_or_insert(txn.status);
                assert_eq!(*d, txn.status, "the decision changed");
            }
            prop_assert!(step < 1999, "did not finish: {:?}", txn.status);
        }
        let end = finished.expect("finished");
        prop_assert_eq!(end, txn.status);
        let n = spec.branches.len();
        let sent: BTreeSet<usize> = (0..n).filter(|&b| world.received.contains_key(&(b, Phase::Action))).collect();
        match end {
            Status::Committed => {
                for b in 0..n {
                    prop_assert!(world.done.contains(&(b, Phase::Action)), "branch {} committed without its action done", b);
                    if spec.mode != Mode::Saga {
                        prop_assert!(world.done.contains(&(b, Phase::Confirm)), "branch {} not confirmed", b);
                    }
                    prop_assert!(!world.received.contains_key(&(b, Phase::Undo)), "undo in a committed transaction");
                }
            }
            Status::Aborted => {
                for b in 0..n {
                    prop_assert!(!world.received.contains_key(&(b, Phase::Confirm)), "confirm in an aborted transaction");
                    let must_undo = sent.contains(&b) && spec.branches[b].undo.is_some();
                    prop_assert_eq!(world.done.contains(&(b, Phase::Undo)), must_undo,
                        "branch {}: undone must equal sent-with-an-undo", b);
                    if !must_undo {
                        prop_assert!(!world.received.contains_key(&(b, Phase::Undo)), "undo of a branch never sent");
                    }
                }
                if spec.mode == Mode::Saga {
                    // Compensations start in non-increasing stage order.
                    let stages: Vec<u32> = world.undo_order.iter().map(|&b| spec.branches[b].stage).collect();
                    prop_assert!(stages.windows(2).all(|w| w[0] >= w[1]), "undo order by stage {:?}", stages);
                }
            }
            s => prop_assert!(false, "not final: {:?}", s),
        }
    }
}
