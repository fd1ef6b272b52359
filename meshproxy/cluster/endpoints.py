"""Endpoint: one runtime as the data plane sees it, with the counters balancers read."""

from __future__ import annotations

from typing import Any


class Endpoint:
    """A runtime's REST endpoint. Lives across snapshots so its counters and pool survive updates.

    `active` is the number of requests in flight to it (least-request reads it);
    `healthy` is cleared by health checks and outlier ejection (later issues).
    """

    __slots__ = ("name", "host", "port", "weight", "active", "healthy", "pool", "served_header",
                 "total")

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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"Endpoint({self.name} {self.address} active={self.active})"
