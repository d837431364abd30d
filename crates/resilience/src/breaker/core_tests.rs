use super::*;
use proptest::prelude::*;

fn classic() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate_threshold: None,
        open_duration_ms: 30_000,
        half_open_max_probes: 1,
        ..Default::default()
    }
}

fn call(
    core: &BreakerCore,
    outcome: Outcome,
    now: Instant,
) -> Result<Option<Transition>, CircuitOpen> {
    let p = core.try_acquire(now)?;
    let t1 = p.transition;
    let t2 = core.record(p, outcome, Duration::ZERO, now);
    Ok(t2.or(t1))
}

#[test]
fn three_failures_then_reset_after_30s() {
    let t0 = Instant::now();
    let core = BreakerCore::new(classic(), t0).unwrap();
    call(&core, Outcome::Failure, t0).unwrap();
    call(&core, Outcome::Failure, t0).unwrap();
    assert_eq!(core.state(), State::Closed);
    let t = call(&core, Outcome::Failure, t0).unwrap().unwrap();
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    let err = core.try_acquire(t0 + Duration::from_secs(10)).unwrap_err();
    assert_eq!(err.remaining, Duration::from_secs(20));
    let t = call(&core, Outcome::Success, t0 + Duration::from_secs(30))
        .unwrap()
        .unwrap();
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Closed));
}

#[test]
fn success_resets_consecutive_count() {
    let t0 = Instant::now();
    let core = BreakerCore::new(classic(), t0).unwrap();
    for _ in 0..10 {
        call(&core, Outcome::Failure, t0).unwrap();
        call(&core, Outcome::Failure, t0).unwrap();
        call(&core, Outcome::Success, t0).unwrap();
    }
    assert_eq!(core.state(), State::Closed);
}

#[test]
fn failure_rate_needs_minimum_calls() {
    let t0 = Instant::now();
    let cfg = BreakerConfig {
        consecutive_failures: None,
        failure_rate_threshold: Some(0.5),
        minimum_calls: 10,
        window: crate::breaker::SlidingWindow::Count { size: 10 },
        ..Default::default()
    };
    let core = BreakerCore::new(cfg, t0).unwrap();
    for _ in 0..5 {
        call(&core, Outcome::Success, t0).unwrap();
        call(&core, Outcome::Failure, t0).unwrap();
    }
    assert_eq!(core.state(), State::Open, "5/10 failures reaches 50%");
}

#[test]
fn slow_calls_trip_and_half_open_backoff_grows() {
    let t0 = Instant::now();
    let cfg = BreakerConfig {
        consecutive_failures: None,
        failure_rate_threshold: None,
        slow_call_rate_threshold: Some(1.0),
        slow_call_duration_ms: 100,
        minimum_calls: 2,
        open_duration_ms: 1_000,
        open_backoff_multiplier: 2.0,
        max_open_duration_ms: 3_000,
        half_open_max_probes: 1,
        ..Default::default()
    };
    let core = BreakerCore::new(cfg, t0).unwrap();
    let slow = Duration::from_millis(150);
    for _ in 0..2 {
        let p = core.try_acquire(t0).unwrap();
        core.record(p, Outcome::Success, slow, t0);
    }
    assert_eq!(core.remaining_open(t0), Duration::from_secs(1));
    let mut now = t0;
    for expected in [2, 3, 3] {
        now += core.remaining_open(now);
        let p = core.try_acquire(now).unwrap();
        assert!(core.try_acquire(now).is_err(), "only one probe");
        core.record(p, Outcome::Failure, Duration::ZERO, now);
        assert_eq!(core.remaining_open(now), Duration::from_secs(expected));
    }
}

#[test]
fn stale_results_are_ignored() {
    let t0 = Instant::now();
    let core = BreakerCore::new(classic(), t0).unwrap();
    let old = core.try_acquire(t0).unwrap();
    for _ in 0..3 {
        call(&core, Outcome::Failure, t0).unwrap();
    }
    let later = t0 + Duration::from_secs(30);
    let probe = core.try_acquire(later).unwrap();
    assert!(
        core.record(old, Outcome::Success, Duration::ZERO, later)
            .is_none()
    );
    assert_eq!(core.state(), State::HalfOpen);
    core.record(probe, Outcome::Success, Duration::ZERO, later);
    assert_eq!(core.state(), State::Closed);
}

