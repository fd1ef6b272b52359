import collections
import random

from meshproxy.cluster.balancer import BALANCERS, LeastRequest, RandomBalancer, RoundRobin
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
    # Requests pile up, so load counts against the weights: heavy holds more, light catches up
    # (about 1.3x at choice_count 2; Envoy's weight / (active + 1) gives about 1.9x).
    for _ in range(400):
        lb.pick(rnd).active += 1
    assert 1.15 < heavy.active / light.active < 2.0, (heavy.active, light.active)


def test_unhealthy_and_excluded_endpoints_are_never_picked():
    a, b, c = eps(1, 1, 1)
    a.healthy = False
    for lb in (LeastRequest([a, b, c]), RandomBalancer([a, b, c]), RoundRobin([a, b, c])):
        rnd = random.Random(3).random
        picked = {lb.pick(rnd, exclude=b).name for _ in range(50)}
        assert picked == {"r2"}


def test_a_lone_endpoint_is_picked_even_unhealthy_and_none_only_when_excluded():
    # Panic at 0 healthy (Envoy would route to it too): an answer that may fail beats none.
    for name, balancer in BALANCERS.items():
        (a,) = eps(1)
        a.healthy = False
        lb = balancer([a])
        assert lb.pick(random.random) is a, name
        assert lb.pick(random.random, exclude=a) is None, name


def test_round_robin_is_smooth_and_weighted():
    a, b = eps(2, 1)
    lb = RoundRobin([a, b])
    assert [lb.pick(random.random).name for _ in range(6)] == ["r0", "r1", "r0"] * 2


def test_least_request_idle_picks_follow_the_weights():
    for weights in ((1, 3), (1, 2, 3), (1, 1, 4)):
        endpoints = eps(*weights)
        for choice_count in (2, 5):
            lb = LeastRequest(endpoints, choice_count=choice_count)
            rnd = random.Random(5).random
            counts = collections.Counter(lb.pick(rnd).name for _ in range(20_000))
            for e in endpoints:  # binomial sd <= sqrt(20000 / 4) ~ 71 picks; allow about 5 sd
                expected = 20_000 * e.weight / sum(weights)
                assert abs(counts[e.name] - expected) < 360, (weights, choice_count, counts)


def test_with_no_healthy_endpoint_every_balancer_picks_among_all_but_the_excluded():
    for name, balancer in BALANCERS.items():
        a, b, c = eps(1, 1, 1)
        lb = balancer([a, b, c])
        for e in (a, b, c):
            e.healthy = False
        rnd = random.Random(11).random
        assert {lb.pick(rnd).name for _ in range(200)} == {"r0", "r1", "r2"}, name
        assert {lb.pick(rnd, exclude=b).name for _ in range(200)} == {"r0", "r2"}, name
        c.healthy = True  # one healthy again: only it takes traffic, no panic
        assert {lb.pick(rnd).name for _ in range(200)} == {"r2"}, name
        assert lb.pick(rnd, exclude=c) is None, name  # a retry may take c again, not a or b
