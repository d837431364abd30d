//! The state machine, scenario by scenario: the exact actions each event
//! produces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshwork_txn::machine::CallState;
use meshwork_txn::{Action, Event, Outcome, Phase, Spec, Status, StepError, Txn};

use Action::{Call, Finished, WakeAt};
use Phase::{Action as Act, Confirm, Undo};

const T0: u64 = 1_000_000;

fn saga(extra: &str) -> Spec {
    Spec::from_json(&format!(
        r#"{{"mode": "saga", {extra} "branches": [
            {{"name": "reserve", "service": "inventory", "action": {{"path": "/reserve"}},
              "undo": {{"path": "/release"}}}},
            {{"name": "charge", "service": "payment", "stage": 1, "action": {{"path": "/charge"}},
              "undo": {{"path": "/refund"}}}},
            {{"name": "notify", "service": "mail", "stage": 2, "action": {{"path": "/send"}}}}
        ]}}"#
    ))
    .unwrap()
}

fn tcc() -> Spec {
    Spec::from_json(
        r#"{"mode": "tcc", "retry": {"stuck_after": 2}, "branches": [
            {"name": "stock", "service": "inventory", "action": {"path": "/try"},
             "confirm": {"path": "/confirm"}, "undo": {"path": "/cancel"}},
            {"name": "money", "service": "payment", "action": {"path": "/try"},
             "confirm": {"path": "/confirm"}, "undo": {"path": "/cancel"}}
        ]}"#,
    )
    .unwrap()
}

fn call(branch: usize, phase: Phase, attempt: u32) -> Action {
    Call {
        branch,
        phase,
        attempt,
    }
}

fn answer(branch: usize, phase: Phase, attempt: u32, outcome: Outcome) -> Event {
    Event::Result {
        branch,
        phase,
        attempt,
        outcome,
    }
}

fn done(branch: usize, phase: Phase, attempt: u32) -> Event {
    answer(branch, phase, attempt, Outcome::Done)
}

fn unknown() -> Outcome {
    Outcome::Unknown("503 from payment".into())
}

fn rejected() -> Outcome {
    Outcome::Rejected("402 declined".into())
}

#[test]
fn a_saga_runs_its_stages_in_order_and_commits() {
    let mut t = Txn::new("t1", saga(""), T0);
    let deadline = WakeAt(T0 + 60_000);
    assert_eq!(
        t.step(T0, Event::Resume).unwrap(),
        vec![call(0, Act, 1), deadline.clone()]
    );
    assert_eq!(
        t.step(T0 + 1, done(0, Act, 1)).unwrap(),
        vec![call(1, Act, 1), deadline.clone()]
    );
    assert_eq!(
        t.step(T0 + 2, done(1, Act, 1)).unwrap(),
        vec![call(2, Act, 1), deadline]
    );
    assert_eq!(
        t.step(T0 + 3, done(2, Act, 1)).unwrap(),
        vec![Finished(Status::Committed)]
    );
    assert_eq!(t.status, Status::Committed);
}

#[test]
fn a_rejected_step_compensates_every_step_sent_in_reverse_stage_order() {
    let mut t = Txn::new("t1", saga(""), T0);
    t.step(T0, Event::Resume).unwrap();
    t.step(T0, done(0, Act, 1)).unwrap();
    // The charge is declined: compensate it (it was sent; the participant's
    // barrier makes an undo of nothing a no-op), then the reservation. The
    // notification was never sent and has no compensation anyway.
    assert_eq!(
        t.step(T0 + 5, answer(1, Act, 1, rejected())).unwrap(),
        vec![call(1, Undo, 1)]
    );
    assert_eq!(t.status, Status::Aborting);
    assert_eq!(t.reason.as_deref(), Some("charge rejected: 402 declined"));
    assert_eq!(t.branches[2].call, CallState::Skipped);
    assert_eq!(
        t.step(T0 + 6, done(1, Undo, 1)).unwrap(),
        vec![call(0, Undo, 1)]
    );
    assert_eq!(
        t.step(T0 + 7, done(0, Undo, 1)).unwrap(),
        vec![Finished(Status::Aborted)]
    );
}

