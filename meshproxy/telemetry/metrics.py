"""Every Prometheus metric the proxy exports, and the cheap recorders the listener edges call.

Per-request numbers (requests, durations, bytes, proxy overhead, attempts) are
kept as plain ints and floats in dicts and turned into Prometheus families only
when scraped: a labels() lookup, a lock and an observe() per request would cost
more than the rest of the per-request bookkeeping together. Endpoint state
(active, pending, ejected, health, pools) is read from the snapshot at scrape
time, so it costs the hot path nothing. Rare events use prometheus-client's
Counter directly.

Runtimes come and go (pods replaced, names change): ProxyMetrics.forget_runtime drops the
series of one that left the table, so label values do not grow without bound; the per-model
families keep what it counted, so they never go down. A late answer from a runtime that
already left counts there only, not under its name (that would bring its series back for
good). A runtime that comes back starts from fresh series.
"""

from __future__ import annotations

import bisect
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.parser import text_string_to_metric_families

# 0.5 ms .. 120 s: inference spans sub-millisecond toy models to minute-long generations.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# What the proxy itself adds: 10 us .. 100 ms.
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                    0.005, 0.01, 0.025, 0.1)


def _histogram(buckets: tuple[float, ...]) -> list:
    """Bucket counts, then the +Inf count, then the sum: one flat list per label set."""
    return [0] * (len(buckets) + 1) + [0.0]


def _observe(hist: list, buckets: tuple[float, ...], value: float) -> None:
    hist[bisect.bisect_left(buckets, value)] += 1
    hist[-1] += value


def _merged(hists) -> list:
    """Element-wise sum of histograms with the same buckets."""
    return [sum(column) for column in zip(*hists)]


def _histogram_family(name: str, doc: str, labels: list[str], buckets: tuple[float, ...],
                      data: dict[tuple, list]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=labels)
    for key, hist in data.items():
        cumulative, points = 0, []
        for bound, n in zip(buckets, hist):
            cumulative += n
            points.append((repr(bound), cumulative))
        points.append(("+Inf", cumulative + hist[len(buckets)]))
        fam.add_metric(list(key), points, hist[-1])
    return fam


def _code_class(code) -> str:
    return f"{code // 100}xx" if isinstance(code, int) else "ok" if code == "OK" else "error"


