"""Traffic policy end to end: retries, ejection, mirroring, splits, limits, live changes."""

import asyncio
import collections
import itertools
import sys
import time

import aiohttp
import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import (eventually, free_port, ipv6_loopback, proxy_file, rt_yaml,
                                       runtimes)

SUM = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}


def config(*entries: str, routes: str = "", extra: str = "") -> str:
    text = ("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
            "admin: {address: '127.0.0.1:0'}\n" + extra
            + "static_resources:\n  runtimes:\n" + "".join(entries))
    if routes:
        text += "  routes:\n" + "".join("    " + ln + "\n" for ln in routes.strip("\n").splitlines())
    return text


async def infer(s, port, model="sum", headers=None):
    t0 = time.perf_counter()
    async with s.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer", json=SUM,
                      headers=headers or {}) as r:
        body = await r.read()
        return r.status, r.headers, body, time.perf_counter() - t0


def metric(app, name, **labels):
    text = generate_latest(app.metrics.registry).decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                total += smp.value
    return total


async def spawn_runtime(name, models):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshproxy", "runtime", "--name", name, "--models", models,
        "--http-port", "0", "--grpc-port", "none", stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(15):
        line = (await proc.stdout.readline()).decode()
    port = int(line.split("http=127.0.0.1:")[1].split()[0])
    return proc, port


