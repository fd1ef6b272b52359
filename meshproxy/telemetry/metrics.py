"""Every Prometheus metric the proxy exports, and the cheap recorders the listener edges call."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 0.5 ms .. 120 s: inference spans sub-millisecond toy models to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ProxyMetrics:
    """The proxy's metrics in their own registry; children are cached per label set."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "meshproxy_requests", "Requests answered, by model, protocol, code and serving runtime",
            ["model", "protocol", "code", "code_class", "runtime"], registry=r)
        self.duration = Histogram(
            "meshproxy_request_duration_seconds", "Time from request head to response end, by model",
            ["model", "protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.local_errors = Counter(
            "meshproxy_local_errors", "Errors the proxy answered itself, by status and reason",
            ["code", "reason"], registry=r)
        self.downstream_connections = Gauge(
            "meshproxy_downstream_connections", "Open client connections", registry=r)
        self.retries = Counter(
            "meshproxy_retries", "Retries sent, by model and the condition that caused them",
            ["model", "reason"], registry=r)
        self.budget_exhausted = Counter(
            "meshproxy_retry_budget_exhausted", "Retries not sent because the budget was spent",
            ["model"], registry=r)
        self.mirrors = Counter(
            "meshproxy_mirror_requests", "Mirrored copies by outcome", ["model", "outcome"],
            registry=r)
        self.ejections = Counter(
            "meshproxy_outlier_ejections", "Endpoints ejected by outlier detection", ["runtime"],
            registry=r)
        self.ejected = Gauge(
            "meshproxy_outlier_ejected", "Endpoints ejected now", registry=r)
        self.overflows = Counter(
            "meshproxy_circuit_breaker_overflows", "Requests refused at a circuit-breaker limit",
            ["runtime", "limit"], registry=r)
        self._request_children: dict = {}
        self._duration_children: dict = {}

    def record_request(self, model: str, protocol: str, code: int, runtime: str,
                       seconds: float) -> None:
        key = (model, protocol, code, runtime)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                model, protocol, str(code), f"{code // 100}xx", runtime)
        child.inc()
        dkey = (model, protocol)
        hist = self._duration_children.get(dkey)
        if hist is None:
            hist = self._duration_children[dkey] = self.duration.labels(model, protocol)
        hist.observe(seconds)

    def record_local_error(self, code: int, reason: str) -> None:
        self.local_errors.labels(str(code), reason).inc()

    def record_retry(self, model: str, reason: str) -> None:
        self.retries.labels(model, reason).inc()

    def record_budget_exhausted(self, model: str) -> None:
        self.budget_exhausted.labels(model).inc()

    def record_mirror(self, model: str, outcome: str) -> None:
        self.mirrors.labels(model, outcome).inc()

    def record_ejection(self, runtime: str) -> None:
        self.ejections.labels(runtime).inc()

    def record_overflow(self, runtime: str, limit: str) -> None:
        self.overflows.labels(runtime, limit).inc()
