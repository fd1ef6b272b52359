"""OpenTelemetry traces: a server span per request, a client span per upstream try.

Off unless an exporter is configured; then `HttpContext.tracing` is a Tracing
and the listener calls it at three points (request routed, try started, try
ended, request finished). W3C traceparent/tracestate are read from the client
and a new traceparent naming the try's client span is sent upstream, so the
runtime's own spans join the trace. When tracing is off the hot path only tests
`ctx.tracing is None`.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_TRACE_HEADERS = (b"traceparent", b"tracestate")


def exporter_for(settings) -> SpanExporter | None:
    """The span exporter the telemetry settings ask for, or None when tracing is off."""
    kind = settings.tracing_exporter
    if kind == "OTLP_GRPC":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=settings.tracing_endpoint or "127.0.0.1:4317",
                                insecure=True)
    if kind == "OTLP_HTTP":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(
            endpoint=settings.tracing_endpoint or "http://127.0.0.1:4318/v1/traces")
    if kind == "CONSOLE":
        return ConsoleSpanExporter()
    return None


class Tracing:
    """Spans for the REST listener and forwarder; built once per process."""

    def __init__(self, exporter: SpanExporter, sampling_ratio: float = 1.0,
                 service_name: str = "meshproxy"):
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sampling_ratio)),
            resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("meshproxy")
        self.propagator = TraceContextTextMapPropagator()

    def start_request(self, ex, model: str) -> None:
        """The server span, child of the client's traceparent when it sent one.

        A request the sampler drops gets no spans at all (ex.span stays None) and its
        traceparent, if any, goes upstream untouched: the cost of an unsampled request is
        one sampling decision."""
        parent = self.parent_context((n.lower().decode(), v.decode("latin-1"))
                                     for n, v in ex.headers if n.lower() in _TRACE_HEADERS)
        span = self.tracer.start_span(
            f"{ex.method.decode()} {model}", context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": ex.method.decode(),
                        "url.path": ex.url.split(b"?", 1)[0].decode("latin-1"),
                        "meshproxy.model": model, "meshproxy.protocol": "rest"})
        if span.is_recording():
            ex.span = span

    def parent_context(self, fields) -> Context | None:
        """The client's trace context from its (name, value) traceparent and tracestate fields,
        or None: a new trace. As W3C trace-context says: repeated tracestate fields are one
        list, joined with commas in the order received; more than one traceparent makes the
        context invalid, as a malformed one does (the propagator ignores tracestate then)."""
        parents, states = [], []
        for name, value in fields:
            (parents if name == "traceparent" else states).append(value)
        if len(parents) != 1:
            return None
        carrier = {"traceparent": parents[0]}
        if states:
            carrier["tracestate"] = ",".join(states)
        return self.propagator.extract(carrier)

    def start_try(self, ex, endpoint) -> tuple[trace.Span, bytes]:
        """A client span for this try, and the request head carrying its traceparent."""
        if ex.base_head is None:
            ex.base_head = _without_trace_headers(ex.outbox[0])
        attributes = {"meshproxy.model": ex.model, "meshproxy.target": ex.target.model,
                      "meshproxy.runtime": endpoint.name, "meshproxy.attempt": ex.tries + 1,
                      "server.address": endpoint.host, "server.port": endpoint.port}
        if ex.retry_reason:
            attributes["meshproxy.retry_reason"] = ex.retry_reason
        span = self.tracer.start_span(
            f"upstream {endpoint.name}", context=trace.set_span_in_context(ex.span),
            kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in carrier.items())
        return span, ex.base_head[:-2] + extra + b"\r\n"

    def end_try(self, ex, outcome: str) -> None:
        span, ex.try_span = ex.try_span, None
        span.set_attribute("meshproxy.outcome", outcome)
        if outcome.isdigit():
            span.set_attribute("http.response.status_code", int(outcome))
            if int(outcome) >= 500:
                span.set_status(Status(StatusCode.ERROR))
        else:
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()

    def end_request(self, ex) -> None:
        span, ex.span = ex.span, None
        span.set_attribute("http.response.status_code", ex.status)
        span.set_attribute("meshproxy.attempts", ex.tries + 1)
        if ex.endpoint is not None:
            span.set_attribute("meshproxy.runtime", ex.endpoint.name)
        if ex.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        self.provider.shutdown()


def _without_trace_headers(head: bytes) -> bytes:
    lines = head[:-4].split(b"\r\n")
    kept = [ln for ln in lines if ln.partition(b":")[0].strip().lower() not in _TRACE_HEADERS]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def build(settings, exporter: SpanExporter | None = None) -> Tracing | None:
    """A Tracing for these settings (or for an exporter passed in, e.g. in tests), or None."""
    exporter = exporter or exporter_for(settings)
    if exporter is None:
        return None
    return Tracing(exporter, settings.sampling_ratio, settings.service_name)
