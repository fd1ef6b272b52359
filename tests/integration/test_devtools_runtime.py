"""The devtools runtime over real sockets: REST with aiohttp, gRPC with grpc.aio, the CLI banner."""

import argparse
import asyncio
import contextlib
import json
import signal
import struct
import subprocess
import sys
import time

import aiohttp
import grpc
import pytest

from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy._proto.inference import grpc_service_pb2_grpc as pb_grpc
from meshproxy.devtools.options import RuntimeOptions, add_arguments, options_from_args
from meshproxy.devtools.runtime import DevRuntime, serve

pytestmark = pytest.mark.timeout(20)


def mnist_formula(x: list[float]) -> list[float]:
    """The documented weights, written out again so a change in the model shows up here."""
    raw = [sum(((7 * i + 13 * k) % 17 - 8) / 16 * x[i] for i in range(784)) + (k - 4.5) / 10
           for k in range(10)]
    return list(struct.unpack("<10f", struct.pack("<10f", *raw)))


IMAGE = [(i % 13) / 8 for i in range(784)]  # multiples of 1/8: exact in float32 and in sums


@contextlib.asynccontextmanager
async def runtime(**options):
    rt = DevRuntime(RuntimeOptions(**{"name": "rt-a", "http_port": 0, "grpc_port": 0, **options}))
    await rt.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{rt.http_port}") as http:
            yield rt, http
    finally:
        await rt.stop()


@contextlib.asynccontextmanager
async def grpc_stub(rt: DevRuntime):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rt.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


