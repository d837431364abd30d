//! The context of the request a service is handling: its trace and its
//! deadline. [`server::Server`](crate::server::Server) sets it for every inbound
//! request; the [`HttpClient`](crate::HttpClient) continues it on every call made
//! while handling that request (a child span, the remaining time as deadline).

use std::future::Future;

use meshwork_resilience::timeout::DeadlineCarrier;
use meshwork_telemetry::TraceContext;
use tokio::time::Instant;

tokio::task_local! {
    static CONTEXT: RequestContext;
}

/// Trace and deadline of the request being handled.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// This hop's span in the caller's trace.
    pub trace: TraceContext,
    /// When the caller stops waiting, if it said.
    pub deadline: Option<Instant>,
}

impl RequestContext {
    /// The context of an inbound request (continues its `traceparent`, reads
    /// `x-meshwork-deadline-ms` / `grpc-timeout`).
    pub fn from_request<B>(req: &http::Request<B>) -> RequestContext {
        RequestContext {
            trace: TraceContext::from_headers(req.headers()),
            deadline: req.deadline(Instant::now()),
        }
    }

    /// The context of the request the current task is handling, if any.
    pub fn current() -> Option<RequestContext> {
        CONTEXT.try_with(Clone::clone).ok()
    }

    /// Runs `f` with this context as the current one.
    ///
    /// ```no_run
    /// # async fn demo(mw: meshwork_sdk::Meshwork) {
    /// use meshwork_sdk::RequestContext;
    /// let ctx = RequestContext {
    ///     trace: meshwork_telemetry::TraceContext::new_root(),
    ///     deadline: Some(tokio::time::Instant::now() + std::time::Duration::from_millis(500)),
    /// };
    /// // Calls made inside continue the trace and carry the remaining time.
    /// let _ = ctx.scope(mw.http().get("inventory", "/products")).await;
    /// # }
    /// ```
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CONTEXT.scope(self, f).await
    }
}

/// Stamps an outgoing request with the current context: a child span of its
/// trace (or a new trace) and its deadline; returns that span's context.
pub(crate) fn stamp<B>(req: &mut http::Request<B>) -> TraceContext {
    let ctx = RequestContext::current();
    let trace = ctx
        .as_ref()
        .map_or_else(TraceContext::new_root, |c| c.trace.child());
    trace.apply(req.headers_mut());
    if let Some(d) = ctx.and_then(|c| c.deadline) {
        req.extensions_mut()
            .insert(meshwork_resilience::timeout::Deadline(d));
    }
    trace
}
