"""Every Prometheus metric the proxy exports, and the cheap recorders the listener edges call."""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

# 0.5 ms .. 120 s: inference spans sub-millisecond toy models to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RequestStats:
    """Requests and their durations, counted on the hot path as plain ints in dicts and turned
    into Prometheus families only when scraped: a labels() lookup, a lock and an observe() per
    request cost more than the rest of the per-request bookkeeping together."""

    def __init__(self) -> None:
        self.counts: dict[tuple, int] = {}
        self.durations: dict[tuple, list] = {}  # (model, protocol) -> bucket counts..., sum

    def collect(self):
        requests = CounterMetricFamily(
            "meshproxy_requests", "Requests answered, by model, protocol, code and serving runtime",
            labels=["model", "protocol", "code", "code_class", "runtime"])
        for (model, protocol, code, runtime), n in list(self.counts.items()):
            code_class = (f"{code // 100}xx" if isinstance(code, int)
                          else "ok" if code == "OK" else "error")
            requests.add_metric([model, protocol, str(code), code_class, runtime], n)
        yield requests
        duration = HistogramMetricFamily(
            "meshproxy_request_duration_seconds", "Time from request head to response end, by model",
            labels=["model", "protocol"])
        for (model, protocol), hist in list(self.durations.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS, hist):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", cumulative + hist[len(LATENCY_BUCKETS)]))
            duration.add_metric([model, protocol], buckets, hist[-1])
        yield duration


class ProxyMetrics:
    """The proxy's metrics in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stats = RequestStats()
        r.register(self.stats)
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

    def record_request(self, model: str, protocol: str, code: int | str, runtime: str,
                       seconds: float) -> None:
        """`code` is the HTTP status (REST) or the gRPC status name, e.g. "OK" (gRPC)."""
        stats = self.stats
        key = (model, protocol, code, runtime)
        stats.counts[key] = stats.counts.get(key, 0) + 1
        hist = stats.durations.get((model, protocol))
        if hist is None:
            hist = stats.durations[(model, protocol)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[-1] += seconds

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