class Cell:
    """The numbers of one (model, protocol, runtime): answers by code, durations, bytes, overhead.

    The REST listener keeps a cell per model on the endpoint that served it (`Endpoint.cells`),
    so a request costs one dict lookup by model name and a few list writes (record()).
    """

    __slots__ = ("codes", "durations", "overhead", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.codes: dict[int | str, int] = {}
        self.durations = _histogram(LATENCY_BUCKETS)
        self.overhead = _histogram(OVERHEAD_BUCKETS)
        self.bytes_in = self.bytes_out = 0


def record(cell: Cell, code, seconds: float, bytes_in: int, bytes_out: int,
           overhead: float | None) -> None:
    """One answered request into its cell (the per-request path: no lookups, no locks)."""
    codes = cell.codes
    codes[code] = codes.get(code, 0) + 1
    hist = cell.durations
    hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    hist[-1] += seconds
    cell.bytes_in += bytes_in
    cell.bytes_out += bytes_out
    if overhead is not None:
        hist = cell.overhead
        hist[bisect.bisect_left(OVERHEAD_BUCKETS, overhead)] += 1
        hist[-1] += overhead


def _fold(into: Cell, cell: Cell) -> None:
    """Add `cell`'s durations, overhead and bytes (not its codes) to `into`."""
    into.durations = _merged((into.durations, cell.durations))
    into.overhead = _merged((into.overhead, cell.overhead))
    into.bytes_in += cell.bytes_in
    into.bytes_out += cell.bytes_out


def record_attempt(attempts: dict, outcome: int | str, seconds: float) -> None:
    """One try into a runtime's {outcome: histogram} (RequestStats.attempts_of); the outcome is
    a status (int, made text at scrape time) or a failure kind."""
    hist = attempts.get(outcome)
    if hist is None:
        hist = attempts[outcome] = _histogram(LATENCY_BUCKETS)
    hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    hist[-1] += seconds


class RequestStats:
    """The hot-path numbers; `collect` is called by prometheus-client at scrape time."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str], Cell] = {}  # (model, protocol, runtime)
        self.attempts: dict[str, dict[int | str, list]] = {}  # runtime -> outcome -> histogram
        self.attempt_timeouts: dict[str, int] = {}          # runtime
        # (model, protocol) -> what runtimes that left added to the per-model families, which
        # must not go down when their cells are dropped (Prometheus would see a counter reset)
        # nor miss their late answers
        self.retired: dict[tuple[str, str], Cell] = {}
        self.in_table: Callable[[str], bool] = lambda runtime: True  # see watch_endpoints

    def cell(self, model: str, protocol: str, runtime: str) -> Cell:
        key = (model, protocol, runtime)
        cell = self.cells.get(key)
        if cell is None:
            if runtime and not self.in_table(runtime):  # a late answer from one that left
                return self._retired(model, protocol)
            cell = self.cells[key] = Cell()
        return cell

    def _retired(self, model: str, protocol: str) -> Cell:
        """Counted in the per-model families only (its codes are not exported)."""
        cell = self.retired.get((model, protocol))
        if cell is None:
            cell = self.retired[(model, protocol)] = Cell()
        return cell

    def attempts_of(self, runtime: str) -> dict[str, list]:
        found = self.attempts.get(runtime)
        if found is None:
            found = {}
            if self.in_table(runtime):
                self.attempts[runtime] = found
        return found

    def forget_runtime(self, runtime: str) -> None:
        """Drop the numbers kept under `runtime`; its share of the per-model families stays."""
        for key in [key for key in self.cells if key[2] == runtime]:
            _fold(self._retired(*key[:2]), self.cells.pop(key))
        self.attempts.pop(runtime, None)
        self.attempt_timeouts.pop(runtime, None)

    def collect(self):
        requests = CounterMetricFamily(
            "meshproxy_requests", "Requests answered, by model, protocol, code and serving runtime",
            labels=["model", "protocol", "code", "code_class", "runtime"])
        per_model: dict[tuple[str, str], list[Cell]] = {}
        for (model, protocol, runtime), cell in list(self.cells.items()):
            for code, n in list(cell.codes.items()):
                requests.add_metric([model, protocol, str(code), _code_class(code), runtime], n)
            per_model.setdefault((model, protocol), []).append(cell)
        for key, cell in list(self.retired.items()):
            per_model.setdefault(key, []).append(cell)
        yield requests
        for name, doc, field in (
                ("meshproxy_request_bytes", "Request body bytes received from clients", "bytes_in"),
                ("meshproxy_response_bytes", "Response bytes sent to clients", "bytes_out")):
            fam = CounterMetricFamily(name, doc, labels=["model", "protocol"])
            for key, cells in per_model.items():
                fam.add_metric(list(key), sum(getattr(c, field) for c in cells))
            yield fam
        yield _histogram_family(
            "meshproxy_request_duration_seconds", "Time from request head to response end, by model",
            ["model", "protocol"], LATENCY_BUCKETS,
            {key: _merged(c.durations for c in cells) for key, cells in per_model.items()})
        overhead = {key: _merged(c.overhead for c in cells) for key, cells in per_model.items()}
        yield _histogram_family(
            "meshproxy_proxy_overhead_seconds",
            "Time the proxy itself adds: request received to upstream request sent, plus "
            "upstream response head to response head sent", ["model", "protocol"], OVERHEAD_BUCKETS,
            {key: hist for key, hist in overhead.items() if hist[-1] or any(hist[:-1])})
        yield _histogram_family(
            "meshproxy_upstream_attempt_duration_seconds",
            "Each try against a runtime, by runtime and outcome", ["runtime", "outcome"],
            LATENCY_BUCKETS, {(runtime, str(outcome)): hist
                              for runtime, by_outcome in list(self.attempts.items())
                              for outcome, hist in list(by_outcome.items())})
        timeouts = CounterMetricFamily("meshproxy_upstream_attempt_timeouts",
                                       "Tries that hit their per-try timeout", labels=["runtime"])
        for runtime, n in list(self.attempt_timeouts.items()):
            timeouts.add_metric([runtime], n)
        yield timeouts


class EndpointCollector:
    """Endpoint state read from the snapshot in force, at scrape time."""

    def __init__(self, snapshot: Callable):
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        specs = [
            ("meshproxy_endpoint_active_requests", "Requests in flight to the runtime",
             lambda e: e.active),
            ("meshproxy_endpoint_pending_connections", "Connections being opened to the runtime",
             lambda e: e.pool.connecting if e.pool else 0),
            ("meshproxy_endpoint_open_connections", "Open connections to the runtime (pool size)",
             lambda e: e.pool.open if e.pool else 0),
            ("meshproxy_endpoint_idle_connections", "Idle keep-alive connections in the pool",
             lambda e: len(e.pool.idle) if e.pool else 0),
            ("meshproxy_endpoint_healthy", "1 when the runtime takes traffic (health check and "
             "outlier detection agree)", lambda e: int(e.healthy)),
            ("meshproxy_endpoint_ejected", "1 while outlier detection has ejected the runtime",
             lambda e: int(e.ejected)),
        ]
        for name, doc, get in specs:
            fam = GaugeMetricFamily(name, doc, labels=["runtime"])
            for e in snap.endpoints.values():
                fam.add_metric([e.name], get(e))
            yield fam


class DiscoveryCollector:
    """The ADS client's state (discovery/client.py), read at scrape time."""

    def __init__(self, client: Callable):
        self.client = client

    def collect(self):
        client = self.client()
        yield GaugeMetricFamily("meshproxy_discovery_connected",
                                "1 while an ADS stream to a control plane is open",
                                value=int(client.connected_to is not None))
        yield CounterMetricFamily("meshproxy_discovery_updates_applied",
                                  "Snapshots built from control-plane updates",
                                  value=client.updates)
        yield CounterMetricFamily("meshproxy_discovery_streams",
                                  "ADS streams opened (reconnects included)", value=client.streams)
        version = GaugeMetricFamily("meshproxy_discovery_config_version",
                                    "The accepted version per resource type (value 1)",
                                    labels=["type", "version"])
        acks = CounterMetricFamily("meshproxy_discovery_acks", "Responses accepted, by type",
                                   labels=["type"])
        nacks = CounterMetricFamily("meshproxy_discovery_nacks", "Responses rejected, by type",
                                    labels=["type"])
        age = GaugeMetricFamily("meshproxy_discovery_seconds_since_update",
                                "Seconds since the last accepted update, by type", labels=["type"])
        now = time.time()
        for ts in client.state.types.values():
            short = ts.type_url.rsplit(".", 1)[-1]
            version.add_metric([short, ts.version_info], 1)
            acks.add_metric([short], ts.acks)
            nacks.add_metric([short], ts.nacks)
            if ts.applied_at is not None:
                age.add_metric([short], max(0.0, now - ts.applied_at))
        yield from (version, acks, nacks, age)


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

    def watch_discovery(self, client: Callable) -> None:
        """Export the ADS client's state (connected, versions, ACKs/NACKs, age) at scrape time."""
        self.registry.register(DiscoveryCollector(client))

    def watch_endpoints(self, snapshot: Callable) -> None:
        """Export endpoint state from `snapshot()` (the snapshot in force) at scrape time;
        numbers of runtimes not in it are not kept from then on."""
        self.registry.register(EndpointCollector(snapshot))
        self.stats.in_table = lambda runtime: runtime in snapshot().endpoints

    def forget_runtime(self, runtime: str) -> None:
        """Drop every series labelled with `runtime`, a runtime that left the table."""
        self.stats.forget_runtime(runtime)
        for metric, labels in ((self.ejections, ("runtime",)),
                               (self.overflows, ("runtime", "limit"))):
            [family] = metric.collect()
            for values in {tuple(s.labels[n] for n in labels) for s in family.samples
                           if s.labels["runtime"] == runtime}:
                metric.remove(*values)

    def record_request(self, model: str, protocol: str, code: int | str, runtime: str,
                       seconds: float, bytes_in: int = 0, bytes_out: int = 0,
                       overhead: float | None = None) -> None:
        """`code` is the HTTP status (REST) or the gRPC status name, e.g. "OK" (gRPC).

        The REST listener records through a cached cell and record() instead."""
        record(self.stats.cell(model, protocol, runtime), code, seconds, bytes_in, bytes_out,
               overhead)

    def record_attempt_timeout(self, runtime: str) -> None:
        if self.stats.in_table(runtime):
            t = self.stats.attempt_timeouts
            t[runtime] = t.get(runtime, 0) + 1

    def record_local_error(self, code: int, reason: str) -> None:
        self.local_errors.labels(str(code), reason).inc()

    def record_retry(self, model: str, reason: str) -> None:
        self.retries.labels(model, reason).inc()

    def record_budget_exhausted(self, model: str) -> None:
        self.budget_exhausted.labels(model).inc()

    def record_mirror(self, model: str, outcome: str) -> None:
        self.mirrors.labels(model, outcome).inc()

    def record_ejection(self, runtime: str) -> None:
        if self.stats.in_table(runtime):
            self.ejections.labels(runtime).inc()

    def record_overflow(self, runtime: str, limit: str) -> None:
        if self.stats.in_table(runtime):
            self.overflows.labels(runtime, limit).inc()


class _Fixed:
    """A collector that yields metrics built elsewhere."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self):
        return iter(self.metrics)


def merge_workers(expositions: list[str]) -> bytes:
    """One exposition from every worker process's own, each series labelled worker="i".

    Worker processes keep their numbers in their own memory (the hot-path dicts, the
    endpoint state of their own snapshot), which prometheus-client's multiprocess files
    cannot see; worker 0's admin fetches the others' /metrics and labels them instead, so
    `sum without (worker) (...)` gives the proxy's totals.
    """
    merged: dict[str, Metric] = {}
    for index, text in enumerate(expositions):
        for fam in text_string_to_metric_families(text):
            metric = merged.get(fam.name)
            if metric is None:
                metric = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                metric.add_sample(s.name, {**s.labels, "worker": str(index)}, s.value,
                                  s.timestamp, s.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(merged.values())))
    return generate_latest(registry)
