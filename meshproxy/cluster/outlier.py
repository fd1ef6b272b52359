"""Outlier detection: consecutive failures eject an endpoint for a while (pure, clock passed in).

How it works: every finished try reports success or failure for its endpoint.
A success, or any answer below 500, resets the endpoint's consecutive counters
(as in Envoy, a 4xx never counts); a 5xx, connect failure, reset or timeout
raises them. When a counter reaches its threshold the endpoint is ejected for
base_ejection_time x times ejected (capped at max_ejection_time), unless that
would leave a model it serves with no healthy endpoint (peers failing their
health check count as unhealthy, not only ejected ones), or eject more than
max_ejection_percent of the endpoints of some model it serves (one ejection is
always allowed when the model has two or more). `sweep(now)` returns endpoints
whose time is up.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.cluster.endpoints import Endpoint


@dataclasses.dataclass(frozen=True)
class OutlierSettings:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


def settings_from_proto(msg: resources_pb2.OutlierDetection | None) -> OutlierSettings:
    base = OutlierSettings()
    if msg is None:
        return base
    def seconds(field, default):
        return getattr(msg, field).ToNanoseconds() / 1e9 if msg.HasField(field) else default
    def count(field, default):
        return getattr(msg, field).value if msg.HasField(field) else default
    return OutlierSettings(
        consecutive_5xx=count("consecutive_5xx", base.consecutive_5xx),
        consecutive_gateway_failure=count("consecutive_gateway_failure",
                                          base.consecutive_gateway_failure),
        base_ejection_time=seconds("base_ejection_time", base.base_ejection_time),
        max_ejection_time=seconds("max_ejection_time", base.max_ejection_time),
        max_ejection_percent=count("max_ejection_percent", base.max_ejection_percent),
    )


GATEWAY_STATUSES = frozenset((502, 503, 504))


class OutlierDetector:
    """Tracks failures per endpoint and ejects; `peers(e)` gives the endpoint sets e belongs to."""

    def __init__(self) -> None:
        self.peers: dict[Endpoint, list[tuple[Endpoint, ...]]] = {}
        self.ejected: set[Endpoint] = set()
        self.ejections_total = 0

    def set_clusters(self, clusters: Iterable[tuple[Endpoint, ...]]) -> None:
        """The endpoint sets (one per model) that bound how many may be ejected at once."""
        peers: dict[Endpoint, list[tuple[Endpoint, ...]]] = {}
        for eps in clusters:
            for e in eps:
                peers.setdefault(e, []).append(eps)
        self.peers = peers

    def success(self, e: Endpoint) -> None:
        e.failures_5xx = e.failures_gateway = 0

    def failure(self, e: Endpoint, status: int, now: float) -> bool:
        """Count a failed try (status 0: no response at all). True when it ejected `e`.
        A status below 500 is not a failure: it resets the counters as a success does."""
        if 0 < status < 500:
            self.success(e)
            return False
        s = e.outlier
        e.failures_5xx += 1
        if status == 0 or status in GATEWAY_STATUSES:
            e.failures_gateway += 1
        over = ((s.consecutive_5xx and e.failures_5xx >= s.consecutive_5xx)
                or (s.consecutive_gateway_failure
                    and e.failures_gateway >= s.consecutive_gateway_failure))
        if over and not e.ejected and self._may_eject(e):
            self._eject(e, now)
            return True
        return False

    def _may_eject(self, e: Endpoint) -> bool:
        for eps in self.peers.get(e, ()):
            if not any(p.healthy for p in eps if p is not e):
                return False  # e is the model's last healthy holder: failing answers beat none
            ejected = sum(1 for p in eps if p.ejected)
            if ejected >= 1 and (ejected + 1) * 100 > e.outlier.max_ejection_percent * len(eps):
                return False
        return True

    def _eject(self, e: Endpoint, now: float) -> None:
        e.times_ejected += 1
        s = e.outlier
        e.ejected_until = now + min(s.base_ejection_time * e.times_ejected, s.max_ejection_time)
        e.ejected = True
        e.refresh_health()
        e.failures_5xx = e.failures_gateway = 0
        self.ejected.add(e)
        self.ejections_total += 1

    def sweep(self, now: float) -> list[Endpoint]:
        """Bring back endpoints whose ejection is over; return them."""
        back = [e for e in self.ejected if e.ejected_until <= now]
        for e in back:
            e.ejected = False
            e.refresh_health()
            self.ejected.discard(e)
        return back
