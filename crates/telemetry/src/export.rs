//! Span export: components record finished spans ([`SpanRecord`]) with a
//! [`Tracer`], which never blocks the request that records them — a bounded
//! queue (full: the span is dropped and counted) drained by one task that
//! sends batches to a [`Sink`]: an OTLP endpoint over gRPC or HTTP/protobuf
//! (configured as OpenTelemetry SDKs are, by the standard `OTEL_*`
//! variables), or a function (the node's own trace store, in process).
//!
//! Spans are built from the [`TraceContext`] the gateway and the SDK already
//! carry, so a span costs a struct and a channel send on the request path;
//! the OTLP messages (`opentelemetry-proto`) are built off it, in the batch task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use crate::TraceContext;

/// What a span stands for (OpenTelemetry's span kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Work inside a process.
    Internal,
    /// Handling a request that came in.
    Server,
    /// A request sent out.
    Client,
    /// A message published.
    Producer,
    /// A message consumed.
    Consumer,
}

impl Kind {
    fn otlp(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::Server => 2,
            Kind::Client => 3,
            Kind::Producer => 4,
            Kind::Consumer => 5,
        }
    }
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// Text.
    Str(String),
    /// An integer.
    Int(i64),
    /// A flag.
    Bool(bool),
    /// A number.
    F64(f64),
}

impl From<&str> for Attr {
    fn from(s: &str) -> Self {
        Attr::Str(s.to_string())
    }
}
impl From<String> for Attr {
    fn from(s: String) -> Self {
        Attr::Str(s)
    }
}
impl From<i64> for Attr {
    fn from(v: i64) -> Self {
        Attr::Int(v)
    }
}
impl From<u16> for Attr {
    fn from(v: u16) -> Self {
        Attr::Int(i64::from(v))
    }
}
impl From<u32> for Attr {
    fn from(v: u32) -> Self {
        Attr::Int(i64::from(v))
    }
}
impl From<bool> for Attr {
    fn from(v: bool) -> Self {
        Attr::Bool(v)
    }
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// Trace id, span id (this span) and parent span id (`parent_id`).
    pub ctx: TraceContext,
    /// The span name (`GET /orders/{id}`, `charge`, ...).
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Attributes, by semantic-convention key.
    pub attributes: Vec<(&'static str, Attr)>,
    /// `Some(message)`: the span failed.
    pub error: Option<String>,
}

impl SpanRecord {
    /// A span of `ctx` started at `start`, ending now.
    pub fn new(ctx: &TraceContext, name: impl Into<String>, kind: Kind, start: SystemTime) -> Self {
        SpanRecord {
            ctx: ctx.clone(),
            name: name.into(),
            kind,
            start,
            end: SystemTime::now(),
            attributes: Vec::new(),
            error: None,
        }
    }

    /// Adds an attribute.
    pub fn attr(mut self, key: &'static str, value: impl Into<Attr>) -> Self {
        self.attributes.push((key, value.into()));
        self
    }

    /// Marks the span failed.
    pub fn failed(mut self, message: impl Into<String>) -> Self {
        self.error = Some(message.into());
        self
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| s.get(2 * i..2 * i + 2))
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect()
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn any(v: &Attr) -> AnyValue {
    AnyValue {
        value: Some(match v {
            Attr::Str(s) => any_value::Value::StringValue(s.clone()),
            Attr::Int(i) => any_value::Value::IntValue(*i),
            Attr::Bool(b) => any_value::Value::BoolValue(*b),
            Attr::F64(f) => any_value::Value::DoubleValue(*f),
        }),
    }
}

fn kv(key: &str, v: &Attr) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(any(v)),
        ..Default::default()
    }
}

impl SpanRecord {
    fn to_otlp(&self) -> Span {
        Span {
            trace_id: unhex(&self.ctx.trace_id),
            span_id: unhex(&self.ctx.span_id),
            parent_span_id: self.ctx.parent_id.as_deref().map(unhex).unwrap_or_default(),
            flags: 0x100 | u32::from(self.ctx.sampled()),
            name: self.name.clone(),
            kind: self.kind.otlp(),
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(self.end).max(nanos(self.start)),
            attributes: self.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            status: self.error.as_ref().map(|m| Status {
                code: 2,
                message: m.clone(),
            }),
            ..Default::default()
        }
    }
}

