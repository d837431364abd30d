//! The tries of one forwarded request: pick an endpoint, send within the
//! per-try timeout, say whose fault the end was (the upstream's or the
//! client's), record it for outlier detection and load balancing, then
//! retry on another endpoint when the rule, the body, the budget and the
//! deadline allow it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, Uri};
use meshwork_resilience::classify::{Outcome, StatusSet};
use meshwork_resilience::retry::{HttpTryEnd, full_jitter, should_retry};
use tokio::time::Instant;

use super::forward::UpstreamHead;
use super::{Exchange, RequestLog};
use crate::body::{self, Body, BodyFault};
use crate::config::GatewayConfig;
use crate::error::{ErrorCode, GatewayError};
use crate::gateway::Clients;
use crate::replay::Replay;
use crate::route::compile::ForwardPlan;
use crate::table::{ForwardRt, Route, TargetRt};
use crate::upstream::{Picked, TryGuard};

/// Tries in all when the route has failover but no `retry` settings.
const FAILOVER_ATTEMPTS: u32 = 3;

/// An upstream call's failure.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    /// Nothing reached the upstream: no connection, or the connection
    /// closed before the request was written.
    #[error("{0}")]
    NotSent(String),
    /// The exchange failed once the request was (at least partly) sent.
    #[error("{0}")]
    Broken(String),
}

/// One call to an upstream endpoint: HTTP/1.1 through the listener's own
/// pool, h2c through hyper-util's pooled client.
pub(super) async fn call_upstream(
    clients: &Clients,
    h2: bool,
    tls: Option<&crate::pool::UpstreamTls>,
    addr: SocketAddr,
    authority: &http::uri::Authority,
    mut req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    if h2 {
        return match clients.h2.request(req).await {
            Ok(r) => Ok(r.map(body::boxed)),
            Err(e) if e.is_connect() => Err(UpstreamError::NotSent(error_chain(&e))),
            Err(e) => Err(UpstreamError::Broken(error_chain(&e))),
        };
    }
    // HTTP/1.1 on a connection: origin-form target, explicit Host.
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    clients.pool.send(addr, tls, req).await.map_err(|e| {
        if e.is_connect() {
            UpstreamError::NotSent(e.to_string())
        } else {
            UpstreamError::Broken(error_chain(&e))
        }
    })
}

/// One try's client span: the endpoint, the attempt number, whether it was
/// the endpoint's trial after an ejection (the breaker's half-open probe),
/// and how it ended (an error for a failure or a 4xx/5xx answer).
fn client_span(
    ctx: &meshwork_telemetry::TraceContext,
    wall: std::time::SystemTime,
    method: &Method,
    picked: &Picked,
    attempt: u32,
    end: &TryEnd,
) -> meshwork_telemetry::export::SpanRecord {
    use meshwork_telemetry::export::{Kind, SpanRecord};
    let mut s = SpanRecord::new(ctx, method.as_str(), Kind::Client, wall)
        .attr("http.request.method", method.as_str())
        .attr("server.address", picked.addr.ip().to_string())
        .attr("server.port", picked.addr.port())
        .attr("meshwork.attempt", attempt);
    if attempt > 1 {
        s = s.attr("http.request.resend_count", attempt - 1);
    }
    if picked.trial {
        s = s.attr("meshwork.breaker.trial", true);
    }
    match end {
        TryEnd::Answered(r) => {
            let status = r.status().as_u16();
            s = s.attr("http.response.status_code", status);
            if status >= 400 {
                s = s.failed(format!("HTTP {status}"));
            }
            s
        }
        TryEnd::Failed(Some(e)) => s.attr("error.type", "upstream_error").failed(e.to_string()),
        TryEnd::Failed(None) => s
            .attr("error.type", "timeout")
            .failed("no answer within the try's time"),
        TryEnd::ClientFault(_) => s
            .attr("error.type", "client_body")
            .failed("the client's request body failed"),
    }
}

