//! What a user asks for: a global transaction's definition ([`Spec`]), its
//! branches and their calls, validated at the edge with a message that names
//! the field to fix. Accepted as JSON or TOML; the same document is what the
//! console draws.

use serde::{Deserialize, Serialize};

/// Most branches in one transaction.
pub const MAX_BRANCHES: usize = 64;
/// Longest branch or service name, bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest call path, bytes.
pub const MAX_PATH_BYTES: usize = 2048;
/// Largest call body (as JSON), bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest definition (as JSON), bytes: the record must fit one store write.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;
/// Longest global timeout: seven days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// How the branches are driven to one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Actions in stages; on failure, the compensations of every action that
    /// was sent, in reverse stage order.
    Saga,
    /// Try every branch; then confirm all, or cancel every branch tried.
    Tcc,
    /// Prepare every branch; then commit all, or roll back every branch
    /// prepared (presumed abort: no commit decision recorded means abort).
    TwoPc,
}

impl Mode {
    /// Its name in definitions, the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Saga => "saga",
            Mode::Tcc => "tcc",
            Mode::TwoPc => "two_pc",
        }
    }
}

/// What a saga does when an action's outcome stays unknown (timeouts,
/// 5xx, transport errors) after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// Compensate (the default): after `retry.max_attempts`, or when the
    /// global timeout passes, the saga rolls back.
    #[default]
    Backward,
    /// Retry until it succeeds: the saga only rolls back when an action is
    /// rejected or an operator aborts it.
    Forward,
}

/// Retries of a branch call whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Wait before the second attempt, ms.
    pub initial_backoff_ms: u64,
    /// Longest wait between attempts, ms.
    pub max_backoff_ms: u64,
    /// Growth of the wait per attempt.
    pub multiplier: f64,
    /// Attempts of a forward call (action, try, prepare) before the
    /// transaction gives up on it and rolls back (backward recovery only).
    /// Confirm and undo calls are retried until they succeed.
    pub max_attempts: u32,
    /// Attempts of a confirm or undo call after which the branch is flagged
    /// stuck for an operator (it is still retried).
    pub stuck_after: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 30_000,
            multiplier: 2.0,
            max_attempts: 5,
            stuck_after: 10,
        }
    }
}

/// One HTTP call to a branch's service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// Method: GET, POST, PUT, PATCH or DELETE (POST when omitted).
    #[serde(default = "post")]
    pub method: String,
    /// Path and query on the service, starting with `/`.
    pub path: String,
    /// JSON body, sent as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// Makes this a unary gRPC call instead: `path` is the method
    /// (`/package.Service/Method`) and this its request message, protobuf
    /// bytes in base64. The answer counts by its `grpc-status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
}

/// gRPC status codes after which retrying cannot help (the call is
/// rejected); every other failure is an unknown outcome, retried.
pub const GRPC_REJECTED: [u8; 8] = [3, 5, 6, 7, 9, 11, 12, 16];

fn post() -> String {
    "POST".to_owned()
}

/// One participant of the transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    /// Unique within the transaction: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// The registered service that runs it.
    pub service: String,
    /// Branches of one stage run in parallel; stages run in ascending order
    /// (and a saga compensates in descending order).
    #[serde(default)]
    pub stage: u32,
    /// The forward call: a saga's action, TCC's try, 2PC's prepare.
    pub action: Call,
    /// TCC's confirm, 2PC's commit; none for a saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<Call>,
    /// A saga's compensation (optional: none for a step with nothing to
    /// undo), TCC's cancel, 2PC's rollback (required for both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo: Option<Call>,
    /// Deadline of one call, ms.
    #[serde(default = "call_timeout")]
    pub timeout_ms: u64,
}

fn call_timeout() -> u64 {
    5_000
}

