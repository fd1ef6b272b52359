"""The control plane end to end: devtools runtimes, a control plane, proxies on ADS streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import socket
import sys
import textwrap

import aiohttp
import pytest

from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.app import ProxyApp
from meshproxy.config import load_text as load_proxy
from meshproxy.control.app import ControlPlaneApp
from meshproxy.control.config import load_file as load_cp_file, load_text as load_cp
from meshproxy.devtools.runtime import DevRuntime, RuntimeOptions
from meshproxy.discovery.state import RUNTIME_TYPE
from tests.integration.harness import eventually, free_port, runtimes

POLL = 0.2
GRACE = 0.6
BODY = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}


def cp_yaml(rts, port: int = 0, extra: str = "") -> str:
    lines = [f"grpc_address: 127.0.0.1:{port}", "admin_address: 127.0.0.1:0",
             "watch_interval: 0.1s",
             "registration: {heartbeat_interval: 0.1s, grace: %ss}" % GRACE,
             "discovery:", f"  poll_interval: {POLL}s", f"  grace: {GRACE}s", "  runtimes:"]
    lines += [f"    - {{name: {rt.name}, http_address: '127.0.0.1:{rt.http_port}', dialect: TRITON}}"
              for rt in rts]
    return "\n".join(lines) + "\n" + textwrap.dedent(extra)


@contextlib.asynccontextmanager
async def control_plane(text: str, path=None):
    if path is not None:
        path.write_text(text)
    cp = ControlPlaneApp(load_cp_file(str(path)) if path else load_cp(text),
                         str(path) if path else None)
    await cp.start()
    try:
        yield cp
    finally:
        await cp.stop()


@contextlib.asynccontextmanager
async def proxies(cp_port: int, protocols=("DELTA", "STATE_OF_THE_WORLD"), extra: str = ""):
    apps = []
    try:
        for i, protocol in enumerate(protocols):
            app = ProxyApp(load_proxy(
                f"node: {{id: proxy-{i}, cluster: test}}\n"
                "listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\nadmin: {address: '127.0.0.1:0'}\n"
                f"dynamic_resources:\n  ads_addresses: ['127.0.0.1:{cp_port}']\n"
                f"  protocol: {protocol}\n"
                + ("" if "initial_backoff" in extra else "  initial_backoff: 0.1s\n")
                + ("" if "max_backoff" in extra else "  max_backoff: 0.4s\n")
                + textwrap.indent(textwrap.dedent(extra), "  ")))
            await app.start()
            apps.append(app)
        yield apps
    finally:
        for app in apps:
            await app.stop()


def routes(app: ProxyApp, model: str) -> set[str]:
    """The runtimes in `app`'s snapshot holding `model` READY (empty: not routable, or the
    proxy's ports are not listening yet: its first table is still incomplete)."""
    if not app.serving:
        return set()
    return {rt.name for rt in app.ctx.snapshot.runtimes
            if any(m.name == model and m.state == 0 for m in rt.models)}


async def infer(session, app: ProxyApp, model: str):
    async with session.post(f"http://127.0.0.1:{app.http_port}/v2/models/{model}/infer",
                            json=BODY) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-meshproxy-upstream")


async def admin_json(port: int, path: str):
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as resp:
        return await resp.json()


async def test_a_loaded_model_is_routed_by_every_proxy_within_poll_interval_and_200ms():
    async with runtimes(("r1", ["mnist"]), ("r2", ["sum"])) as (r1, r2), \
            runtimes(("r3", ["identity"]), latency_ms=300) as (r3,), \
            control_plane(cp_yaml([r1, r2, r3])) as cp, proxies(cp.grpc_port) as apps:
        await eventually(lambda: all(routes(a, "identity") == {"r3"} for a in apps), timeout=10)
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{r1.http_port}/v2/repository/models/sum/load"):
                pass
            loaded = loop.time()
            await eventually(lambda: all(routes(a, "sum") == {"r1", "r2"} for a in apps),
                             timeout=POLL + 0.2, interval=0.005)
            print(f"propagation {1000 * (loop.time() - loaded):.0f} ms")
            served = {await infer(s, a, "sum") for a in apps for _ in range(20)}
            assert served == {(200, "r1"), (200, "r2")}

            # Unloaded: no longer routed; a request in flight on it still finishes.
            inflight = asyncio.ensure_future(asyncio.gather(*(
                infer(s, apps[0], "identity") for _ in range(3))))
            await eventually(lambda: apps[0].registry.endpoints["r3"].active == 3, timeout=2)
            async with s.post(f"http://127.0.0.1:{r3.http_port}/v2/repository/models/identity/unload"):
                pass
            await eventually(lambda: all(routes(a, "identity") == set() for a in apps), timeout=2)
            assert {await infer(s, a, "identity") for a in apps} == {(404, None)}
            assert await inflight == [(200, "r3")] * 3

        proxies_view = await admin_json(cp.admin_port, "/proxies")
        assert sorted(p["node_id"] for p in proxies_view["proxies"]) == ["proxy-0", "proxy-1"]
        for p in proxies_view["proxies"]:
            rt_status = p["types"][RUNTIME_TYPE]
            assert rt_status["acked_version"] == cp.cache.get(RUNTIME_TYPE).version
            assert rt_status["nacks"] == 0


