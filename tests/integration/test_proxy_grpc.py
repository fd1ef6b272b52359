"""The gRPC data plane against devtools runtimes: tritonclient (in its own process) and grpc.aio."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import pathlib
import random
import re
import sys
import textwrap
import types

import grpc
import pytest

from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy._proto.inference import grpc_service_pb2_grpc as pb_grpc
from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from tests.integration import harness
from tests.integration.harness import eventually, free_port

SERVICE = "/inference.GRPCInferenceService/"
ROOT = pathlib.Path(__file__).resolve().parents[2]  # where `-m tests.integration...` resolves


def runtimes(*specs: tuple[str, list[str]], **options):
    """Devtools runtimes with REST and gRPC on free ports."""
    return harness.runtimes(*specs, grpc_port=0, **options)


def runtime_entry(name: str, http_port: int, grpc_port: int, models: list[str]) -> str:
    ms = ", ".join("{name: %s}" % m for m in models)
    return (f"    - name: {name}\n      http_address: 127.0.0.1:{http_port}\n"
            f"      grpc_address: 127.0.0.1:{grpc_port}\n      models: [{ms}]\n")


@contextlib.asynccontextmanager
async def proxy(rts=(), routes: str = "", extra: str = "", listed=None, dead=None,
                span_exporter=None):
    """A proxy with its gRPC listener on a free port in front of `rts`; `listed` overrides the
    models a runtime is said to hold; `dead` adds runtimes where nothing listens."""
    body = "".join(runtime_entry(rt.name, rt.http_port, rt.grpc_port,
                                 (listed or {}).get(rt.name, rt.loaded_models())) for rt in rts)
    for name, models in (dead or {}).items():
        body += runtime_entry(name, free_port(), free_port(), models)
    text = ("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
            "admin: {address: '127.0.0.1:0'}\n" + textwrap.dedent(extra)
            + "static_resources:\n  runtimes:\n" + body
            + ("  routes:\n" + textwrap.indent(textwrap.dedent(routes), "    ") if routes else ""))
    app = ProxyApp(load_text(text), span_exporter=span_exporter)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@contextlib.asynccontextmanager
async def stub(app: ProxyApp, max_receive: int = 4 * 1024 * 1024):
    options = [("grpc.max_receive_message_length", max_receive)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}", options=options) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def sum_request(*values: float, model: str = "sum", **fields) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model, **fields)
    t = msg.inputs.add(name="input0", datatype="FP64", shape=[len(values)])
    t.contents.fp64_contents.extend(values)
    return msg


async def triton(app: ProxyApp, *args: str) -> dict:
    """Run tests/integration/triton_client.py against the proxy; its JSON answer."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.triton_client", f"127.0.0.1:{app.grpc_port}",
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    try:
        async with asyncio.timeout(15):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


def requests_counted(app: ProxyApp, model: str, code: str, runtime: str) -> float:
    return app.metrics.registry.get_sample_value("meshproxy_requests_total", {
        "model": model, "protocol": "grpc", "code": code,
        "code_class": "ok" if code == "OK" else "error", "runtime": runtime}) or 0.0


async def test_tritonclient_server_model_and_unary_infer():
    async with runtimes(("r1", ["identity"]), ("r2", ["sum"])) as rts, proxy(rts) as app:
        seen = await triton(app, "basics")
        assert seen == {"live": True, "ready": True, "server": "meshproxy",
                        "identity_ready": True, "metadata_inputs": ["input0"], "sum": [7.0],
                        "served_by": "r2", "index": ["identity", "sum"]}
        assert requests_counted(app, "sum", "OK", "r2") == 2  # metadata and infer


async def test_tritonclient_stream_of_100_stays_on_one_runtime():
    async with runtimes(("r1", ["identity"]), ("r2", ["identity"])) as rts, proxy(rts) as app:
        seen = (await triton(app, "stream", "100"))["responses"]
        assert [r["id"] for r in seen] == [str(i) for i in range(100)]
        assert [r["first"] for r in seen] == [float(i) for i in range(100)]
        assert len({r["runtime"] for r in seen}) == 1
        assert requests_counted(app, "identity", "OK", seen[0]["runtime"]) == 1


