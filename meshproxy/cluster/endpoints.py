"""Endpoint: one runtime as the data plane sees it, with the counters balancers read."""

from __future__ import annotations

from typing import Any


class Endpoint:
    """A runtime's REST endpoint. Lives across snapshots so its counters and pool survive updates.

    `active` is the number of requests in flight to it (least-request reads it).
    `healthy` is what balancers read: the active health check passes (`checked_ok`)
    and outlier detection has not ejected it (`ejected`); refresh_health() joins them.
    """

    __slots__ = ("name", "host", "port", "weight", "active", "healthy", "pool", "served_header",
                 "total", "checked_ok", "ejected", "ejected_until", "times_ejected",
                 "failures_5xx", "failures_gateway", "outlier", "limits", "cells", "attempts")

    def __init__(self, name: str, host: str, port: int, weight: int = 1):
        self.name = name
        self.host = host
        self.port = port
        self.weight = weight
        self.active = 0
        self.total = 0
        self.healthy = True
        self.pool: Any = None  # upstream.http_pool.HttpPool, attached by the snapshot builder
        self.served_header = b"x-meshproxy-upstream: " + name.encode() + b"\r\n"
        self.checked_ok = True
        self.ejected = False
        self.ejected_until = 0.0
        self.times_ejected = 0
        self.failures_5xx = self.failures_gateway = 0
        self.outlier: Any = None  # cluster.outlier.OutlierSettings, set by the snapshot builder
        self.limits = Limits()
        # Metrics shortcuts the REST path fills on first use (telemetry/metrics.py): model ->
        # Cell of the requests this endpoint served, and outcome -> histogram of its tries.
        self.cells: dict = {}
        self.attempts: dict | None = None

    def refresh_health(self) -> None:
        self.healthy = self.checked_ok and not self.ejected

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.name} {self.address} active={self.active})"


class Limits:
    """Circuit-breaker limits of one endpoint (Envoy's defaults)."""

    __slots__ = ("max_connections", "max_pending_requests", "max_requests")

    def __init__(self, max_connections: int = 1024, max_pending_requests: int = 1024,
                 max_requests: int = 1024):
        self.max_connections = max_connections
        self.max_pending_requests = max_pending_requests
        self.max_requests = max_requests

    @classmethod
    def from_proto(cls, msg) -> "Limits":
        get = lambda f: getattr(msg, f).value if msg is not None and msg.HasField(f) else 1024
        return cls(get("max_connections"), get("max_pending_requests"), get("max_requests"))
