"""Load balancers: pick one endpoint of a cluster. Picked by name from BALANCERS at load time.

Panic: when none of a balancer's endpoints is healthy, it picks among all of them (other than
`exclude`), by its own rule, instead of answering none. This is Envoy's panic mode at its
extreme: Envoy's default healthy_panic_threshold is 50% (under half healthy, it balances over
all hosts); meshproxy panics only at 0 healthy, so a partly healthy cluster keeps its traffic
on the healthy endpoints. Like Envoy's, panic is a state of the cluster, not of one pick: when
the only healthy endpoint is `exclude` (a retry, a full endpoint), the answer is None and the
caller may take that one again rather than an unhealthy one.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from typing import Callable, Protocol, Sequence

from meshproxy.cluster.endpoints import Endpoint

Random = Callable[[], float]  # random.random, or a fake in tests


class LoadBalancer(Protocol):
    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        """A healthy endpoint other than `exclude`, or None when there is none; when no
        endpoint at all is healthy, any other than `exclude` (panic).

        `key` in [0, 1) is a request's hash (ring_hash, maglev); others ignore it.
        """


class _Weighted:
    """Draws endpoints at random in proportion to their weights."""

    def __init__(self, endpoints: Sequence[Endpoint], **_options):
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
        usable = _usable(self.endpoints, exclude)
        return min(usable, key=key) if usable else None


def _usable(endpoints: Sequence[Endpoint], exclude: Endpoint | None) -> list[Endpoint]:
    """The healthy endpoints other than `exclude`; when none is healthy, all others (panic)."""
    if not any(e.healthy for e in endpoints):
        return [e for e in endpoints if e is not exclude]
    return [e for e in endpoints if e.healthy and e is not exclude]


class LeastRequest(_Weighted):
    """Power of `choice_count` choices: draw that many by weight, keep the one with the fewest
    requests in flight (ties keep the first drawn).

    The weight acts once, in the draw: idle endpoints (every tie) take traffic in proportion
    to their weights, for any number of endpoints; under load the fewer-in-flight rule moves
    traffic off busy ones. When the draws find nothing usable, a scan picks the least busy
    (ties at random).
    """

    def __init__(self, endpoints: Sequence[Endpoint], choice_count: int = 2, **_options):
        super().__init__(endpoints)
        self.choice_count = max(1, choice_count)

    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        eps = self.endpoints
        if len(eps) == 1:
            e = eps[0]
            return e if e is not exclude else None  # healthy, or the only one there is (panic)
        best = None
        for _ in range(self.choice_count):
            e = self._draw(rnd)
            if e.healthy and e is not exclude and (best is None or e.active < best.active):
                best = e
        return best if best is not None else self._fallback(exclude, lambda e: (e.active, rnd()))


class RandomBalancer(_Weighted):
    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        if self.endpoints:
            e = self._draw(rnd)
            if e.healthy and e is not exclude:
                return e
        return self._fallback(exclude, lambda e: rnd())


class RoundRobin:
    """Smooth weighted round robin (each pick raises every current weight by its weight)."""

    def __init__(self, endpoints: Sequence[Endpoint], **_options):
        self.endpoints = tuple(endpoints)
        self._current = [0] * len(self.endpoints)

    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        e = self._step(exclude, True)
        if e is None and not any(x.healthy for x in self.endpoints):
            e = self._step(exclude, False)  # panic
        return e

    def _step(self, exclude: Endpoint | None, healthy_only: bool) -> Endpoint | None:
        best_i = -1
        total = 0
        for i, e in enumerate(self.endpoints):
            if (healthy_only and not e.healthy) or e is exclude:
                continue
            self._current[i] += e.weight
            total += e.weight
            if best_i < 0 or self._current[i] > self._current[best_i]:
                best_i = i
        if best_i < 0:
            return None
        self._current[best_i] -= total
        return self.endpoints[best_i]


def _point(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


class RingHash:
    """Consistent hashing on a ring: each endpoint owns weight x 64 points; a request's key
    lands on the next point. Removing an endpoint moves only the keys it owned."""

    POINTS_PER_WEIGHT = 64

    def __init__(self, endpoints: Sequence[Endpoint], **_options):
        self.endpoints = tuple(endpoints)
        ring = sorted((_point(f"{e.name}#{i}"), e) for e in self.endpoints
                      for i in range(e.weight * self.POINTS_PER_WEIGHT))
        self._hashes = [h for h, _ in ring]
        self._owners = [e for _, e in ring]

    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        if not self._owners:
            return None
        start = bisect.bisect_left(self._hashes, int((rnd() if key is None else key) * 2 ** 64))
        n = len(self._owners)
        for i in range(n):
            e = self._owners[(start + i) % n]
            if e.healthy and e is not exclude:
                return e
        if any(e.healthy for e in self.endpoints):
            return None
        for i in range(n):  # panic: the next owner other than `exclude`
            e = self._owners[(start + i) % n]
            if e is not exclude:
                return e
        return None


class Maglev:
    """Maglev lookup table (65537 slots filled by each endpoint's permutation, by weight):
    even spread and minimal disruption, one index per pick."""

    TABLE_SIZE = 65537  # prime

    def __init__(self, endpoints: Sequence[Endpoint], **_options):
        self.endpoints = tuple(endpoints)
        self._table: list[Endpoint] = self._build() if self.endpoints else []

    def _build(self) -> list[Endpoint]:
        m = self.TABLE_SIZE
        perms = [(_point(e.name + "/offset") % m, _point(e.name + "/skip") % (m - 1) + 1)
                 for e in self.endpoints]
        nxt = [0] * len(self.endpoints)
        table: list[Endpoint | None] = [None] * m
        filled = 0
        max_w = max(e.weight for e in self.endpoints)
        credit = [0.0] * len(self.endpoints)
        while filled < m:
            for i, e in enumerate(self.endpoints):
                credit[i] += e.weight / max_w
                if credit[i] < 1:
                    continue
                credit[i] -= 1
                offset, skip = perms[i]
                while True:
                    slot = (offset + nxt[i] * skip) % m
                    nxt[i] += 1
                    if table[slot] is None:
                        table[slot] = e
                        filled += 1
                        break
                if filled == m:
                    break
        return table  # type: ignore[return-value]

    def pick(self, rnd: Random, exclude: Endpoint | None = None,
             key: float | None = None) -> Endpoint | None:
        if not self._table:
            return None
        slot = int((rnd() if key is None else key) * self.TABLE_SIZE)
        e = self._table[slot]
        if e.healthy and e is not exclude:
            return e
        usable = _usable(self.endpoints, exclude)
        if not usable:
            return None
        if not usable[0].healthy and e is not exclude:
            return e  # panic: the slot's own owner, so keys keep their endpoint
        return usable[slot % len(usable)]


BALANCERS: dict[str, Callable[..., LoadBalancer]] = {
    "least_request": LeastRequest,
    "round_robin": RoundRobin,
    "random": RandomBalancer,
    "ring_hash": RingHash,
    "maglev": Maglev,
}
DEFAULT_BALANCER = "least_request"