async def test_tritonclient_unknown_model():
    async with runtimes(("r1", ["identity"])) as rts, proxy(rts) as app:
        seen = await triton(app, "unknown")
        assert seen["status"] == "StatusCode.NOT_FOUND"
        assert "'no-such-model'" in seen["message"]


async def test_unary_passes_metadata_and_names_the_runtime():
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts) as app, stub(app) as s:
        call = s.ModelInfer(sum_request(1, 2, id="q"), metadata=(("x-trace", "t1"),))
        response = await call
        assert response.outputs[0].contents.fp64_contents == [3.0] and response.id == "q"
        initial = dict(await call.initial_metadata())
        assert initial["x-served-by"] == "r1" and initial["x-meshproxy-upstream"] == "r1"


async def test_model_named_only_by_metadata_is_written_into_the_request():
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts) as app, stub(app) as s:
        response = await s.ModelInfer(sum_request(4, 5, model=""), metadata=(("model", "sum"),))
        assert response.model_name == "sum" and response.outputs[0].contents.fp64_contents == [9.0]


async def test_model_ready_and_metadata_are_routed_by_name():
    async with runtimes(("r1", ["identity"]), ("r2", ["sum"])) as rts, \
            proxy(rts, listed={"r1": ["identity"], "r2": ["sum", "loading"]}) as app, \
            stub(app) as s:
        assert (await s.ModelReady(pb.ModelReadyRequest(name="sum"))).ready
        meta = await s.ModelMetadata(pb.ModelMetadataRequest(name="identity"))
        assert meta.name == "identity" and [i.name for i in meta.inputs] == ["input0"]
        # Listed but not loaded on r2: r2's own answer comes back.
        assert not (await s.ModelReady(pb.ModelReadyRequest(name="loading"))).ready
        err = await rpc_error(s.ModelMetadata(pb.ModelMetadataRequest(name="loading")))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert dict(err.initial_metadata())["x-meshproxy-upstream"] == "r2"


async def test_errors_name_the_model():
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts) as app, stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1, model="nope")))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in err.details()
        err = await rpc_error(s.ModelInfer(sum_request(1, model="")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no model" in err.details()
        err = await rpc_error(s.ModelInfer(sum_request(1), metadata=(("model", "identity"),)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'identity'" in err.details() and "'sum'" in err.details()
        err = await rpc_error(s.ModelInfer(sum_request(1, model="bad name")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert requests_counted(app, "", "INVALID_ARGUMENT", "") == 3
        assert requests_counted(app, "", "NOT_FOUND", "") == 1


async def test_unknown_and_unserved_methods():
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts) as app, stub(app) as s:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
        try:
            err = await rpc_error(channel.unary_unary(SERVICE + "ModelConfig")(b""))
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await channel.close()
        err = await rpc_error(s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="x")))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        assert (await s.ServerLive(pb.ServerLiveRequest())).live


async def test_no_ready_runtime_and_dead_runtime():
    async with runtimes(("r1", ["sum"])) as rts, \
            proxy(rts, dead={"gone": ["lost"]},
                  routes="- model: later\n- model: lost\n  retry_policy: {num_retries: 1}\n"
                  ) as app, stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1, model="later")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "'later'" in err.details()
        assert not (await s.ModelReady(pb.ModelReadyRequest(name="later"))).ready
        err = await rpc_error(s.ModelInfer(sum_request(1, model="lost")))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "'lost'" in err.details() and "gone" in err.details()


async def test_split_rewrites_the_model_in_the_request():
    routes = "- model: adder\n  targets: [{model: sum, weight: 1}]\n"
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts, routes=routes) as app, \
            stub(app) as s:
        response = await s.ModelInfer(sum_request(2, 2, model="adder", model_version="7"))
        assert response.model_name == "sum" and response.outputs[0].contents.fp64_contents == [4]
        first = None

        async def messages():
            for i in range(3):
                yield sum_request(i, 1, model="adder", id=str(i))

        async for reply in s.ModelStreamInfer(messages()):
            first = first or reply
            assert reply.error_message == "" and reply.infer_response.model_name == "sum"
        assert first is not None


async def test_tensors_over_grpcs_4_mib_default_pass_both_ways():
    values = 1_300_000  # 5.2 MB of FP32, sent and answered raw
    msg = pb.ModelInferRequest(model_name="identity")
    msg.inputs.add(name="input0", datatype="FP32", shape=[values])
    msg.raw_input_contents.append(b"\x00\x00\x80\x3f" * values)  # 1.0f
    async with runtimes(("r1", ["identity"])) as rts, proxy(rts) as app, \
            stub(app, max_receive=8 * 1024 * 1024) as s:
        reply = await s.ModelInfer(msg, timeout=10)
        assert reply.raw_output_contents[0] == msg.raw_input_contents[0]


async def test_message_size_limit_and_a_listener_turned_off():
    async with runtimes(("r1", ["identity"])) as rts, \
            proxy(rts, extra="grpc: {max_message_bytes: 2048}\n") as app, stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(*range(400), model="identity")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await s.ModelInfer(sum_request(1.0, model="identity"))).model_name == "identity"
    off = load_text("listeners: {http_address: '127.0.0.1:0', grpc_address: disabled}\n"
                    "admin: {address: '127.0.0.1:0'}\n")
    app = ProxyApp(off)
    await app.start()
    try:
        assert app.grpc_server is None and app.grpc_port == 0
    finally:
        await app.stop()


