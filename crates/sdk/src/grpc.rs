//! A tonic channel to a service, built like the HTTP client: balanced over the
//! registry's instances (following changes), with the target's timeout
//! (shortened to the caller's deadline and sent as `grpc-timeout`) and circuit
//! breaker (UNAVAILABLE and DEADLINE_EXCEEDED count as failures), continuing the
//! current trace: with an exporter set, each call is a client span
//! (`package.Service/Method`, the RPC attributes, its gRPC status).
//!
//! ```no_run
//! # async fn demo(mw: meshwork_sdk::Meshwork) -> Result<(), meshwork_sdk::Error> {
//! let channel = mw.grpc_channel("inventory").await?;
//! // let mut client = InventoryClient::new(channel);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use meshwork_coord::CoordClient;
use meshwork_coord::registry::Filter;
use meshwork_resilience::BoxError;
use meshwork_resilience::breaker::CircuitBreaker;
use meshwork_resilience::classify::GrpcStatus;
use meshwork_resilience::timeout::Timeout;
use tonic::body::Body;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service};

use crate::Error;
use crate::client::{EndpointChange, TargetPolicy, current_endpoints, follow};

/// Endpoint changes buffered between the registry feed and the channel.
const CHANGE_BUFFER: usize = 1024;

/// A balanced, resilient channel to one service; pass it to a tonic client.
#[derive(Clone)]
pub struct GrpcChannel {
    inner: Timeout<CircuitBreaker<Channel, GrpcStatus>>,
    service: Arc<str>,
    _feed: Arc<crate::client::AbortOnDrop>,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel").finish_non_exhaustive()
    }
}

fn endpoint(addr: std::net::SocketAddr, policy: &TargetPolicy) -> Option<Endpoint> {
    Endpoint::from_shared(format!("http://{addr}"))
        .ok()
        .map(|e| {
            e.connect_timeout(Duration::from_millis(policy.connect_timeout_ms))
                .tcp_nodelay(true)
        })
}

pub(crate) async fn channel(
    coord: &CoordClient,
    service: &str,
    policy: &TargetPolicy,
) -> Result<GrpcChannel, Error> {
    let registry = coord.discovery(service).await?;
    let filter = Filter {
        healthy: true,
        ..policy.filter.clone()
    };
    let (channel, tx) = Channel::balance_channel::<std::net::SocketAddr>(CHANGE_BUFFER);
    let known = current_endpoints(&registry, service, &filter).await;
    for addr in known.keys() {
        if let Some(ep) = endpoint(*addr, policy) {
            let _ = tx.send(Change::Insert(*addr, ep)).await;
        }
    }
    let p = policy.clone();
    let feed = tokio::spawn(follow(
        registry,
        service.to_string(),
        filter,
        known,
        move |change| {
            let change = match change {
                EndpointChange::Add(addr, ..) => {
                    endpoint(addr, &p).map(|ep| Change::Insert(addr, ep))
                }
                EndpointChange::Remove(addr) => Some(Change::Remove(addr)),
                // tonic's balancer has no weights.
                EndpointChange::Weight(..) => None,
            };
            let tx = tx.clone();
            async move {
                match change {
                    // The feed runs in its own task: a full buffer waits for the channel.
                    Some(c) => tx.send(c).await.is_ok(),
                    None => true,
                }
            }
        },
    ));
    let (breaker, timeout) = crate::client::guards(service, policy)?;
    Ok(GrpcChannel {
        inner: timeout.layer(CircuitBreaker::new(channel, breaker, GrpcStatus::default())),
        service: service.into(),
        _feed: Arc::new(crate::client::AbortOnDrop(feed)),
    })
}

impl Service<http::Request<Body>> for GrpcChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let span = crate::context::stamp(&mut req);
        let traced = crate::telemetry::tracer()
            .filter(|_| span.sampled())
            .map(|t| (t, std::time::SystemTime::now(), req.uri().path().to_owned()));
        let call = self.inner.call(req);
        let Some((tracer, wall, path)) = traced else {
            return Box::pin(call);
        };
        let service = self.service.clone();
        Box::pin(async move {
            use meshwork_telemetry::export::Kind;
            let res = call.await;
            let head = res.as_ref().map(|r| r.headers()).map_err(|e| e.to_string());
            if let Some(s) = meshwork_telemetry::rpc::span(&span, &path, Kind::Client, wall, head) {
                tracer.record(s.attr("server.address", &*service));
            }
            res
        })
    }
}