/// Where batches go: a future per batch, `Err` with why it failed.
pub type Sink = Arc<
    dyn Fn(ExportTraceServiceRequest) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// The exporter's settings (`OTEL_BSP_*` and the resource).
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `service.name` of the resource.
    pub service: String,
    /// More resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
    /// Spans waiting at most; past it they are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048).
    pub queue: usize,
    /// Spans per export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, default 512).
    pub batch: usize,
    /// Longest wait before a partial batch goes (`OTEL_BSP_SCHEDULE_DELAY` ms,
    /// default 1000).
    pub delay: Duration,
    /// The instrumentation scope's name.
    pub scope: String,
}

impl ExportConfig {
    /// Defaults for `service`, then the `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_BSP_*` variables over them.
    pub fn from_env(service: &str) -> Self {
        let num = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        let resource: Vec<(String, String)> = std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        let service = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| service.to_string());
        ExportConfig {
            service,
            resource: resource
                .into_iter()
                .filter(|(k, _)| k != "service.name")
                .collect(),
            queue: num("OTEL_BSP_MAX_QUEUE_SIZE").map_or(2048, |v| v as usize),
            batch: num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").map_or(512, |v| v as usize),
            delay: Duration::from_millis(num("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(1000)),
            scope: "meshwork".to_string(),
        }
    }
}

struct Inner {
    tx: tokio::sync::mpsc::Sender<SpanRecord>,
    dropped: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
}

/// Records spans for export (cheap to clone; a disabled tracer records nothing).
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.enabled())
            .field("stats", &self.stats())
            .finish()
    }
}

