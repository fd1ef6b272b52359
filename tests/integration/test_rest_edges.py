"""REST edges a user meets in operation: runtimes that hang, mirrored copies of odd requests,
and what the access log and metrics say about requests that did not end normally."""

import collections

import aiohttp

from tests.integration.harness import proxy_file, rt_yaml, runtimes
from tests.integration.test_traffic_policy import SUM, config, infer, metric


async def test_a_runtime_that_hangs_past_the_route_timeout_is_ejected(tmp_path):
    # No per_try_timeout (the default): each request to the hung runtime ends at the route
    # timeout. Those are gateway failures for outlier detection, as in Envoy, so after two
    # the runtime is ejected and the rest of the requests are answered by the other one.
    async with runtimes(("fast", ["sum"])) as (fast,), \
            runtimes(("hung", ["sum"]), latency_ms=5000) as (hung,):
        entries = rt_yaml(fast) + rt_yaml(
            hung, extra="outlier_detection: {consecutive_gateway_failure: 2}\n")
        routes = "- {model: sum, balancer: round_robin, timeout: 0.3s}"
        async with proxy_file(tmp_path / "p.yaml", config(entries, routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                statuses = [(await infer(s, p.http_port))[0] for _ in range(16)]
            assert p.ctx.snapshot.endpoints["hung"].ejected
            assert statuses.count(504) == 2, collections.Counter(statuses)
            assert statuses[-8:] == [200] * 8
            assert metric(p, "meshproxy_outlier_ejections_total", runtime="hung") == 1
