"""Every Prometheus metric the control plane exports (the proxy's live in telemetry/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.proxies = Gauge("meshproxy_cp_connected_proxies", "Open ADS streams, by protocol",
                             ["protocol"], registry=r)
        self.responses = Counter("meshproxy_cp_xds_responses", "xDS responses sent",
                                 ["protocol", "type_url"], registry=r)
        self.bytes = Counter("meshproxy_cp_xds_response_bytes", "Bytes of xDS responses sent",
                             ["protocol", "type_url"], registry=r)
        self.nacks = Counter("meshproxy_cp_xds_nacks", "NACKs received, by type", ["type_url"],
                             registry=r)
        self.resources = Gauge("meshproxy_cp_resources", "Resources in the cache, by type",
                               ["type_url"], registry=r)
        self.polls = Counter("meshproxy_cp_runtime_polls", "Runtime discovery polls, by result",
                             ["runtime", "result"], registry=r)
        self.config_reloads = Counter("meshproxy_cp_config_reloads",
                                      "Config file edits, by result", ["result"], registry=r)
        self.registrations = Gauge("meshproxy_cp_sidecar_registrations",
                                   "Open sidecar registration streams", registry=r)
        self.push_latency = Histogram(
            "meshproxy_cp_push_latency_seconds",
            "From a change in the cache to the update written on a proxy's stream",
            ["protocol"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))

    def sent(self, protocol: str, type_url: str, size: int) -> None:
        self.responses.labels(protocol, type_url).inc()
        self.bytes.labels(protocol, type_url).inc(size)
