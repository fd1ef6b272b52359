"""OpenTelemetry spans for gRPC calls: a server span per call, a client span per try.

Uses the process's `telemetry.tracing.Tracing` (its tracer and W3C propagator), so REST and gRPC
spans share one provider and exporter. The client's `traceparent`/`tracestate` metadata make
the server span's parent; each try sends a `traceparent` naming its own client span, so the
runtime's spans join the trace. A call the sampler drops gets no spans and its metadata goes
upstream untouched. Off (None) unless tracing is configured.
"""

from __future__ import annotations

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_TRACE_KEYS = ("traceparent", "tracestate")
_SERVICE = "inference.GRPCInferenceService"


class GrpcTracing:
    def __init__(self, tracing):
        self.tracer = tracing.tracer
        self.propagator = tracing.propagator
        self.parent_context = tracing.parent_context  # the W3C header rules, shared with REST

    def start_call(self, method: str, model: str, metadata: tuple):
        """The server span of a call (None when not sampled)."""
        parent = self.parent_context(
            (k, v) for k, v in metadata if k in _TRACE_KEYS and isinstance(v, str))
        name = method.rpartition("/")[2]
        span = self.tracer.start_span(
            f"grpc {name} {model}", context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": name,
                        "meshproxy.model": model, "meshproxy.protocol": "grpc"})
        return span if span.is_recording() else None

    def start_try(self, call_span, metadata: tuple, endpoint, target_model: str, attempt: int,
                  reason: str | None):
        """A client span for one try, and the metadata carrying its traceparent."""
        attributes = {"meshproxy.target": target_model, "meshproxy.runtime": endpoint.name,
                      "meshproxy.attempt": attempt}
        if reason:
            attributes["meshproxy.retry_reason"] = reason
        span = self.tracer.start_span(
            f"upstream {endpoint.name}", context=trace.set_span_in_context(call_span),
            kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        kept = tuple((k, v) for k, v in metadata if k not in _TRACE_KEYS)
        return span, kept + tuple(carrier.items())

    @staticmethod
    def end(span, code: str, runtime: str = "") -> None:
        """End a call or try span with the gRPC status name it ended with."""
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if runtime:
            span.set_attribute("meshproxy.runtime", runtime)
        if code != "OK":
            span.set_status(Status(StatusCode.ERROR, code))
        span.end()