#[test]
fn unknown_outcomes_are_retried_with_backoff_then_the_saga_gives_up() {
    let mut t = Txn::new("t1", saga(r#""retry": {"max_attempts": 3},"#), T0);
    t.step(T0, Event::Resume).unwrap();
    let deadline = WakeAt(T0 + 60_000);
    // Attempt 1 fails: retry after 100 ms, then 200 ms (the default backoff).
    assert_eq!(
        t.step(T0 + 10, answer(0, Act, 1, unknown())).unwrap(),
        vec![WakeAt(T0 + 110)]
    );
    assert_eq!(
        t.step(T0 + 50, Event::Tick).unwrap(),
        vec![WakeAt(T0 + 110)]
    );
    assert_eq!(
        t.step(T0 + 110, Event::Tick).unwrap(),
        vec![call(0, Act, 2), deadline.clone()]
    );
    assert_eq!(
        t.step(T0 + 120, answer(0, Act, 2, unknown())).unwrap(),
        vec![WakeAt(T0 + 320)]
    );
    assert_eq!(
        t.step(T0 + 320, Event::Tick).unwrap(),
        vec![call(0, Act, 3), deadline]
    );
    // The third unknown outcome is the last: compensate the step (it may
    // have taken effect).
    assert_eq!(
        t.step(T0 + 330, answer(0, Act, 3, unknown())).unwrap(),
        vec![call(0, Undo, 1)]
    );
    assert_eq!(
        t.reason.as_deref(),
        Some("reserve failed 3 times: 503 from payment")
    );
}

#[test]
fn the_global_deadline_aborts_the_forward_phase() {
    let mut t = Txn::new("t1", saga(r#""timeout_ms": 10000,"#), T0);
    t.step(T0, Event::Resume).unwrap();
    t.step(T0 + 10, done(0, Act, 1)).unwrap();
    // The charge hangs; at the deadline both sent steps are compensated.
    assert_eq!(
        t.step(T0 + 10_000, Event::Tick).unwrap(),
        vec![call(1, Undo, 1)]
    );
    // The charge's late answer changes nothing.
    assert_eq!(t.step(T0 + 10_001, done(1, Act, 1)).unwrap(), vec![]);
    assert_eq!(t.status, Status::Aborting);
}

#[test]
fn forward_recovery_retries_past_max_attempts_and_the_deadline() {
    let mut t = Txn::new(
        "t1",
        saga(
            r#""recovery": "forward", "timeout_ms": 5000, "retry": {"max_attempts": 1, "initial_backoff_ms": 10, "max_backoff_ms": 10},"#,
        ),
        T0,
    );
    assert_eq!(t.step(T0, Event::Resume).unwrap(), vec![call(0, Act, 1)]);
    let mut now = T0;
    for attempt in 1..=5 {
        now += 6000;
        assert_eq!(
            t.step(now, answer(0, Act, attempt, unknown())).unwrap(),
            vec![WakeAt(now + 10)]
        );
        assert_eq!(
            t.step(now + 10, Event::Tick).unwrap(),
            vec![call(0, Act, attempt + 1)]
        );
    }
    assert_eq!(t.status, Status::Running);
    // A rejection still rolls back.
    assert_eq!(
        t.step(now + 20, answer(0, Act, 6, rejected())).unwrap(),
        vec![call(0, Undo, 1)]
    );
}

#[test]
fn tcc_tries_in_parallel_then_confirms_everything() {
    let mut t = Txn::new("t1", tcc(), T0);
    let deadline = WakeAt(T0 + 60_000);
    assert_eq!(
        t.step(T0, Event::Resume).unwrap(),
        vec![call(0, Act, 1), call(1, Act, 1), deadline.clone()]
    );
    assert_eq!(t.step(T0 + 1, done(1, Act, 1)).unwrap(), vec![deadline]);
    assert_eq!(
        t.step(T0 + 2, done(0, Act, 1)).unwrap(),
        vec![call(0, Confirm, 1), call(1, Confirm, 1)]
    );
    assert_eq!(t.verdict(), Some(true));
    // Once committing, an abort is refused.
    assert_eq!(
        t.step(
            T0 + 3,
            Event::Abort {
                reason: "operator".into()
            }
        ),
        Err(StepError::Committed("t1".into()))
    );
    // Confirm is retried whatever the answer, and flagged stuck after 2.
    assert_eq!(
        t.step(T0 + 4, answer(0, Confirm, 1, rejected())).unwrap(),
        vec![WakeAt(T0 + 104)]
    );
    t.step(T0 + 104, Event::Tick).unwrap();
    t.step(T0 + 105, answer(0, Confirm, 2, unknown())).unwrap();
    assert!(t.branches[0].stuck);
    assert_eq!(
        t.step(T0 + 106, Event::RetryNow).unwrap(),
        vec![call(0, Confirm, 3)]
    );
    assert!(!t.branches[0].stuck);
    t.step(T0 + 107, done(1, Confirm, 1)).unwrap();
    assert_eq!(
        t.step(T0 + 108, done(0, Confirm, 3)).unwrap(),
        vec![Finished(Status::Committed)]
    );
}

#[test]
fn a_tcc_rejection_cancels_every_branch_tried_including_one_in_flight() {
    let mut t = Txn::new("t1", tcc(), T0);
    t.step(T0, Event::Resume).unwrap();
    assert_eq!(
        t.step(T0 + 1, answer(0, Act, 1, rejected())).unwrap(),
        vec![call(0, Undo, 1), call(1, Undo, 1)]
    );
    assert_eq!(t.verdict(), Some(false));
    // The in-flight try's answer arrives after the decision: ignored.
    assert_eq!(t.step(T0 + 2, done(1, Act, 1)).unwrap(), vec![]);
    t.step(T0 + 3, done(0, Undo, 1)).unwrap();
    assert_eq!(
        t.step(T0 + 4, done(1, Undo, 1)).unwrap(),
        vec![Finished(Status::Aborted)]
    );
    // Over: operator actions are refused, late answers ignored.
    assert!(matches!(
        t.step(T0 + 5, Event::RetryNow),
        Err(StepError::Final { .. })
    ));
    assert_eq!(t.step(T0 + 5, done(1, Undo, 1)).unwrap(), vec![]);
}

#[test]
fn resume_resends_calls_in_flight_with_the_same_attempt() {
    let mut t = Txn::new("t1", tcc(), T0);
    t.step(T0, Event::Resume).unwrap();
    t.step(T0 + 1, done(0, Act, 1)).unwrap();
    // The coordinator dies; another loads the record and resumes it.
    let json = serde_json::to_string(&t).unwrap();
    let mut t2: Txn = serde_json::from_str(&json).unwrap();
    assert_eq!(t2, t);
    assert_eq!(
        t2.step(T0 + 5000, Event::Resume).unwrap(),
        vec![call(1, Act, 1), WakeAt(T0 + 60_000)]
    );
    assert_eq!(t2.idempotency_key(1, Act), "t1/money/action");
    // An answer to an attempt that was never sent, or to an unknown branch.
    assert_eq!(
        t2.step(T0 + 5001, done(1, Act, 7)).unwrap(),
        vec![WakeAt(T0 + 60_000)]
    );
    assert!(matches!(
        t2.step(T0 + 5001, done(9, Act, 1)),
        Err(StepError::NoBranch { branch: 9, .. })
    ));
}

#[test]
fn an_operator_abort_before_anything_was_sent_finishes_at_once() {
    let mut t = Txn::new("t1", saga(""), T0);
    assert_eq!(
        t.step(
            T0,
            Event::Abort {
                reason: "cancelled by the client".into()
            }
        )
        .unwrap(),
        vec![Finished(Status::Aborted)]
    );
    assert_eq!(t.reason.as_deref(), Some("cancelled by the client"));
}

#[test]
fn history_is_bounded() {
    let mut t = Txn::new(
        "t1",
        saga(r#""recovery": "forward", "retry": {"initial_backoff_ms": 1, "max_backoff_ms": 1},"#),
        T0,
    );
    t.step(T0, Event::Resume).unwrap();
    let mut now = T0;
    for attempt in 1..=500 {
        now += 1;
        t.step(now, answer(0, Act, attempt, unknown())).unwrap();
        now += 1;
        t.step(now, Event::Tick).unwrap();
    }
    assert_eq!(t.history.len(), meshwork_txn::machine::MAX_HISTORY);
    assert_eq!(t.history_dropped, 1001 - 128);
}