async def test_header_rule_on_metadata_picks_the_canary():
    routes = ("- model: sum\n  matches:\n  - headers: [{name: x-canary, exact: '1'}]\n"
              "    targets: [{model: sum-canary}]\n")
    async with runtimes(("stable", ["sum"]), ("canary", ["sum-canary"])) as rts, \
            proxy(rts, routes=routes) as app, stub(app) as s:
        canary = s.ModelInfer(sum_request(1, 1), metadata=(("x-canary", "1"),))
        assert (await canary).model_name == "sum-canary"
        assert dict(await canary.initial_metadata())["x-meshproxy-upstream"] == "canary"
        stable = s.ModelInfer(sum_request(1, 1), metadata=(("x-canary", "0"),))
        assert (await stable).model_name == "sum"
        assert dict(await stable.initial_metadata())["x-meshproxy-upstream"] == "stable"


async def test_rate_limit_is_resource_exhausted_with_retry_after():
    routes = "- model: sum\n  rate_limit: {requests_per_second: 0.5, burst: 1}\n"
    async with runtimes(("r1", ["sum"])) as rts, proxy(rts, routes=routes) as app, stub(app) as s:
        await s.ModelInfer(sum_request(1))
        err = await rpc_error(s.ModelInfer(sum_request(1)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'sum'" in err.details()
        assert int(dict(err.trailing_metadata())["retry-after"]) >= 1


async def test_stream_with_a_message_for_another_model_ends_invalid():
    async with runtimes(("r1", ["sum", "identity"])) as rts, proxy(rts) as app, stub(app) as s:
        async def messages():
            yield sum_request(1)
            yield sum_request(2, model="identity")

        call = s.ModelStreamInfer(messages())
        replies = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for reply in call:
                replies.append(reply)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'identity'" in info.value.details()
        assert [r.infer_response.outputs[0].contents.fp64_contents[0] for r in replies] == [1.0]


async def test_deadlines_expire():
    routes = "- model: identity\n  timeout: 0.2s\n"
    async with runtimes(("r1", ["sum", "identity"]), latency_ms=1000) as rts, \
            proxy(rts, routes=routes) as app, stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1), timeout=0.2))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        err = await rpc_error(s.ModelInfer(sum_request(1, model="identity")))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "'identity'" in err.details()


@contextlib.asynccontextmanager
async def raw_runtime(name: str, model: str, infer=None, stream=None):
    """A gRPC server answering ModelInfer with `infer(message, context)` and ModelStreamInfer
    with `stream(requests, context)`, listed as holding `model` (its REST address is a free
    port nobody serves)."""
    server = grpc.aio.server()
    handlers = {}
    if infer is not None:
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(infer)
    if stream is not None:
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    class Listed:
        def loaded_models(self):
            return [model]

    rt = Listed()
    rt.name, rt.http_port, rt.grpc_port = name, free_port(), port
    try:
        yield rt
    finally:
        await server.stop(None)


