//! The rollout state machine as pure code: [`tick`] takes what was observed
//! (healthy instances of the new version, the current window's figures for
//! both versions, the time) and moves the status on, returning the decision
//! it took; [`command`] applies an operator's promote, abort, pause or resume.
//! No I/O, no clock of its own: the controller and the HTTP API call these and
//! write the result with a compare on the record's revision.

use super::{Action, Decision, Phase, Rollout, Window};

/// Most decisions kept on a rollout (the oldest go first).
pub const MAX_DECISIONS: usize = 200;

/// What the controller saw at one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Now, Unix ms.
    pub now_ms: u64,
    /// Healthy instances of the new version in the registry.
    pub canary_healthy: usize,
    /// The new version's figures in the current window.
    pub canary: Window,
    /// The stable version's figures in the current window.
    pub stable: Window,
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The next step now (`full`: straight to 100 % and promoted).
    Promote {
        /// Skip every remaining step.
        full: bool,
    },
    /// Roll back: every request to the stable version.
    Abort,
    /// Stop deciding; the weights stay where they are.
    Pause,
    /// Decide again, with a fresh window.
    Resume,
}

impl Command {
    /// The command's name in the API.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Promote { .. } => "promote",
            Command::Abort => "abort",
            Command::Pause => "pause",
            Command::Resume => "resume",
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn push(r: &mut Rollout, d: Decision) -> Decision {
    r.status.decisions.push(d.clone());
    let n = r.status.decisions.len();
    if n > MAX_DECISIONS {
        r.status.decisions.drain(..n - MAX_DECISIONS);
    }
    d
}

fn decision(r: &Rollout, now_ms: u64, action: Action, reason: String) -> Decision {
    Decision {
        at_ms: now_ms,
        action,
        step: r.status.step,
        weight: r.status.weight,
        reason,
        canary: r.status.canary.clone(),
        stable: r.status.stable.clone(),
        by: None,
    }
}

/// Starts a new window (a new step, a resume): the gateways count afresh.
fn new_window(r: &mut Rollout, now_ms: u64) {
    r.status.window += 1;
    r.status.window_started_ms = now_ms;
    r.status.held = false;
    r.status.canary = Window::default();
    r.status.stable = Window::default();
}

/// Goes to step `step` (its weight), or to promoted past the last one.
fn go_to_step(r: &mut Rollout, step: u32, now_ms: u64) {
    match r.spec.weights().get(step as usize) {
        Some(&w) => {
            r.status.phase = Phase::Progressing;
            r.status.step = step;
            r.status.weight = w;
        }
        None => {
            r.status.phase = Phase::Promoted;
            r.status.weight = 100;
        }
    }
    new_window(r, now_ms);
}

fn fail(r: &mut Rollout, now_ms: u64, reason: String) -> Decision {
    if r.spec.auto_rollback {
        r.status.phase = Phase::RolledBack;
        r.status.weight = 0;
        let d = decision(r, now_ms, Action::Rollback, reason);
        new_window(r, now_ms);
        push(r, d)
    } else {
        r.status.phase = Phase::Paused;
        let d = decision(r, now_ms, Action::Pause, reason);
        push(r, d)
    }
}

/// The z of a one-sided 95 % confidence bound: the error verdict at a
/// step's end.
pub const Z95: f64 = 1.645;

/// The z of a one-sided 99.9 % confidence bound: an error verdict before a
/// step's end. The analysis looks every second; at 95 % per look a healthy
/// version would fail some step by chance alone, at 99.9 % per look (with
/// the 95 % look at the end) a step of up to 50 looks stays near 5 % in all
/// (Bonferroni), and a clearly failing version is still caught at once.
pub const Z999: f64 = 3.090;

/// The lower bound of the one-sided Wilson score interval (`z`: [`Z95`] or
/// [`Z999`]) of `failures` in `requests`: an error rate the new version
/// has at least, with that confidence (one early failure in 20 requests is
/// not 5 %).
pub fn error_rate_lower_bound(failures: u64, requests: u64, z: f64) -> f64 {
    if requests == 0 {
        return 0.0;
    }
    let n = requests as f64;
    let p = failures.min(requests) as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - margin) / (1.0 + z2 / n)).max(0.0)
}

