"""Every Prometheus metric the control plane exports (the proxy's live in telemetry/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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

    def sent(self, protocol: str, type_url: str, size: int) -> None:
        self.responses.labels(protocol, type_url).inc()
        self.bytes.labels(protocol, type_url).inc(size)