async def eventually(check, timeout: float = 3.0):
    """Poll an async condition until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            assert result, "condition not met before the deadline"
            return result
        await asyncio.sleep(0.01)


async def post_json(http, path, body):
    async with http.post(path, json=body) as r:
        return r.status, await r.json(), r.headers.get("x-served-by")


def fp32_input(name, shape, data):
    return {"name": name, "shape": shape, "datatype": "FP32", "data": data}


ONE = {"inputs": [fp32_input("x", [1], [1])]}  # a valid request for identity-like models


# --- REST -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model,inputs,outputs", [
    ("identity", [fp32_input("x", [2], [1.5, -2.0])],
     [{"name": "output0", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]}]),
    ("bert", [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]}],
     [{"name": "output0", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]),
    ("sum", [fp32_input("x", [2, 2], [[1, 2], [3, 4.5]]), fp32_input("y", [1], [0.25])],
     [{"name": "sum", "shape": [1], "datatype": "FP64", "data": [10.75]}]),
    ("mnist", [fp32_input("img", [1, 784], IMAGE)],
     [{"name": "logits", "shape": [1, 10], "datatype": "FP32", "data": mnist_formula(IMAGE)},
      {"name": "label", "shape": [1], "datatype": "INT64",
       "data": [mnist_formula(IMAGE).index(max(mnist_formula(IMAGE)))]}]),
])
async def test_rest_infer_answers_exactly(model, inputs, outputs):
    async with runtime(models=["identity", "sum", "mnist", "bert"]) as (_, http):
        status, body, served_by = await post_json(
            http, f"/v2/models/{model}/infer", {"id": "req-1", "inputs": inputs})
    assert (status, served_by) == (200, "rt-a")
    assert body == {"model_name": model, "model_version": "1", "id": "req-1",
                    "parameters": {"runtime": "rt-a"}, "outputs": outputs}


async def test_rest_unknown_model_is_404_naming_it():
    async with runtime() as (_, http):
        status, body, served_by = await post_json(http, "/v2/models/resnet/versions/1/infer", ONE)
        async with http.get("/v2/models/resnet") as meta:
            meta_status = meta.status
    assert (status, served_by, meta_status) == (404, "rt-a", 404)
    assert body == {"error": "model 'resnet' is not loaded on runtime rt-a"}


@pytest.mark.parametrize("payload,message", [
    (b"{not json", "not valid JSON"),
    (b'{"inputs": 3}', "'inputs' list"),
    (json.dumps({"inputs": [fp32_input("img", [1, 783], [0.0] * 783)]}).encode(), "784 elements"),
])
async def test_rest_bad_requests_are_400_naming_the_problem(payload, message):
    async with runtime(fail_rate=1.0) as (_, http):  # client errors win over injected failures
        async with http.post("/v2/models/mnist/infer", data=payload) as r:
            status, body = r.status, await r.json()
    assert status == 400 and message in body["error"]


async def test_fail_rate_one_gives_500_and_latency_delays_the_answer():
    async with runtime(fail_rate=1.0, latency_ms=150) as (_, http):
        started = time.monotonic()
        status, body, _ = await post_json(http, "/v2/models/identity/infer", ONE)
        elapsed = time.monotonic() - started
    assert status == 500 and "injected failure on runtime rt-a" in body["error"]
    assert elapsed >= 0.14  # libuv timers have millisecond granularity and may fire a tick early


async def test_health_and_metadata():
    async with runtime() as (_, http):
        async with http.get("/v2/health/live") as live, http.get("/v2/health/ready") as ready:
            assert (live.status, ready.status) == (200, 200)
        async with http.get("/v2") as r:
            assert await r.json() == {"name": "rt-a", "version": "0.1.0",
                                      "extensions": ["model_repository"]}
        async with http.get("/v2/models/mnist/versions/1") as r:
            assert await r.json() == {
                "name": "mnist", "versions": ["1"], "platform": "meshproxy-devtools",
                "inputs": [{"name": "input0", "datatype": "FP32", "shape": [1, 784]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10]},
                            {"name": "label", "datatype": "INT64", "shape": [1]}]}
        async with http.get("/v2/models/sum/ready") as yes, http.get("/v2/models/bert/ready") as no:
            assert (yes.status, no.status) == (200, 503)
            assert "not ready on runtime rt-a" in (await no.json())["error"]


async def index(http, ready=None):
    body = {} if ready is None else {"ready": ready}
    status, body, _ = await post_json(http, "/v2/repository/index", body)
    assert status == 200
    return {m["name"]: (m["state"], m["reason"]) for m in body}


async def test_repository_load_unload_round_trip():
    async with runtime(models=["sum"]) as (rt, http):
        assert (await post_json(http, "/v2/repository/models/bert/load", None))[:2] == (200, {})
        assert await index(http) == {"sum": ("READY", ""), "bert": ("READY", "")}
        assert rt.loaded_models() == ["bert", "sum"]
        assert (await post_json(http, "/v2/repository/models/sum/unload", None))[0] == 200
        assert await index(http) == {"sum": ("UNAVAILABLE", "unloaded"), "bert": ("READY", "")}
        assert await index(http, ready=True) == {"bert": ("READY", "")}
        status, _, _ = await post_json(http, "/v2/models/sum/infer", ONE)
        assert status == 404
        assert (await post_json(http, "/v2/repository/models/nope/unload", None))[0] == 404


async def test_load_delay_shows_loading_then_ready():
    async with runtime(models=[], load_delay_ms=300) as (_, http):
        started = time.monotonic()
        load = asyncio.ensure_future(post_json(http, "/v2/repository/models/bert/load", None))
        await eventually(lambda: _state_is(http, "bert", "LOADING"))
        status, body, _ = await post_json(http, "/v2/models/bert/infer", ONE)
        assert status == 503 and "still loading" in body["error"]
        assert (await load)[:2] == (200, {})
        assert time.monotonic() - started >= 0.3
        assert (await index(http))["bert"][0] == "READY"


async def _state_is(http, name, state):
    return (await index(http)).get(name, (None,))[0] == state


async def test_capacity_evicts_least_recently_used_over_rest():
    async with runtime(models=["identity", "sum"], capacity=2) as (_, http):
        await post_json(http, "/v2/models/identity/infer", ONE)
        await post_json(http, "/v2/repository/models/mnist/load", None)
        states = await index(http)
    assert states["sum"][0] == "UNAVAILABLE" and "evicted" in states["sum"][1]
    assert (states["identity"][0], states["mnist"][0]) == ("READY", "READY")


async def test_debug_echo_shows_headers_in_order_and_chunked_body_size():
    async with runtime() as (rt, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", rt.http_port)
        writer.write(b"PUT /debug/echo/a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nX-B: 2\r\nx-a: 1\r\n"
                     b"X-B: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"x-served-by: rt-a" in head.lower()
    assert json.loads(body) == {
        "method": "PUT", "path": "/debug/echo/a/b?x=1&y=2", "body_bytes": 11, "runtime": "rt-a",
        "headers": [["Host", "h"], ["X-B", "2"], ["x-a", "1"], ["X-B", "3"],
                    ["Transfer-Encoding", "chunked"], ["Connection", "close"]]}


# --- gRPC -----------------------------------------------------------------------------------

def mnist_request(i: int = 0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="mnist", id=f"r{i}")
    req.inputs.add(name="img", datatype="FP32", shape=[1, 784]).contents.fp32_contents.extend(IMAGE)
    return req


async def test_grpc_infer_typed_contents_with_served_by():
    async with runtime() as (rt, _), grpc_stub(rt) as stub:
        call = stub.ModelInfer(mnist_request())
        resp, metadata = await call, await call.initial_metadata()
    assert ("x-served-by", "rt-a") in list(metadata)
    assert resp.parameters["runtime"].string_param == "rt-a"
    want = mnist_formula(IMAGE)
    assert [(o.name, list(o.shape)) for o in resp.outputs] == [("logits", [1, 10]), ("label", [1])]
    assert list(resp.outputs[0].contents.fp32_contents) == want
    assert list(resp.outputs[1].contents.int64_contents) == [want.index(max(want))]


async def test_grpc_raw_contents_are_answered_raw():
    req = pb.ModelInferRequest(model_name="sum")
    req.inputs.add(name="a", datatype="INT64", shape=[3])
    req.inputs.add(name="b", datatype="INT32", shape=[2])
    req.raw_input_contents.extend([struct.pack("<3q", 1, 2, 2**40), struct.pack("<2i", -5, 7)])
    async with runtime() as (rt, _), grpc_stub(rt) as stub:
        resp = await stub.ModelInfer(req)
    assert resp.outputs[0].datatype == "INT64"
    assert struct.unpack("<q", resp.raw_output_contents[0]) == (2**40 + 5,)


async def test_grpc_errors_map_to_status_codes():
    unknown = pb.ModelInferRequest(model_name="resnet")
    unknown.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    bad = mnist_request()
    bad.inputs[0].shape[:] = [1, 783]
    async with runtime() as (rt, _), grpc_stub(rt) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await stub.ModelInfer(unknown)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ModelInfer(bad)
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'resnet' is not loaded on runtime rt-a" in not_found.value.details()
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_stream_answers_100_requests_in_order_and_survives_an_error():
    async def requests():
        for i in range(100):
            yield mnist_request(i) if i != 50 else pb.ModelInferRequest(model_name="nope", id="r50")

    async with runtime() as (rt, _), grpc_stub(rt) as stub:
        call = stub.ModelStreamInfer(requests())
        answers = [r async for r in call]
        assert ("x-served-by", "rt-a") in list(await call.initial_metadata())
    assert [a.infer_response.id for a in answers] == [f"r{i}" for i in range(100)]
    assert "model 'nope' is not loaded" in answers[50].error_message
    assert all(not a.error_message and a.infer_response.outputs[1].contents.int64_contents
               for i, a in enumerate(answers) if i != 50)


async def test_grpc_health_metadata_and_repository():
    async with runtime(models=["sum"]) as (rt, _), grpc_stub(rt) as stub:
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert (meta.name, list(meta.extensions)) == ("rt-a", ["model_repository"])
        model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="sum"))
        assert (model.platform, [o.name for o in model.outputs]) == ("meshproxy-devtools", ["sum"])
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="bert"))).ready
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="bert"))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="bert"))).ready
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="sum"))
        listed = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.state) for m in listed.models] == [
            ("bert", "READY"), ("sum", "UNAVAILABLE")]
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="sum"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


# --- lifecycle and CLI ----------------------------------------------------------------------

def test_arguments_parse_into_options():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = options_from_args(parser.parse_args(
        ["--name", "b", "--models", "sum, bert", "--grpc-port", "none", "--capacity", "3",
         "--fail-rate", "0.5", "--seed", "7", "--http-port", "0"]))
    assert opts == RuntimeOptions(name="b", models=["sum", "bert"], http_port=0, grpc_port=None,
                                  fail_rate=0.5, capacity=3, seed=7)
    assert options_from_args(parser.parse_args(["--grpc-port", "-1"])).grpc_port is None
    assert options_from_args(parser.parse_args(["--grpc-port", "0"])).grpc_port == 0
    with pytest.raises(ValueError, match="fail_rate must be in"):
        options_from_args(parser.parse_args(["--fail-rate", "2"]))


async def test_a_busy_grpc_port_fails_start_and_releases_the_http_port():
    async with runtime() as (first, _):
        second = DevRuntime(RuntimeOptions(name="rt-b", http_port=0, grpc_port=first.grpc_port))
        with pytest.raises(OSError, match="cannot listen for gRPC"):
            await second.start()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", second.http_port)


async def test_serve_calls_ready_and_stops_when_cancelled():
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    options = RuntimeOptions(http_port=0, grpc_port=None)
    task = asyncio.ensure_future(serve(options, started.set_result))
    rt = await asyncio.wait_for(started, 5)
    assert rt.grpc_port is None and rt.loaded_models() == ["identity", "mnist", "sum"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", rt.http_port)


def test_cli_prints_the_listening_line_and_exits_on_sigterm():
    script = ("import argparse, asyncio, sys; from meshproxy.devtools import options as o, "
              "runtime as r; p = argparse.ArgumentParser(); o.add_arguments(p); "
              "asyncio.run(r.serve(o.options_from_args(p.parse_args(sys.argv[1:]))))")
    args = ["--name", "cli", "--models", "sum,bert", "--http-port", "0", "--grpc-port", "0"]
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # printed once listening; the test timeout bounds the wait
        assert line.startswith("runtime cli listening http=127.0.0.1:")
        assert " grpc=127.0.0.1:" in line and line.rstrip().endswith("models=bert,sum")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