/// The share of requests allowed above a p99 limit.
const P99_SHARE: f64 = 0.01;

/// The significance of the latency check: the new version fails on p99
/// only when a version whose p99 is within the limit would show so many
/// slow requests less than 5 % of the time.
const ALPHA: f64 = 0.05;

/// `P(X >= k)` for `X ~ Binomial(n, p)` with `0 < p < 1`, summed exactly
/// (in logarithms, so large `n` does not underflow).
pub fn binomial_upper_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let (nf, q) = (n as f64, 1.0 - p);
    let mean = nf * p;
    // Twelve standard deviations above the mean the tail is below 1e-30
    // (and the sum below would be long).
    if k as f64 > mean + 12.0 * (mean * q).sqrt() + 12.0 {
        return 0.0;
    }
    let odds = (p / q).ln();
    let mut ln_pmf = nf * q.ln();
    let mut below = 0.0;
    for i in 0..k {
        below += ln_pmf.exp();
        ln_pmf += ((n - i) as f64 / (i + 1) as f64).ln() + odds;
    }
    (1.0 - below).max(0.0)
}

/// The analysis of one window: why the new version fails, or `None` when
/// it passes or has too few requests to say. `stable` is the stable
/// version's figures in the same window, `baseline` its last window with
/// enough requests (for the last step, where the stable version has none).
///
/// On errors the new version fails when even the lower bound of its error
/// rate ([`error_rate_lower_bound`]) is more than the allowed points above
/// the stable version's rate (this window's, else the baseline's). On
/// latency it fails when its p99 is above the limit (`max_p99_ratio` times
/// the stable p99 and `p99_slack_ms` more) with 95 % confidence: more than
/// 1 % of its requests certainly slower than the limit, beyond what chance
/// gives ([`binomial_upper_tail`]); one slow first request is not a slow
/// version. Latency is compared only with the same window's stable figures
/// (an earlier window ran at another load and share of the traffic), and
/// only when `step_over` (once per step: a 5 % test repeated every second
/// over a growing window would roll back healthy versions far more often
/// than 5 %; errors are judged every tick, for a fast rollback).
pub fn analyse(
    r: &Rollout,
    canary: &Window,
    stable: &Window,
    baseline: Option<&Window>,
    step_over: bool,
) -> Option<String> {
    let a = &r.spec.analysis;
    if canary.requests < a.min_requests {
        return None;
    }
    let concurrent = (stable.requests >= a.min_requests).then_some(stable);
    let reference = concurrent.or(baseline.filter(|w| w.requests >= a.min_requests));
    let stable_rate = reference.map_or(0.0, Window::error_rate);
    let rate = canary.error_rate();
    let (z, level) = if step_over { (Z95, 95.0) } else { (Z999, 99.9) };
    let at_least = error_rate_lower_bound(canary.failures, canary.requests, z);
    if at_least - stable_rate > a.max_error_rate_increase {
        return Some(format!(
            "error rate {:.2}% ({} of {}; at least {:.2}% with {level}% confidence) against {:.2}% for the stable version; at most {:.2} points more are allowed",
            rate * 100.0,
            canary.failures,
            canary.requests,
            at_least * 100.0,
            stable_rate * 100.0,
            a.max_error_rate_increase * 100.0
        ));
    }
    if let (true, Some(cp), Some(sp)) =
        (step_over, canary.p99_ms, concurrent.and_then(|w| w.p99_ms))
    {
        let limit = (sp * a.max_p99_ratio).max(sp + a.p99_slack_ms);
        let (slow, timed) = (canary.slower_than(limit), canary.timed());
        if cp > limit && binomial_upper_tail(slow, timed, P99_SHARE) < ALPHA {
            return Some(format!(
                "p99 {cp:.1} ms against {sp:.1} ms for the stable version ({slow} of {timed} requests slower than {limit:.1} ms: more than 1% with 95% confidence); at most {:.2}x (and {:.0} ms more) is allowed",
                a.max_p99_ratio, a.p99_slack_ms
            ));
        }
    }
    None
}

