//! The gRPC service `meshwork.mq.v1.Broker` (feature `grpc`; `proto/mq.proto`),
//! served by a node on its HTTP port next to `/v1/mq/`: `Publish` takes a batch
//! and answers once it is durable; `Consume` is one consumer's session with a
//! group on one bidirectional stream. The client opens it with `subscribe` and
//! grants credit (how many deliveries it can take); the broker pushes deliveries
//! as they become due, never more than the credit left; acks, nacks and
//! extensions come back on the same stream, each applied (and durable) in the
//! order sent. A settle the broker refuses (an unknown delivery, a bad request)
//! ends the stream with its status. Deliveries still held when a stream ends are
//! delivered again after their ack deadline, as with the HTTP API.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::{Broker, Delivery, MqError, NewMessage};

/// The generated messages, server and client of `meshwork.mq.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    include!("generated/meshwork.mq.v1.rs");
}

use proto::consume_request::Kind;

/// The service's path on an axum router (`Router::route_service`).
pub const ROUTE: &str = "/meshwork.mq.v1.Broker/{*method}";

/// How long one fetch inside a stream waits for a message before it looks again.
const FETCH_WAIT: Duration = Duration::from_secs(10);
/// Most deliveries sent in one response.
const MAX_BATCH: u64 = 1000;
/// Largest request message: a publish batch (messages are 1 MiB at most by default).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Responses buffered towards a slow client before the broker stops fetching.
const OUT_BUFFER: usize = 4;

/// How long a new Consume stream has to send its `subscribe`.
pub const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

/// The service over `broker`, ready for a tonic router.
pub fn service(broker: Broker) -> proto::broker_server::BrokerServer<Service> {
    service_with(broker, SUBSCRIBE_WITHIN)
}