/// How one try ended. Only what the upstream did counts against it.
enum TryEnd {
    /// The upstream answered (any status).
    Answered(Response<Body>),
    /// The upstream failed: nothing sent, a broken exchange, or no answer
    /// within the try's time (`None` error).
    Failed(Option<UpstreamError>),
    /// The client's body failed (`BodyFault` code): the client's doing,
    /// never counted against the upstream.
    ClientFault(u8),
}

impl TryEnd {
    /// What the try says about the endpoint's health.
    fn outcome(&self, failure_statuses: &StatusSet) -> Outcome {
        match self {
            TryEnd::Answered(r) if failure_statuses.contains(r.status().as_u16()) => {
                Outcome::Failure
            }
            TryEnd::Answered(_) => Outcome::Success,
            TryEnd::Failed(_) => Outcome::Failure,
            TryEnd::ClientFault(_) => Outcome::Ignored,
        }
    }
}

/// The retry rules of one request (see [`retry_allowed`]).
#[derive(Debug, Clone, Copy)]
struct RetryRules {
    /// The route configures `retry`.
    configured: bool,
    /// The route fails over on connection failures (default on).
    failover: bool,
    /// The method may be sent twice (idempotent, or `retry_all_methods`).
    method_retryable: bool,
    /// Per-try timeouts are shorter than the overall one.
    per_try_shorter: bool,
}

/// Whether a try that ended so may be tried again on another endpoint
/// (attempts, body replay, budget and deadline are checked elsewhere):
///
/// * nothing sent: for every method, with retries or failover;
/// * a broken exchange: idempotent methods, with retries or failover;
/// * 502/503/504: idempotent methods, with retries, or with failover when
///   the try was an endpoint's trial after an ejection;
/// * a per-try timeout: idempotent methods, with retries;
/// * the client's fault: never.
///
/// What may go again by method and outcome is the shared rule
/// ([`should_retry`], also the SDK's); this adds which route settings allow it.
fn retry_allowed(end: &TryEnd, rules: RetryRules, trial: bool) -> bool {
    let any = rules.configured || rules.failover;
    // `method_retryable` already folds in `retry_all_methods`.
    let shared = |e| should_retry(&Method::POST, e, rules.method_retryable);
    match end {
        TryEnd::Failed(Some(UpstreamError::NotSent(_))) => any && shared(HttpTryEnd::NotSent),
        TryEnd::Failed(Some(UpstreamError::Broken(_))) => any && shared(HttpTryEnd::Failed),
        TryEnd::Failed(None) => {
            rules.configured && rules.per_try_shorter && shared(HttpTryEnd::Failed)
        }
        TryEnd::Answered(r) => {
            shared(HttpTryEnd::Answered(r.status().as_u16()))
                && (rules.configured || (trial && rules.failover))
        }
        TryEnd::ClientFault(_) => false,
    }
}

/// The client-facing error for a try's end (never an internal address or
/// a library's message: those are logged with the request id).
fn try_error(
    end: TryEnd,
    max_body_bytes: u64,
    waited: Duration,
) -> Result<Response<Body>, GatewayError> {
    match end {
        TryEnd::Answered(r) => Ok(r),
        TryEnd::ClientFault(BodyFault::TOO_LARGE) => Err(GatewayError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body exceeds {max_body_bytes} bytes"),
        )),
        TryEnd::ClientFault(BodyFault::TIMEOUT) => Err(GatewayError::new(
            ErrorCode::RequestTimeout,
            "request body read timed out",
        )),
        TryEnd::ClientFault(_) => Err(GatewayError::new(
            ErrorCode::BadRequest,
            "the request body was malformed or cut short",
        )),
        TryEnd::Failed(Some(UpstreamError::NotSent(_))) => Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "no upstream endpoint could be reached",
        )),
        TryEnd::Failed(Some(UpstreamError::Broken(_))) => Err(GatewayError::new(
            ErrorCode::UpstreamUnavailable,
            "the upstream failed before answering",
        )),
        TryEnd::Failed(None) => Err(GatewayError::new(
            ErrorCode::UpstreamTimeout,
            format!("upstream did not answer within {} ms", waited.as_millis()),
        )),
    }
}

