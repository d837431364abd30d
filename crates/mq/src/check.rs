//! Check-backs of unresolved half messages: the broker asks the producer service (one of
//! its instances, found by the node's registry) whether to commit or roll back.
//!
//! The request is `POST http://{instance}/meshwork/mq/check` with the message as JSON (as
//! a fetch shows it, plus `topic`, `checks` and `prepared_ms`); the answer is
//! `{"decision": "commit" | "rollback" | "unknown"}`. Anything else — no instance, no
//! answer within [`CHECK_TIMEOUT`], another status, another body — counts as unknown:
//! the half message is asked about again after `mq.half_check_interval`, and rolled back
//! after `mq.half_max_checks` checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::sync::watch;

use crate::api::message_json;
use crate::{Broker, HalfCheck, HalfDecision};

/// The path of a producer's check-back endpoint.
pub const CHECK_PATH: &str = "/meshwork/mq/check";
/// How long one check-back may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Check-backs in flight at once.
const MAX_CONCURRENT: usize = 32;
/// How often due check-backs are looked for.
const TICK: Duration = Duration::from_millis(200);
/// Largest answer read from a producer.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Finds the addresses of a service's instances taking traffic.
pub type Resolver = Arc<dyn Fn(&str) -> Vec<SocketAddr> + Send + Sync>;

/// Makes the broker's check-backs until `stop` changes.
pub async fn run_checker(broker: Broker, resolve: Resolver, mut stop: watch::Receiver<bool>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let turn = AtomicUsize::new(0);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        let due = match broker.take_due_checks(MAX_CONCURRENT).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "half message check-backs failed");
                continue;
            }
        };
        if due.is_empty() {
            continue;
        }
        let asks = due.into_iter().map(|c| {
            let (client, resolve, broker, turn) = (&client, &resolve, &broker, &turn);
            async move {
                let decision = ask(client, resolve, turn, &c).await;
                let label = match decision {
                    Some(HalfDecision::Commit) => "commit",
                    Some(HalfDecision::Rollback) => "rollback",
                    None => "unknown",
                };
                metrics::counter!("meshwork_mq_half_checks_total", "decision" => label)
                    .increment(1);
                if let Some(d) = decision {
                    match broker.resolve_half(c.info.id, d).await {
                        Ok(_) => {
                            tracing::info!(id = c.info.id, topic = %c.info.topic, decision = label, "half message resolved by its check-back");
                        }
                        Err(e) => {
                            tracing::warn!(id = c.info.id, error = %e, "resolving a half message after its check-back failed");
                        }
                    }
                }
            }
        });
        futures_util::future::join_all(asks).await;
    }
}

/// Asks one instance of the producer; `None` when the answer is unknown.
async fn ask(
    client: &Client<HttpConnector, Full<Bytes>>,
    resolve: &Resolver,
    turn: &AtomicUsize,
    c: &HalfCheck,
) -> Option<HalfDecision> {
    let addrs = resolve(&c.info.producer);
    if addrs.is_empty() {
        tracing::debug!(id = c.info.id, producer = %c.info.producer, "no instance of the producer to check a half message with");
        return None;
    }
    let addr = addrs[turn.fetch_add(1, Ordering::Relaxed) % addrs.len()];
    let mut body = message_json(&c.message);
    body["topic"] = json!(c.info.topic);
    body["checks"] = json!(c.info.checks);
    body["prepared_ms"] = json!(c.info.prepared_ms);
    let req = axum::http::Request::post(format!("http://{addr}{CHECK_PATH}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .ok()?;
    let exchange = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            tracing::debug!(id = c.info.id, %addr, status = %resp.status(), "a check-back was answered with an error");
            return None;
        }
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .ok()?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        match v.get("decision").and_then(|d| d.as_str()) {
            Some("commit") => Some(HalfDecision::Commit),
            Some("rollback") => Some(HalfDecision::Rollback),
            _ => None,
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, exchange)
        .await
        .ok()
        .flatten()
}
