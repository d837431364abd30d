//! The state machine of one global transaction and its branches: [`Txn::step`]
//! takes an [`Event`] and the time, changes the record, and returns the
//! [`Action`]s to run. No I/O and no clock: the runner persists the record
//! *before* it runs the actions a step returned, so a decision (commit or
//! abort) is on disk before any phase-two call, and a coordinator that takes
//! the transaction over after a crash resumes it from the record alone.
//!
//! One machine serves the three modes; they differ only in two rules:
//!
//! | | forward phase | commit | abort |
//! |---|---|---|---|
//! | saga | actions, by stage | nothing more to call | compensations, reverse stage order |
//! | TCC | tries, by stage | confirm every branch | cancel every branch tried, in parallel |
//! | 2PC | prepares, by stage | commit every branch | roll back every branch prepared, in parallel |
//!
//! Invariants (checked by `tests/model.rs` over random outcome sequences):
//! - the decision is made once and never changes: a transaction that decided
//!   to commit finishes forward, whatever happens after;
//! - every branch whose forward call was *sent* (it may have taken effect,
//!   even if no answer came) is undone on abort, and no other branch is;
//! - confirm and undo calls are retried until they succeed;
//! - a call's result counts only for the attempt it answers: a late answer
//!   from a previous attempt or phase is ignored.

use serde::{Deserialize, Serialize};

use crate::spec::{Mode, Recovery, Spec};

/// Wall-clock time in milliseconds since the Unix epoch (records outlive
/// processes, so their deadlines are wall-clock).
pub type Millis = u64;

/// Most entries kept in a transaction's history (older ones are counted and
/// dropped, so a call retried for days cannot grow the record without bound).
pub const MAX_HISTORY: usize = 128;

/// Which call of a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The forward call: action, try or prepare.
    Action,
    /// Confirm (TCC) or commit (2PC).
    Confirm,
    /// Compensation, cancel or rollback.
    Undo,
}

impl Phase {
    /// Its name in headers, keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Action => "action",
            Phase::Confirm => "confirm",
            Phase::Undo => "undo",
        }
    }
}

/// Where the transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The forward phase.
    Running,
    /// Decided to commit; confirming (TCC, 2PC).
    Committing,
    /// Decided to abort; undoing what was sent.
    Aborting,
    /// Final: every branch done (and confirmed).
    Committed,
    /// Final: every branch that was sent is undone.
    Aborted,
}

impl Status {
    /// True for the two final states.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Committed | Status::Aborted)
    }

    /// Its name in the API and the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Committing => "committing",
            Status::Aborting => "aborting",
            Status::Committed => "committed",
            Status::Aborted => "aborted",
        }
    }
}

/// How one call ended, as the runner classifies the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum Outcome {
    /// It succeeded (2xx).
    Done,
    /// The participant refused it for good (a 4xx other than 408 and 429):
    /// retrying cannot help.
    Rejected(String),
    /// Nobody knows whether it took effect (timeout, 5xx, 408, 429, a broken
    /// connection): retry it, with the same idempotency key.
    Unknown(String),
}

/// What happens to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A coordinator starts driving it: right after it was created, or after
    /// taking it over from a coordinator that died. Calls that were in flight
    /// are sent again (same attempt, same idempotency key).
    Resume,
    /// A call the machine asked for ended.
    Result {
        /// Index of the branch in the spec.
        branch: usize,
        /// Which of its calls.
        phase: Phase,
        /// The attempt this answers.
        attempt: u32,
        /// How it ended.
        outcome: Outcome,
    },
    /// Time passed: timers due by now fire.
    Tick,
    /// An operator (or the initiator) asks to abort; refused once the
    /// transaction decided to commit.
    Abort {
        /// Why, for the record.
        reason: String,
    },
    /// An operator asks to retry every waiting call now.
    RetryNow,
}