/// The tries of one request and what they share.
pub(super) struct Tries<'a> {
    target: &'a TargetRt,
    head: UpstreamHead,
    /// The request's hash for hash-based balancing.
    hash: Option<u64>,
    rules: RetryRules,
    attempts_allowed: u32,
    /// Keeps the body while it streams, to send it again (`None` when the
    /// request may be tried once, or has no body).
    replay: Option<Replay>,
    /// The body the next try sends.
    next_body: Option<Body>,
    body_empty: bool,
    /// Set when the client's body fails (to tell its fault from the upstream's).
    fault: BodyFault,
    per_try: Duration,
    deadline: Instant,
}

impl<'a> Tries<'a> {
    /// Sets up the tries of a request: how many, its body's replay buffer,
    /// the retry budget's deposit and the deadline.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: &GatewayConfig,
        plan: &ForwardPlan,
        rt: &ForwardRt,
        target: &'a TargetRt,
        head: UpstreamHead,
        hash: Option<u64>,
        body: Option<Body>,
        fault: BodyFault,
    ) -> Self {
        let method_retryable =
            should_retry(&head.method, HttpTryEnd::Failed, plan.retry_all_methods);
        let attempts_allowed = match &plan.retry {
            Some(r) if !head.upgrade => r.max_attempts,
            _ if plan.failover => FAILOVER_ATTEMPTS,
            _ => 1,
        };
        let body_empty = body.is_none();
        // A body that may be retried is kept while it streams (up to the
        // limit); one that may only be retried on a connect failure keeps
        // nothing (replayable only while untouched).
        let (replay, next_body) = match body {
            Some(b) if attempts_allowed > 1 => {
                let limit = if method_retryable {
                    plan.retry_buffer_bytes.unwrap_or(cfg.retry_buffer_bytes)
                } else {
                    0
                };
                let r = Replay::new(b, limit);
                let first = r.next_body().map(body::boxed);
                (Some(r), first)
            }
            other => (None, other),
        };
        if let Some(b) = &rt.budget {
            b.deposit(Instant::now());
        }
        let overall = plan
            .timeout
            .unwrap_or(Duration::from_millis(cfg.default_timeout_ms));
        let per_try = plan.per_try_timeout.unwrap_or(overall);
        let rules = RetryRules {
            configured: plan.retry.is_some() && !head.upgrade,
            failover: plan.failover,
            method_retryable,
            per_try_shorter: per_try < overall,
        };
        Tries {
            target,
            head,
            hash,
            rules,
            attempts_allowed,
            replay,
            next_body,
            body_empty,
            fault,
            per_try,
            deadline: Instant::now() + overall,
        }
    }

    /// Tries until an answer that is kept, or an end that may not be
    /// retried; the last end becomes the response or the client's error.
    pub(super) async fn run(
        mut self,
        cx: &Exchange<'_>,
        route: &Route,
        plan: &ForwardPlan,
        rt: &ForwardRt,
        out: &mut RequestLog,
    ) -> Result<Response<Body>, GatewayError> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let cluster = &self.target.cluster;
            let Some(picked) = cluster.pick(self.hash, &tried, &self.head.headers, attempt > 1)
            else {
                return Err(GatewayError::new(
                    ErrorCode::NoHealthyUpstream,
                    format!("no healthy endpoint for {}", cluster.name),
                ));
            };
            // A failed trial is retried elsewhere: it gets one try more.
            if picked.trial && self.rules.failover {
                self.attempts_allowed = self.attempts_allowed.max(attempt + 1);
            }
            out.upstream = Some(picked.addr);
            tried.push(picked.addr);
            let last = attempt >= self.attempts_allowed;
            let this_try = self
                .per_try
                .min(self.deadline.saturating_duration_since(Instant::now()));
            let end = self
                .send(cx, &picked, last, this_try, plan.failure_statuses, attempt)
                .await?;
            log_end(cx, route, &picked, attempt, &end, this_try);
            if !last && let Some(backoff) = self.retry_wait(&end, plan, rt, picked.trial, attempt) {
                tracing::debug!(route = %route.plan.name, endpoint = %picked.addr, attempt, "retrying");
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                continue;
            }
            return try_error(end, cx.sh.cfg.max_body_bytes, this_try);
        }
    }

    /// One try on `picked` within `this_try`: its end, recorded against
    /// the endpoint unless the client was at fault.
    async fn send(
        &mut self,
        cx: &Exchange<'_>,
        picked: &Picked,
        last: bool,
        this_try: Duration,
        statuses: StatusSet,
        attempt: u32,
    ) -> Result<TryEnd, GatewayError> {
        let uri = self.head.uri(&picked.authority).map_err(|_| {
            GatewayError::new(ErrorCode::BadRequest, "cannot build the upstream URI")
        })?;
        let body = self.next_body.take().unwrap_or_else(body::empty);
        let mut up = Request::new(body);
        *up.method_mut() = self.head.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = self.head.version;
        *up.headers_mut() = if last {
            std::mem::take(&mut self.head.headers)
        } else {
            self.head.headers.clone()
        };
        // With tracing on, each try is a client span: the upstream's parent.
        let tracer = cx.sh.tracer.get().filter(|t| t.enabled());
        let span = tracer.map(|_| (cx.trace.child(), std::time::SystemTime::now()));
        if let Some((ctx, _)) = &span {
            ctx.apply(up.headers_mut());
        }
        let guard = TryGuard::start(picked);
        let res = tokio::time::timeout(
            this_try,
            call_upstream(
                &cx.conn.clients,
                self.head.h2,
                self.target.tls.as_deref(),
                picked.addr,
                &picked.authority,
                up,
            ),
        )
        .await;
        let rtt = guard.end();
        let end = match res {
            Ok(Ok(r)) => TryEnd::Answered(r),
            // The client's body broke the exchange: not the upstream's doing.
            Ok(Err(_)) | Err(_) if self.fault.get() != BodyFault::NONE => {
                TryEnd::ClientFault(self.fault.get())
            }
            Ok(Err(e)) => TryEnd::Failed(Some(e)),
            Err(_) => TryEnd::Failed(None),
        };
        if let (Some(t), Some((ctx, wall))) = (tracer, &span) {
            t.record(client_span(
                ctx,
                *wall,
                &self.head.method,
                picked,
                attempt,
                &end,
            ));
        }
        // A rollout judges versions by every 5xx and failed try, whatever
        // the route counts against an endpoint's health.
        if let Some((live, new)) = &picked.rollout {
            let error = match &end {
                TryEnd::Answered(r) => Some(r.status().is_server_error()),
                TryEnd::Failed(_) => Some(true),
                TryEnd::ClientFault(_) => None,
            };
            if let Some(error) = error {
                live.record(*new, error, rtt);
            }
        }
        let outcome = end.outcome(&statuses);
        if outcome == Outcome::Failure {
            picked.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        let trace = span.as_ref().map_or(cx.trace, |(ctx, _)| ctx);
        self.target
            .cluster
            .record(picked, outcome, rtt, Some(trace));
        Ok(end)
    }

    /// How long to wait before the next try, when the end may be retried:
    /// the rule allows it, the body can be sent again, the budget has a
    /// retry and the backoff ends before the deadline. Sets the next
    /// try's body.
    fn retry_wait(
        &mut self,
        end: &TryEnd,
        plan: &ForwardPlan,
        rt: &ForwardRt,
        trial: bool,
        attempt: u32,
    ) -> Option<Duration> {
        let may_retry = retry_allowed(end, self.rules, trial)
            && self
                .replay
                .as_ref()
                .map_or(self.body_empty, Replay::replayable)
            && rt
                .budget
                .as_ref()
                .is_none_or(|b| b.try_withdraw(Instant::now()));
        if !may_retry {
            return None;
        }
        // Nothing was sent: the next endpoint at once. Otherwise the
        // configured backoff.
        let not_sent = matches!(end, TryEnd::Failed(Some(UpstreamError::NotSent(_))));
        let backoff = match &plan.retry {
            Some(r) if !not_sent => full_jitter(
                Duration::from_millis(r.initial_backoff_ms),
                Duration::from_millis(r.max_backoff_ms),
                r.multiplier,
                attempt,
            ),
            _ => Duration::ZERO,
        };
        if Instant::now() + backoff >= self.deadline {
            return None;
        }
        // The retry's body (this supersedes the failed try's, which its
        // connection may still be sending); none if the body went past the
        // limit since the check above.
        self.next_body = match &self.replay {
            Some(r) => Some(body::boxed(r.next_body()?)),
            None => None,
        };
        Some(backoff)
    }
}