/// One tick of the controller: records what was seen in `status.canary`
/// and `status.stable`, and moves the rollout on when the health gate
/// opens, the analysis fails, or the step's interval passed with enough
/// requests. Returns the decision taken, if any (a hold is recorded once per
/// window).
pub fn tick(r: &mut Rollout, o: &Observation) -> Option<Decision> {
    let now = o.now_ms;
    match r.status.phase {
        Phase::Promoted | Phase::RolledBack | Phase::Paused => return None,
        Phase::Waiting | Phase::Progressing => {}
    }
    r.status.canary = o.canary.clone();
    r.status.stable = o.stable.clone();
    let min = r.spec.analysis.min_requests;
    if o.stable.requests >= min {
        r.status.baseline = Some(o.stable.clone());
    }
    if r.status.phase == Phase::Waiting {
        let need = r.spec.min_healthy.max(1) as usize;
        if o.canary_healthy >= need {
            let reason = format!(
                "{} healthy instance(s) of version {}: shifting {}% of the traffic",
                o.canary_healthy,
                r.spec.to_version,
                r.spec.weights().first().copied().unwrap_or(100)
            );
            let judged = (r.status.canary.clone(), r.status.stable.clone());
            go_to_step(r, 0, now);
            let mut d = decision(r, now, Action::Advance, reason);
            (d.canary, d.stable) = judged;
            return Some(push(r, d));
        }
        // The deadline counts from the start, or from a resume.
        if now.saturating_sub(r.status.window_started_ms) >= r.spec.deadline_ms {
            return Some(fail(
                r,
                now,
                format!(
                    "{} of {} healthy instance(s) of version {} after {} s",
                    o.canary_healthy,
                    need,
                    r.spec.to_version,
                    r.spec.deadline_ms / 1000
                ),
            ));
        }
        return None;
    }
    if o.canary_healthy == 0 {
        return Some(fail(
            r,
            now,
            format!(
                "no healthy instance of version {} is left",
                r.spec.to_version
            ),
        ));
    }
    let step_over = now.saturating_sub(r.status.window_started_ms) >= r.spec.interval_ms;
    let baseline = r.status.baseline.as_ref();
    if let Some(reason) = analyse(r, &o.canary, &o.stable, baseline, step_over) {
        return Some(fail(r, now, reason));
    }
    if !step_over {
        return None;
    }
    if o.canary.requests < min {
        // Starved for a whole deadline past the interval (its instances
        // ejected, no traffic at all): a verdict, not an endless hold.
        let waited = now.saturating_sub(r.status.window_started_ms);
        if waited >= r.spec.interval_ms.saturating_add(r.spec.deadline_ms) {
            return Some(fail(
                r,
                now,
                format!(
                    "{} of the {} requests to version {} the analysis needs after {} s",
                    o.canary.requests,
                    min,
                    r.spec.to_version,
                    waited / 1000
                ),
            ));
        }
        if r.status.held {
            return None;
        }
        r.status.held = true;
        let d = decision(
            r,
            now,
            Action::Hold,
            format!(
                "{} of the {} requests to version {} the analysis needs; waiting for traffic",
                o.canary.requests, min, r.spec.to_version
            ),
        );
        return Some(push(r, d));
    }
    let judged = (r.status.canary.clone(), r.status.stable.clone());
    let from = r.status.weight;
    go_to_step(r, r.status.step + 1, now);
    let (action, reason) = if r.status.phase == Phase::Promoted {
        (
            Action::Promote,
            format!(
                "the analysis passed at {from}%: version {} takes all the traffic",
                r.spec.to_version
            ),
        )
    } else {
        (
            Action::Advance,
            format!(
                "the analysis passed at {from}%: shifting {}%",
                r.status.weight
            ),
        )
    };
    let mut d = decision(r, now, action, reason);
    (d.canary, d.stable) = judged;
    Some(push(r, d))
}

