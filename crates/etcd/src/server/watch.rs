//! The Watch service: one bidirectional stream carries many watchers.

use std::pin::Pin;

use futures_util::Stream;
use meshwork_store::{KeyRange, WatchMessage, WatchSpec};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Ctx;
use crate::convert::event_out;
use crate::proto::etcdserverpb as pb;

pub(crate) struct WatchService(pub(crate) Ctx);

/// A status as etcd's Go server writes one into a cancel reason.
fn go_status_text(s: &Status) -> String {
    let code = match s.code() {
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::PermissionDenied => "PermissionDenied",
        _ => "Unknown",
    };
    format!("rpc error: code = {code} desc = {}", s.message())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ctx = self.0.clone();
        // The stream's token decides every watch created on it; a bad one
        // cancels each watch with the reason, as etcd does.
        let caller = ctx.caller(&req);
        let mut incoming = req.into_inner();
        let (stream, rx) = ctx.store.watch_stream();
        // Answers the stream itself produces (errors on create) go through this channel.
        let (err_tx, err_rx) = tokio::sync::mpsc::channel::<pb::WatchResponse>(16);
        let reader_ctx = ctx.clone();
        tokio::spawn(async move {
            use pb::watch_request::RequestUnion;
            while let Some(Ok(msg)) = incoming.next().await {
                match msg.request_union {
                    Some(RequestUnion::CreateRequest(c)) => {
                        let no_put = c
                            .filters
                            .contains(&(pb::watch_create_request::FilterType::Noput as i32));
                        let no_delete = c
                            .filters
                            .contains(&(pb::watch_create_request::FilterType::Nodelete as i32));
                        let spec = WatchSpec {
                            range: KeyRange::new(c.key, c.range_end),
                            start_revision: c.start_revision,
                            prev_kv: c.prev_kv,
                            no_put,
                            no_delete,
                            progress_notify: c.progress_notify,
                            watch_id: c.watch_id,
                        };
                        // As etcd: a watch the caller may not read is
                        // answered created and canceled, with the reason.
                        let allowed = caller.as_ref().map_err(Clone::clone).and_then(|c| {
                            c.read(&spec.range.key, &spec.range.end)
                                .map_err(Status::from)
                        });
                        let made = match allowed {
                            Ok(()) => stream.create(spec).await.map_err(|e| e.to_string()),
                            Err(s) => Err(go_status_text(&s)),
                        };
                        if let Err(e) = made {
                            let resp = pb::WatchResponse {
                                header: reader_ctx.header.at(reader_ctx.store.revision()),
                                watch_id: if c.watch_id != 0 { c.watch_id } else { -1 },
                                created: true,
                                canceled: true,
                                cancel_reason: e,
                                ..Default::default()
                            };
                            if err_tx.send(resp).await.is_err() {
                                break;
                            }
                        }
                    }
                    Some(RequestUnion::CancelRequest(c)) => {
                        stream.cancel(c.watch_id).await;
                    }
                    Some(RequestUnion::ProgressRequest(_)) => stream.request_progress(),
                    None => {}
                }
            }
            // The client closed its side: dropping `stream` removes its watchers.
            drop(stream);
        });
        let header = ctx.header;
        let store = ctx.store.clone();
        let events = ReceiverStream::new(rx).map(move |m| {
            Ok(match m {
                WatchMessage::Created { watch_id, revision } => pb::WatchResponse {
                    header: header.at(revision),
                    watch_id,
                    created: true,
                    ..Default::default()
                },
                WatchMessage::Events {
                    watch_id,
                    revision,
                    events,
                } => pb::WatchResponse {
                    header: header.at(revision.max(store.revision())),
                    watch_id,
                    events: events.into_iter().map(event_out).collect(),
                    ..Default::default()
                },
                WatchMessage::Progress { watch_id, revision } => pb::WatchResponse {
                    header: header.at(revision),
                    watch_id,
                    ..Default::default()
                },
                WatchMessage::Canceled {
                    watch_id,
                    revision,
                    compact_revision,
                    reason,
                } => pb::WatchResponse {
                    header: header.at(revision),
                    watch_id,
                    canceled: true,
                    compact_revision,
                    cancel_reason: reason,
                    ..Default::default()
                },
            })
        });
        let errors = ReceiverStream::new(err_rx).map(Ok);
        Ok(Response::new(Box::pin(events.merge(errors))))
    }
}
