"""Traffic policy end to end: retries, ejection, mirroring, splits, limits, live changes."""

import asyncio
import collections
import sys
import time

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import eventually, proxy_file, rt_yaml, runtimes

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