/// The exporter's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans sent.
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans in batches the sink refused.
    pub failed: u64,
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn disabled() -> Tracer {
        Tracer { inner: None }
    }

    /// Starts the batch task (on the current tokio runtime) sending to `sink`.
    pub fn start(cfg: ExportConfig, sink: Sink) -> Tracer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<SpanRecord>(cfg.queue.max(1));
        let inner = Arc::new(Inner {
            tx,
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&inner);
        let resource = Resource {
            attributes: std::iter::once(("service.name".to_string(), cfg.service.clone()))
                .chain(cfg.resource.iter().cloned())
                .map(|(k, v)| kv(&k, &Attr::Str(v)))
                .collect(),
            ..Default::default()
        };
        let scope = InstrumentationScope {
            name: cfg.scope.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let mut buf: Vec<SpanRecord> = Vec::with_capacity(cfg.batch);
            loop {
                let deadline = tokio::time::sleep(cfg.delay);
                tokio::pin!(deadline);
                let open = loop {
                    tokio::select! {
                        got = rx.recv() => match got {
                            Some(s) => {
                                buf.push(s);
                                if buf.len() >= cfg.batch { break true; }
                            }
                            None => break false,
                        },
                        _ = &mut deadline => break true,
                    }
                };
                if !buf.is_empty() {
                    let n = buf.len() as u64;
                    let req = ExportTraceServiceRequest {
                        resource_spans: vec![ResourceSpans {
                            resource: Some(resource.clone()),
                            scope_spans: vec![ScopeSpans {
                                scope: Some(scope.clone()),
                                spans: buf.drain(..).map(|s| s.to_otlp()).collect(),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                    };
                    let result = sink(req).await;
                    if let Some(inner) = weak.upgrade() {
                        match result {
                            Ok(()) => {
                                inner.exported.fetch_add(n, Ordering::Relaxed);
                                metrics::counter!("meshwork_trace_spans_exported_total")
                                    .increment(n);
                            }
                            Err(e) => {
                                inner.failed.fetch_add(n, Ordering::Relaxed);
                                metrics::counter!("meshwork_trace_spans_export_failed_total")
                                    .increment(n);
                                tracing::debug!(error = %e, spans = n, "span export failed");
                            }
                        }
                    }
                }
                if !open {
                    return;
                }
            }
        });
        Tracer { inner: Some(inner) }
    }

    /// Whether spans are recorded at all.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues a finished span (sampled ones only); never waits: a full queue
    /// drops it and counts the drop.
    pub fn record(&self, span: SpanRecord) {
        let Some(inner) = &self.inner else { return };
        if !span.ctx.sampled() {
            return;
        }
        if inner.tx.try_send(span).is_err() {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("meshwork_trace_spans_dropped_total").increment(1);
        }
    }

    /// The counters.
    pub fn stats(&self) -> ExportStats {
        self.inner
            .as_ref()
            .map_or_else(ExportStats::default, |i| ExportStats {
                exported: i.exported.load(Ordering::Relaxed),
                dropped: i.dropped.load(Ordering::Relaxed),
                failed: i.failed.load(Ordering::Relaxed),
            })
    }
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// An OTLP endpoint and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// For gRPC the server's URL; for HTTP the full URL of the traces path.
    pub url: String,
    /// The transport.
    pub protocol: Protocol,
    /// Headers sent with every export (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(String, String)>,
    /// Time one export may take (`OTEL_EXPORTER_OTLP_TIMEOUT` ms, default 10 s).
    pub timeout: Duration,
    /// TLS, for an `https://` URL: the collector's certificate verified against
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE` (or the system's roots), and this
    /// process's own from `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` / `_CLIENT_KEY`.
    pub tls: Option<meshwork_tls::ClientTlsConfig>,
    /// Batches sent gzip-compressed (`OTEL_EXPORTER_OTLP_COMPRESSION=gzip`).
    pub gzip: bool,
}

/// Why an endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The URL is not `http[s]://HOST:PORT[/path]`.
    #[error("OTLP endpoint {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Url(String),
    /// The TLS files cannot be used.
    #[error("OTLP endpoint TLS: {0}")]
    Tls(String),
    /// The compression is not one we speak.
    #[error("OTLP compression {0:?}: use gzip or none")]
    Compression(String),
    /// The protocol is not one we speak.
    #[error("OTLP protocol {0:?}: use grpc or http/protobuf")]
    Protocol(String),
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

impl Endpoint {
    /// The endpoint `flag` (when given) or the one the standard variables
    /// name (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, used as is, or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, with `/v1/traces` appended for HTTP),
    /// with `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` (default `http/protobuf`,
    /// as the specification says), `_HEADERS` and `_TIMEOUT`. `None`: nothing
    /// configured.
    pub fn from_env(flag: Option<&str>) -> Result<Option<Endpoint>, EndpointError> {
        let (base, exact) = match (flag, env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            (Some(f), _) => (f.to_string(), false),
            (None, Some(t)) => (t, true),
            (None, None) => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(e) => (e, false),
                None => return Ok(None),
            },
        };
        let protocol = match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
            .map(str::trim)
        {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => return Err(EndpointError::Protocol(other.to_string())),
        };
        let headers = env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        let timeout = env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(10), Duration::from_millis);
        let mut ep = Endpoint::new(&base, exact, protocol, headers, timeout)?;
        let var = |name: &str| {
            env(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
                .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{name}")))
        };
        ep.gzip = match var("COMPRESSION").as_deref().map(str::trim) {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => return Err(EndpointError::Compression(other.to_string())),
        };
        if let Some(tls) = &mut ep.tls {
            tls.ca_file = var("CERTIFICATE").map(Into::into);
            tls.cert_file = var("CLIENT_CERTIFICATE").map(Into::into);
            tls.key_file = var("CLIENT_KEY").map(Into::into);
            // Checked now, so a bad file stops the start, not every export.
            ep.tls_config()?;
        }
        Ok(Some(ep))
    }

    /// The rustls client of an `https://` endpoint (ALPN as its protocol needs).
    fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, EndpointError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let alpn: &[&[u8]] = match self.protocol {
            Protocol::Grpc => &[b"h2"],
            Protocol::HttpProtobuf => &[b"http/1.1"],
        };
        meshwork_tls::client_config(tls, alpn)
            .map(Some)
            .map_err(|e| EndpointError::Tls(e.to_string()))
    }

    /// An endpoint at `url` (`exact`: the HTTP traces path is in it already).
    pub fn new(
        url: &str,
        exact: bool,
        protocol: Protocol,
        headers: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<Endpoint, EndpointError> {
        let url = url.trim();
        let parsed: http::Uri = url.parse().map_err(|_| EndpointError::Url(url.into()))?;
        let tls = match parsed.scheme_str() {
            Some("http") => None,
            Some("https") => Some(meshwork_tls::ClientTlsConfig::default()),
            _ => return Err(EndpointError::Url(url.into())),
        };
        if parsed.authority().is_none() {
            return Err(EndpointError::Url(url.into()));
        }
        let url = match protocol {
            Protocol::HttpProtobuf if !exact => format!("{}/v1/traces", url.trim_end_matches('/')),
            _ => url.to_string(),
        };
        Ok(Endpoint {
            url,
            protocol,
            headers,
            timeout,
            tls,
            gzip: false,
        })
    }

    /// A sink sending batches here.
    pub fn sink(&self) -> Sink {
        match self.protocol {
            Protocol::Grpc => grpc_sink(self.clone()),
            Protocol::HttpProtobuf => http_sink(self.clone()),
        }
    }
}

/// A sink that fails every export with `why` (the endpoint could not be set up).
fn failing(why: String) -> Sink {
    Arc::new(move |_| {
        let why = why.clone();
        Box::pin(async move { Err(why) })
    })
}

fn grpc_sink(ep: Endpoint) -> Sink {
    let tls = match ep.tls_config() {
        Ok(t) => t,
        Err(e) => return failing(e.to_string()),
    };
    // With TLS the connector does the handshake: tonic is handed the same
    // authority with the http scheme (it would refuse https without its own TLS).
    let url = match &tls {
        Some(_) => ep.url.replacen("https://", "http://", 1),
        None => ep.url.clone(),
    };
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map(|e| {
            let e = e.timeout(ep.timeout);
            match tls {
                Some(cfg) => e.connect_with_connector_lazy(crate::https::HttpsConnector::new(cfg)),
                None => e.connect_lazy(),
            }
        })
        .map_err(|e| e.to_string());
    let gzip = ep.gzip;
    let headers: Vec<(
        tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )> = ep
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
        .collect();
    let headers = Arc::new(headers);
    Arc::new(move |req| {
        let channel = channel.clone();
        let headers = headers.clone();
        Box::pin(async move {
            let channel = channel?;
            let mut client = TraceServiceClient::new(channel);
            if gzip {
                client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            let mut r = tonic::Request::new(req);
            for (k, v) in headers.iter() {
                r.metadata_mut().insert(k.clone(), v.clone());
            }
            client
                .export(r)
                .await
                .map(|_| ())
                .map_err(|s| format!("{}: {}", s.code(), s.message()))
        })
    })
}

fn http_sink(ep: Endpoint) -> Sink {
    use hyper_util::client::legacy::Client;
    let builder = Client::builder(hyper_util::rt::TokioExecutor::new());
    match ep.tls_config() {
        Ok(Some(cfg)) => http_sink_over(ep, builder.build(crate::https::HttpsConnector::new(cfg))),
        Ok(None) => http_sink_over(ep, builder.build_http()),
        Err(e) => failing(e.to_string()),
    }
}

/// Gzip of `data` (`None`: it could not be compressed, send it as it is).
fn gzip(data: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).ok()?;
    enc.finish().ok()
}

fn http_sink_over<C>(
    ep: Endpoint,
    client: hyper_util::client::legacy::Client<C, http_body_util::Full<bytes::Bytes>>,
) -> Sink
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    use http_body_util::{BodyExt, Full};
    let ep = Arc::new(ep);
    Arc::new(move |req| {
        let (client, ep) = (client.clone(), ep.clone());
        Box::pin(async move {
            let mut b = http::Request::post(ep.url.as_str())
                .header(http::header::CONTENT_TYPE, "application/x-protobuf");
            for (k, v) in &ep.headers {
                b = b.header(k.as_str(), v.as_str());
            }
            let mut body = req.encode_to_vec();
            if ep.gzip
                && let Some(z) = gzip(&body)
            {
                body = z;
                b = b.header(http::header::CONTENT_ENCODING, "gzip");
            }
            let r = b
                .body(Full::new(bytes::Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(ep.timeout, client.request(r))
                .await
                .map_err(|_| format!("no answer within {:?}", ep.timeout))?
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            // Read the body so the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(queue: usize, batch: usize) -> ExportConfig {
        ExportConfig {
            service: "svc".into(),
            resource: vec![],
            queue,
            batch,
            delay: Duration::from_millis(10),
            scope: "test".into(),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_and_never_waits() {
        // A collector that never answers: the batch task is stuck on its first batch.
        let sink: Sink = Arc::new(|_| Box::pin(std::future::pending()));
        let t = Tracer::start(cfg(2, 1), sink);
        let ctx = TraceContext::new_root();
        // Nothing runs the batch task in between: two fit, three are dropped.
        for _ in 0..5 {
            t.record(SpanRecord::new(
                &ctx,
                "op",
                Kind::Internal,
                SystemTime::now(),
            ));
        }
        assert_eq!(t.stats().dropped, 3);
        // An unsampled trace is not even queued.
        let mut unsampled = TraceContext::new_root();
        unsampled.flags = "00".into();
        t.record(SpanRecord::new(
            &unsampled,
            "op",
            Kind::Internal,
            SystemTime::now(),
        ));
        assert_eq!(t.stats().dropped, 3);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn spans_go_out_in_batches_as_otlp() {
        let got: Arc<parking_lot::Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
        let got2 = got.clone();
        let sink: Sink = Arc::new(move |req| {
            got2.lock().push(req);
            Box::pin(async { Ok(()) })
        });
        let t = Tracer::start(cfg(100, 3), sink);
        let ctx = TraceContext::new_root();
        for i in 0..4 {
            t.record(
                SpanRecord::new(
                    &ctx.child(),
                    format!("op{i}"),
                    Kind::Client,
                    SystemTime::now(),
                )
                .attr("attempt", i as i64)
                .failed("boom"),
            );
        }
        // A full batch at once, the rest after the schedule delay.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reqs = got.lock().clone();
        let spans: Vec<&Span> = reqs
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        assert_eq!(reqs.len(), 2);
        assert_eq!(spans.len(), 4);
        assert_eq!(spans[0].trace_id, unhex(&ctx.trace_id));
        assert_eq!(spans[0].parent_span_id, unhex(&ctx.span_id));
        assert_eq!(spans[0].kind, 3);
        assert_eq!(spans[0].status.as_ref().unwrap().code, 2);
        let res = reqs[0].resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(res.attributes[0].key, "service.name");
        assert_eq!(t.stats().exported, 4);
    }

    #[test]
    fn endpoints_follow_the_otlp_variables_rules() {
        let ep = Endpoint::new(
            "http://collector:4318/",
            false,
            Protocol::HttpProtobuf,
            vec![],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(ep.url, "http://collector:4318/v1/traces");
        let exact = Endpoint::new(
            "http://c:4318/custom",
            true,
            Protocol::HttpProtobuf,
            vec![],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(exact.url, "http://c:4318/custom");
        let grpc = Endpoint::new(
            "http://c:4317",
            false,
            Protocol::Grpc,
            vec![],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(grpc.url, "http://c:4317");
        let tls = Endpoint::new(
            "https://c:4317",
            false,
            Protocol::Grpc,
            vec![],
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(tls.tls, Some(meshwork_tls::ClientTlsConfig::default()));
        assert!(
            Endpoint::new(
                "ftp://c:4317",
                false,
                Protocol::Grpc,
                vec![],
                Duration::from_secs(1)
            )
            .is_err()
        );
        assert!(
            Endpoint::new(
                "c:4317",
                false,
                Protocol::Grpc,
                vec![],
                Duration::from_secs(1)
            )
            .is_err()
        );
    }
}