/// The service, with a stream's deadline for its `subscribe`.
pub fn service_with(
    broker: Broker,
    subscribe_within: Duration,
) -> proto::broker_server::BrokerServer<Service> {
    proto::broker_server::BrokerServer::new(Service {
        broker,
        subscribe_within,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The gRPC status of a broker error (the same classes as the HTTP API's).
pub fn status(e: MqError) -> Status {
    let msg = e.to_string();
    match e {
        MqError::InvalidName { .. }
        | MqError::Invalid(_)
        | MqError::OffsetOutOfRange { .. }
        | MqError::UnknownDelivery { .. } => Status::invalid_argument(msg),
        // Too large is the only RESOURCE_EXHAUSTED: clients map it back to 413.
        MqError::TooLarge { .. } => Status::resource_exhausted(msg),
        MqError::NoTopic(_)
        | MqError::NoGroup { .. }
        | MqError::NoPartition { .. }
        | MqError::NoHalf(_) => Status::not_found(msg),
        MqError::TopicExists(_) | MqError::GroupExists { .. } => Status::already_exists(msg),
        MqError::HalfResolved { .. } => Status::aborted(msg),
        MqError::Limit { .. } => Status::failed_precondition(msg),
        MqError::Storage(_) | MqError::Stopped => Status::unavailable(msg),
    }
}

/// `meshwork.mq.v1.Broker` over one broker.
#[derive(Clone)]
pub struct Service {
    broker: Broker,
    subscribe_within: Duration,
}

fn delivery(d: Delivery) -> proto::Delivery {
    let m = d.message;
    proto::Delivery {
        partition: d.partition,
        offset: d.offset,
        delivery: u32::from(d.delivery),
        id: m.id,
        key: m.key,
        tag: m.tag,
        headers: m.headers.into_iter().collect(),
        body: m.body,
        publish_ms: m.publish_ms,
    }
}

fn positions(s: &proto::Settle) -> Result<Vec<(u32, u64)>, Status> {
    if s.positions.is_empty() {
        return Err(Status::invalid_argument(
            "a settle needs at least one {partition, offset}",
        ));
    }
    Ok(s.positions
        .iter()
        .map(|p| (p.partition, p.offset))
        .collect())
}

#[tonic::async_trait]
impl proto::broker_server::Broker for Service {
    async fn publish(
        &self,
        req: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        let req = req.into_inner();
        if req.messages.is_empty() {
            return Err(Status::invalid_argument(
                "messages: at least one message is required",
            ));
        }
        let now = self.broker.config().clock.now_ms();
        let mut msgs = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            let priority = u8::try_from(m.priority)
                .map_err(|_| Status::invalid_argument("priority must be 0 to 9"))?;
            msgs.push(NewMessage {
                id: m.id,
                key: m.key,
                tag: m.tag,
                headers: m.headers.into_iter().collect(),
                body: m.body,
                deliver_at_ms: if m.delay_ms > 0 {
                    now.saturating_add(m.delay_ms)
                } else {
                    0
                },
                priority,
            });
        }
        let published = self
            .broker
            .publish(&req.topic, msgs)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::PublishResponse {
            results: published
                .into_iter()
                .map(|p| proto::Published {
                    partition: p.partition,
                    offset: p.offset,
                    duplicate: p.duplicate,
                })
                .collect(),
        }))
    }

    type ConsumeStream =
        Pin<Box<dyn Stream<Item = Result<proto::ConsumeResponse, Status>> + Send + 'static>>;

    async fn consume(
        &self,
        req: Request<Streaming<proto::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = req.into_inner();
        // A stream that says nothing is not kept: it would hold a task for nothing.
        let first = tokio::time::timeout(self.subscribe_within, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no `subscribe` within {:?} of opening the stream",
                    self.subscribe_within
                ))
            })?;
        let sub = match first? {
            Some(proto::ConsumeRequest {
                kind: Some(Kind::Subscribe(s)),
            }) => s,
            _ => {
                return Err(Status::invalid_argument(
                    "the first request of a Consume stream must be `subscribe`",
                ));
            }
        };
        let group = if sub.consumer.is_empty() {
            sub.group.clone()
        } else {
            format!("{}/{}", sub.group, sub.consumer)
        };
        // Refuse an unknown topic or group before the stream starts.
        self.broker
            .group_info(&sub.topic, &sub.group)
            .map_err(status)?;
        let credit = Arc::new(AtomicU64::new(u64::from(sub.credit)));
        let more = Arc::new(Notify::new());
        // Set when the client's side is over: no more credit will come.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(OUT_BUFFER);

        // Settles and credit from the client, applied in order.
        let (broker, topic, g) = (self.broker.clone(), sub.topic.clone(), group.clone());
        let (credit_in, more_in, tx_in) = (credit.clone(), more.clone(), tx.clone());
        let ended_in = ended.clone();
        let finish = move || {
            ended_in.store(true, Ordering::Release);
            more_in.notify_one();
        };
        let more_in = more.clone();
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(r)) => r,
                    // The client closed its side, or went away.
                    Ok(None) | Err(_) => return finish(),
                };
                let done = match next.kind {
                    Some(Kind::Credit(n)) => {
                        credit_in.fetch_add(u64::from(n), Ordering::AcqRel);
                        more_in.notify_one();
                        Ok(())
                    }
                    Some(Kind::Ack(s)) => match positions(&s) {
                        Ok(p) => broker.ack(&topic, &g, &p).await.map_err(status),
                        Err(e) => Err(e),
                    },
                    Some(Kind::Nack(s)) => match positions(&s) {
                        Ok(p) => broker
                            .nack(&topic, &g, &p, Duration::from_millis(s.delay_ms))
                            .await
                            .map_err(status),
                        Err(e) => Err(e),
                    },
                    Some(Kind::Extend(s)) => match positions(&s) {
                        Ok(p) => {
                            let by = (s.delay_ms > 0).then(|| Duration::from_millis(s.delay_ms));
                            broker.extend(&topic, &g, &p, by).await.map_err(status)
                        }
                        Err(e) => Err(e),
                    },
                    Some(Kind::Subscribe(_)) => Err(Status::invalid_argument(
                        "a Consume stream subscribes once, in its first request",
                    )),
                    None => Err(Status::invalid_argument("an empty request")),
                };
                if let Err(e) = done {
                    let _ = tx_in.send(Err(e)).await;
                    return finish();
                }
            }
        });

        // Deliveries, never more than the credit left.
        let broker = self.broker.clone();
        tokio::spawn(async move {
            loop {
                if ended.load(Ordering::Acquire) || tx.is_closed() {
                    return;
                }
                let n = credit.load(Ordering::Acquire).min(MAX_BATCH);
                if n == 0 {
                    tokio::select! {
                        _ = more.notified() => {}
                        _ = tx.closed() => return,
                    }
                    continue;
                }
                let fetched = tokio::select! {
                    r = broker.fetch(&sub.topic, &group, n as usize, FETCH_WAIT) => r,
                    _ = tx.closed() => return,
                };
                match fetched {
                    Ok(ds) if ds.is_empty() => {}
                    Ok(ds) => {
                        credit.fetch_sub(ds.len() as u64, Ordering::AcqRel);
                        let out = proto::ConsumeResponse {
                            deliveries: ds.into_iter().map(delivery).collect(),
                        };
                        if tx.send(Ok(out)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