async def test_a_runtime_that_stops_answering_loses_its_models_after_the_grace():
    async with runtimes(("r1", ["identity"]), ("r2", ["sum"])) as (r1, r2), \
            control_plane(cp_yaml([r1, r2])) as cp, proxies(cp.grpc_port) as apps:
        await eventually(lambda: all(routes(a, "sum") == {"r2"} for a in apps), timeout=10)
        loop = asyncio.get_running_loop()
        port = r2.http_port
        await r2.stop()
        stopped = loop.time()
        await eventually(lambda: all(routes(a, "sum") == set() for a in apps), timeout=GRACE + 2)
        # The last answer came at most one poll before the stop, so never before grace - poll.
        assert loop.time() - stopped >= GRACE - POLL - 0.05
        assert all(routes(a, "identity") == {"r1"} for a in apps)

        back = DevRuntime(RuntimeOptions(name="r2", models=["sum"], http_port=port, grpc_port=None))
        await back.start()
        try:
            await eventually(lambda: all(routes(a, "sum") == {"r2"} for a in apps), timeout=2)
        finally:
            await back.stop()


async def proxies_view(admin_port: int, predicate, timeout: float = 10.0) -> list:
    """/proxies of a control plane, polled until `predicate(rows)` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            rows = (await admin_json(admin_port, "/proxies"))["proxies"]
            if predicate(rows):
                return rows
        except aiohttp.ClientError:
            pass
        assert asyncio.get_running_loop().time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def control_plane_process(text: str, tmp_path):
    """`meshproxy control-plane` as a real process; yields it once it printed its ready line."""
    path = tmp_path / "cp.yaml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshproxy", "--log-level", "warning", "control-plane", "-c",
        str(path), stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"ready" in line, line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_control_plane_killed_under_load_fails_no_request_and_proxies_resync(tmp_path):
    async with runtimes(("r1", ["identity", "sum"]), ("r2", ["sum"])) as (r1, r2):
        port, admin = free_port(), free_port()
        text = cp_yaml([r1, r2], port=port).replace("admin_address: 127.0.0.1:0",
                                                    f"admin_address: 127.0.0.1:{admin}")
        async with control_plane_process(text, tmp_path) as cp, proxies(port) as apps:
            await eventually(lambda: all(routes(a, "sum") == {"r1", "r2"} for a in apps), 10)
            results: list[int] = []
            stop = asyncio.Event()

            async def load(app):
                async with aiohttp.ClientSession() as s:
                    while not stop.is_set():
                        results.append((await infer(s, app, "sum"))[0])

            drivers = [asyncio.ensure_future(load(a)) for a in apps for _ in range(2)]
            try:
                # deadlines are generous: a loaded CI machine is slow, a correct one is fast
                await eventually(lambda: len(results) > 20, timeout=15)
                cp.kill()
                await cp.wait()
                await eventually(lambda: all(a.discovery.connected_to is None for a in apps), 15)
                during = len(results)
                await eventually(lambda: len(results) > during + 50, timeout=15)
                async with control_plane_process(text, tmp_path):
                    view = await proxies_view(admin, lambda v: len(v) == 2 and all(
                        RUNTIME_TYPE in p["types"] for p in v))
                    # Delta resubscribed with what it held and was sent none of it again (the
                    # empty routes type, which it holds nothing of, gets an empty response)
                    delta = [p for p in view if p["protocol"] == "delta"]
                    assert len(delta) == 1 and delta[0]["responses"] <= 1
                    assert delta[0]["types"][RUNTIME_TYPE]["sent_nonce"] == ""
                    async with aiohttp.ClientSession() as s:
                        async with s.post(f"http://127.0.0.1:{r2.http_port}"
                                          "/v2/repository/models/identity/load"):
                            pass
                    await eventually(lambda: all(routes(a, "identity") == {"r1", "r2"}
                                                 for a in apps), timeout=10)
            finally:
                stop.set()
                await asyncio.gather(*drivers)
        assert len(results) > 100
        assert set(results) == {200}, \
            f"{len(results) - results.count(200)} failed: {collections.Counter(results)}"


@pytest.mark.parametrize("protocol", ["DELTA", "STATE_OF_THE_WORLD"])
async def test_an_invalid_resource_is_nacked_and_traffic_stays_on_the_old_snapshot(protocol):
    async with runtimes(("r1", ["sum"])) as (r1,), control_plane(cp_yaml([r1])) as cp, \
            proxies(cp.grpc_port, [protocol]) as (app,):
        await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
        good = list(cp.cache.get(RUNTIME_TYPE).entries.values())
        bad = resources_pb2.Runtime(name="broken", http_address="nowhere")
        cp.cache.set_resources(RUNTIME_TYPE, [e.message for e in good] + [bad])
        await eventually(lambda: app.discovery.state.types[RUNTIME_TYPE].last_nack is not None, 5)
        nack = app.discovery.state.types[RUNTIME_TYPE].last_nack
        assert "broken" in nack.message and "http_address" in nack.message
        async with aiohttp.ClientSession() as s:
            assert {await infer(s, app, "sum") for _ in range(10)} == {(200, "r1")}
        await eventually(lambda: any(st.types[RUNTIME_TYPE].nacks == 1
                                     for st in cp.proxies.statuses.values()), timeout=2)
        view = (await admin_json(cp.admin_port, "/proxies"))["proxies"][0]["types"][RUNTIME_TYPE]
        assert view["nacks"] == 1 and "broken" in view["last_nack"]
        xds = await admin_json(app.admin_port, "/xds")
        assert "broken" in xds["types"][RUNTIME_TYPE]["last_nack"]["message"]

        cp.publish()  # the table without the bad resource: accepted again
        await eventually(lambda: any(st.types[RUNTIME_TYPE].acked_version
                                     == cp.cache.get(RUNTIME_TYPE).version
                                     for st in cp.proxies.statuses.values()), timeout=2)
        assert routes(app, "sum") == {"r1"}


@pytest.mark.parametrize("protocol", ["DELTA", "STATE_OF_THE_WORLD"])
async def test_a_push_the_proxy_fails_to_apply_is_nacked_and_not_taken_as_held(protocol):
    # A bug while putting a valid push in force (validation passed) must not leave the proxy
    # believing it holds what it never applied: it NACKs and serves the last table, and on a
    # new stream it is sent the resources again instead of claiming to hold them.
    late = resources_pb2.Runtime(name="late", http_address="127.0.0.1:1",
                                 models=[resources_pb2.LoadedModel(name="late-model")])

    def with_late(cp):
        good = [e.message for e in cp.cache.get(RUNTIME_TYPE).entries.values()]
        cp.cache.set_resources(RUNTIME_TYPE, good + [late])

    port = free_port()
    async with runtimes(("r1", ["sum"])) as (r1,):
        async with control_plane(cp_yaml([r1], port=port)) as cp, \
                proxies(port, [protocol]) as (app,):
            await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
            client = app.discovery
            version, real_apply = client.state.version(), client._apply_cb

            def failing_apply(version, runtimes, routes):
                if any(rt.name == "late" for rt in runtimes):
                    raise RuntimeError("injected failure")
                real_apply(version, runtimes, routes)

            client._apply_cb = failing_apply
            with_late(cp)
            await eventually(lambda: client.state.types[RUNTIME_TYPE].last_nack is not None, 5)
            assert "injected failure" in client.state.types[RUNTIME_TYPE].last_nack.message
            assert "late" not in client.state.types[RUNTIME_TYPE].resources
            assert client.state.version() == version and client.connected_to is not None
            async with aiohttp.ClientSession() as s:
                assert await infer(s, app, "sum") == (200, "r1")
            await eventually(lambda: any(st.types[RUNTIME_TYPE].nacks == 1
                                         for st in cp.proxies.statuses.values()), timeout=2)
            client._apply_cb = real_apply  # fixed
            await cp.stop()  # and a control plane restarted on the same address
            async with control_plane(cp_yaml([r1], port=port)) as again:
                with_late(again)
                await eventually(lambda: app.ctx.snapshot.is_known("late-model"), timeout=10)


async def test_config_edits_are_pushed_and_invalid_edits_keep_the_last_good_config(tmp_path):
    path = tmp_path / "cp.yaml"
    async with runtimes(("r1", ["sum"])) as (r1,), control_plane(cp_yaml([r1]), path) as cp, \
            proxies(cp.grpc_port, ["DELTA"]) as (app,):
        await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
        route = "resources:\n  routes:\n    - {model: total, targets: [{model: sum}]}\n"
        path.write_text(cp_yaml([r1], extra=route))
        await eventually(lambda: app.ctx.snapshot.is_known("total"), timeout=3)
        path.write_text(cp_yaml([r1], extra=route.replace("total", "bad/name")))
        await eventually(lambda: cp.watcher.last_error != "", timeout=3)
        assert "resources.routes[0].model" in cp.watcher.last_error
        assert [r.model for r in cp.settings.routes] == ["total"]
        async with aiohttp.ClientSession() as s:
            assert await infer(s, app, "total") == (200, "r1")
        # an edit to a setting bound at start is named, and the one in force is kept
        path.write_text(cp_yaml([r1], extra=route).replace("watch_interval: 0.1s",
                                                           "watch_interval: 0.1s\nidentifier: cp-b"))
        await eventually(lambda: cp.restart_pending == ["identifier"], timeout=3)
        assert cp.settings.identifier != "cp-b" and cp.watcher.last_error == ""


async def test_a_sidecar_registered_runtime_appears_and_disappears_with_its_stream():
    async with runtimes(("r1", ["identity"]), ("local", ["mnist"])) as (r1, local), \
            control_plane(cp_yaml([r1])) as cp, proxies(cp.grpc_port, ["DELTA"]) as (gateway,):
        sidecar_extra = (f"sidecar:\n  runtime: {{name: local, http_address: "
                         f"'127.0.0.1:{local.http_port}'}}\n  poll_interval: 0.1s\n")
        async with proxies(cp.grpc_port, ["DELTA"], extra=sidecar_extra) as (sidecar,):
            await eventually(lambda: routes(gateway, "mnist") == {"local"}, timeout=5)
            # the sidecar routes the other models straight to their runtimes
            await eventually(lambda: routes(sidecar, "identity") == {"r1"}, timeout=5)
            async with aiohttp.ClientSession() as s:
                assert await infer(s, sidecar, "identity") == (200, "r1")
        loop = asyncio.get_running_loop()
        closed = loop.time()
        await eventually(lambda: routes(gateway, "mnist") == set(), timeout=GRACE + 2)
        assert loop.time() - closed >= GRACE - 0.1


async def test_a_restarted_control_plane_keeps_sidecar_runtimes_until_their_sidecars_return(
        tmp_path):
    # With registration.state_path, a control plane restarted while sidecars are connected
    # serves their runtimes from the saved state: a gateway that reconnects before a sidecar
    # does keeps routing to it, instead of every request for its models failing until then.
    port, state = free_port(), tmp_path / "registrations.json"
    async with runtimes(("r1", ["sum"]), ("local", ["identity"])) as (r1, local):
        text = cp_yaml([r1], port=port).replace(
            "grace: %ss}" % GRACE, f"grace: 3s, state_path: '{state}'}}")
        sidecar_extra = (f"sidecar:\n  runtime: {{name: local, http_address: "
                         f"'127.0.0.1:{local.http_port}'}}\n  poll_interval: 1.5s\n"
                         "initial_backoff: 1.5s\nmax_backoff: 1.5s\n")  # back after the gateway
        cp = ControlPlaneApp(load_cp(text))
        await cp.start()
        try:
            async with proxies(port, ["DELTA"]) as (gateway,), \
                    proxies(port, ["DELTA"], extra=sidecar_extra) as (sidecar,):
                await eventually(lambda: routes(gateway, "identity") == {"local"}, timeout=10)
                results: list[int] = []
                stop = asyncio.Event()

                async def load():
                    async with aiohttp.ClientSession() as s:
                        while not stop.is_set():
                            results.append((await infer(s, gateway, "identity"))[0])

                driver = asyncio.ensure_future(load())
                try:
                    await cp.stop()
                    cp = ControlPlaneApp(load_cp(text))
                    await cp.start()
                    assert "local" in cp.registrations.entries  # restored, stream not yet back
                    await eventually(lambda: cp.proxies.statuses and all(
                        RUNTIME_TYPE in st.types and st.types[RUNTIME_TYPE].acked_version
                        for st in cp.proxies.statuses.values()), timeout=10)
                    await eventually(lambda: getattr(cp.registrations.entries.get("local"),
                                                     "closed_at", 0) is None,
                                     timeout=10)  # the sidecar registered again
                    seen = len(results)
                    await eventually(lambda: len(results) > seen + 20, timeout=10)
                finally:
                    stop.set()
                    await driver
                assert routes(gateway, "identity") == {"local"}
                assert len(results) > 20 and set(results) == {200}, collections.Counter(results)
        finally:
            await cp.stop()


async def test_failover_and_a_saved_snapshot_serve_while_no_control_plane_answers(tmp_path):
    snapshot = tmp_path / "xds.json"
    extra = f"snapshot_path: '{snapshot}'\n"
    async with runtimes(("r1", ["sum"])) as (r1,):
        async with control_plane(cp_yaml([r1])) as cp:
            dead = free_port()
            app = ProxyApp(load_proxy(
                "listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                "admin: {address: '127.0.0.1:0'}\n"
                f"dynamic_resources:\n  ads_addresses: ['127.0.0.1:{dead}', "
                f"'127.0.0.1:{cp.grpc_port}']\n  initial_backoff: 0.05s\n  max_backoff: 0.1s\n"
                f"  {extra}"))
            await app.start()
            try:
                await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
                assert app.discovery.connected_to == f"127.0.0.1:{cp.grpc_port}"
                await eventually(snapshot.exists, timeout=2)
            finally:
                await app.stop()
        # No control plane at all now: a restarted proxy serves what it saved.
        async with proxies(free_port(), ["DELTA"], extra=extra) as (again,):
            assert routes(again, "sum") == {"r1"}
            async with aiohttp.ClientSession() as s:
                assert await infer(s, again, "sum") == (200, "r1")


def polling(port: int, name: str, dialect: str) -> str:
    """A control plane config discovering one runtime at 127.0.0.1:`port`."""
    return (f"grpc_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\ndiscovery:\n"
            f"  poll_interval: {POLL}s\n  runtimes:\n"
            f"    - {{name: {name}, http_address: '127.0.0.1:{port}', dialect: {dialect}}}\n")


def published(cp, name: str):
    """(model, state) of what the control plane publishes for runtime `name`, or None."""
    entry = cp.cache.get(RUNTIME_TYPE).entries.get(name)
    return [(m.name, resources_pb2.LoadedModel.State.Name(m.state))
            for m in entry.message.models] if entry else None


async def test_a_runtime_whose_health_says_not_ready_keeps_its_ready_models():
    # MLServer (and Triton, strict readiness) answer /v2/health/ready 400 while any one model
    # is not ready: that took every model of the runtime out of the table, for as long as one
    # model was loading, or for good when one failed to load.
    from aiohttp import web

    async def index(_):
        return web.json_response([{"name": "counter", "state": "READY"},
                                  {"name": "broken", "state": "UNAVAILABLE"},
                                  {"name": "slow", "state": "LOADING"}])

    async with fake_runtime(("POST", "/v2/repository/index", index), ready_status=400) \
            as (port, _):
        async with control_plane(polling(port, "ml", "MLSERVER")) as cp:
            await eventually(lambda: published(cp, "ml") == [("counter", "READY"),
                                                             ("slow", "LOADING")], timeout=3)


async def test_kserve_dialect_is_polled_with_v2_models_and_model_ready():
    from aiohttp import web
    ready = {"a": True, "b": False}

    async def models(_):
        return web.json_response({"models": sorted(ready)})

    async def model_ready(request):
        return web.json_response({}, status=200 if ready[request.match_info["m"]] else 503)

    async with fake_runtime(("GET", "/v2/models", models),
                            ("GET", "/v2/models/{m}/ready", model_ready)) as (port, _):
        async with control_plane(polling(port, "ks", "KSERVE")) as cp:
            def models_of_ks():
                return published(cp, "ks")
            # a listed model not ready yet is known (a request for it gets 503, not 404)
            await eventually(lambda: models_of_ks() == [("a", "READY"), ("b", "LOADING")],
                             timeout=3)
            ready["b"] = True
            await eventually(lambda: models_of_ks() == [("a", "READY"), ("b", "READY")],
                             timeout=3)
            async with aiohttp.ClientSession() as s, \
                    s.get(f"http://127.0.0.1:{cp.admin_port}/metrics") as resp:
                text = await resp.text()
            assert 'meshproxy_cp_runtime_polls_total{result="ok",runtime="ks"}' in text


async def test_the_control_plane_demo_shows_traffic_moving_to_a_model_loaded_live():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshproxy", "--log-level", "warning", "demo", "--control-plane",
        "--once", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    lines = out.decode().splitlines()
    loaded = next(line for line in lines if line.startswith("sum loaded on runtime-c"))
    assert [f"runtime-{n} x" in loaded for n in "abc"] == [True, True, True]
    unloaded = next(line for line in lines if line.startswith("sum unloaded from runtime-a"))
    assert "runtime-a" not in unloaded.split("sum", 2)[2]


async def test_editing_the_proxy_file_keeps_the_dynamic_resources(tmp_path):
    async with runtimes(("r1", ["sum"]), ("r2", ["mnist"])) as (r1, r2), \
            control_plane(cp_yaml([r1])) as cp:
        path = tmp_path / "proxy.yaml"
        base = ("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                "admin: {address: '127.0.0.1:0'}\n"
                f"dynamic_resources: {{ads_addresses: ['127.0.0.1:{cp.grpc_port}']}}\n")
        path.write_text(base)
        app = ProxyApp(load_proxy(base), config_path=str(path))
        app.watch_interval = 0.05
        await app.start()
        try:
            await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
            path.write_text(base + "static_resources:\n  runtimes:\n    - {name: r2, "
                            f"http_address: '127.0.0.1:{r2.http_port}', models: [{{name: mnist}}]}}\n")
            await eventually(lambda: routes(app, "mnist") == {"r2"}, timeout=5)
            assert routes(app, "sum") == {"r1"}
        finally:
            await app.stop()


@pytest.mark.parametrize("text, words", [
    ("discovery: {runtimes: [{name: a, http_address: 'x:1', models: [{name: m}]}]}\n",
     "discovery.runtimes[0].models"),
    ("grpc_adress: 127.0.0.1:1\n", "grpc_adress"),
    ("resources: {routes: [{model: m}, {model: m}]}\n", "resources.routes[1].model"),
    ("keepalive: {interval: 0s}\n", "keepalive.interval: must be positive"),
])
async def test_bad_control_plane_config_exits_64_naming_the_field(tmp_path, text, words):
    path = tmp_path / "cp.yaml"
    path.write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshproxy", "control-plane", "-c", str(path),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 64 and words in err.decode()


def _random_table(rng, ports):
    runtimes = []
    for name in rng.sample([f"r{i}" for i in range(6)], rng.randint(0, 6)):
        rt = resources_pb2.Runtime(name=name, http_address=f"127.0.0.1:{rng.choice(ports)}")
        for model in rng.sample(["a", "b", "c", "d"], rng.randint(0, 4)):
            rt.models.add(name=model, version=rng.choice(["", "1", "2"]))
        runtimes.append(rt)
    routes = [resources_pb2.ModelRoute(model=m, balancer=rng.choice(["", "round_robin"]))
              for m in rng.sample(["a", "b", "c"], rng.randint(0, 3))]
    return runtimes, routes


def _by_name(messages, key):
    return {getattr(m, key): m for m in messages}


async def test_proxies_converge_on_every_table_the_control_plane_pushes():
    # Random tables (runtimes added, changed and removed; routes likewise) pushed one after
    # another, some so quickly that a stream is still sending the last one: a DELTA and a
    # STATE_OF_THE_WORLD proxy must each end up with exactly the control plane's table, every
    # time it is given the chance to settle.
    rng = random.Random(3)
    text = "grpc_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\n"
    async with control_plane(text) as cp, proxies(cp.grpc_port) as apps:
        for step in range(30):
            runtimes, routes = _random_table(rng, [8000, 8001])
            cp.cache.set_all(runtimes, routes)
            if rng.random() < 0.4:
                continue  # the next table follows at once
            want = (_by_name(runtimes, "name"), _by_name(routes, "model"))
            await eventually(lambda: all(
                (_by_name(a.ctx.snapshot.runtimes, "name"),
                 _by_name(a.ctx.snapshot.routes, "model")) == want for a in apps), timeout=5)


async def test_a_restarted_control_plane_serves_its_first_table_only_after_polling_each_runtime():
    # Killed under load and started again, the control plane knows nothing until it has asked
    # each runtime what it holds. Serving before that would tell every proxy that reconnects
    # that the runtimes hold no models, and each would drop its routes until the next push
    # (404s under load). One runtime answers its first poll slowly, one never answers: the
    # first table lists the slow one's models, and startup waits no longer than the poll's
    # request_timeout (plus a second) for the silent one.
    from aiohttp import web

    async def index(_):
        await asyncio.sleep(0.3)  # a runtime slow to answer its first poll
        return web.json_response([{"name": "sum", "state": "READY"}])

    async def health(_):
        return web.json_response({})

    fake = web.Application()
    fake.router.add_get("/v2/health/ready", health)
    fake.router.add_post("/v2/repository/index", index)
    runner = web.AppRunner(fake)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    silent_port = silent.sockets[0].getsockname()[1]
    text = ("grpc_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\ndiscovery:\n"
            "  poll_interval: 5s\n  request_timeout: 0.5s\n  runtimes:\n"
            f"    - {{name: slow, http_address: '127.0.0.1:{port}', dialect: TRITON}}\n"
            f"    - {{name: silent, http_address: '127.0.0.1:{silent_port}', dialect: TRITON}}\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with control_plane(text) as cp:
            took = loop.time() - started
            entries = cp.cache.get(RUNTIME_TYPE).entries
            assert [m.name for m in entries["slow"].message.models] == ["sum"]
            assert list(entries["silent"].message.models) == []
            assert took < 0.5 + 1.0 + 1.0  # request_timeout + 1 s, and a second for the rest
    finally:
        silent.close()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_runtime(*routes, ready_status: int = 200):
    """An aiohttp app on a free port answering `routes` ((method, path, handler), ...) and
    /v2/health/ready (with `ready_status`); yields (port, runner): a test may stop it early
    with runner.cleanup()."""
    from aiohttp import web

    async def ready(_):
        return web.json_response({"ready": ready_status == 200}, status=ready_status)

    app = web.Application()
    app.router.add_get("/v2/health/ready", ready)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1], runner
    finally:
        await runner.cleanup()


def index_runtime(answer: dict):
    """A runtime whose repository index is `answer["index"]` (JSON text), read at each poll."""
    from aiohttp import web

    async def index(_):
        return web.Response(text=answer["index"], content_type="application/json")

    return fake_runtime(("POST", "/v2/repository/index", index))


GOOD_INDEX = '[{"name": "m", "state": "READY"}]'
UNUSABLE_INDEX = '[{"name": "m\\ud800", "state": "READY"}]'  # a lone surrogate: no LoadedModel


async def test_a_runtime_giving_an_unusable_answer_is_a_failed_poll_and_polling_goes_on():
    # The poll task used to die on such an answer: the runtime's models then stayed in the
    # table for good, even after it was gone. Now the poll fails, and the grace rule runs as
    # for no answer.
    from meshproxy.control.sources import DiscoveryPoller
    answer = {"index": GOOD_INDEX}
    async with index_runtime(answer) as (port, runner):
        poller = DiscoveryPoller(lambda: None)
        try:
            poller.configure([resources_pb2.Runtime(name="rt", http_address=f"127.0.0.1:{port}")],
                             0.05, 0.2, 0.5)
            view = poller.views["rt"]
            await eventually(lambda: [m.name for m in view.models] == ["m"])
            answer["index"] = UNUSABLE_INDEX
            await eventually(lambda: "unusable answer" in view.error)
            await runner.cleanup()  # gone for good: its models leave after the grace
            await eventually(lambda: view.models == [] and "unusable" not in view.error)
            assert not poller._tasks["rt"].done()
        finally:
            await poller.close()


async def test_a_sidecar_whose_runtime_gives_an_unusable_answer_goes_on_reporting():
    # The reporter used to stop for good, without a log line: grpc cancelled the stream when
    # the request generator raised, and nothing caught that. Its runtime then left the table.
    import types
    from meshproxy._proto.meshproxy.v1 import bootstrap_pb2
    from meshproxy.config import parse_address
    from meshproxy.discovery.sidecar import SidecarReporter
    answer = {"index": GOOD_INDEX}
    async with index_runtime(answer) as (port, _):
        cp = ControlPlaneApp(load_cp("grpc_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\n"
                                     "registration: {heartbeat_interval: 0.1s, grace: 0.3s}\n"))
        await cp.start()
        settings = types.SimpleNamespace(
            ads_addresses=(parse_address(f"127.0.0.1:{cp.grpc_port}", "x"),),
            initial_backoff=0.05, max_backoff=0.2, sidecar_poll_interval=0.1,
            keepalive_interval=10.0, keepalive_timeout=5.0,
            sidecar=resources_pb2.Runtime(name="side", http_address=f"127.0.0.1:{port}"))
        reporter = SidecarReporter(settings, bootstrap_pb2.Node(id="n"))
        await reporter.start()
        try:
            def models():
                return cp.registrations.dump().get("side", {}).get("models")

            await eventually(lambda: models() == 1)
            answer["index"] = UNUSABLE_INDEX  # reported as not answering: no models
            seen = reporter.reports
            await eventually(lambda: models() == 0 and reporter.reports > seen + 2)
            answer["index"] = GOOD_INDEX
            await eventually(lambda: models() == 1)
            assert not reporter._task.done()
        finally:
            await reporter.stop()
            await cp.stop()


@contextlib.asynccontextmanager
async def stopped(proc, group: bool = False):
    """`proc` (with `group`, its whole process group) frozen with SIGSTOP: its kernel still
    ACKs TCP, nothing answers a ping. Then let go with SIGCONT."""
    def signal_it(sig):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    signal_it(signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.returncode is None:
            signal_it(signal.SIGCONT)


async def test_a_frozen_proxy_leaves_the_control_planes_view_and_comes_back(tmp_path):
    # A proxy that vanishes without closing its connection (a frozen pod, a dead node) must
    # not stay listed, and pushed to, for the kernel's TCP timeouts: the control plane's
    # keepalive pings go unanswered and its stream is ended.
    async with runtimes(("r1", ["sum"])) as (r1,), control_plane(cp_yaml(
            [r1], extra="keepalive: {interval: 0.5s, timeout: 0.5s}\n")) as cp:
        path = tmp_path / "proxy.yaml"
        path.write_text("node: {id: frozen, cluster: test}\n"
                        "listeners: {http_address: '127.0.0.1:0', grpc_address: disabled}\n"
                        "admin: {address: '127.0.0.1:0'}\n"
                        f"dynamic_resources: {{ads_addresses: ['127.0.0.1:{cp.grpc_port}'], "
                        "initial_backoff: 0.1s, max_backoff: 0.2s}\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshproxy", "--log-level", "warning", "proxy", "-c",
            str(path), "--workers", "1", stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True)  # its own group: the parent and its worker freeze together
        try:
            def listed(rows):
                return [p for p in rows if p["node_id"] == "frozen"]

            await proxies_view(cp.admin_port, lambda rows: len(listed(rows)) == 1, timeout=20)
            async with stopped(proc, group=True):
                frozen_at = asyncio.get_running_loop().time()
                await proxies_view(cp.admin_port, lambda rows: not listed(rows), timeout=10)
                gone_after = asyncio.get_running_loop().time() - frozen_at
            # let go, it finds its stream ended and subscribes again
            await proxies_view(cp.admin_port, lambda rows: len(listed(rows)) == 1, timeout=10)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert gone_after < 5, gone_after  # about interval + timeout


async def test_a_proxy_notices_a_frozen_control_plane_on_a_quiet_stream(tmp_path):
    # gRPC stops pinging after two pings without data unless told otherwise, so a proxy
    # whose stream has been quiet for a while would never notice its control plane vanish
    # (a partition, a frozen pod), and would not try the next address.
    async with runtimes(("r1", ["sum"])) as (r1,):
        port = free_port()
        async with control_plane_process(cp_yaml([r1], port=port), tmp_path) as cp, \
                proxies(port, ["DELTA"], extra="keepalive: {interval: 1s, timeout: 1s}\n") \
                as (app,):
            await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
            # The scenario, not a wait for a condition: the stream stays quiet (nothing
            # changes) for several ping intervals before the control plane freezes.
            await asyncio.sleep(4.5)
            streams = app.discovery.streams
            async with stopped(cp):
                await eventually(lambda: app.discovery.connected_to is None, timeout=10)
                assert routes(app, "sum") == {"r1"}  # still serving the last table
            await eventually(lambda: app.discovery.streams > streams
                             and app.discovery.connected_to is not None, timeout=10)


async def test_a_sidecar_retries_at_least_once_a_poll_interval_while_the_control_plane_is_away():
    # A control plane restored with its registrations keeps each for `grace` only, so a
    # sidecar must come back within it however long the control plane was away: its
    # reconnect backoff stops growing at its poll interval.
    import types
    from meshproxy._proto.meshproxy.v1 import bootstrap_pb2
    from meshproxy.config import parse_address
    from meshproxy.discovery.sidecar import SidecarReporter
    async with index_runtime({"index": GOOD_INDEX}) as (port, _):
        cp_port = free_port()
        settings = types.SimpleNamespace(
            ads_addresses=(parse_address(f"127.0.0.1:{cp_port}", "x"),),
            initial_backoff=0.1, max_backoff=30.0, sidecar_poll_interval=0.3,
            keepalive_interval=10.0, keepalive_timeout=5.0,
            sidecar=resources_pb2.Runtime(name="side", http_address=f"127.0.0.1:{port}"))
        # draws at the top of each backoff step: retries at 0.1, 0.3, 0.7, 1.5, 3.1 s uncapped
        reporter = SidecarReporter(settings, bootstrap_pb2.Node(id="n"), rnd=lambda: 0.999)
        await reporter.start()
        try:
            await asyncio.sleep(1.7)  # the scenario: no control plane for 1.7 s
            loop = asyncio.get_running_loop()
            async with control_plane(
                    f"grpc_address: 127.0.0.1:{cp_port}\nadmin_address: 127.0.0.1:0\n") as cp:
                back = loop.time()
                await eventually(lambda: "side" in cp.registrations.entries, timeout=10)
                took = loop.time() - back
        finally:
            await reporter.stop()
    assert took < 0.3 + 0.5, took  # one poll interval and a margin; 1.4 s uncapped


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_a_proxy_takes_no_connection_until_its_control_plane_answered_or_the_fetch_timed_out():
    # As Envoy warms its listeners: a new gateway pod that has no table yet neither reports
    # ready nor takes a connection it would answer 404; with no control plane it opens its
    # ports (with the static resources) after initial_fetch_timeout.
    async with runtimes(("r1", ["sum"])) as (r1,):
        port = free_port()
        async with proxies(port, ["DELTA"], extra="initial_fetch_timeout: 1s\n") as (lonely,):
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{lonely.admin_port}/ready") as r:
                    assert (r.status, await r.text()) == (503, "INITIALIZING\n")
                assert await refused(lonely.http_port) and await refused(lonely.grpc_port)
                # not listening, but held: another server cannot take the port meanwhile
                with socket.socket() as other, pytest.raises(OSError):
                    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    other.bind(("127.0.0.1", lonely.http_port))
                await eventually(lambda: lonely.ready(), timeout=5)
                assert loop.time() - started >= 0.9
                async with s.get(f"http://127.0.0.1:{lonely.http_port}/v2/health/ready") as r:
                    assert r.status == 200
            assert not await refused(lonely.grpc_port)
        async with control_plane(cp_yaml([r1], port=port)), \
                proxies(port, ["DELTA", "STATE_OF_THE_WORLD"]) as apps:
            await eventually(lambda: all(a.ready() for a in apps), timeout=5)
            for app in apps:
                assert routes(app, "sum") == {"r1"}  # ready with the table, not before it
