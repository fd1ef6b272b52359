"""Pure traffic-policy parts with seeded randomness and injected time."""

import collections
import random

import pytest

from meshproxy._proto.meshproxy.v1 import resources_pb2 as pb
from meshproxy.cluster.balancer import LeastRequest, Maglev, RingHash
from meshproxy.cluster.endpoints import Endpoint
from meshproxy.cluster.outlier import OutlierDetector, OutlierSettings
from meshproxy.routing.ratelimit import TokenBucket
from meshproxy.routing.split import HeaderCondition, HeaderRule, Split, first_match
from meshproxy.routing.table import Target
from meshproxy.upstream.retry import RetryBudget, RetryPolicy, from_proto


def target(name, weight):
    return Target(name, None, weight, None, 1.0, True)


def test_split_ratio_within_bound_over_10000_picks():
    split = Split([target("v1", 80), target("v2", 20)])
    rnd = random.Random(42).random
    counts = collections.Counter(split.pick(rnd).model for _ in range(10_000))
    # binomial sd = sqrt(10000 * 0.8 * 0.2) = 40; allow 4.5 sd
    assert abs(counts["v2"] - 2000) <= 180, counts


def test_sticky_split_sends_the_same_user_to_the_same_target():
    split = Split([target("v1", 50), target("v2", 50)], hash_header="x-user")
    rnd = random.Random(1).random
    for user in (b"alice", b"bob", b"carol", b"dave"):
        picks = {split.pick(rnd, lambda n: user if n == "x-user" else None).model
                 for _ in range(20)}
        assert len(picks) == 1
    spread = collections.Counter(
        split.pick(rnd, lambda n, u=str(i).encode(): u).model for i in range(2000))
    assert 850 < spread["v1"] < 1150  # users spread by weight


def headers(**kv):
    data = {k.replace("_", "-"): v.encode() for k, v in kv.items()}
    return lambda name: data.get(name)


def cond(**kw):
    return HeaderCondition(pb.HeaderMatcher(**kw))


def test_header_conditions():
    assert cond(name="X-Env", exact="canary").holds(headers(x_env="canary"))
    assert not cond(name="x-env", exact="canary").holds(headers(x_env="canary2"))
    assert cond(name="x-env", prefix="can").holds(headers(x_env="canary2"))
    assert cond(name="x-env", regex="c[a-z]+y").holds(headers(x_env="canary"))
    assert not cond(name="x-env", regex="c[a-z]+").holds(headers(x_env="canary-1"))  # whole value
    assert cond(name="x-env", present=True).holds(headers(x_env=""))
    assert cond(name="x-env", present=False).holds(headers())
    assert cond(name="x-env", exact="a", invert=True).holds(headers(x_env="b"))


def test_bad_regex_is_refused_at_load():
    with pytest.raises(ValueError, match="regex"):
        cond(name="x", regex="(unclosed")


def test_first_matching_rule_wins_else_default():
    canary, beta, default = (Split([target(n, 1)]) for n in ("canary", "beta", "stable"))
    rules = [HeaderRule([cond(name="x-env", exact="canary")], canary),
             HeaderRule([cond(name="x-env", prefix="c")], beta)]
    pick = lambda h: first_match(rules, default, h).targets[0].model
    assert pick(headers(x_env="canary")) == "canary"
    assert pick(headers(x_env="cobalt")) == "beta"
    assert pick(headers()) == "stable"


def test_retry_conditions_follow_envoy():
    p = from_proto(pb.RetryPolicy(retry_on="5xx"))
    assert p.on_status(500) == "5xx" and p.on_status(404) is None
    assert p.on_failure("reset") and p.on_failure("connect-failure")
    g = from_proto(pb.RetryPolicy(retry_on="gateway-error"))
    assert g.on_status(503) == "gateway-error" and g.on_status(500) is None
    assert g.on_failure("connect-failure") and g.on_failure("reset") is None
    c = from_proto(pb.RetryPolicy(retry_on="retriable-status-codes", retriable_status_codes=[409]))
    assert c.on_status(409) == "status-409" and c.on_status(503) is None
    assert RetryPolicy().on_grpc_status("UNAVAILABLE") == "unavailable"
    with pytest.raises(ValueError, match="retry_on: unknown condition 'sometimes'"):
        from_proto(pb.RetryPolicy(retry_on="5xx,sometimes"))


