"""Sends spans to Meshwork's trace store with the Python OpenTelemetry SDK
(the OTLP exporters from PyPI, a client we did not write): one trace over
OTLP/HTTP (protobuf), one over OTLP/gRPC, each a server span with a client
child and an internal child that fails. Prints the two trace ids as JSON.

usage: otel_py.py HTTP_ENDPOINT GRPC_ENDPOINT
  e.g. otel_py.py http://127.0.0.1:4318 http://127.0.0.1:4317
"""
import json
import sys

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode


def one_trace(exporter, service, route):
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("otel-py-peer-test", "1.0")
    with tracer.start_as_current_span(
        "GET " + route,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "GET", "http.route": route, "http.response.status_code": 500},
    ) as root:
        trace_id = format(root.get_span_context().trace_id, "032x")
        with tracer.start_as_current_span(
            "SELECT stock", kind=SpanKind.CLIENT, attributes={"db.system": "sqlite", "retry": 2}
        ) as child:
            child.add_event("cache miss", {"key": "sku-1"})
        with tracer.start_as_current_span("charge", kind=SpanKind.INTERNAL) as failing:
            failing.set_status(Status(StatusCode.ERROR, "card declined"))
    ok = provider.force_flush(10_000)
    provider.shutdown()
    if not ok:
        raise SystemExit("force_flush timed out")
    return trace_id


def main():
    http_ep, grpc_ep = sys.argv[1], sys.argv[2]
    t1 = one_trace(HttpExporter(endpoint=http_ep.rstrip("/") + "/v1/traces", timeout=10), "py-http", "/orders/{id}")
    t2 = one_trace(GrpcExporter(endpoint=grpc_ep, insecure=True, timeout=10), "py-grpc", "/stock/{sku}")
    print(json.dumps({"http": t1, "grpc": t2}))


if __name__ == "__main__":
    main()