/// Logs a try that failed, or a client whose body failed.
fn log_end(
    cx: &Exchange<'_>,
    route: &Route,
    picked: &Picked,
    attempt: u32,
    end: &TryEnd,
    this_try: Duration,
) {
    match end {
        TryEnd::Failed(e) => tracing::warn!(
            request_id = cx.rid.to_str().unwrap_or(""),
            route = %route.plan.name,
            endpoint = %picked.addr,
            attempt,
            error = e.as_ref().map_or_else(|| format!("no answer within {} ms", this_try.as_millis()), ToString::to_string),
            "upstream try failed"
        ),
        TryEnd::ClientFault(f) => {
            route.stats.client_faults.fetch_add(1, Ordering::Relaxed);
            route.stats.m_client_faults.increment(1);
            tracing::info!(
                request_id = cx.rid.to_str().unwrap_or(""),
                route = %route.plan.name,
                client = %cx.conn.peer,
                fault = f,
                "client's request body failed (aborted, malformed, too large or too slow)"
            );
        }
        TryEnd::Answered(_) => {}
    }
}

/// An error and its sources, one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn answered(status: u16) -> TryEnd {
        let mut r = Response::new(body::empty());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        TryEnd::Answered(r)
    }

    #[test]
    fn retry_rules() {
        let failover = RetryRules {
            configured: false,
            failover: true,
            method_retryable: false,
            per_try_shorter: true,
        };
        let not_sent = TryEnd::Failed(Some(UpstreamError::NotSent(String::new())));
        let broken = TryEnd::Failed(Some(UpstreamError::Broken(String::new())));
        // Nothing sent: any method, with failover alone.
        assert!(retry_allowed(&not_sent, failover, false));
        // Sent and broken: idempotent methods only.
        assert!(!retry_allowed(&broken, failover, false));
        let get = RetryRules {
            method_retryable: true,
            ..failover
        };
        assert!(retry_allowed(&broken, get, false));
        // A 503 is retried with `retry`, or when it was a trial.
        assert!(!retry_allowed(&answered(503), get, false));
        assert!(retry_allowed(&answered(503), get, true));
        assert!(!retry_allowed(&answered(500), get, true));
        let configured = RetryRules {
            configured: true,
            ..get
        };
        assert!(retry_allowed(&answered(503), configured, false));
        assert!(retry_allowed(&TryEnd::Failed(None), configured, false));
        assert!(!retry_allowed(&TryEnd::Failed(None), get, false));
        // The client's fault: never.
        assert!(!retry_allowed(
            &TryEnd::ClientFault(BodyFault::CLIENT),
            configured,
            true
        ));
        // Nothing at all with failover off and no retry.
        let off = RetryRules {
            failover: false,
            ..get
        };
        assert!(!retry_allowed(&not_sent, off, true));
        assert!(!retry_allowed(&answered(503), off, true));
    }
}
