import collections
import random

from meshproxy.cluster.balancer import LeastRequest, RandomBalancer, RoundRobin
from meshproxy.cluster.endpoints import Endpoint


def eps(*weights):
    return [Endpoint(f"r{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)]


def test_least_request_prefers_the_less_busy_of_two_draws():
    a, b = eps(1, 1)
    a.active = 5
    lb = LeastRequest([a, b])
    draws = iter([0.1, 0.9])  # draws a, then b
    assert lb.pick(lambda: next(draws)) is b


def test_least_request_spreads_evenly_when_idle():
    endpoints = eps(1, 1, 1, 1)
    lb = LeastRequest(endpoints)
    rnd = random.Random(7).random
    counts = collections.Counter(lb.pick(rnd).name for _ in range(4000))
    assert all(900 < c < 1100 for c in counts.values()), counts


def test_least_request_honours_weights():
    light, heavy = eps(1, 3)
    lb = LeastRequest([light, heavy])
    rnd = random.Random(1).random
    picks = collections.Counter()
    # Keep requests in flight so load matters: heavy should hold about 3x light.
    for _ in range(400):
        e = lb.pick(rnd)
        e.active += 1
        picks[e.name] += 1
    assert 2.3 < heavy.active / light.active < 3.8, (heavy.active, light.active)


def test_unhealthy_and_excluded_endpoints_are_never_picked():
    a, b, c = eps(1, 1, 1)
    a.healthy = False
    for lb in (LeastRequest([a, b, c]), RandomBalancer([a, b, c]), RoundRobin([a, b, c])):
        rnd = random.Random(3).random
        picked = {lb.pick(rnd, exclude=b).name for _ in range(50)}
        assert picked == {"r2"}


def test_nothing_usable_gives_none():
    (a,) = eps(1)
    a.healthy = False
    assert LeastRequest([a]).pick(random.random) is None
    assert RoundRobin([a]).pick(random.random) is None


def test_round_robin_is_smooth_and_weighted():
    a, b = eps(2, 1)
    lb = RoundRobin([a, b])
    assert [lb.pick(random.random).name for _ in range(6)] == ["r0", "r1", "r0"] * 2