async def test_per_try_timeout_retries_on_another_runtime():
    # Round robin, so the slow runtime is tried first every other call: with least_request's
    # random draws it was never picked in 6 calls about once in 64 runs.
    route = ("- model: identity\n  balancer: round_robin\n"
             "  retry_policy: {per_try_timeout: 0.3s, num_retries: 2}\n")
    async with runtimes(("slow", ["identity"]), latency_ms=2000) as slow, \
            runtimes(("fast", ["identity"])) as fast, proxy(slow + fast, routes=route) as app, \
            stub(app) as s:
        for _ in range(6):
            reply = await s.ModelInfer(sum_request(1, model="identity"), timeout=5)
            assert reply.parameters["runtime"].string_param == "fast"
        assert app.registry.endpoints["slow"].total > 0
    async with runtimes(("slow", ["identity"]), latency_ms=2000) as slow, \
            proxy(slow, routes=route.replace("num_retries: 2", "num_retries: 0")) as app, \
            stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1, model="identity"), timeout=5))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "per-try" in err.details()


async def test_trailers_and_binary_metadata_pass_both_ways():
    """A raw upstream echoes the metadata it got: hop-by-hop entries are gone, -bin survive."""

    async def echo(message: bytes, context: grpc.aio.ServicerContext):
        got = {k: v for k, v in context.invocation_metadata()}
        await context.send_initial_metadata((("x-seen", ",".join(sorted(got))),))
        context.set_trailing_metadata((("x-tag-bin", got.get("x-tag-bin", b"")),
                                       ("x-note", "fine")))
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("too much")

    async with raw_runtime("raw", "echo", echo) as rt, \
            proxy([rt], routes="- model: echo\n  retry_policy: {num_retries: 0}\n") as app, \
            stub(app) as s:
        call = s.ModelInfer(sum_request(1, model="echo"),
                            metadata=(("x-tag-bin", b"\x00\xff"), ("x-user", "u")))
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details() == "too much"
        seen = dict(err.initial_metadata())["x-seen"].split(",")
        assert "x-tag-bin" in seen and "x-user" in seen
        assert not {"te", "content-type", "grpc-timeout"} & set(seen)
        trailers = dict(err.trailing_metadata())
        assert trailers["x-tag-bin"] == b"\x00\xff" and trailers["x-note"] == "fine"


async def test_resource_exhausted_is_retried_only_when_the_policy_says_so():
    async def busy(message: bytes, context):
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("queue full")

    async def free(message: bytes, context):
        return pb.ModelInferResponse(model_name="m", id="ok").SerializeToString()

    retried = "- model: m\n  retry_policy: {retry_on: resource-exhausted, num_retries: 2}\n"
    async with raw_runtime("busy", "m", busy) as r1, raw_runtime("free", "m", free) as r2:
        async with proxy([r1, r2], routes=retried) as app, stub(app) as s:
            for _ in range(20):
                assert (await s.ModelInfer(sum_request(1, model="m"))).id == "ok"
            assert app.registry.endpoints["busy"].total > 0
        async with proxy([r1, r2]) as app, stub(app) as s:
            codes = set()
            for _ in range(20):
                try:
                    await s.ModelInfer(sum_request(1, model="m"))
                    codes.add("OK")
                except grpc.aio.AioRpcError as e:
                    assert e.details() == "queue full"
                    assert dict(e.initial_metadata())["x-meshproxy-upstream"] == "busy"
                    codes.add(e.code().name)
            assert codes == {"OK", "RESOURCE_EXHAUSTED"}


async def test_runtime_stopped_under_load_fails_no_unary_call():
    async with runtimes(("r1", ["identity"]), ("r2", ["identity"])) as rts, \
            proxy(rts) as app, stub(app) as s:
        async with steady_load(s) as (done, failures):
            await eventually(lambda: min(done.values()) >= 10, timeout=10)
            await rts[0].stop()
            after = done["r2"]
            await eventually(lambda: done["r2"] >= after + 100, timeout=10)
        assert failures == []
        assert app.registry.endpoints["r1"].ejected  # outlier detection saw the failed tries
        assert app.metrics.registry.get_sample_value(
            "meshproxy_retries_total", {"model": "identity", "reason": "connect-failure"}) \
            or app.metrics.registry.get_sample_value(
                "meshproxy_retries_total", {"model": "identity", "reason": "unavailable"})


