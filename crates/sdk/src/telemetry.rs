//! The service's span exporter: started by [`Server::new`](crate::server::Server::new)
//! for the service it serves when an OTLP endpoint is configured the standard
//! way (`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_SERVICE_NAME`, `OTEL_BSP_*`; TLS and gzip by `OTEL_EXPORTER_OTLP_CERTIFICATE`,
//! `_CLIENT_CERTIFICATE`, `_CLIENT_KEY`, `_COMPRESSION`; head sampling by
//! `OTEL_TRACES_SAMPLER[_ARG]`). The server middleware then records a
//! server span per request and the [`HttpClient`](crate::HttpClient) a client
//! span per call; nothing is recorded (and nothing costs) without an endpoint.

use std::sync::OnceLock;

use meshwork_telemetry::export::{Endpoint, ExportConfig, Tracer};

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Starts the process's exporter for `service` (the first call wins; later
/// calls return the same tracer). Needs a tokio runtime; without one, or
/// without an endpoint, spans are not recorded.
pub fn init(service: &str) -> &'static Tracer {
    TRACER.get_or_init(|| {
        if tokio::runtime::Handle::try_current().is_err() {
            return Tracer::disabled();
        }
        // Which traces this service records (OTEL_TRACES_SAMPLER[_ARG]).
        meshwork_telemetry::sampler_from_env();
        match Endpoint::from_env(None) {
            Ok(Some(ep)) => {
                tracing::info!(endpoint = %ep.url, protocol = ?ep.protocol, service, "exporting spans over OTLP");
                let mut cfg = ExportConfig::from_env(service);
                cfg.scope = "meshwork-sdk".to_string();
                Tracer::start(cfg, ep.sink())
            }
            Ok(None) => Tracer::disabled(),
            Err(e) => {
                tracing::warn!(error = %e, "span export is off");
                Tracer::disabled()
            }
        }
    })
}

/// Starts the process's exporter for `service` to `endpoint`, set in code
/// rather than by the `OTEL_*` variables (the first call of this or
/// [`init`] wins).
pub fn init_with(service: &str, endpoint: Endpoint) -> &'static Tracer {
    TRACER.get_or_init(|| {
        if tokio::runtime::Handle::try_current().is_err() {
            return Tracer::disabled();
        }
        let mut cfg = ExportConfig::from_env(service);
        cfg.scope = "meshwork-sdk".to_string();
        Tracer::start(cfg, endpoint.sink())
    })
}

/// The exporter, when one records spans.
pub fn tracer() -> Option<&'static Tracer> {
    TRACER.get().filter(|t| t.enabled())
}