async def test_killing_one_of_three_runtimes_under_load_fails_no_request(tmp_path):
    procs = [await spawn_runtime(f"k{i}", "sum") for i in range(3)]
    try:
        entries = "".join(f"    - name: k{i}\n      http_address: 127.0.0.1:{port}\n"
                          f"      models: [{{name: sum}}]\n" for i, (_, port) in enumerate(procs))
        # With 8 clients, a third of the fleet gone means up to half the requests in flight
        # retry at once until the dead runtime is ejected: more than Envoy's default budget
        # (20%, at least 3) allows, so this route always allows 10 concurrent retries.
        routes = ("- model: sum\n  retry_policy: {retry_on: 'connect-failure,reset,5xx', "
                  "num_retries: 3, budget: {min_retry_concurrency: 10}}")
        async with proxy_file(tmp_path / "p.yaml", config(entries, routes=routes)) as p:
            statuses = collections.Counter()
            done = 0

            async def client(s):
                nonlocal done
                while done < 900:
                    done += 1
                    statuses[(await infer(s, p.http_port))[0]] += 1

            async with aiohttp.ClientSession() as s:
                workers = [asyncio.ensure_future(client(s)) for _ in range(8)]
                await eventually(lambda: done >= 300, timeout=20)
                procs[1][0].kill()  # SIGKILL under load: resets and refused connects follow
                async with asyncio.timeout(60):
                    await asyncio.gather(*workers)
            assert statuses == {200: sum(statuses.values())} and sum(statuses.values()) >= 900
            assert metric(p, "meshproxy_retries_total") >= 1
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_failing_runtime_is_ejected_and_clients_see_no_5xx(tmp_path):
    async with runtimes(("good1", ["sum"]), ("good2", ["sum"])) as good, \
            runtimes(("flaky", ["sum"]), fail_rate=0.5, seed=7) as (flaky,):
        entries = rt_yaml(good[0]) + rt_yaml(good[1]) + rt_yaml(
            flaky, extra="outlier_detection: {consecutive_5xx: 3, base_ejection_time: 30s}\n")
        routes = "- model: sum\n  retry_policy: {retry_on: 5xx, num_retries: 2}"
        async with proxy_file(tmp_path / "p.yaml", config(entries, routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(300)]
            assert [r[0] for r in results] == [200] * 300
            assert metric(p, "meshproxy_outlier_ejections_total", runtime="flaky") >= 1
            assert p.ctx.snapshot.endpoints["flaky"].ejected
            assert metric(p, "meshproxy_retries_total", reason="5xx") >= 1


async def test_hanging_mirror_does_not_delay_primary_responses(tmp_path):
    async with runtimes(("primary", ["sum"])) as (primary,), \
            runtimes(("shadow", ["sum-shadow"]), latency_ms=3000) as (shadow,):
        routes = "- model: sum\n  mirror: {model: sum-shadow, fraction: 1.0, max_concurrent: 4}"
        async with proxy_file(tmp_path / "p.yaml",
                              config(rt_yaml(primary), rt_yaml(shadow), routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(20)]
            assert all(status == 200 for status, *_ in results)
            assert max(r[3] for r in results) < 1.0  # the shadow takes 3 s per copy
            shadow_ep = p.ctx.snapshot.endpoints["shadow"]
            assert 1 <= shadow_ep.active <= 4  # copies are in flight there, capped


async def test_80_20_split_over_2000_requests_lands_within_bound(tmp_path):
    async with runtimes(("v1", ["mnist-v1"]), ("v2", ["mnist-v2"])) as rts:
        routes = ("- model: mnist\n  targets: [{model: mnist-v1, weight: 80}, "
                  "{model: mnist-v2, weight: 20}]")
        async with proxy_file(tmp_path / "p.yaml", config(*map(rt_yaml, rts), routes=routes)) as p:
            served = collections.Counter()
            async with aiohttp.ClientSession() as s:
                async def client(n):
                    for _ in range(n):
                        status, headers, body, _ = await infer(s, p.http_port, "mnist")
                        assert status == 200
                        served[headers["x-meshproxy-upstream"]] += 1
                await asyncio.gather(*(client(250) for _ in range(8)))
            # binomial sd = sqrt(2000 * 0.8 * 0.2) ~ 17.9; allow 5 sd
            assert sum(served.values()) == 2000 and abs(served["v2"] - 400) <= 90, served


async def test_policy_edits_apply_while_traffic_flows(tmp_path):
    async with runtimes(("v1", ["m-v1"]), ("v2", ["m-v2"])) as rts:
        path = tmp_path / "p.yaml"
        route = "- model: m\n  targets: [{model: %s}]"
        async with proxy_file(path, config(*map(rt_yaml, rts), routes=route % "m-v1")) as p:
            async with aiohttp.ClientSession() as s:
                assert (await infer(s, p.http_port, "m"))[1]["x-meshproxy-upstream"] == "v1"
                path.write_text(config(*map(rt_yaml, rts), routes=route % "m-v2"))
                seen = []

                async def now_v2():
                    seen.append((await infer(s, p.http_port, "m"))[1]["x-meshproxy-upstream"])
                    return seen[-1] == "v2"
                async with asyncio.timeout(5):
                    while not await now_v2():
                        pass
                # an invalid edit is refused and the last good version stays
                path.write_text("static_resources: {routes: [{model: m, balancer: fastest}]}\n")
                await eventually(lambda: p.watcher.rejected == 1)
                assert (await infer(s, p.http_port, "m"))[1]["x-meshproxy-upstream"] == "v2"


async def test_per_try_timeout_retries_on_another_runtime(tmp_path):
    async with runtimes(("fast", ["sum"])) as (fast,), \
            runtimes(("slow", ["sum"]), latency_ms=2000) as (slow,):
        routes = ("- model: sum\n  balancer: round_robin\n  retry_policy: {retry_on: 5xx, "
                  "num_retries: 2, per_try_timeout: 0.3s}")
        async with proxy_file(tmp_path / "p.yaml", config(rt_yaml(fast), rt_yaml(slow),
                                                          routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(6)]
            assert [r[1]["x-meshproxy-upstream"] for r in results] == ["fast"] * 6
            assert max(r[3] for r in results) < 1.5
            assert metric(p, "meshproxy_retries_total", reason="per-try-timeout") >= 1


async def test_rate_limit_answers_429_with_retry_after(tmp_path):
    async with runtimes(("r1", ["sum"])) as rts:
        routes = "- model: sum\n  rate_limit: {requests_per_second: 0.5, burst: 2}"
        async with proxy_file(tmp_path / "p.yaml", config(*map(rt_yaml, rts), routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(3)]
        assert [r[0] for r in results] == [200, 200, 429]
        assert results[2][1]["retry-after"] == "2" and b"rate limit" in results[2][2]


async def test_circuit_breaker_answers_503_at_once_instead_of_queueing(tmp_path):
    async with runtimes(("busy", ["sum"]), latency_ms=1000) as (busy,):
        entries = rt_yaml(busy, extra="circuit_breakers: {max_requests: 1}\n")
        async with proxy_file(tmp_path / "p.yaml", config(entries)) as p:
            async with aiohttp.ClientSession() as s:
                first = asyncio.ensure_future(infer(s, p.http_port))
                await eventually(lambda: p.ctx.snapshot.endpoints["busy"].active == 1)
                status, _, body, elapsed = await infer(s, p.http_port)
                assert status == 503 and b"limit" in body and elapsed < 0.5
                assert (await first)[0] == 200


async def test_header_match_routes_to_its_own_target(tmp_path):
    async with runtimes(("stable", ["sum"]), ("canary", ["sum-canary"])) as rts:
        routes = ("- model: sum\n  matches:\n  - headers: [{name: x-canary, exact: '1'}]\n"
                  "    targets: [{model: sum-canary}]")
        async with proxy_file(tmp_path / "p.yaml", config(*map(rt_yaml, rts), routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                _, h1, b1, _ = await infer(s, p.http_port, headers={"x-canary": "1"})
                _, h2, _, _ = await infer(s, p.http_port, headers={"x-canary": "0"})
        assert h1["x-meshproxy-upstream"] == "canary" and b"sum-canary" in b1
        assert h2["x-meshproxy-upstream"] == "stable"


async def test_active_health_check_takes_a_not_ready_runtime_out_and_back(tmp_path):
    async with runtimes(("a", ["sum"]), ("b", ["sum"])) as (a, b):
        check = "health_check: {interval: 0.05s, timeout: 0.5s, unhealthy_threshold: 2}\n"
        async with proxy_file(tmp_path / "p.yaml",
                              config(rt_yaml(a, extra=check), rt_yaml(b, extra=check))) as p:
            ep = p.ctx.snapshot.endpoints["b"]
            await b.stop()  # b stops answering /v2/health/ready
            await eventually(lambda: not ep.healthy)
            async with aiohttp.ClientSession() as s:
                served = {(await infer(s, p.http_port))[1]["x-meshproxy-upstream"] for _ in range(20)}
            assert served == {"a"}
            await b.start()  # back on the same port
            await eventually(lambda: ep.healthy)


async def test_a_runtime_failing_its_health_check_does_not_get_its_last_healthy_peer_ejected(
        tmp_path):
    async with runtimes(("a", ["sum"])) as (a,), \
            runtimes(("b", ["sum"]), fail_rate=0.3, seed=3) as (b,):
        check = "health_check: {interval: 0.05s, timeout: 0.5s, unhealthy_threshold: 2}\n"
        outlier = "outlier_detection: {consecutive_5xx: 2, base_ejection_time: 30s}\n"
        routes = "- model: sum\n  retry_policy: {num_retries: 0}"
        async with proxy_file(tmp_path / "p.yaml", config(
                rt_yaml(a, extra=check), rt_yaml(b, extra=outlier), routes=routes)) as p:
            ea, eb = p.ctx.snapshot.endpoints["a"], p.ctx.snapshot.endpoints["b"]
            await a.stop()  # a is gone; its health check takes it out
            await eventually(lambda: not ea.healthy)
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(60)]
            # b fails 30% of its requests, runs of two included: it is still the one to ask
            assert [r[1].get("x-meshproxy-upstream") for r in results] == ["b"] * 60
            assert collections.Counter(r[0] for r in results)[200] >= 30
            assert not eb.ejected


async def test_when_every_runtime_fails_its_health_check_requests_still_reach_them(tmp_path):
    async with runtimes(("a", ["sum"]), ("b", ["sum"])) as (a, b):
        check = "health_check: {interval: 0.05s, timeout: 0.5s, unhealthy_threshold: 1}\n"
        async with proxy_file(tmp_path / "p.yaml",
                              config(rt_yaml(a, extra=check), rt_yaml(b, extra=check))) as p:
            ea, eb = p.ctx.snapshot.endpoints["a"], p.ctx.snapshot.endpoints["b"]
            a.ready = b.ready = False  # both answer /v2/health/ready 503, and still infer
            await eventually(lambda: not ea.healthy and not eb.healthy)
            async with aiohttp.ClientSession() as s:
                results = [await infer(s, p.http_port) for _ in range(20)]
            # Envoy's panic: with no healthy runtime, balance over all of them
            assert [r[0] for r in results] == [200] * 20
            assert {r[1]["x-meshproxy-upstream"] for r in results} == {"a", "b"}


def _grpc_runtime(*codes):
    """A gRPC runtime whose ModelInfer calls answer `codes` in turn, round and round (None or
    no codes: OK, an empty response)."""
    turn = itertools.cycle(codes or (None,))

    async def infer(request, context):
        code = next(turn)
        if code is not None:
            await context.abort(code, "queue full")
        return b""
    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    return server, server.add_insecure_port("127.0.0.1:0")


async def _grpc_calls_to_busy_and_ok(tmp_path, busy_codes, n, outlier=""):
    """Route model m over a runtime answering `busy_codes` in turn and one answering OK, by
    round robin; make `n` calls. Returns (status names seen, the proxy's ejections)."""
    (busy, busy_port), (ok, ok_port) = _grpc_runtime(*busy_codes), _grpc_runtime()
    await busy.start()
    await ok.start()
    entries = "".join(
        f"    - {{name: {name}, http_address: '127.0.0.1:{free_port()}', "
        f"grpc_address: '127.0.0.1:{port}', models: [{{name: m}}]{outlier}}}\n"
        for name, port in (("busy", busy_port), ("ok", ok_port)))
    seen = collections.Counter()
    try:
        async with proxy_file(tmp_path / "p.yaml", config(
                entries, routes="- {model: m, balancer: round_robin}")) as p, \
                grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(n):
                try:
                    await call(b"\x0a\x01m", timeout=5)
                    seen["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    seen[e.code().name] += 1
            return seen, metric(p, "meshproxy_outlier_ejections_total")
    finally:
        await busy.stop(0)
        await ok.stop(0)


async def test_grpc_load_shedding_and_unimplemented_answers_do_not_eject_a_runtime(tmp_path):
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED):
        # 12 calls, 6 to busy: more than consecutive_5xx (5 by default) in a row
        seen, ejections = await _grpc_calls_to_busy_and_ok(tmp_path, [code], 12)
        # a 4xx-equivalent answer is the runtime's answer, not a failure (as in Envoy)
        assert (seen, ejections) == ({"OK": 6, code.name: 6}, 0)


async def test_grpc_answers_between_failures_end_the_run_so_the_runtime_stays(tmp_path):
    internal, not_found = grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND
    seen, ejections = await _grpc_calls_to_busy_and_ok(
        tmp_path, [internal, internal, not_found], 12,
        outlier=", outlier_detection: {consecutive_5xx: 3}")
    # busy fails 4 of its 6 calls, never 3 in a row: NOT_FOUND answers in between
    assert (seen, ejections) == ({"OK": 6, "INTERNAL": 4, "NOT_FOUND": 2}, 0)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_health_checks_reach_an_ipv6_runtime(tmp_path):
    async with runtimes(("v6", ["sum"]), host="::1") as (rt,):
        entry = (f"    - {{name: v6, http_address: '[::1]:{rt.http_port}', models: [{{name: sum}}], "
                 "health_check: {interval: 0.05s, timeout: 0.5s, unhealthy_threshold: 1}}\n")
        async with proxy_file(tmp_path / "p.yaml", config(entry)) as p:
            ep = p.ctx.snapshot.endpoints["v6"]
            rt.ready = False
            await eventually(lambda: not ep.healthy)
            rt.ready = True  # the check must reach [::1] to see it ready again
            await eventually(lambda: ep.healthy)
            async with aiohttp.ClientSession() as s:
                assert (await infer(s, p.http_port))[0] == 200


async def test_a_table_update_does_not_refill_the_rate_limit_or_reset_the_mirror_cap(tmp_path):
    async with runtimes(("primary", ["sum"])) as (primary,), \
            runtimes(("shadow", ["sum-shadow"]), latency_ms=3000) as (shadow,):
        routes = ("- model: sum\n  rate_limit: {requests_per_second: 0.01, burst: 4}\n"
                  "  mirror: {model: sum-shadow, fraction: 1.0, max_concurrent: 2}")
        async with proxy_file(tmp_path / "p.yaml",
                              config(rt_yaml(primary), rt_yaml(shadow), routes=routes)) as p:
            shadow_ep = p.ctx.snapshot.endpoints["shadow"]
            async with aiohttp.ClientSession() as s:
                first = [(await infer(s, p.http_port))[0] for _ in range(3)]
                assert shadow_ep.active == 2  # copies hang at the shadow, capped
                snap = p.ctx.snapshot
                p.update("same-again", snap.runtimes, snap.routes)  # as any table update
                second = [(await infer(s, p.http_port))[0] for _ in range(3)]
            assert first + second == [200] * 4 + [429] * 2  # one burst of 4 in all
            assert shadow_ep.active == 2