/// Applies an operator's command (`by` names who), or says why not.
pub fn command(r: &mut Rollout, c: Command, now_ms: u64, by: &str) -> Result<Decision, Refused> {
    let phase = r.status.phase;
    let judged = (r.status.canary.clone(), r.status.stable.clone());
    if phase.is_terminal() {
        return Err(Refused(format!(
            "the rollout of {} is {}; start a new one",
            r.spec.service,
            phase.as_str()
        )));
    }
    let (action, reason) = match c {
        Command::Promote { full } => {
            let from = r.status.weight;
            let next = match (full, phase) {
                (true, _) => u32::MAX,
                (false, Phase::Waiting) => 0,
                (false, _) if from == 0 => 0,
                (false, _) => r.status.step + 1,
            };
            go_to_step(r, next, now_ms);
            let action = if r.status.phase == Phase::Promoted {
                Action::Promote
            } else {
                Action::Advance
            };
            (
                action,
                format!("promoted by hand from {from}% to {}%", r.status.weight),
            )
        }
        Command::Abort => {
            r.status.phase = Phase::RolledBack;
            r.status.weight = 0;
            new_window(r, now_ms);
            (Action::Rollback, "aborted by hand".to_string())
        }
        Command::Pause => {
            if phase == Phase::Paused {
                return Err(Refused("the rollout is paused already".into()));
            }
            r.status.phase = Phase::Paused;
            (Action::Pause, "paused by hand".to_string())
        }
        Command::Resume => {
            if phase != Phase::Paused {
                return Err(Refused(format!(
                    "the rollout is {}, not paused",
                    phase.as_str()
                )));
            }
            r.status.phase = if r.status.weight == 0 {
                Phase::Waiting
            } else {
                Phase::Progressing
            };
            new_window(r, now_ms);
            (
                Action::Resume,
                "resumed by hand: a fresh window".to_string(),
            )
        }
    };
    let mut d = decision(r, now_ms, action, reason);
    (d.canary, d.stable) = judged;
    d.by = Some(by.to_string());
    Ok(push(r, d))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rollout::{Analysis, LATENCY_BUCKETS, Spec, Strategy, latency_bucket, p99_ms};

    const MIN: u64 = 60_000;

    fn canary(steps: &[u8]) -> Rollout {
        Rollout::new(
            "r1".into(),
            Spec {
                service: "inventory".into(),
                to_version: "2".into(),
                strategy: Strategy::Canary,
                steps: steps.to_vec(),
                interval_ms: MIN,
                analysis: Analysis::default(),
                auto_rollback: true,
                min_healthy: 1,
                deadline_ms: 10 * MIN,
                pin: None,
            },
            1_000,
        )
    }

    /// A window whose requests all took `p99` ms.
    fn w(requests: u64, failures: u64, p99: f64) -> Window {
        lat(failures, &[(p99, requests)])
    }

    /// A window of `(ms, requests)` latencies, its p99 from their buckets.
    fn lat(failures: u64, latencies: &[(f64, u64)]) -> Window {
        let mut b = [0u64; LATENCY_BUCKETS];
        for (ms, n) in latencies {
            b[latency_bucket((ms * 1000.0) as u64)] += n;
        }
        let requests = b.iter().sum();
        Window {
            requests,
            failures,
            p99_ms: if requests == 0 { Some(0.0) } else { p99_ms(&b) },
            latency: (0u8..).zip(b).filter(|(_, n)| *n > 0).collect(),
        }
    }

    fn obs(now_ms: u64, healthy: usize, c: Window, s: Window) -> Observation {
        Observation {
            now_ms,
            canary_healthy: healthy,
            canary: c,
            stable: s,
        }
    }

    fn actions(r: &Rollout) -> Vec<(Action, u8)> {
        r.status
            .decisions
            .iter()
            .map(|d| (d.action, d.weight))
            .collect()
    }

    #[test]
    fn a_good_canary_walks_every_step_and_is_promoted() {
        let mut r = canary(&[5, 25, 50, 100]);
        assert_eq!(r.split().weight, 0);
        // No healthy instance of version 2 yet: nothing moves.
        assert_eq!(
            tick(&mut r, &obs(2_000, 0, w(0, 0, 0.0), w(50, 0, 10.0))),
            None
        );
        assert_eq!(r.status.phase, Phase::Waiting);
        let d = tick(&mut r, &obs(3_000, 1, w(0, 0, 0.0), w(50, 0, 10.0))).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Advance, 5));
        let mut t = 3_000;
        for expected in [25, 50, 100] {
            // Inside the interval the analysis passes but nothing moves.
            assert_eq!(
                tick(
                    &mut r,
                    &obs(t + MIN - 1, 1, w(30, 0, 11.0), w(500, 1, 10.0))
                ),
                None
            );
            t += MIN;
            let d = tick(&mut r, &obs(t, 1, w(30, 0, 11.0), w(500, 1, 10.0))).unwrap();
            assert_eq!(d.action, Action::Advance, "{d:?}");
            assert_eq!(r.status.weight, expected);
        }
        t += MIN;
        let d = tick(&mut r, &obs(t, 1, w(30, 0, 11.0), w(0, 0, 0.0))).unwrap();
        assert_eq!(d.action, Action::Promote);
        assert_eq!((r.status.phase, r.status.weight), (Phase::Promoted, 100));
        assert_eq!(
            actions(&r),
            vec![
                (Action::Advance, 5),
                (Action::Advance, 25),
                (Action::Advance, 50),
                (Action::Advance, 100),
                (Action::Promote, 100)
            ]
        );
        // Every step counted in a window of its own.
        assert_eq!(r.status.window, 6);
        // Terminal: ticks change nothing, commands are refused.
        assert_eq!(
            tick(&mut r, &obs(t + MIN, 0, w(0, 0, 0.0), w(0, 0, 0.0))),
            None
        );
        assert!(command(&mut r, Command::Abort, t, "ann").is_err());
    }

    #[test]
    fn errors_roll_back_at_once_without_waiting_for_the_interval() {
        let mut r = canary(&[10, 50, 100]);
        tick(&mut r, &obs(2_000, 2, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        // Too few requests to judge: 5 failures of 10 are not yet a verdict.
        assert_eq!(
            tick(&mut r, &obs(3_000, 2, w(10, 5, 9.0), w(90, 0, 9.0))),
            None
        );
        let d = tick(&mut r, &obs(4_000, 2, w(20, 5, 9.0), w(180, 0, 9.0))).unwrap();
        assert_eq!(d.action, Action::Rollback);
        assert!(
            d.reason.contains("error rate 25.00% (5 of 20;"),
            "{}",
            d.reason
        );
        assert_eq!(d.canary.requests, 20, "the decision keeps its numbers");
        assert_eq!((r.status.phase, r.status.weight), (Phase::RolledBack, 0));
        assert_eq!(r.split().weight, 0);
    }

    #[test]
    fn the_stable_versions_own_errors_do_not_count_against_the_canary() {
        let mut r = canary(&[50, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        // Both versions fail 30 % (a shared dependency is down): no verdict.
        assert_eq!(
            tick(&mut r, &obs(MIN / 2, 1, w(100, 30, 9.0), w(100, 31, 9.0))),
            None
        );
        let d = tick(&mut r, &obs(MIN, 1, w(200, 60, 9.0), w(200, 61, 9.0))).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Advance, 100));
        // At 100 % the stable version has no traffic: its last window is the reference.
        assert_eq!(r.status.baseline.as_ref().unwrap().failures, 61);
        let d = tick(&mut r, &obs(MIN + 1, 1, w(100, 60, 9.0), w(0, 0, 0.0))).unwrap();
        assert_eq!(
            d.action,
            Action::Rollback,
            "60 % against a 30 % baseline: {d:?}"
        );
    }

    #[test]
    fn a_slow_canary_fails_on_p99_but_noise_within_the_slack_does_not() {
        let mut r = canary(&[20, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        // 3 ms against 1 ms is 3x but within the 25 ms slack.
        assert_eq!(
            tick(&mut r, &obs(1_000, 1, w(50, 0, 3.0), w(200, 0, 1.0))),
            None
        );
        // Latency is judged at the step's end.
        assert_eq!(
            tick(&mut r, &obs(2_000, 1, w(60, 0, 120.0), w(240, 0, 10.0))),
            None
        );
        let d = tick(&mut r, &obs(MIN, 1, w(60, 0, 120.0), w(240, 0, 10.0))).unwrap();
        assert_eq!(d.action, Action::Rollback);
        assert!(d.reason.starts_with("p99 1"), "{}", d.reason);
        assert!(
            d.reason.contains("against 10.") && d.reason.contains("60 of 60 requests"),
            "{}",
            d.reason
        );
    }

    /// The two windows that rolled a healthy version back in the shop test
    /// on a loaded machine (p99 judged as a point estimate): one slow
    /// request among 61, and a last step judged on an earlier window's
    /// latency. Neither is a slow version; 5 slow requests in 100 are.
    #[test]
    fn p99_fails_only_with_confidence_and_against_the_same_window() {
        let mut r = canary(&[25, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        let stable = lat(0, &[(5.0, 196), (37.0, 4)]);
        let one_slow = lat(0, &[(5.0, 60), (80.0, 1)]);
        assert!(one_slow.p99_ms.unwrap() > 60.0);
        // At the step's end, one slow request in 61 is no verdict.
        let d = tick(&mut r, &obs(MIN, 1, one_slow, stable.clone())).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Advance, 100));
        // The last step: no stable traffic, and latency is not judged
        // against the baseline of another load.
        let busier = lat(0, &[(20.0, 160), (99.0, 11)]);
        let d = tick(&mut r, &obs(2 * MIN, 1, busier, w(0, 0, 0.0))).unwrap();
        assert_eq!(d.action, Action::Promote);
        // A slow version at 25 %: 5 % of its requests far above the limit,
        // judged once, at the step's end.
        let mut r = canary(&[25, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        let slow = lat(0, &[(5.0, 95), (200.0, 5)]);
        assert_eq!(
            tick(&mut r, &obs(1_000, 1, slow.clone(), stable.clone())),
            None
        );
        let d = tick(&mut r, &obs(MIN, 1, slow, stable)).unwrap();
        assert_eq!(d.action, Action::Rollback);
        assert!(
            d.reason.contains("5 of 100 requests slower than"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn the_binomial_tail_is_exact_for_small_and_sane_for_large_counts() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(binomial_upper_tail(0, 20, 0.01), 1.0);
        assert!(close(
            binomial_upper_tail(1, 20, 0.01),
            1.0 - 0.99f64.powi(20)
        ));
        let two = 1.0 - 0.99f64.powi(20) - 20.0 * 0.01 * 0.99f64.powi(19);
        assert!(close(binomial_upper_tail(2, 20, 0.01), two));
        assert_eq!(binomial_upper_tail(21, 20, 0.01), 0.0);
        // A million requests: about even at the mean, nothing far above it.
        let at_mean = binomial_upper_tail(10_000, 1_000_000, 0.01);
        assert!((0.45..0.55).contains(&at_mean), "{at_mean}");
        assert!(binomial_upper_tail(10_500, 1_000_000, 0.01) < 1e-6);
        assert_eq!(binomial_upper_tail(20_000, 1_000_000, 0.01), 0.0);
    }

    #[test]
    fn too_little_traffic_holds_once_then_advances_when_it_comes() {
        let mut r = canary(&[5, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        let d = tick(&mut r, &obs(MIN, 1, w(3, 0, 1.0), w(60, 0, 1.0))).unwrap();
        assert_eq!(d.action, Action::Hold);
        assert!(d.reason.starts_with("3 of the 20 requests"), "{}", d.reason);
        assert_eq!(
            tick(&mut r, &obs(MIN + 1_000, 1, w(4, 0, 1.0), w(80, 0, 1.0))),
            None
        );
        let d = tick(&mut r, &obs(MIN + 9_000, 1, w(20, 0, 1.0), w(400, 0, 1.0))).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Advance, 100));
    }

    #[test]
    fn the_new_versions_instances_vanishing_or_never_coming_fail_it() {
        let mut r = canary(&[5, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        let d = tick(&mut r, &obs(1_000, 0, w(1, 0, 1.0), w(9, 0, 1.0))).unwrap();
        assert_eq!(d.action, Action::Rollback);
        assert!(d.reason.contains("no healthy instance of version 2"));

        let mut r = canary(&[5, 100]);
        r.spec.auto_rollback = false;
        assert_eq!(
            tick(
                &mut r,
                &obs(1_000 + 10 * MIN - 1, 0, w(0, 0, 0.0), w(0, 0, 0.0))
            ),
            None
        );
        let d = tick(
            &mut r,
            &obs(1_000 + 10 * MIN, 0, w(0, 0, 0.0), w(0, 0, 0.0)),
        )
        .unwrap();
        // Without automatic rollback a failure pauses where it is.
        assert_eq!((d.action, r.status.phase), (Action::Pause, Phase::Paused));
        assert_eq!(
            tick(&mut r, &obs(20 * MIN, 1, w(0, 0, 0.0), w(0, 0, 0.0))),
            None
        );
    }

    #[test]
    fn blue_green_switches_everything_after_the_health_gate() {
        let mut r = canary(&[]);
        r.spec.strategy = Strategy::BlueGreen;
        r.spec.min_healthy = 3;
        assert_eq!(tick(&mut r, &obs(0, 2, w(0, 0, 0.0), w(100, 0, 5.0))), None);
        let d = tick(&mut r, &obs(1_000, 3, w(0, 0, 0.0), w(100, 0, 5.0))).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Advance, 100));
        // The stable version's figures before the switch are the reference.
        let d = tick(&mut r, &obs(2_000, 3, w(40, 10, 5.0), w(0, 0, 0.0))).unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Rollback, 0));
    }

    #[test]
    fn operators_promote_abort_pause_and_resume() {
        let mut r = canary(&[5, 25, 100]);
        // Promote from the health gate goes to the first step.
        let d = command(&mut r, Command::Promote { full: false }, 10, "ann").unwrap();
        assert_eq!(
            (d.action, r.status.weight, d.by.as_deref()),
            (Action::Advance, 5, Some("ann"))
        );
        command(&mut r, Command::Pause, 20, "ann").unwrap();
        assert!(command(&mut r, Command::Pause, 21, "ann").is_err());
        // Paused: ticks decide nothing, even with terrible figures.
        assert_eq!(
            tick(&mut r, &obs(30, 1, w(100, 100, 1.0), w(100, 0, 1.0))),
            None
        );
        let window = r.status.window;
        command(&mut r, Command::Resume, 40, "bob").unwrap();
        assert_eq!(
            (r.status.phase, r.status.window),
            (Phase::Progressing, window + 1)
        );
        command(&mut r, Command::Promote { full: false }, 50, "bob").unwrap();
        assert_eq!(r.status.weight, 25);
        let d = command(&mut r, Command::Promote { full: true }, 60, "bob").unwrap();
        assert_eq!(
            (d.action, r.status.phase, r.status.weight),
            (Action::Promote, Phase::Promoted, 100)
        );

        let mut r = canary(&[5, 100]);
        command(&mut r, Command::Promote { full: false }, 10, "ann").unwrap();
        let d = command(&mut r, Command::Abort, 20, "ann").unwrap();
        assert_eq!((d.action, r.status.weight), (Action::Rollback, 0));
        assert!(command(&mut r, Command::Resume, 30, "ann").is_err());
    }

    #[test]
    fn one_early_failure_is_not_a_verdict_but_a_real_error_rate_is() {
        let mut r = canary(&[10, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        // 1 of 20 (5 %) could be noise: at least 0.9 % at 95 %.
        assert_eq!(
            tick(&mut r, &obs(1_000, 1, w(20, 1, 1.0), w(200, 0, 1.0))),
            None
        );
        assert!(error_rate_lower_bound(1, 20, Z95) < 0.02);
        // 8 of 20 (40 %) is not: at least 22 %, and still 15 % with the
        // 99.9 % an early verdict needs.
        assert!(error_rate_lower_bound(8, 20, Z95) > 0.2);
        assert!(error_rate_lower_bound(8, 20, Z999) > 0.15);
        // 3 of 60 (5 %): a verdict at the step's end, not before it.
        assert!(error_rate_lower_bound(3, 60, Z95) > 0.02);
        assert!(error_rate_lower_bound(3, 60, Z999) < 0.02);
        let d = tick(&mut r, &obs(2_000, 1, w(20, 8, 1.0), w(200, 0, 1.0))).unwrap();
        assert_eq!(d.action, Action::Rollback);
        assert_eq!(error_rate_lower_bound(0, 0, Z95), 0.0);
        assert!(error_rate_lower_bound(20, 20, Z95) > 0.85);
    }

    #[test]
    fn a_starved_step_fails_after_its_deadline_and_a_resume_restarts_the_clock() {
        let mut r = canary(&[10, 100]);
        tick(&mut r, &obs(0, 1, w(0, 0, 0.0), w(0, 0, 0.0))).unwrap();
        assert_eq!(
            tick(&mut r, &obs(MIN, 1, w(2, 0, 1.0), w(50, 0, 1.0)))
                .unwrap()
                .action,
            Action::Hold
        );
        assert_eq!(
            tick(
                &mut r,
                &obs(MIN + 10 * MIN - 1, 1, w(2, 0, 1.0), w(50, 0, 1.0))
            ),
            None
        );
        let d = tick(&mut r, &obs(MIN + 10 * MIN, 1, w(2, 0, 1.0), w(50, 0, 1.0))).unwrap();
        assert_eq!(d.action, Action::Rollback, "{d:?}");

        // Paused while waiting for instances past the deadline, a resume
        // gives them a whole deadline again.
        let mut r = canary(&[10, 100]);
        command(&mut r, Command::Pause, 1_000, "ann").unwrap();
        command(&mut r, Command::Resume, 20 * MIN, "ann").unwrap();
        assert_eq!(r.status.phase, Phase::Waiting);
        assert_eq!(
            tick(
                &mut r,
                &obs(20 * MIN + 1_000, 0, w(0, 0, 0.0), w(0, 0, 0.0))
            ),
            None
        );
        let d = tick(
            &mut r,
            &obs(20 * MIN + 2_000, 1, w(0, 0, 0.0), w(30, 0, 1.0)),
        )
        .unwrap();
        assert_eq!(d.action, Action::Advance);
        assert_eq!(
            d.stable.requests, 30,
            "the gate's decision keeps what it saw"
        );
    }

    #[test]
    fn decisions_are_bounded() {
        let mut r = canary(&[5, 100]);
        for i in 0..(MAX_DECISIONS as u64 + 10) {
            command(&mut r, Command::Pause, i * 2, "a").unwrap();
            command(&mut r, Command::Resume, i * 2 + 1, "a").unwrap();
        }
        assert_eq!(r.status.decisions.len(), MAX_DECISIONS);
        assert_eq!(r.status.decisions.last().unwrap().action, Action::Resume);
    }
}