/// What the runner must do after persisting the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `phase` of `branch`; its answer comes back as [`Event::Result`]
    /// with the same attempt.
    Call {
        /// Index of the branch in the spec.
        branch: usize,
        /// Which of its calls.
        phase: Phase,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Send [`Event::Tick`] at this time (the earliest timer; replaces any
    /// earlier request).
    WakeAt(Millis),
    /// The transaction reached its final state.
    Finished(Status),
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Abort after the commit decision.
    #[error("transaction {0} already decided to commit; it finishes forward and cannot be aborted")]
    Committed(String),
    /// The transaction is over.
    #[error("transaction {id} is already {status}")]
    Final {
        /// The transaction.
        id: String,
        /// Its final status.
        status: &'static str,
    },
    /// A result for a branch the spec does not have.
    #[error("transaction {id} has no branch {branch}")]
    NoBranch {
        /// The transaction.
        id: String,
        /// The index given.
        branch: usize,
    },
}

/// Where one branch's current call is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum CallState {
    /// Not sent yet.
    Idle,
    /// Sent (attempt `attempt`), no answer yet.
    Calling {
        /// The attempt in flight.
        attempt: u32,
    },
    /// Attempt `attempt` failed with an unknown outcome; the next goes at `at`.
    Backoff {
        /// The attempt that failed.
        attempt: u32,
        /// When the next one goes.
        at: Millis,
    },
    /// Succeeded.
    Done,
    /// Refused for good (forward phase only).
    Rejected,
    /// Given up after `max_attempts` unknown outcomes (forward phase only).
    Exhausted,
    /// Nothing to call in this phase.
    Skipped,
}

/// One branch's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The phase its current call belongs to.
    pub phase: Phase,
    /// Where that call is.
    pub call: CallState,
    /// Its forward call was sent at least once (so it may have taken effect,
    /// and must be undone on abort).
    pub sent: bool,
    /// A confirm or undo call failed `stuck_after` times: an operator should look.
    pub stuck: bool,
    /// The last failure's detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One entry of a transaction's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When.
    pub at: Millis,
    /// The branch, when it is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<usize>,
    /// The phase, when it is about a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The attempt, when it is about a call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// What happened: `sent`, `done`, `rejected: ...`, `unknown: ...`,
    /// `committing`, `aborting: reason`, `committed`, `aborted`.
    pub what: String,
}

