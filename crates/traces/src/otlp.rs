//! The OTLP receivers: `TraceService/Export` over gRPC, and `POST /v1/traces`
//! over HTTP with a protobuf or JSON body, answered in the request's encoding
//! as the OTLP specification says (partial success for refused spans,
//! `google.rpc.Status` bodies for errors, 503 + `Retry-After` when busy).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

use crate::store::{Ingested, TraceError, TraceStore};

fn partial(i: &Ingested) -> Option<ExportTracePartialSuccess> {
    (i.rejected > 0).then(|| ExportTracePartialSuccess {
        rejected_spans: i.rejected as i64,
        error_message: i.message.clone().unwrap_or_default(),
    })
}

/// The OTLP/gRPC trace service over a store.
#[derive(Clone)]
pub struct GrpcReceiver {
    store: TraceStore,
}

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        match self.store.ingest(request.into_inner()).await {
            Ok(i) => Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: partial(&i),
            })),
            // UNAVAILABLE is the code OTLP exporters retry with backoff.
            Err(e @ TraceError::Busy(_)) => Err(tonic::Status::unavailable(e.to_string())),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    }
}

/// The gRPC service to add to a tonic server (messages up to the store's
/// `max_request_bytes`).
pub fn grpc_service(store: TraceStore) -> TraceServiceServer<GrpcReceiver> {
    let max = store.config().max_request_bytes;
    TraceServiceServer::new(GrpcReceiver { store })
        .max_decoding_message_size(max)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
}

/// The body of an OTLP/HTTP error (`google.rpc.Status`: code and message).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// An OTLP/HTTP error reply: `status` with a `google.rpc.Status` body of
/// gRPC code `code` in the request's encoding.
fn status_reply(enc: Encoding, status: StatusCode, code: i32, message: String) -> Response {
    let body = match enc {
        Encoding::Protobuf => RpcStatus { code, message }.encode_to_vec(),
        Encoding::Json => serde_json::json!({ "code": code, "message": message })
            .to_string()
            .into_bytes(),
    };
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(enc.content_type()),
    );
    r
}

enum Gunzip {
    TooLarge,
    Bad(std::io::Error),
}

/// Inflates a gzip body, reading at most `max` bytes of it: a small body
/// that inflates to gigabytes is refused, not held.
fn gunzip(body: &[u8], max: usize) -> Result<Bytes, Gunzip> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
    flate2::read::GzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Gunzip::Bad)?;
    if out.len() > max {
        return Err(Gunzip::TooLarge);
    }
    Ok(Bytes::from(out))
}

/// The OTLP/HTTP receiver: `POST /v1/traces`.
pub fn http_router(store: TraceStore) -> Router {
    let max = store.config().max_request_bytes;
    Router::new()
        .route("/v1/traces", post(export_http))
        .layer(DefaultBodyLimit::max(max))
        .with_state(store)
}

async fn export_http(State(store): State<TraceStore>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let enc = match mime.as_str() {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        _ => {
            return status_reply(
                Encoding::Json,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                3,
                format!(
                    "Content-Type {ct:?} is not supported; send application/x-protobuf or application/json"
                ),
            );
        }
    };
    let body = match headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None => body,
        Some(ce) if ce.eq_ignore_ascii_case(b"identity") => body,
        Some(ce) if ce.eq_ignore_ascii_case(b"gzip") => {
            let max = store.config().max_request_bytes;
            match gunzip(&body, max) {
                Ok(b) => b,
                Err(Gunzip::TooLarge) => {
                    return status_reply(
                        enc,
                        StatusCode::PAYLOAD_TOO_LARGE,
                        8,
                        format!("the body inflates past {max} bytes ([traces] max_request_bytes)"),
                    );
                }
                Err(Gunzip::Bad(e)) => {
                    return status_reply(
                        enc,
                        StatusCode::BAD_REQUEST,
                        3,
                        format!("the body is not valid gzip: {e}"),
                    );
                }
            }
        }
        Some(ce) => {
            return status_reply(
                enc,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                3,
                format!(
                    "Content-Encoding {:?} is not supported; send gzip or an uncompressed body",
                    String::from_utf8_lossy(ce)
                ),
            );
        }
    };
    let req = match enc {
        Encoding::Protobuf => ExportTraceServiceRequest::decode(body.as_ref())
            .map_err(|e| format!("the body is not an OTLP ExportTraceServiceRequest: {e}")),
        Encoding::Json => serde_json::from_slice::<ExportTraceServiceRequest>(&body)
            .map_err(|e| format!("the body is not OTLP/JSON ExportTraceServiceRequest: {e}")),
    };
    let req = match req {
        Ok(r) => r,
        Err(msg) => return status_reply(enc, StatusCode::BAD_REQUEST, 3, msg),
    };
    match store.ingest(req).await {
        Ok(i) => {
            let resp = ExportTraceServiceResponse {
                partial_success: partial(&i),
            };
            let body = match (enc, &resp.partial_success) {
                (Encoding::Protobuf, _) => resp.encode_to_vec(),
                (Encoding::Json, None) => b"{}".to_vec(),
                // proto3 JSON writes int64 as a string.
                (Encoding::Json, Some(p)) => serde_json::json!({
                    "partialSuccess": {
                        "rejectedSpans": p.rejected_spans.to_string(),
                        "errorMessage": p.error_message,
                    }
                })
                .to_string()
                .into_bytes(),
            };
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(enc.content_type()),
            );
            r
        }
        Err(e) => {
            let mut r = status_reply(enc, StatusCode::SERVICE_UNAVAILABLE, 14, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}