async def test_stop_lets_a_call_in_flight_finish_and_refuses_new_ones():
    async with runtimes(("r1", ["sum"]), latency_ms=300) as rts:
        async with proxy(rts) as app, stub(app) as s:
            in_flight = asyncio.ensure_future(s.ModelInfer(sum_request(2, 3), timeout=5))
            await eventually(lambda: app.registry.endpoints["r1"].active == 1)
            stopping = asyncio.ensure_future(app.stop())
            await eventually(lambda: app.ctx.draining)
            assert (await in_flight).outputs[0].contents.fp64_contents == [5.0]
            await stopping
            err = await rpc_error(s.ModelInfer(sum_request(1), timeout=2))
            assert err.code() == grpc.StatusCode.UNAVAILABLE


@contextlib.asynccontextmanager
async def steady_load(s, clients: int = 3):
    """Unary calls back to back from `clients` callers (three: the default retry budget lets
    three retries run at once) until the block ends; yields (calls per runtime, failures)."""
    done = {"r1": 0, "r2": 0}
    failures = []
    stop = asyncio.Event()

    async def client():
        while not stop.is_set():
            try:
                reply = await s.ModelInfer(sum_request(1, model="identity"), timeout=5)
                done[reply.parameters["runtime"].string_param] += 1
            except grpc.aio.AioRpcError as e:
                failures.append(e)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    try:
        yield done, failures
    finally:
        stop.set()
        await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def runtime_process(name: str, models: list[str]):
    """`meshproxy runtime` in its own process (so it can be killed -9); yields (proc, entry)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshproxy", "runtime", "--name", name, "--models", ",".join(models),
        "--http-port", "0", "--grpc-port", "0", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
    try:
        async with asyncio.timeout(15):
            line = (await proc.stdout.readline()).decode()
        m = re.search(r"http=127\.0\.0\.1:(\d+) grpc=127\.0\.0\.1:(\d+)", line)
        assert m, line

        class Listed:
            def loaded_models(self):
                return models

        rt = Listed()
        rt.name, rt.http_port, rt.grpc_port = name, int(m.group(1)), int(m.group(2))
        yield proc, rt
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_runtime_killed_9_under_load_fails_no_unary_call():
    async with runtimes(("r1", ["identity"])) as (r1,), \
            runtime_process("r2", ["identity"]) as (victim, r2), \
            proxy([r1, r2]) as app, stub(app) as s:
        async with steady_load(s) as (done, failures):
            await eventually(lambda: min(done.values()) >= 10, timeout=10)
            victim.kill()
            await victim.wait()
            after = done["r1"]
            await eventually(lambda: done["r1"] >= after + 100, timeout=10)
        assert failures == []
        assert app.registry.endpoints["r2"].ejected  # its failed tries were retried on r1


async def test_spans_join_the_clients_trace_and_the_runtime_gets_the_try_span():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    seen = {}

    async def infer(message: bytes, context):
        seen.update(context.invocation_metadata())
        return pb.ModelInferResponse(model_name="m").SerializeToString()

    exporter = InMemorySpanExporter()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with raw_runtime("raw", "m", infer) as rt, \
            proxy([rt], span_exporter=exporter) as app, stub(app) as s:
        await s.ModelInfer(sum_request(1, model="m"),
                           metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
        app.ctx.tracing.provider.force_flush()
        spans = {sp.name: sp for sp in exporter.get_finished_spans()}
    server, upstream = spans["grpc ModelInfer m"], spans["upstream raw"]
    assert f"{server.context.trace_id:032x}" == trace_id
    assert server.parent.span_id == 0x00f067aa0ba902b7
    assert upstream.parent.span_id == server.context.span_id
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["meshproxy.runtime"] == "raw"
    _, tid, sid, _ = seen["traceparent"].split("-")
    assert (tid, sid) == (trace_id, f"{upstream.context.span_id:016x}")


async def test_access_log_has_a_line_per_call(tmp_path):
    log = tmp_path / "access.log"
    async with runtimes(("r1", ["sum"])) as rts, \
            proxy(rts, extra=f"telemetry: {{access_log: {{path: '{log}'}}}}\n") as app, \
            stub(app) as s:
        await s.ModelInfer(sum_request(1, 2))
        await rpc_error(s.ModelInfer(sum_request(1, model="nope")))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    ok, missing = lines
    assert ok["protocol"] == "grpc" and ok["status"] == "OK" and ok["runtime"] == "r1"
    assert ok["path"] == SERVICE + "ModelInfer" and ok["model"] == "sum" and ok["attempts"] == 1
    assert ok["bytes_out"] > 0
    assert missing["status"] == "NOT_FOUND" and missing["runtime"] is None


@pytest.mark.parametrize("seed", range(2))
async def test_grpc_calls_under_concurrent_failures_are_all_answered_and_nothing_leaks(seed):
    # Eight clients at once; the runtime answers, answers late, fails with UNAVAILABLE or
    # RESOURCE_EXHAUSTED, or never answers within the per-try timeout; some clients cancel their
    # call. Every awaited call ends with the runtime's answer or a gRPC status, and afterwards no
    # call is counted active on the endpoint or in the retry budget.
    rng = random.Random(seed)

    async def infer(message: bytes, context):
        case = rng.choice(["ok", "ok", "ok", "late", "unavailable", "exhausted", "silent"])
        if case == "silent":
            await asyncio.sleep(1)  # past the per-try timeout
        elif case == "late":
            await asyncio.sleep(rng.random() / 20)
        elif case != "ok":
            await context.abort(grpc.StatusCode.UNAVAILABLE if case == "unavailable"
                                else grpc.StatusCode.RESOURCE_EXHAUSTED, case)
        return pb.ModelInferResponse(model_name="m", id=pb.ModelInferRequest.FromString(
            message).id).SerializeToString()

    route = ("- model: m\n  timeout: 2s\n  retry_policy: {retry_on: 'unavailable,resource-exhausted',"
             " num_retries: 2, per_try_timeout: 0.3s}\n")
    outcomes = collections.Counter()

    async def client(s, k):
        for i in range(12):
            call = s.ModelInfer(sum_request(1, model="m", id=f"{k}-{i}"))
            if rng.random() < 0.1:
                await asyncio.sleep(rng.random() / 50)
                call.cancel()
                outcomes["cancelled"] += 1
                continue
            try:
                assert (await call).id == f"{k}-{i}"
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1

    async with raw_runtime("rt", "m", infer) as rt, proxy([rt], routes=route) as app, \
            stub(app) as s:
        async with asyncio.timeout(60):
            await asyncio.gather(*(client(s, k) for k in range(8)))
        endpoint = app.registry.endpoints["rt"]
        budget = app.ctx.snapshot.match("m", None, rng.random)[0].budget
        await eventually(lambda: (endpoint.active, budget.active_requests,
                                  budget.active_retries) == (0, 0, 0), timeout=5)
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED",
                             "cancelled"}
    assert outcomes["OK"] > 20, outcomes  # (about 72 of 96 in 25 runs)


async def test_a_stream_the_runtime_ends_with_an_error_after_a_reply_ends_so_for_the_client():
    # The proxy sends its initial metadata (x-meshproxy-upstream) with the runtime's; an error
    # after that must not try to send it again (grpc's UsageError made it UNKNOWN, counted OK).
    async def after_one(requests, context):
        async for _ in requests:
            yield pb.ModelStreamInferResponse().SerializeToString()
            context.set_trailing_metadata((("x-why", "quota"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    async with raw_runtime("raw", "m", stream=after_one) as rt, proxy([rt]) as app, \
            stub(app) as s:
        async def messages():
            yield sum_request(1, model="m")

        call, replies = s.ModelStreamInfer(messages()), []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for reply in call:
                replies.append(reply)
        assert len(replies) == 1 and e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == "queue full"
        assert ("x-why", "quota") in tuple(e.value.trailing_metadata())
        assert requests_counted(app, "m", "RESOURCE_EXHAUSTED", "raw") == 1
        assert requests_counted(app, "m", "OK", "raw") == 0


async def test_a_call_whose_runtime_leaves_the_table_is_retried_on_the_new_holder():
    # The update closes the leaving runtime's channel after drain_timeout, and grpc cancels
    # the calls still on it. Those calls used to end with no status at all: the client waited
    # for its deadline, or for good without one. Now each ends UNAVAILABLE on that runtime and
    # is retried on the runtime holding the model in the table in force.
    async def slow(message, context):
        await asyncio.sleep(30)
        return b""

    async def fast(message, context):
        return pb.ModelInferResponse(model_name="m").SerializeToString()

    async with raw_runtime("a", "m", slow) as a, raw_runtime("b", "m", fast) as b, \
            proxy([a], extra="drain_timeout: 0.5s\n", routes="- model: m\n  timeout: 60s\n") \
            as app, stub(app) as s:
        calls = [asyncio.ensure_future(s.ModelInfer(sum_request(1, model="m"), timeout=t))
                 for t in (20, None)]
        leaving = app.registry.endpoints["a"]
        await eventually(lambda: leaving.active == 2)
        new = load_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                        "static_resources:\n  runtimes:\n"
                        + runtime_entry("b", b.http_port, b.grpc_port, ["m"]))
        app.update("v2", new.runtimes, new.routes)
        assert (await s.ModelInfer(sum_request(1, model="m"))).model_name == "m"  # on b
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*calls)
        assert [a.model_name for a in answers] == ["m", "m"]  # b answers with the model name
        assert requests_counted(app, "m", "OK", "b") == 3
        assert leaving.active == 0


async def test_a_stream_cancelled_while_the_proxy_waits_to_write_to_it_is_counted_cancelled():
    big = pb.ModelStreamInferResponse(error_message="x" * 1_000_000).SerializeToString()
    sent = []

    async def flood(requests, context):
        await requests.__anext__()
        while True:
            yield big
            sent.append(1)

    async with raw_runtime("raw", "m", stream=flood) as rt, proxy([rt]) as app, stub(app) as s:
        hold = asyncio.Event()

        async def messages():
            yield sum_request(1, model="m")
            await hold.wait()

        call = s.ModelStreamInfer(messages())
        await call.read()
        # The client reads no more: the windows fill and the proxy waits in its write.
        await eventually(lambda: len(sent) >= 8, timeout=10)
        call.cancel()
        await eventually(lambda: requests_counted(app, "m", "CANCELLED", "raw") == 1)
        assert requests_counted(app, "m", "OK", "raw") == 0
        await eventually(lambda: app.registry.endpoints["raw"].active == 0)
        hold.set()


@pytest.mark.skipif(not harness.ipv6_loopback(), reason="no IPv6 loopback on this host")
async def test_listeners_on_an_ipv6_address_serve_rest_and_grpc():
    # The gRPC address needs brackets: '::1:0' was refused by grpc core, and the proxy exited.
    app = ProxyApp(load_text("listeners: {http_address: '[::1]:0', grpc_address: '[::1]:0'}\n"
                             "admin: {address: '127.0.0.1:0'}\n"))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"[::1]:{app.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
        reader, writer = await asyncio.open_connection("::1", app.http_port)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await app.stop()


async def _echo_stream(requests, context):
    async for message in requests:
        yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
            model_name="m", id=pb.ModelInferRequest.FromString(message).id)).SerializeToString()


async def test_a_stream_to_a_runtime_that_cannot_be_reached_goes_to_another_and_ejects_it():
    # Streams took one try: with one holder down, every other stream failed UNAVAILABLE for
    # as long as it stayed in the table, and outlier detection never heard of it.
    async with raw_runtime("live", "m", stream=_echo_stream) as rt, \
            proxy([rt], dead={"dead": ["m"]}, routes="- model: m\n  balancer: round_robin\n") \
            as app, stub(app) as s:
        answers = []
        for i in range(12):
            async def one(i=i):
                yield sum_request(1, model="m", id=f"s{i}")
            answers += [pb.ModelStreamInferResponse.FromString(r.SerializeToString())
                        .infer_response.id async for r in s.ModelStreamInfer(one(), timeout=5)]
        assert answers == [f"s{i}" for i in range(12)]
        assert app.registry.endpoints["dead"].ejected  # consecutive_gateway_failure: 5
        assert requests_counted(app, "m", "OK", "live") == 12
        assert app.metrics.registry.get_sample_value(
            "meshproxy_retries_total", {"model": "m", "reason": "connect-failure"}) >= 5
        assert app.registry.endpoints["live"].active == 0


async def test_a_runtimes_own_unavailable_answer_is_relayed_as_it_came():
    # An UNAVAILABLE the runtime answered itself was taken for one it never got: its details
    # were replaced, its trailers dropped, and a connect-failure policy retried it.
    seen = []

    async def unloading(message, context):
        seen.append(1)
        context.set_trailing_metadata((("x-reason", "unloading"),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "model m is unloading, try r2")

    routes = "- model: m\n  retry_policy: {retry_on: connect-failure, num_retries: 2}\n"
    async with raw_runtime("rt", "m", unloading) as rt, proxy([rt], routes=routes) as app, \
            stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1, model="m"), timeout=5))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE,
                                               "model m is unloading, try r2")
        assert dict(err.trailing_metadata())["x-reason"] == "unloading"
        assert len(seen) == 1  # not retried: it reached the runtime
        assert requests_counted(app, "m", "UNAVAILABLE", "rt") == 1


async def test_a_runtime_slower_than_100ms_to_accept_a_connection_still_gets_the_call():
    # grpc core gives a connection attempt at least grpc.min_reconnect_backoff_ms, which was
    # 100: the first call on each new connection to a runtime that slow failed UNAVAILABLE.
    async with runtimes(("r1", ["sum"])) as (r1,):
        async def relay(reader, writer):
            await asyncio.sleep(0.3)  # the scenario: a slow handshake (a busy runtime, a WAN)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", r1.grpc_port)

            async def pump(src, dst):
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

        slow = await asyncio.start_server(relay, "127.0.0.1", 0)
        behind = types.SimpleNamespace(name="r1", http_port=r1.http_port,
                                       grpc_port=slow.sockets[0].getsockname()[1],
                                       loaded_models=lambda: ["sum"])
        try:
            async with proxy([behind]) as app, stub(app) as s:
                response = await s.ModelInfer(sum_request(1, 2), timeout=5)
                assert response.model_name == "sum"
        finally:
            slow.close()


async def test_a_call_past_the_clients_deadline_is_counted_deadline_exceeded(tmp_path):
    # It was counted and logged CANCELLED: timeouts looked like clients giving up.
    log = tmp_path / "access.log"
    async with runtimes(("r1", ["sum"]), latency_ms=500) as rts, \
            proxy(rts, extra=f"telemetry: {{access_log: {{path: '{log}'}}}}\n") as app, \
            stub(app) as s:
        err = await rpc_error(s.ModelInfer(sum_request(1, 2), timeout=0.1))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await eventually(lambda: requests_counted(app, "sum", "DEADLINE_EXCEEDED", "r1") == 1)
    assert json.loads(log.read_text())["status"] == "DEADLINE_EXCEEDED"


async def test_a_streams_bytes_are_counted_and_logged(tmp_path):
    log = tmp_path / "access.log"
    async with raw_runtime("rt", "m", stream=_echo_stream) as rt, \
            proxy([rt], extra=f"telemetry: {{access_log: {{path: '{log}'}}}}\n") as app, \
            stub(app) as s:
        sent = [sum_request(1, 2, model="m", id=f"n{i}") for i in range(3)]

        async def messages():
            for m in sent:
                yield m
        got = [r async for r in s.ModelStreamInfer(messages(), timeout=5)]
    line = json.loads(log.read_text())
    assert line["bytes_in"] == sum(m.ByteSize() for m in sent)
    assert line["bytes_out"] == sum(r.ByteSize() for r in got)