/// A global transaction: its definition and everything decided so far. This
/// is the durable record (serialized as JSON into the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Txn {
    /// Its id (unique; also the prefix of every idempotency key).
    pub id: String,
    /// What was asked for.
    pub spec: Spec,
    /// Where it is.
    pub status: Status,
    /// Why it is aborting, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was created.
    pub created: Millis,
    /// The forward phase's deadline.
    pub deadline: Millis,
    /// One per spec branch, same order.
    pub branches: Vec<Branch>,
    /// The timeline, oldest first (at most [`MAX_HISTORY`] entries).
    pub history: Vec<Record>,
    /// Entries dropped from the front of the history.
    #[serde(default)]
    pub history_dropped: u64,
    /// The node driving it (the machine does not read it; the node's
    /// scheduler does, to take over transactions whose coordinator died).
    #[serde(default)]
    pub coordinator: String,
    /// The W3C `traceparent` of the transaction's span (the request that
    /// started it continues here); every branch call is a child of it, so one
    /// transaction is one trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Txn {
    /// A new transaction (validate the spec first), created at `now`.
    pub fn new(id: impl Into<String>, spec: Spec, now: Millis) -> Txn {
        let branches = spec
            .branches
            .iter()
            .map(|_| Branch {
                phase: Phase::Action,
                call: CallState::Idle,
                sent: false,
                stuck: false,
                last_error: None,
            })
            .collect();
        let deadline = now.saturating_add(spec.timeout_ms);
        Txn {
            id: id.into(),
            spec,
            status: Status::Running,
            reason: None,
            created: now,
            deadline,
            branches,
            history: Vec::new(),
            history_dropped: 0,
            coordinator: String::new(),
            traceparent: None,
        }
    }

    /// The idempotency key of `phase` of `branch`: the same for every attempt,
    /// so a participant applies a retried call once.
    pub fn idempotency_key(&self, branch: usize, phase: Phase) -> String {
        let name = self
            .spec
            .branches
            .get(branch)
            .map_or("?", |b| b.name.as_str());
        format!("{}/{}/{}", self.id, name, phase.as_str())
    }

    /// What a 2PC participant in doubt should do: commit once the commit is
    /// decided, abort once the abort is, wait while the forward phase runs.
    pub fn verdict(&self) -> Option<bool> {
        match self.status {
            Status::Committing | Status::Committed => Some(true),
            Status::Aborting | Status::Aborted => Some(false),
            Status::Running => None,
        }
    }

    /// Applies `event` at `now`; the actions to run once the changed record
    /// is persisted.
    pub fn step(&mut self, now: Millis, event: Event) -> Result<Vec<Action>, StepError> {
        if self.status.is_final() {
            // Late answers after the end are harmless; anything else is a mistake.
            return match event {
                Event::Result { .. } | Event::Tick | Event::Resume => Ok(Vec::new()),
                Event::Abort { .. } | Event::RetryNow => Err(StepError::Final {
                    id: self.id.clone(),
                    status: self.status.as_str(),
                }),
            };
        }
        let mut out = Vec::new();
        match event {
            Event::Resume => {
                for (i, b) in self.branches.iter().enumerate() {
                    if let CallState::Calling { attempt } = b.call {
                        out.push(Action::Call {
                            branch: i,
                            phase: b.phase,
                            attempt,
                        });
                    }
                }
            }
            Event::Result {
                branch,
                phase,
                attempt,
                outcome,
            } => {
                if branch >= self.branches.len() {
                    return Err(StepError::NoBranch {
                        id: self.id.clone(),
                        branch,
                    });
                }
                self.answer(now, branch, phase, attempt, outcome);
            }
            Event::Tick => {}
            Event::Abort { reason } => {
                if self.status == Status::Committing {
                    return Err(StepError::Committed(self.id.clone()));
                }
                if self.status == Status::Running {
                    self.decide_abort(now, reason);
                }
            }
            Event::RetryNow => {
                for b in &mut self.branches {
                    if let CallState::Backoff { at, .. } = &mut b.call {
                        *at = now;
                    }
                    b.stuck = false;
                }
            }
        }
        self.drive(now, &mut out);
        Ok(out)
    }

    /// Records the answer to a call, if it answers the call in flight.
    fn answer(&mut self, now: Millis, i: usize, phase: Phase, attempt: u32, outcome: Outcome) {
        let b = &self.branches[i];
        if b.phase != phase || b.call != (CallState::Calling { attempt }) {
            return; // a late answer to an earlier attempt or phase
        }
        let retry = self.spec.retry;
        let what = match &outcome {
            Outcome::Done => "done".to_owned(),
            Outcome::Rejected(e) => format!("rejected: {e}"),
            Outcome::Unknown(e) => format!("unknown: {e}"),
        };
        self.log(now, Some(i), Some(phase), Some(attempt), what);
        let b = &mut self.branches[i];
        match outcome {
            Outcome::Done => b.call = CallState::Done,
            Outcome::Rejected(e) if phase == Phase::Action => {
                b.call = CallState::Rejected;
                b.last_error = Some(e);
            }
            Outcome::Unknown(e)
                if phase == Phase::Action
                    && self.spec.recovery == Recovery::Backward
                    && attempt >= retry.max_attempts =>
            {
                b.call = CallState::Exhausted;
                b.last_error = Some(e);
            }
            // Unknown forward outcomes are retried; confirm and undo are
            // retried whatever the answer, until they succeed.
            Outcome::Rejected(e) | Outcome::Unknown(e) => {
                let wait = meshwork_resilience::retry::ceiling(
                    std::time::Duration::from_millis(retry.initial_backoff_ms),
                    std::time::Duration::from_millis(retry.max_backoff_ms),
                    retry.multiplier,
                    attempt,
                );
                b.call = CallState::Backoff {
                    attempt,
                    at: now.saturating_add(wait.as_millis() as u64),
                };
                if phase != Phase::Action && attempt >= retry.stuck_after {
                    b.stuck = true;
                }
                b.last_error = Some(e);
            }
        }
    }

    /// Moves the transaction as far as it can go now: decisions, calls to
    /// start, timers.
    fn drive(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.status == Status::Running {
            // Finished work commits even if the deadline passed meanwhile.
            if self.branches.iter().all(|b| b.call == CallState::Done) {
                self.decide_commit(now);
            } else if let Some(reason) = self.abort_reason(now) {
                self.decide_abort(now, reason);
            }
        }
        if self.status == Status::Committing
            && self.branches.iter().all(|b| b.call == CallState::Done)
        {
            self.finish(now, Status::Committed, out);
            return;
        }
        if self.status == Status::Aborting
            && self
                .branches
                .iter()
                .all(|b| matches!(b.call, CallState::Done | CallState::Skipped))
        {
            self.finish(now, Status::Aborted, out);
            return;
        }
        let active = self.active_stage();
        for i in 0..self.branches.len() {
            if active.is_some_and(|s| self.spec.branches[i].stage != s) {
                continue;
            }
            let next = match self.branches[i].call {
                CallState::Idle => 1,
                CallState::Backoff { attempt, at } if at <= now => attempt + 1,
                _ => continue,
            };
            let b = &mut self.branches[i];
            b.call = CallState::Calling { attempt: next };
            if b.phase == Phase::Action {
                b.sent = true;
            }
            let phase = b.phase;
            self.log(now, Some(i), Some(phase), Some(next), "sent".to_owned());
            out.push(Action::Call {
                branch: i,
                phase,
                attempt: next,
            });
        }
        let mut wake = self
            .branches
            .iter()
            .filter_map(|b| match b.call {
                CallState::Backoff { at, .. } => Some(at),
                _ => None,
            })
            .min();
        if self.status == Status::Running && self.deadline_applies() {
            wake = Some(wake.map_or(self.deadline, |w| w.min(self.deadline)));
        }
        if let Some(at) = wake {
            out.push(Action::WakeAt(at));
        }
    }

    /// Why the forward phase must stop, if it must.
    fn abort_reason(&self, now: Millis) -> Option<String> {
        for (i, b) in self.branches.iter().enumerate() {
            let name = &self.spec.branches[i].name;
            let detail = b.last_error.as_deref().unwrap_or("");
            match b.call {
                CallState::Rejected => return Some(format!("{name} rejected: {detail}")),
                CallState::Exhausted => {
                    return Some(format!(
                        "{name} failed {} times: {detail}",
                        self.spec.retry.max_attempts
                    ));
                }
                _ => {}
            }
        }
        (self.deadline_applies() && now >= self.deadline).then(|| {
            format!(
                "the forward phase did not finish within {} ms",
                self.spec.timeout_ms
            )
        })
    }

    /// Whether the global deadline can abort the forward phase.
    fn deadline_applies(&self) -> bool {
        self.spec.recovery == Recovery::Backward
    }

    /// The stage whose calls may start now, or None for "every branch".
    fn active_stage(&self) -> Option<u32> {
        let unfinished = |b: &Branch| !matches!(b.call, CallState::Done | CallState::Skipped);
        let stages = self
            .branches
            .iter()
            .zip(&self.spec.branches)
            .filter(|(b, _)| unfinished(b))
            .map(|(_, s)| s.stage);
        match self.status {
            Status::Running => stages.min(),
            Status::Aborting if self.spec.mode == Mode::Saga => stages.max(),
            _ => None,
        }
    }

    fn decide_commit(&mut self, now: Millis) {
        if self.spec.mode == Mode::Saga {
            // Nothing to confirm: every action is done.
            self.status = Status::Committing;
            return;
        }
        self.status = Status::Committing;
        self.log(now, None, None, None, "committing".to_owned());
        for b in &mut self.branches {
            b.phase = Phase::Confirm;
            b.call = CallState::Idle;
            b.last_error = None;
        }
    }

    fn decide_abort(&mut self, now: Millis, reason: String) {
        self.status = Status::Aborting;
        self.log(now, None, None, None, format!("aborting: {reason}"));
        self.reason = Some(reason);
        for (b, s) in self.branches.iter_mut().zip(&self.spec.branches) {
            b.phase = Phase::Undo;
            b.call = if b.sent && s.undo.is_some() {
                CallState::Idle
            } else {
                CallState::Skipped
            };
        }
    }

    fn finish(&mut self, now: Millis, status: Status, out: &mut Vec<Action>) {
        self.status = status;
        self.log(now, None, None, None, status.as_str().to_owned());
        out.push(Action::Finished(status));
    }

    fn log(
        &mut self,
        at: Millis,
        branch: Option<usize>,
        phase: Option<Phase>,
        attempt: Option<u32>,
        what: String,
    ) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(0);
            self.history_dropped += 1;
        }
        self.history.push(Record {
            at,
            branch,
            phase,
            attempt,
            what,
        });
    }
}
