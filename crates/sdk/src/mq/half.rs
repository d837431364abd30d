//! Half (transactional) messages on the node's broker: prepare one, do the local
//! transaction, then commit or roll it back; a service that dies in between is asked
//! later (a check-back to one of its instances, found in the registry) and answers from
//! its own state with [`half_check_router`].
//!
//! With a local SQLite database the message outbox ([`super::outbox`]) is the simpler
//! choice: the message commits with the business rows and needs no check-back.

use std::future::Future;
use std::time::Duration;

use axum::Json;
use serde_json::{Value, json};

use super::{
    MqClient, MqError, OutMessage, Published, Publisher, REQUEST_TIMEOUT, Received, enc, random_id,
};

/// The path the broker's check-backs come to on a producer's instances.
pub const CHECK_PATH: &str = "/meshwork/mq/check";

/// A prepared half message: durable on the broker, delivered once committed.
#[derive(Debug, Clone)]
pub struct HalfMessage {
    client: MqClient,
    id: u64,
}

/// What a producer answers about one of its half messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDecision {
    /// Its transaction committed: deliver the message.
    Commit,
    /// Its transaction rolled back (or never happened): drop the message.
    Rollback,
    /// Not known yet (still running): ask again later.
    Unknown,
}

/// A check-back: the broker asking whether to commit a half message.
#[derive(Debug, Clone)]
pub struct HalfCheck {
    /// The topic the message goes to on commit.
    pub topic: String,
    /// Check-backs made so far, this one included.
    pub checks: u32,
    /// The message (its `id` is the half message's; partition and offset are 0).
    pub message: Received,
}

/// Three attempts of a call whose repeats are harmless, backing off on transient failures.
async fn with_retries<T, F: Future<Output = Result<T, MqError>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, MqError> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match call().await {
            Err(e) if e.is_transient() && attempt < 3 => {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            done => return done,
        }
    }
}

impl Publisher {
    /// Prepares a half message for this publisher's topic on behalf of the service
    /// `producer` (asked at [`CHECK_PATH`] if it is left unresolved): durable when this
    /// answers, delivered only after [`HalfMessage::commit`]. Its id is the message's
    /// (or a random one), which the commit is deduplicated by.
    pub async fn prepare(&self, producer: &str, msg: OutMessage) -> Result<HalfMessage, MqError> {
        #[cfg(feature = "nats")]
        if self.client.nats.is_some() {
            return Err(super::nats::unsupported("half messages"));
        }
        let id = msg.id.unwrap_or_else(random_id);
        let body = json!({ "producer": producer, "message": msg.to_json(id) });
        let path = format!("/v1/mq/topics/{}/half", enc(&self.topic));
        with_retries(|| {
            self.client.call(
                http::Method::POST,
                &path,
                Some(body.clone()),
                REQUEST_TIMEOUT,
            )
        })
        .await?;
        Ok(self.client.half(id))
    }
}

impl MqClient {
    /// The half message `id` (to resolve one prepared before a restart).
    pub fn half(&self, id: u64) -> HalfMessage {
        HalfMessage {
            client: self.clone(),
            id,
        }
    }
}

impl HalfMessage {
    /// Its id.
    pub fn id(&self) -> u64 {
        self.id
    }

    async fn resolve(&self, how: &str) -> Result<Value, MqError> {
        let path = format!("/v1/mq/half/{}/{how}", self.id);
        let (_, v) = with_retries(|| {
            self.client
                .call(http::Method::POST, &path, None, REQUEST_TIMEOUT)
        })
        .await?;
        Ok(v)
    }

    /// Publishes it to its topic; answers once it is durable there. Committing again
    /// answers the same place; a half message rolled back is refused (409).
    pub async fn commit(&self) -> Result<Published, MqError> {
        let v = self.resolve("commit").await?;
        Ok(Published {
            partition: v["partition"].as_u64().unwrap_or(0) as u32,
            offset: v["offset"].as_u64().unwrap_or(0),
            duplicate: false,
        })
    }

    /// Drops it. Rolling back again is a no-op; a committed one is refused (409).
    pub async fn rollback(&self) -> Result<(), MqError> {
        self.resolve("rollback").await.map(|_| ())
    }
}

/// The route that answers the broker's check-backs with `decide` (merge it into the
/// service's router): `decide` looks the message up in the service's own state.
pub fn half_check_router<F, Fut>(decide: F) -> axum::Router
where
    F: Fn(HalfCheck) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = CheckDecision> + Send + 'static,
{
    axum::Router::new().route(
        CHECK_PATH,
        axum::routing::post(move |Json(mut v): Json<Value>| {
            let decide = decide.clone();
            async move {
                let topic = v["topic"].as_str().unwrap_or_default().to_owned();
                let checks = u32::try_from(v["checks"].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
                v["partition"] = json!(0);
                v["offset"] = json!(0);
                let decision = match Received::from_json(&v) {
                    Some(message) => {
                        decide(HalfCheck {
                            topic,
                            checks,
                            message,
                        })
                        .await
                    }
                    None => CheckDecision::Unknown,
                };
                let name = match decision {
                    CheckDecision::Commit => "commit",
                    CheckDecision::Rollback => "rollback",
                    CheckDecision::Unknown => "unknown",
                };
                Json(json!({ "decision": name }))
            }
        }),
    )
}