/// A global transaction's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Saga, TCC or two-phase commit.
    pub mode: Mode,
    /// The participants.
    pub branches: Vec<BranchSpec>,
    /// The forward phase must finish within this, ms, or the transaction
    /// rolls back (except a saga with forward recovery).
    #[serde(default = "global_timeout")]
    pub timeout_ms: u64,
    /// A saga's answer to unknown outcomes.
    #[serde(default)]
    pub recovery: Recovery,
    /// Retries of calls whose outcome is unknown.
    #[serde(default)]
    pub retry: RetryPolicy,
}

fn global_timeout() -> u64 {
    60_000
}

/// Why a definition was refused; the message names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The document is not a definition.
    #[error("not a transaction definition: {0}")]
    Syntax(String),
    /// A field's value is out of range or malformed.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as a path (`branches[1].undo`).
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl Spec {
    /// Parses and validates a JSON definition.
    pub fn from_json(text: &str) -> Result<Spec, SpecError> {
        let spec: Spec =
            serde_json::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every limit and the mode's rules.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.branches.is_empty() || self.branches.len() > MAX_BRANCHES {
            return Err(invalid(
                "branches",
                format!(
                    "between 1 and {MAX_BRANCHES} branches, got {}",
                    self.branches.len()
                ),
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(invalid(
                "timeout_ms",
                format!("between 1 and {MAX_TIMEOUT_MS} ms, got {}", self.timeout_ms),
            ));
        }
        if self.mode != Mode::Saga && self.recovery == Recovery::Forward {
            return Err(invalid(
                "recovery",
                "forward recovery is for sagas; TCC and 2PC roll back what they cannot finish",
            ));
        }
        self.validate_retry()?;
        let size = serde_json::to_vec(self).map_or(usize::MAX, |v| v.len());
        if size > MAX_SPEC_BYTES {
            return Err(invalid(
                "branches",
                format!("the definition is {size} bytes of JSON; at most {MAX_SPEC_BYTES}"),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, b) in self.branches.iter().enumerate() {
            let at = |f: &str| format!("branches[{i}].{f}");
            check_name(&at("name"), &b.name)?;
            check_name(&at("service"), &b.service)?;
            if !names.insert(b.name.as_str()) {
                return Err(invalid(at("name"), format!("\"{}\" is used twice", b.name)));
            }
            if b.timeout_ms == 0 || b.timeout_ms > self.timeout_ms.max(1) {
                return Err(invalid(
                    at("timeout_ms"),
                    format!(
                        "between 1 and the global timeout ({} ms), got {}",
                        self.timeout_ms, b.timeout_ms
                    ),
                ));
            }
            check_call(&at("action"), &b.action)?;
            match (self.mode, &b.confirm, &b.undo) {
                (Mode::Saga, Some(_), _) => {
                    return Err(invalid(
                        at("confirm"),
                        "a saga step has an action and a compensation (undo), no confirm",
                    ));
                }
                (Mode::Tcc | Mode::TwoPc, None, _) => {
                    return Err(invalid(
                        at("confirm"),
                        "required for TCC (confirm) and 2PC (commit)",
                    ));
                }
                (Mode::Tcc | Mode::TwoPc, _, None) => {
                    return Err(invalid(
                        at("undo"),
                        "required for TCC (cancel) and 2PC (rollback)",
                    ));
                }
                _ => {}
            }
            if let Some(c) = &b.confirm {
                check_call(&at("confirm"), c)?;
            }
            if let Some(c) = &b.undo {
                check_call(&at("undo"), c)?;
            }
        }
        Ok(())
    }

    fn validate_retry(&self) -> Result<(), SpecError> {
        let r = &self.retry;
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
            return Err(invalid(
                "retry",
                "initial_backoff_ms must be at least 1 and max_backoff_ms at least initial_backoff_ms",
            ));
        }
        if !(1.0..=10.0).contains(&r.multiplier) {
            return Err(invalid(
                "retry.multiplier",
                format!("between 1 and 10, got {}", r.multiplier),
            ));
        }
        if r.max_attempts == 0 || r.stuck_after == 0 {
            return Err(invalid(
                "retry",
                "max_attempts and stuck_after must be at least 1",
            ));
        }
        Ok(())
    }
}

fn check_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME_BYTES || !name.chars().all(ok_char) {
        return Err(invalid(
            field,
            format!("1 to {MAX_NAME_BYTES} letters, digits, '.', '_' or '-', got {name:?}"),
        ));
    }
    Ok(())
}

fn check_call(field: &str, c: &Call) -> Result<(), SpecError> {
    if !matches!(
        c.method.as_str(),
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE"
    ) {
        return Err(invalid(
            format!("{field}.method"),
            format!("one of GET, POST, PUT, PATCH, DELETE, got {:?}", c.method),
        ));
    }
    if !c.path.starts_with('/')
        || c.path.len() > MAX_PATH_BYTES
        || c.path.chars().any(|ch| ch.is_control() || ch == ' ')
    {
        return Err(invalid(
            format!("{field}.path"),
            format!(
                "a path starting with '/', at most {MAX_PATH_BYTES} bytes, no spaces or control characters"
            ),
        ));
    }
    if let Some(body) = &c.body {
        let len = serde_json::to_vec(body)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if len > MAX_BODY_BYTES {
            return Err(invalid(
                format!("{field}.body"),
                format!("at most {MAX_BODY_BYTES} bytes of JSON, got {len}"),
            ));
        }
    }
    if c.grpc.is_some() {
        let Some(message) = c.grpc_message() else {
            return Err(invalid(
                format!("{field}.grpc"),
                "the request message as standard base64",
            ));
        };
        if message.len() > MAX_BODY_BYTES {
            return Err(invalid(
                format!("{field}.grpc"),
                format!(
                    "at most {MAX_BODY_BYTES} bytes of message, got {}",
                    message.len()
                ),
            ));
        }
        let method = c.path.strip_prefix('/').and_then(|m| m.split_once('/'));
        if !method.is_some_and(|(svc, m)| !svc.is_empty() && !m.is_empty() && !m.contains('/')) {
            return Err(invalid(
                format!("{field}.path"),
                "a gRPC method: /package.Service/Method",
            ));
        }
        if c.method != "POST" || c.body.is_some() {
            return Err(invalid(
                format!("{field}.grpc"),
                "a gRPC call has no method or JSON body of its own",
            ));
        }
    }
    Ok(())
}

/// Building a definition in Rust:
///
/// ```
/// use meshwork_txn::spec::{BranchSpec, Call, Spec};
/// let spec = Spec::saga()
///     .branch(BranchSpec::new("reserve", "inventory", Call::post("/reserve"))
///         .undo(Call::post("/release")))
///     .branch(BranchSpec::new("charge", "payment", Call::post("/charges")
///             .json(serde_json::json!({"amount": 30})))
///         .stage(1)
///         .undo(Call::post("/refund")))
///     .build();
/// assert!(spec.is_ok());
/// ```
impl Spec {
    /// A saga with no branch yet and the default timeout, recovery and retries.
    pub fn saga() -> Spec {
        Spec::empty(Mode::Saga)
    }

    /// A TCC transaction with no branch yet.
    pub fn tcc() -> Spec {
        Spec::empty(Mode::Tcc)
    }

    /// A two-phase commit with no branch yet.
    pub fn two_pc() -> Spec {
        Spec::empty(Mode::TwoPc)
    }

    fn empty(mode: Mode) -> Spec {
        Spec {
            mode,
            branches: Vec::new(),
            timeout_ms: global_timeout(),
            recovery: Recovery::default(),
            retry: RetryPolicy::default(),
        }
    }

    /// Adds a branch.
    pub fn branch(mut self, branch: BranchSpec) -> Spec {
        self.branches.push(branch);
        self
    }

    /// The forward phase's deadline.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Spec {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// A saga's answer to unknown outcomes.
    pub fn recovery(mut self, recovery: Recovery) -> Spec {
        self.recovery = recovery;
        self
    }

    /// Retries of calls whose outcome is unknown.
    pub fn retry(mut self, retry: RetryPolicy) -> Spec {
        self.retry = retry;
        self
    }

    /// The definition, validated.
    pub fn build(self) -> Result<Spec, SpecError> {
        self.validate()?;
        Ok(self)
    }
}

impl BranchSpec {
    /// A branch of `service` whose forward call (action, try, prepare) is
    /// `action`; stage 0, the default call deadline, no confirm or undo yet.
    pub fn new(name: impl Into<String>, service: impl Into<String>, action: Call) -> BranchSpec {
        BranchSpec {
            name: name.into(),
            service: service.into(),
            stage: 0,
            action,
            confirm: None,
            undo: None,
            timeout_ms: call_timeout(),
        }
    }

    /// Its stage (stages run in ascending order; one stage's branches in
    /// parallel).
    pub fn stage(mut self, stage: u32) -> BranchSpec {
        self.stage = stage;
        self
    }

    /// TCC's confirm, 2PC's commit.
    pub fn confirm(mut self, call: Call) -> BranchSpec {
        self.confirm = Some(call);
        self
    }

    /// A saga's compensation, TCC's cancel, 2PC's rollback.
    pub fn undo(mut self, call: Call) -> BranchSpec {
        self.undo = Some(call);
        self
    }

    /// Deadline of one call.
    pub fn timeout(mut self, timeout: std::time::Duration) -> BranchSpec {
        self.timeout_ms = timeout.as_millis() as u64;
        self
    }
}

impl Call {
    /// `POST path` with no body.
    pub fn post(path: impl Into<String>) -> Call {
        Call {
            method: post(),
            path: path.into(),
            body: None,
            grpc: None,
        }
    }

    /// The same call with another method (GET, POST, PUT, PATCH, DELETE).
    pub fn method(mut self, method: impl Into<String>) -> Call {
        self.method = method.into();
        self
    }

    /// The same call with a JSON body.
    pub fn json(mut self, body: serde_json::Value) -> Call {
        self.body = Some(body);
        self
    }

    /// A unary gRPC call of `method` (`/package.Service/Method`) with the
    /// protobuf-encoded request `message`.
    pub fn grpc(method: impl Into<String>, message: &[u8]) -> Call {
        use base64::Engine as _;
        Call {
            method: post(),
            path: method.into(),
            body: None,
            grpc: Some(base64::engine::general_purpose::STANDARD.encode(message)),
        }
    }

    /// The gRPC request message, decoded (None for an HTTP call or bad base64).
    pub fn grpc_message(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        let text = self.grpc.as_deref()?;
        base64::engine::general_purpose::STANDARD.decode(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saga() -> &'static str {
        r#"{"mode": "saga", "branches": [
            {"name": "reserve", "service": "inventory", "action": {"path": "/reserve"},
             "undo": {"path": "/release"}},
            {"name": "charge", "service": "payment", "stage": 1, "action": {"path": "/charge"},
             "undo": {"path": "/refund"}}
        ]}"#
    }

    #[test]
    fn a_saga_parses_with_defaults() {
        let s = Spec::from_json(saga()).unwrap();
        assert_eq!(s.mode, Mode::Saga);
        assert_eq!(s.branches[1].stage, 1);
        assert_eq!(s.branches[0].action.method, "POST");
        assert_eq!(s.timeout_ms, 60_000);
        assert_eq!(s.recovery, Recovery::Backward);
    }

    #[test]
    fn bad_definitions_name_the_field() {
        let cases = [
            (r#"{"mode": "saga", "branches": []}"#, "branches"),
            (
                r#"{"mode": "tcc", "branches": [{"name": "a", "service": "s", "action": {"path": "/t"}, "undo": {"path": "/c"}}]}"#,
                "branches[0].confirm",
            ),
            (
                r#"{"mode": "two_pc", "branches": [{"name": "a", "service": "s", "action": {"path": "/p"}, "confirm": {"path": "/c"}}]}"#,
                "branches[0].undo",
            ),
            (
                r#"{"mode": "saga", "branches": [{"name": "a b", "service": "s", "action": {"path": "/x"}}]}"#,
                "branches[0].name",
            ),
            (
                r#"{"mode": "saga", "branches": [{"name": "a", "service": "s", "action": {"path": "x"}}]}"#,
                "branches[0].action.path",
            ),
            (
                r#"{"mode": "saga", "branches": [{"name": "a", "service": "s", "action": {"method": "TRACE", "path": "/x"}}]}"#,
                "branches[0].action.method",
            ),
            (
                r#"{"mode": "saga", "branches": [{"name": "a", "service": "s", "action": {"path": "/x"}}, {"name": "a", "service": "s", "action": {"path": "/y"}}]}"#,
                "branches[1].name",
            ),
            (
                r#"{"mode": "tcc", "recovery": "forward", "branches": [{"name": "a", "service": "s", "action": {"path": "/t"}, "confirm": {"path": "/c"}, "undo": {"path": "/x"}}]}"#,
                "recovery",
            ),
            (
                r#"{"mode": "saga", "timeout_ms": 100, "branches": [{"name": "a", "service": "s", "timeout_ms": 200, "action": {"path": "/x"}}]}"#,
                "branches[0].timeout_ms",
            ),
        ];
        for (text, field) in cases {
            match Spec::from_json(text) {
                Err(SpecError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected an error on {field}, got {other:?}"),
            }
        }
        assert!(matches!(
            Spec::from_json(r#"{"mode": "xa", "branches": []}"#),
            Err(SpecError::Syntax(_))
        ));
        assert!(matches!(
            Spec::from_json(r#"{"mode": "saga", "branches": [], "extra": 1}"#),
            Err(SpecError::Syntax(_))
        ));
    }

    #[test]
    fn the_builder_makes_what_the_document_says() {
        let built = Spec::tcc()
            .branch(
                BranchSpec::new("stock", "inventory", Call::post("/try"))
                    .confirm(Call::post("/confirm"))
                    .undo(Call::post("/cancel")),
            )
            .timeout(std::time::Duration::from_secs(60))
            .build();
        let parsed = Spec::from_json(
            r#"{"mode": "tcc", "branches": [{"name": "stock", "service": "inventory",
                "action": {"path": "/try"}, "confirm": {"path": "/confirm"},
                "undo": {"path": "/cancel"}}]}"#,
        );
        assert_eq!(built, parsed);
        // Validated like a document: TCC needs a confirm.
        let missing = Spec::tcc()
            .branch(BranchSpec::new("stock", "inventory", Call::post("/try")))
            .build();
        assert!(
            matches!(missing, Err(SpecError::Invalid { .. })),
            "{missing:?}"
        );
    }

    #[test]
    fn grpc_calls_are_checked_at_the_edge() {
        let spec = |call: &str| {
            Spec::from_json(&format!(
                r#"{{"mode": "saga", "branches": [{{"name": "a", "service": "s", "action": {call}}}]}}"#
            ))
        };
        assert!(spec(r#"{"path": "/pkg.Svc/Put", "grpc": "CgMvZy8x"}"#).is_ok());
        let err = |call: &str| spec(call).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err(r#"{"path": "/pkg.Svc/Put", "grpc": "not base64!"}"#)
                .contains("branches[0].action.grpc")
        );
        assert!(err(r#"{"path": "/Put", "grpc": ""}"#).contains("a gRPC method"));
        assert!(
            err(r#"{"path": "/pkg.Svc/Put", "grpc": "", "body": {}}"#)
                .contains("no method or JSON body")
        );
        let call = Call::grpc("/pkg.Svc/Put", b"\x0a\x01k");
        assert_eq!(call.grpc_message(), Some(b"\x0a\x01k".to_vec()));
    }
}
