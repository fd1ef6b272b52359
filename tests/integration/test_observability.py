"""Metrics, traces and the access log, read the way operators read them."""

import asyncio
import json
import shutil
import subprocess

import aiohttp
import grpc
import pytest
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy._proto.inference import grpc_service_pb2_grpc as pb_grpc
from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from tests.integration.harness import eventually, free_port, rt_yaml, runtimes

SUM = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}
NO_EJECT = "outlier_detection: {consecutive_5xx: 0, consecutive_gateway_failure: 0}\n"


def config(*entries, routes="", extra=""):
    text = ("listeners: {http_address: '127.0.0.1:0', grpc_address: disabled}\n"
            "admin: {address: '127.0.0.1:0'}\n" + extra
            + "static_resources:\n  runtimes:\n" + "".join(entries))
    if routes:
        text += "  routes:\n" + "".join("    " + ln + "\n" for ln in routes.strip().splitlines())
    return text


class Proxy:
    def __init__(self, text, **kw):
        self.app = ProxyApp(load_text(text), **kw)

    async def __aenter__(self):
        await self.app.start()
        return self.app

    async def __aexit__(self, *exc):
        await self.app.stop()


async def scrape(app) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{app.admin_port}/metrics") as r:
            return await r.text()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(text, name, **labels):
    return sum(v for (n, ls), v in samples(text).items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


async def post(s, port, model, headers=None, path=None):
    async with s.post(f"http://127.0.0.1:{port}{path or f'/v2/models/{model}/infer'}", json=SUM,
                      headers=headers or {}) as r:
        return r.status, await r.read()


async def test_known_traffic_shows_up_exactly_in_metrics():
    async with runtimes(("good", ["sum"])) as (good,), \
            runtimes(("bad", ["flaky"]), fail_rate=1.0) as (bad,):
        routes = "- model: flaky\n  retry_policy: {retry_on: 5xx, num_retries: 2}"
        async with Proxy(config(rt_yaml(good), rt_yaml(bad, extra=NO_EJECT), routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                ok = [await post(s, p.http_port, "sum") for _ in range(5)]
                failed = [await post(s, p.http_port, "flaky") for _ in range(10)]
            text = await scrape(p)
    assert [st for st, _ in ok] == [200] * 5 and [st for st, _ in failed] == [500] * 10
    assert total(text, "meshproxy_requests_total", model="sum", code="200", runtime="good") == 5
    assert total(text, "meshproxy_requests_total", model="flaky", code="500", runtime="bad") == 10
    # each flaky request: one try and two retries, all to the one runtime that holds it
    assert total(text, "meshproxy_retries_total", model="flaky", reason="5xx") == 20
    assert total(text, "meshproxy_retries_total", model="sum") == 0
    assert total(text, "meshproxy_upstream_attempt_duration_seconds_count",
                 runtime="bad", outcome="500") == 30
    assert total(text, "meshproxy_request_duration_seconds_count", model="sum") == 5
    assert total(text, "meshproxy_proxy_overhead_seconds_count", model="sum") == 5
    body = len(json.dumps(SUM))
    assert total(text, "meshproxy_request_bytes_total", model="sum") == 5 * body
    assert total(text, "meshproxy_response_bytes_total", model="sum") > 5 * 100
    assert total(text, "meshproxy_endpoint_healthy", runtime="good") == 1
    assert total(text, "meshproxy_endpoint_idle_connections", runtime="good") == 1


async def test_series_of_runtimes_that_left_the_table_leave_metrics():
    """Pods churn: every generation of the runtime has a new name. /metrics keeps series for
    the runtimes in the table only, the per-model totals keep counting, and a name that comes
    back starts from fresh series."""
    async with runtimes(("rt", ["sum"])) as (rt,), \
            runtimes(("bad1", ["flaky"]), ("bad2", ["flaky"]), fail_rate=1.0) as bad:
        eject_at_once = "outlier_detection: {consecutive_5xx: 1}\n"
        cfg = config(rt_yaml(rt), *(rt_yaml(b, extra=eject_at_once) for b in bad))
        async with Proxy(cfg) as p:
            async with aiohttp.ClientSession() as s:
                assert (await post(s, p.http_port, "flaky"))[0] == 500
                assert (await post(s, p.http_port, "sum"))[0] == 200
                before = await scrape(p)
                for gen in range(20):
                    p.update(f"v{gen}", [renamed(rt, f"sum-{gen}")], [])
                    assert (await post(s, p.http_port, "sum"))[0] == 200
                p.update("back", [renamed(rt, "sum-0")], [])
                assert (await post(s, p.http_port, "sum"))[0] == 200
            text = await scrape(p)
    assert total(before, "meshproxy_outlier_ejections_total") == 1
    assert {dict(labels).get("runtime") for _, labels in samples(text)} == {None, "sum-0"}
    assert total(text, "meshproxy_requests_total", runtime="sum-0") == 1
    assert total(text, "meshproxy_upstream_attempt_duration_seconds_count", runtime="sum-0") == 1
    assert total(text, "meshproxy_request_duration_seconds_count", model="sum") == 22
    assert total(text, "meshproxy_request_bytes_total", model="sum") == 22 * len(json.dumps(SUM))


async def test_an_answer_after_its_runtime_left_does_not_bring_its_series_back():
    async with runtimes(("slow", ["sum"]), latency_ms=300) as (rt,):
        async with Proxy(config(rt_yaml(rt))) as p:
            async with aiohttp.ClientSession() as s:
                pending = asyncio.ensure_future(post(s, p.http_port, "sum"))
                endpoint = p.registry.endpoints["slow"]
                await eventually(lambda: endpoint.active == 1)
                p.update("v1", [renamed(rt, "slow-2")], [])
                assert (await pending)[0] == 200
            text = await scrape(p)
    assert {dict(labels).get("runtime") for _, labels in samples(text)} == {None, "slow-2"}
    assert total(text, "meshproxy_request_duration_seconds_count", model="sum") == 1


def renamed(rt, name: str) -> resources_pb2.Runtime:
    """Runtime `rt` (holding sum) listed under another name, as a replaced pod is."""
    return resources_pb2.Runtime(name=name, http_address=f"127.0.0.1:{rt.http_port}",
                                 models=[resources_pb2.LoadedModel(name="sum")])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                    "(make test installs Debian's prometheus package)")
async def test_exposition_passes_promtool():
    async with runtimes(("good", ["sum"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts))) as p:
            async with aiohttp.ClientSession() as s:
                await post(s, p.http_port, "sum")
                await post(s, p.http_port, "nosuch")
            text = await scrape(p)
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed "
                    "(make test installs Debian's prometheus package)")
async def test_a_real_prometheus_scrapes_the_proxy(tmp_path):
    async with runtimes(("good", ["sum"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts))) as p:
            async with aiohttp.ClientSession() as s:
                for _ in range(3):
                    await post(s, p.http_port, "sum")
                port = free_port()
                (tmp_path / "prometheus.yml").write_text(
                    "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: meshproxy\n"
                    f"    static_configs: [{{targets: ['127.0.0.1:{p.admin_port}']}}]\n")
                prom = await asyncio.create_subprocess_exec(
                    "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                try:
                    query = (f"http://127.0.0.1:{port}/api/v1/query?query="
                             "meshproxy_requests_total{model=\"sum\",code=\"200\"}")
                    value = None
                    async with asyncio.timeout(30):
                        while value is None:
                            try:
                                async with s.get(query) as r:
                                    result = (await r.json())["data"]["result"]
                                    value = result[0]["value"][1] if result else None
                            except (aiohttp.ClientError, KeyError):
                                pass
                            if value is None:
                                await asyncio.sleep(0.2)
                    assert value == "3"
                finally:
                    prom.terminate()
                    await prom.wait()


async def test_span_tree_of_a_retried_request_and_the_traceparent_sent_upstream():
    exporter = InMemorySpanExporter()
    async with runtimes(("echo", ["echo"])) as (echo,), \
            runtimes(("bad", ["flaky"]), fail_rate=1.0) as (bad,):
        routes = "- model: flaky\n  retry_policy: {retry_on: 5xx, num_retries: 1}"
        text = config(rt_yaml(echo), rt_yaml(bad, extra=NO_EJECT), routes=routes)
        async with Proxy(text, span_exporter=exporter) as p:
            trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
            parent = f"00-{trace_id}-00f067aa0ba902b7-01"
            async with aiohttp.ClientSession() as s:
                status, _ = await post(s, p.http_port, "flaky", {"traceparent": parent})
                _, echoed = await post(s, p.http_port, "echo", {"model": "echo"}, "/debug/echo")
            p.ctx.tracing.provider.force_flush()
            spans = exporter.get_finished_spans()
    assert status == 500
    flaky_server = next(sp for sp in spans if sp.name == "POST flaky")
    tries = sorted((sp for sp in spans if sp.parent and sp.parent.span_id ==
                    flaky_server.context.span_id), key=lambda sp: sp.attributes["meshproxy.attempt"])
    assert f"{flaky_server.context.trace_id:032x}" == trace_id  # joined the client's trace
    assert flaky_server.parent.span_id == 0x00f067aa0ba902b7
    assert [sp.attributes["meshproxy.attempt"] for sp in tries] == [1, 2]
    assert [sp.attributes.get("meshproxy.retry_reason") for sp in tries] == [None, "5xx"]
    assert all(sp.attributes["meshproxy.runtime"] == "bad" for sp in tries)
    # the runtime saw a traceparent naming the client span of its try
    headers = {k.lower(): v for k, v in json.loads(echoed)["headers"]}
    echo_try = next(sp for sp in spans if sp.name == "upstream echo")
    version, tid, sid, flags = headers["traceparent"].split("-")
    assert (version, tid, sid) == ("00", f"{echo_try.context.trace_id:032x}",
                                   f"{echo_try.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


async def test_repeated_trace_headers_follow_w3c_trace_context():
    """Two tracestate headers are one list (the span and the runtime see it joined); two
    traceparent headers are an invalid context, so the request starts a trace of its own."""
    exporter = InMemorySpanExporter()
    other_trace = "1" * 32
    async with runtimes(("echo", ["echo"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts)), span_exporter=exporter) as p:
            async with aiohttp.ClientSession() as s:
                _, states = await post(s, p.http_port, "echo", CIMultiDict([
                    ("model", "echo"), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),
                    ("tracestate", "a=1"), ("tracestate", "b=2")]), "/debug/echo")
                _, parents = await post(s, p.http_port, "echo", CIMultiDict([
                    ("model", "echo"), ("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),
                    ("traceparent", f"00-{other_trace}-{CLIENT_SPAN}-01")]), "/debug/echo")
            p.ctx.tracing.provider.force_flush()
            first, second = [sp for sp in exporter.get_finished_spans() if sp.name == "POST echo"]
    assert first.context.trace_state.to_header() == "a=1,b=2"
    assert f"{first.context.trace_id:032x}" == TRACE_ID
    assert _sent_upstream(states, "tracestate") == ["a=1,b=2"]
    assert second.parent is None  # a root span: neither of the client's traces
    assert f"{second.context.trace_id:032x}" not in (TRACE_ID, other_trace)
    [traceparent] = _sent_upstream(parents, "traceparent")
    assert traceparent.split("-")[1] == f"{second.context.trace_id:032x}"


async def test_repeated_tracestate_metadata_of_a_grpc_call_is_one_list():
    """(gRPC core hands the server only the last of repeated `traceparent` entries, so the
    invalid-context case cannot arrive over gRPC.)"""
    exporter = InMemorySpanExporter()
    async with runtimes(("r1", ["sum"]), grpc_port=0) as (rt,):
        text = config(rt_yaml(rt, extra=f"grpc_address: 127.0.0.1:{rt.grpc_port}\n")).replace(
            "grpc_address: disabled", "grpc_address: '127.0.0.1:0'")
        async with Proxy(text, span_exporter=exporter) as p, \
                grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = (("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),
                        ("tracestate", "a=1"), ("tracestate", "b=2"))
            assert (await stub.ModelReady(pb.ModelReadyRequest(name="sum"), metadata=metadata,
                                          timeout=5)).ready
            p.ctx.tracing.provider.force_flush()
            [server] = [sp for sp in exporter.get_finished_spans() if sp.kind.name == "SERVER"]
    assert server.parent.span_id == int(CLIENT_SPAN, 16)
    assert server.context.trace_state.to_header() == "a=1,b=2"


def _sent_upstream(echoed: bytes, name: str) -> list[str]:
    """The values of header `name` the echo runtime received, in order."""
    return [v for k, v in json.loads(echoed)["headers"] if k.lower() == name]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests = []

    async def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_arrive_over_otlp_grpc():
    receiver = Receiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with runtimes(("r1", ["sum"])) as rts:
            extra = (f"telemetry: {{tracing: {{exporter: OTLP_GRPC, endpoint: '127.0.0.1:{port}', "
                     "service_name: gateway-a}}\n")
            async with Proxy(config(*map(rt_yaml, rts), extra=extra)) as p:
                async with aiohttp.ClientSession() as s:
                    assert (await post(s, p.http_port, "sum"))[0] == 200
                await asyncio.get_running_loop().run_in_executor(
                    None, p.ctx.tracing.provider.force_flush)
                await eventually(lambda: receiver.requests, timeout=10)
    finally:
        await server.stop(None)
    spans = [(rs.resource, sp) for req in receiver.requests for rs in req.resource_spans
             for ss in rs.scope_spans for sp in ss.spans]
    names = {sp.name for _, sp in spans}
    assert {"POST sum", "upstream r1"} <= names
    service = {a.value.string_value for res, _ in spans for a in res.attributes
               if a.key == "service.name"}
    assert service == {"gateway-a"}


async def test_access_log_writes_one_json_line_per_request(tmp_path):
    log = tmp_path / "access.log"
    async with runtimes(("r1", ["sum"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts), extra=f"telemetry: {{access_log: {{path: '{log}'}}}}\n")) as p:
            async with aiohttp.ClientSession() as s:
                await post(s, p.http_port, "sum")
                await post(s, p.http_port, "nosuch")
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [(ln["model"], ln["status"], ln["runtime"], ln["attempts"]) for ln in lines] == [
        ("sum", 200, "r1", 1), ("nosuch", 404, None, 0)]
    first = lines[0]
    assert first["path"] == "/v2/models/sum/infer" and first["method"] == "POST"
    assert first["bytes_in"] == len(json.dumps(SUM)) and first["bytes_out"] > 100
    assert 0 < first["upstream_duration_ms"] <= first["duration_ms"]
    assert first["start_time"].endswith("Z") and first["target"] == "sum"


async def test_stats_lists_every_sample_as_envoy_style_lines():
    async with runtimes(("r1", ["sum"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts))) as p:
            async with aiohttp.ClientSession() as s:
                await post(s, p.http_port, "sum")
                async with s.get(f"http://127.0.0.1:{p.admin_port}/stats") as r:
                    text = await r.text()
    lines = text.splitlines()
    assert ("meshproxy_requests_total{code=200,code_class=2xx,model=sum,protocol=rest,"
            "runtime=r1}: 1") in lines
    assert lines == sorted(lines)


async def test_discovery_health_is_in_the_proxy_metrics():
    from meshproxy._proto.meshproxy.v1 import resources_pb2
    from meshproxy.discovery.state import RUNTIME_TYPE
    from tests.integration.test_control_plane import control_plane, cp_yaml, proxies, routes
    from tests.integration.test_control_plane import runtimes as cp_runtimes
    async with cp_runtimes(("r1", ["sum"])) as (r1,), control_plane(cp_yaml([r1])) as cp, \
            proxies(cp.grpc_port, ["DELTA"]) as (app,):
        await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
        text = await scrape(app)
        assert total(text, "meshproxy_discovery_connected") == 1
        assert total(text, "meshproxy_discovery_updates_applied_total") >= 1
        assert total(text, "meshproxy_discovery_nacks_total", type="Runtime") == 0
        assert 0 <= total(text, "meshproxy_discovery_seconds_since_update", type="Runtime") < 60
        bad = resources_pb2.Runtime(name="broken", http_address="nowhere")
        good = [e.message for e in cp.cache.get(RUNTIME_TYPE).entries.values()]
        cp.cache.set_resources(RUNTIME_TYPE, good + [bad])
        await eventually(lambda: app.discovery.state.types[RUNTIME_TYPE].nacks == 1, timeout=5)
        assert total(await scrape(app), "meshproxy_discovery_nacks_total", type="Runtime") == 1


def dashboard_exprs():
    import pathlib
    dash = json.loads((pathlib.Path(__file__).parents[2] / "config" / "grafana-dashboard.json")
                      .read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


async def test_dashboard_queries_name_only_exported_metrics_and_parse(tmp_path):
    import re
    from meshproxy.control.metrics import ControlPlaneMetrics
    from prometheus_client import generate_latest
    exprs = dashboard_exprs()
    async with runtimes(("r1", ["sum"])) as rts:
        async with Proxy(config(*map(rt_yaml, rts))) as p:
            async with aiohttp.ClientSession() as s:
                await post(s, p.http_port, "sum")
            exported = await scrape(p)
    exported += generate_latest(ControlPlaneMetrics().registry).decode()
    # discovery families only exist with a control plane; they are tested above
    exported += "meshproxy_discovery_connected meshproxy_discovery_updates_applied_total " \
                "meshproxy_discovery_nacks_total meshproxy_discovery_seconds_since_update"
    names = {n for e in exprs for n in re.findall(r"meshproxy_[a-z0-9_]+", e)}
    # a family with no series yet still has its HELP/TYPE line under the base name
    missing = {n for n in names
               if n not in exported and re.sub(r"_(bucket|sum|count)$", "", n) not in exported}
    assert not missing, missing
    if shutil.which("promtool"):
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "1m")
             .replace("$model", ".*")} for i, e in enumerate(exprs)]}]}
        path = tmp_path / "rules.yml"
        path.write_text(json.dumps(rules))
        check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


async def test_control_plane_measures_push_latency():
    from tests.integration.test_control_plane import control_plane, cp_yaml, proxies, routes
    from tests.integration.test_control_plane import runtimes as cp_runtimes
    async with cp_runtimes(("r1", ["sum"])) as (r1,), control_plane(cp_yaml([r1])) as cp, \
            proxies(cp.grpc_port, ["DELTA"]) as (app,):
        await eventually(lambda: routes(app, "sum") == {"r1"}, timeout=10)
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{r1.http_port}/v2/repository/models/bert/load"):
                pass
        await eventually(lambda: routes(app, "bert") == {"r1"}, timeout=10)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{cp.admin_port}/metrics") as r:
                text = await r.text()
    assert total(text, "meshproxy_cp_push_latency_seconds_count", protocol="delta") >= 1
    assert total(text, "meshproxy_cp_runtime_polls_total", runtime="r1") >= 1