#[test]
fn operator_overrides() {
    let t0 = Instant::now();
    let core = BreakerCore::new(classic(), t0).unwrap();
    let t = core.force_open(Duration::from_secs(5), t0).unwrap();
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert_eq!(
        core.try_acquire(t0).unwrap_err().remaining,
        Duration::from_secs(5)
    );
    let t = core.reset(t0).unwrap();
    assert_eq!((t.from, t.to), (State::Open, State::Closed));
    assert!(core.try_acquire(t0).is_ok());
    assert!(core.reset(t0).is_none(), "already closed");
}

fn allowed(from: State, to: State) -> bool {
    matches!(
        (from, to),
        (State::Closed, State::Open)
            | (State::Open, State::HalfOpen)
            | (State::HalfOpen, State::Open)
            | (State::HalfOpen, State::Closed)
    )
}

proptest! {
    /// For random outcome sequences and clock steps, every reported
    /// transition is an edge of the state machine, consecutive transitions
    /// chain, the observed state always matches the last transition, and the
    /// breaker only opens from closed when a trigger really fired.
    #[test]
    fn transitions_follow_the_state_machine(
        steps in proptest::collection::vec((0u8..3, 0u64..2_000, any::<bool>()), 1..400),
        window_mode in any::<bool>(),
        time_window in any::<bool>(),
    ) {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            consecutive_failures: Some(3),
            failure_rate_threshold: window_mode.then_some(0.5),
            minimum_calls: 4,
            window: if time_window {
                crate::breaker::SlidingWindow::Time { duration_ms: 5_000, buckets: 5 }
            } else {
                crate::breaker::SlidingWindow::Count { size: 8 }
            },
            open_duration_ms: 1_000,
            open_backoff_multiplier: 2.0,
            max_open_duration_ms: 8_000,
            half_open_max_probes: 2,
            ..Default::default()
        };
        let core = BreakerCore::new(cfg, t0).unwrap();
        let mut now = t0;
        let mut state = State::Closed;
        let mut held = Vec::new();
        let mut streak = 0u32;
        let mut any_held = false;
        for (o, dt, hold) in steps {
            now += Duration::from_millis(dt);
            let outcome = [Outcome::Success, Outcome::Failure, Outcome::Ignored][o as usize];
            match core.try_acquire(now) {
                Err(e) => {
                    prop_assert!(state != State::Closed);
                    if state == State::Open { prop_assert!(e.remaining > Duration::ZERO); }
                }
                Ok(p) => {
                    if let Some(t) = p.transition {
                        prop_assert!(allowed(t.from, t.to));
                        prop_assert_eq!(t.from, state);
                        state = t.to;
                    }
                    prop_assert!(state != State::Open);
                    if hold && held.len() < 3 {
                        any_held = true;
                        held.push((p, outcome));
                        continue;
                    }
                    let was_closed = state == State::Closed;
                    if was_closed && outcome == Outcome::Failure { streak += 1 }
                    if was_closed && outcome == Outcome::Success { streak = 0 }
                    if let Some(t) = core.record(p, outcome, Duration::ZERO, now) {
                        prop_assert!(allowed(t.from, t.to));
                        prop_assert_eq!(t.from, state);
                        if t.from == State::Closed && !window_mode && !any_held {
                            prop_assert!(streak >= 3, "tripped without 3 consecutive failures");
                        }
                        if t.to != State::Closed { streak = 0 }
                        state = t.to;
                    }
                }
            }
            // Late results of held calls may only be applied if still current.
            if held.len() == 3 {
                for (p, outcome) in held.drain(..) {
                    if let Some(t) = core.record(p, outcome, Duration::ZERO, now) {
                        prop_assert!(allowed(t.from, t.to));
                        prop_assert_eq!(t.from, state);
                        state = t.to;
                        streak = 0;
                    }
                }
            }
            prop_assert_eq!(core.state(), state);
        }
    }
}
