"""Load balancers: pick one endpoint of a cluster. Picked by name from BALANCERS at load time."""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, Protocol, Sequence

from meshproxy.cluster.endpoints import Endpoint

Random = Callable[[], float]  # random.random, or a fake in tests


class LoadBalancer(Protocol):
    def pick(self, rnd: Random, exclude: Endpoint | None = None) -> Endpoint | None:
        """A healthy endpoint other than `exclude`, or None when there is none."""


class _Weighted:
    """Draws endpoints at random in proportion to their weights."""

    def __init__(self, endpoints: Sequence[Endpoint]):
        self.endpoints = tuple(endpoints)
        weights = [e.weight for e in self.endpoints]
        self._equal = len(set(weights)) <= 1
        self._cumulative = list(itertools.accumulate(weights))
        self._total = self._cumulative[-1] if weights else 0

    def _draw(self, rnd: Random) -> Endpoint:
        if self._equal:
            return self.endpoints[int(rnd() * len(self.endpoints))]
        return self.endpoints[bisect.bisect_right(self._cumulative, rnd() * self._total)]

    def _fallback(self, exclude: Endpoint | None, key) -> Endpoint | None:
        usable = [e for e in self.endpoints if e.healthy and e is not exclude]
        return min(usable, key=key) if usable else None


def _load(e: Endpoint) -> float:
    return (e.active + 1) / e.weight


class LeastRequest(_Weighted):
    """Power of `choice_count` choices: draw that many by weight, keep the least loaded.

    Load is (active + 1) / weight, so a heavier endpoint takes proportionally more
    concurrent requests. When the draws find nothing usable, a scan picks the least loaded.
    """

    def __init__(self, endpoints: Sequence[Endpoint], choice_count: int = 2):
        super().__init__(endpoints)
        self.choice_count = choice_count

    def pick(self, rnd: Random, exclude: Endpoint | None = None) -> Endpoint | None:
        eps = self.endpoints
        if len(eps) == 1:
            e = eps[0]
            return e if e.healthy and e is not exclude else None
        best = None
        for _ in range(self.choice_count):
            e = self._draw(rnd)
            if e.healthy and e is not exclude and (
                    best is None or (e.active + 1) * best.weight < (best.active + 1) * e.weight):
                best = e
        return best if best is not None else self._fallback(exclude, _load)


class RandomBalancer(_Weighted):
    def pick(self, rnd: Random, exclude: Endpoint | None = None) -> Endpoint | None:
        if self.endpoints:
            e = self._draw(rnd)
            if e.healthy and e is not exclude:
                return e
        return self._fallback(exclude, lambda e: rnd())


class RoundRobin:
    """Smooth weighted round robin (each pick raises every current weight by its weight)."""

    def __init__(self, endpoints: Sequence[Endpoint]):
        self.endpoints = tuple(endpoints)
        self._current = [0] * len(self.endpoints)

    def pick(self, rnd: Random, exclude: Endpoint | None = None) -> Endpoint | None:
        best_i = -1
        total = 0
        for i, e in enumerate(self.endpoints):
            if not e.healthy or e is exclude:
                continue
            self._current[i] += e.weight
            total += e.weight
            if best_i < 0 or self._current[i] > self._current[best_i]:
                best_i = i
        if best_i < 0:
            return None
        self._current[best_i] -= total
        return self.endpoints[best_i]


BALANCERS: dict[str, Callable[[Sequence[Endpoint]], LoadBalancer]] = {
    "least_request": LeastRequest,
    "round_robin": RoundRobin,
    "random": RandomBalancer,
}
DEFAULT_BALANCER = "least_request"
