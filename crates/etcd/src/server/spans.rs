//! Server spans for the etcd gRPC API: one span per unary call that
//! continues a caller's sampled trace (its `traceparent` metadata), named
//! `service/method` as OpenTelemetry's RPC conventions ask, with
//! `rpc.system`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code`.
//!
//! The store starts no trace of its own, as etcd does not: a client that
//! does not trace (etcdctl, the SDK's keep-alives and watches) costs one
//! header lookup and makes no span. Streams (Watch, LeaseKeepAlive, Snapshot,
//! Observe) live as long as their client and get no span.

use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::future::{BoxFuture, Either};
use meshwork_telemetry::TraceContext;
use meshwork_telemetry::export::{Kind, Tracer};
use tonic::codegen::http;

/// The streaming methods: no span.
const STREAMS: &[&str] = &[
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
    "/etcdserverpb.Maintenance/Snapshot",
    "/v3electionpb.Election/Observe",
];

/// The layer (a disabled or absent tracer records nothing).
#[derive(Clone, Default)]
pub struct SpanLayer(Option<Tracer>);

impl SpanLayer {
    /// Spans to `tracer`, when it is enabled.
    pub fn new(tracer: Option<Tracer>) -> Self {
        Self(tracer.filter(Tracer::enabled))
    }
}

impl<S> tower_layer::Layer<S> for SpanLayer {
    type Service = Spans<S>;

    fn layer(&self, inner: S) -> Spans<S> {
        Spans {
            inner,
            tracer: self.0.clone(),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct Spans<S> {
    inner: S,
    tracer: Option<Tracer>,
}

impl<S, B, RB> tonic::codegen::Service<http::Request<B>> for Spans<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(tracer) = &self.tracer else {
            return Either::Left(self.inner.call(req));
        };
        let path = req.uri().path();
        let ctx = meshwork_telemetry::rpc::method_of(path)
            .filter(|_| !STREAMS.contains(&path))
            .and_then(|_| req.headers().get("traceparent"))
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .filter(TraceContext::sampled);
        let Some(ctx) = ctx else {
            return Either::Left(self.inner.call(req));
        };
        let (tracer, path) = (tracer.clone(), path.to_owned());
        let wall = SystemTime::now();
        let call = self.inner.call(req);
        Either::Right(Box::pin(async move {
            let res = call.await;
            // No response at all: a transport error.
            let head = res
                .as_ref()
                .map(|r| r.headers())
                .map_err(|_| "no response".to_owned());
            if let Some(span) = meshwork_telemetry::rpc::span(&ctx, &path, Kind::Server, wall, head)
            {
                tracer.record(span);
            }
            res
        }))
    }
}