def test_backoff_is_fully_jittered_and_capped():
    p = RetryPolicy(base_interval=0.025, max_interval=0.25)
    rnd = random.Random(3).random
    for retry in range(1, 10):
        cap = min(0.25, 0.025 * 2 ** (retry - 1))
        waits = [p.backoff(retry, rnd) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits) and max(waits) > cap * 0.8


def test_budget_caps_retries():
    p = RetryPolicy(budget_percent=20.0, min_retry_concurrency=3)
    b = RetryBudget()
    b.active_requests = 100
    b.active_retries = 19
    assert b.allows(p)
    b.active_retries = 20
    assert not b.allows(p)
    b.active_requests, b.active_retries = 2, 2
    assert b.allows(p)  # the minimum always applies
    b.active_retries = 3
    assert not b.allows(p)


def eps(n):
    out = [Endpoint(f"r{i}", "127.0.0.1", 9000 + i) for i in range(n)]
    for e in out:
        e.outlier = OutlierSettings(consecutive_5xx=3, consecutive_gateway_failure=0,
                                    base_ejection_time=30, max_ejection_time=100,
                                    max_ejection_percent=50)
    return out


def test_consecutive_failures_eject_and_the_clock_brings_back():
    a, b = eps(2)
    d = OutlierDetector()
    d.set_clusters([(a, b)])
    assert not d.failure(a, 500, now=0) and not d.failure(a, 500, now=1)
    d.success(a)  # a success resets the count
    assert not d.failure(a, 500, 2) and not d.failure(a, 500, 3)
    assert d.failure(a, 500, 4) and not a.healthy
    assert d.sweep(33.9) == [] and d.sweep(34.0) == [a] and a.healthy
    for t in (40, 41, 42):
        d.failure(a, 503, t)
    assert a.ejected and a.ejected_until == 42 + 60  # second ejection: 2 x base
    for t in (110, 111, 112, 200, 201, 202, 300, 301, 302):
        d.sweep(t)
        d.failure(a, 0, t)
    assert a.ejected_until - 302 == 100  # capped at max_ejection_time


def test_ejection_never_takes_more_than_the_allowed_share():
    a, b, c, e = eps(4)
    d = OutlierDetector()
    d.set_clusters([(a, b, c, e)])
    for x in (a, b, c):
        for t in range(3):
            d.failure(x, 500, t)
    assert [x.ejected for x in (a, b, c)] == [True, True, False]  # 50% of 4
    (only,) = eps(1)
    d.set_clusters([(only,)])
    for t in range(5):
        d.failure(only, 500, t)
    assert not only.ejected  # the last holder of a model is never ejected


def test_token_bucket():
    tb = TokenBucket(rate=2.0, burst=2)
    assert tb.take(0.0) == 0 and tb.take(0.0) == 0
    assert tb.take(0.0) == pytest.approx(0.5)
    assert tb.take(0.5) == 0


def test_hash_balancers_are_consistent_and_move_little_when_one_endpoint_goes():
    four = [Endpoint(f"r{i}", "h", i) for i in range(4)]
    for cls in (RingHash, Maglev):
        before = cls(four)
        after = cls(four[:3])
        keys = [i / 1000 for i in range(1000)]
        moved = sum(1 for k in keys if before.pick(random.random, key=k).name != "r3"
                    and before.pick(random.random, key=k).name != after.pick(random.random, key=k).name)
        assert moved < 100, (cls.__name__, moved)  # only r3's keys should move
        assert before.pick(random.random, key=0.5) is before.pick(random.random, key=0.5)


def test_least_request_prefers_less_loaded():
    a, b = eps(2)
    a.active = 10
    lb = LeastRequest([a, b])
    rnd = random.Random(0).random
    picks = collections.Counter(lb.pick(rnd).name for _ in range(1000))
    assert picks["r1"] > 700  # b wins every draw that sees both


def test_health_state_needs_thresholds_in_a_row():
    from meshproxy.cluster.health import HealthSettings, HealthState
    s = HealthState(HealthSettings(unhealthy_threshold=2, healthy_threshold=3))
    assert not s.record(False) and s.healthy  # one failure is not enough
    assert not s.record(True) and not s.record(False) and s.healthy  # the run was broken
    assert s.record(False) and not s.healthy
    assert not s.record(True) and not s.record(True) and not s.healthy
    assert s.record(True) and s.healthy


def test_a_missing_header_matches_no_value_matcher_even_inverted():
    for kind, value in (("exact", "prod"), ("prefix", "pro"), ("regex", "prod|live")):
        non_prod = cond(name="x-env", invert=True, **{kind: value})
        assert non_prod.holds(headers(x_env="staging")), kind
        assert not non_prod.holds(headers(x_env="prod")), kind
        assert not non_prod.holds(headers()), kind  # as Envoy: no header, no match
    assert cond(name="x-env", present=True, invert=True).holds(headers())
    assert not cond(name="x-env", present=True, invert=True).holds(headers(x_env="a"))
    assert cond(name="x-env", present=False, invert=True).holds(headers(x_env="a"))
    rules = [HeaderRule([cond(name="x-env", exact="prod", invert=True)], Split([target("test", 1)]))]
    default = Split([target("stable", 1)])
    assert first_match(rules, default, headers()).targets[0].model == "stable"
    assert first_match(rules, default, headers(x_env="dev")).targets[0].model == "test"


def test_the_last_healthy_holder_is_not_ejected_while_its_peer_fails_health_checks():
    a, b = eps(2)
    d = OutlierDetector()
    d.set_clusters([(a, b)])
    a.checked_ok = False  # the active health check took a out
    a.refresh_health()
    for t in range(5):
        assert not d.failure(b, 500, t)
    assert b.healthy and not b.ejected  # b still answers some requests; none would be worse
    a.checked_ok = True
    a.refresh_health()
    for t in range(3):
        d.failure(b, 500, 10 + t)
    assert b.ejected  # with a healthy again, b's next run of failures ejects it


def test_answers_below_500_do_not_count_and_end_a_run_of_failures():
    a, b = eps(2)
    d = OutlierDetector()
    d.set_clusters([(a, b)])
    for t in range(10):
        assert not d.failure(a, 429, t)  # load shedding (gRPC RESOURCE_EXHAUSTED) is an answer
    assert not d.failure(a, 500, 10) and not d.failure(a, 503, 11)
    d.failure(a, 404, 12)  # resets the run, as a success does
    assert not d.failure(a, 500, 13) and not d.failure(a, 500, 14)
    assert a.healthy and d.ejections_total == 0
    assert d.failure(a, 0, 15) and a.ejected  # the third failure in a row


def test_an_ejected_endpoint_left_as_the_only_holder_still_takes_requests():
    x, y = eps(2)
    d = OutlierDetector()
    d.set_clusters([(x, y)])
    for t in range(3):
        d.failure(x, 503, t)
    assert x.ejected
    d.set_clusters([(x,)])  # a table update: y no longer holds the model
    assert LeastRequest([x]).pick(random.random) is x  # panic, until the ejection ends


def test_health_check_url_brackets_an_ipv6_host():
    from meshproxy.cluster.health import ready_url
    assert str(ready_url(Endpoint("v6", "::1", 8000))) == "http://[::1]:8000/v2/health/ready"
    assert str(ready_url(Endpoint("v4", "10.0.0.7", 8000))) == "http://10.0.0.7:8000/v2/health/ready"
