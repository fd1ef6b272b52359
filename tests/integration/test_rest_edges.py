"""REST edges a user meets in operation: runtimes that hang, mirrored copies of odd requests,
and what the access log and metrics say about requests that did not end normally."""

import asyncio
import collections
import contextlib
import json
import re
import socket
import struct
import types

import aiohttp

from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from tests.integration.harness import (eventually, free_port, proxy_file, raw, rt_yaml, runtimes,
                                       statuses)
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


@contextlib.asynccontextmanager
async def recording_runtime(name: str, models: list[str]):
    """A runtime on a free port that keeps each request head it reads and answers 200 (a
    HEAD with the head only); yields (a runtime for rt_yaml, the heads)."""
    heads: list[bytes] = []

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                heads.append(head)
                body = b'{"outputs": []}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body)
                             + (b"" if head.startswith(b"HEAD ") else body))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with served_by(serve, name, models) as rt:
        yield rt, heads


@contextlib.asynccontextmanager
async def served_by(serve, name: str = "odd", models=("sum",)):
    """A runtime whose connections `serve(reader, writer)` handles, on a free port; yields it
    as rt_yaml takes it."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield types.SimpleNamespace(name=name, http_port=server.sockets[0].getsockname()[1],
                                    loaded_models=lambda: list(models))
    finally:
        server.close()


def mirror_outcomes(p) -> dict[str, float]:
    return {o: metric(p, "meshproxy_mirror_requests_total", outcome=o)
            for o in ("ok", "error", "failed", "timeout", "primary_failed")}


async def test_a_mirrored_copy_says_shadow_in_its_host_and_a_head_copy_ends_at_once(tmp_path):
    # Envoy adds -shadow to a copy's Host, so the shadow side can tell copies from traffic. A
    # copy of a HEAD request has an answer without a body: it used to wait for one until the
    # route timeout, holding a connection and a max_concurrent slot, then count `timeout`.
    async with runtimes(("primary", ["sum"])) as (primary,), \
            recording_runtime("shadow", ["sum-shadow"]) as (shadow, heads):
        routes = "- {model: sum, timeout: 5s, mirror: {model: sum-shadow, fraction: 1.0}}"
        async with proxy_file(tmp_path / "p.yaml",
                              config(rt_yaml(primary), rt_yaml(shadow), routes=routes)) as p:
            async with aiohttp.ClientSession() as s:
                assert (await infer(s, p.http_port, headers={"host": "infer.example:8080"}))[0] \
                    == 200
                async with s.head(f"http://127.0.0.1:{p.http_port}/v2/models/sum/ready",
                                  headers={"host": "infer.example"}) as r:
                    assert r.status == 200
            await eventually(lambda: mirror_outcomes(p)["ok"] == 2, timeout=2)
            assert mirror_outcomes(p)["timeout"] == 0
    hosts = [re.search(rb"(?i)\r\nhost: *([^\r]*)", h).group(1) for h in heads]
    assert hosts == [b"infer.example-shadow:8080", b"infer.example-shadow"]


async def test_a_request_answered_before_its_body_arrived_is_not_mirrored_half(tmp_path):
    # The primary runtime refuses connections: the client gets its 502 before it sent the body,
    # whose rest is then read and dropped. The copy used to go out with the head and no body,
    # and the shadow runtime waited for it until the route timeout.
    dead = f"    - name: dead\n      http_address: 127.0.0.1:{free_port()}\n      models: [{{name: sum}}]\n"
    async with recording_runtime("shadow", ["sum-shadow"]) as (shadow, heads):
        routes = "- {model: sum, timeout: 3s, mirror: {model: sum-shadow, fraction: 1.0}}"
        async with proxy_file(tmp_path / "p.yaml",
                              config(dead, rt_yaml(shadow), routes=routes)) as p:
            body = b'{"inputs": []}'
            reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
            writer.write(b"POST /v2/models/sum/infer HTTP/1.1\r\nHost: x\r\n"
                         b"content-length: %d\r\n\r\n" % len(body))
            async with asyncio.timeout(5):
                answer = await reader.readuntil(b"\r\n\r\n")
                writer.write(body)
                await writer.drain()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 502")
            await eventually(lambda: mirror_outcomes(p)["primary_failed"] == 1, timeout=2)
            assert p.ctx.snapshot.endpoints["shadow"].active == 0 and heads == []


async def test_a_request_whose_client_went_away_is_still_logged_and_counted(tmp_path):
    # A client that times out or is killed mid-request used to leave no access-log line and
    # no count; Envoy logs it with response code 0.
    log = tmp_path / "access.log"
    async with runtimes(("slow", ["sum"]), latency_ms=2000) as (slow,):
        extra = f"telemetry: {{access_log: {{path: '{log}'}}}}\n"
        async with proxy_file(tmp_path / "p.yaml", config(rt_yaml(slow), extra=extra)) as p:
            body = json.dumps(SUM).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
            writer.write(b"POST /v2/models/sum/infer HTTP/1.1\r\nHost: x\r\n"
                         b"content-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            await eventually(lambda: p.ctx.snapshot.endpoints["slow"].active == 1, timeout=2)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # a reset, with the answer still to come
            await eventually(lambda: metric(p, "meshproxy_requests_total", model="sum",
                                            code="0") == 1, timeout=2)
            assert p.ctx.snapshot.endpoints["slow"].active == 0  # its try was let go
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [(ln["model"], ln["status"], ln["runtime"]) for ln in lines] == [("sum", 0, "slow")]


async def test_protocol_errors_are_logged_and_bytes_out_is_what_the_client_got(tmp_path):
    # A request that is not valid HTTP got its 400 but no access-log line; bytes_out left out
    # local answers, error answers and the headers the proxy adds.
    log = tmp_path / "access.log"
    async with runtimes(("r1", ["sum"])) as (r1,):
        extra = f"telemetry: {{access_log: {{path: '{log}'}}}}\n"
        async with proxy_file(tmp_path / "p.yaml", config(rt_yaml(r1), extra=extra)) as p:
            got = []
            for request in (b"GET /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"GET /v2/models/nope/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            b"NOT HTTP AT ALL\r\n\r\n"):
                got.append(await raw(p.http_port, request))
    assert [int(g.split(b" ")[1]) for g in got] == [200, 404, 200, 400]
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [ln["status"] for ln in lines] == [200, 404, 200, 400]
    assert [ln["bytes_out"] for ln in lines] == [len(g) for g in got]


async def test_a_request_refused_before_routing_gets_its_server_span(tmp_path):
    # An unknown model (404) or a rate-limited request (429) got no span, so a sampled
    # trace lost the request and its access-log line had no trace_id.
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from meshproxy.app import ProxyApp
    from meshproxy.config import load_text
    exporter = InMemorySpanExporter()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with runtimes(("r1", ["sum"])) as (r1,):
        app = ProxyApp(load_text(config(rt_yaml(r1))), span_exporter=exporter)
        await app.start()
        try:
            async with aiohttp.ClientSession() as s:
                status, *_ = await infer(s, app.http_port, model="nope",
                                         headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
            app.ctx.tracing.provider.force_flush()
        finally:
            await app.stop()
    assert status == 404
    spans = exporter.get_finished_spans()
    assert [(s.name, f"{s.context.trace_id:032x}", s.attributes["http.response.status_code"])
            for s in spans] == [("POST nope", trace_id, 404)]


SMUGGLED = b"GET /v2/models/secret/ready HTTP/1.1\r\nHost: x\r\n\r\n"


def carrying_smuggled(lines: bytes) -> bytes:
    """A request for model `sum` with `lines` in its head, whose body is a request for model
    `secret`: a runtime that misses the body's framing reads that as a request of its own."""
    return (b"POST /v2/models/sum/infer HTTP/1.1\r\nHost: x\r\n" + lines + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED)


async def test_connection_cannot_strip_the_framing_of_a_request_or_a_response(tmp_path):
    # `Connection: content-length` used to drop Content-Length from the head sent upstream
    # while the body went on: the runtime read the body as a request of its own (smuggling,
    # here for a model no route sends it). A response naming its own framing the same way
    # reached the client without it, and the client could not find its end.
    async with recording_runtime("r1", ["sum", "secret"]) as (rt, heads):
        async with proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
            reply = await raw(p.http_port, carrying_smuggled(b"Connection: content-length, close"))
    assert reply.startswith(b"HTTP/1.1 200")
    assert len(heads) == 1 and b"\r\ncontent-length: %d" % len(SMUGGLED) in heads[0].lower()

    async def framed_oddly(reader, writer):
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\n"
                         b"content-length: 5\r\n\r\nhello")

    async with served_by(framed_oddly) as odd, \
            proxy_file(tmp_path / "q.yaml", config(rt_yaml(odd))) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
        async with asyncio.timeout(5):
            for _ in range(2):  # the connection stays usable: each answer has its end
                writer.write(b"GET /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"\r\ncontent-length: 5\r\n" in head.lower()
                assert await reader.readexactly(5) == b"hello"
        writer.close()


@contextlib.asynccontextmanager
async def sloppy_runtime(answer):
    """A runtime that writes the reads `answer(request_head)` returns, each a read of its own
    (a pause between them); yields it (as rt_yaml takes it) and the connections it accepted."""
    accepted = []

    async def serve(reader, writer):
        accepted.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            for i, data in enumerate(answer(head)):
                if i:
                    await asyncio.sleep(0.05)  # the scenario: a read of its own
                writer.write(data)
                await writer.drain()

    async with served_by(serve, "sloppy") as rt:
        yield rt, accepted


async def test_bytes_a_runtime_sends_past_its_answer_never_reach_the_client(tmp_path):
    # Past the Content-Length in a later read, or a body after a HEAD's head: those bytes were
    # relayed into the client's keep-alive stream (a split response), and the runtime
    # connection was used again.
    def answer(head):
        if head.startswith(b"HEAD "):
            return [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabcd"]
        return [b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234",
                b"56789HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"]

    async with sloppy_runtime(answer) as (rt, accepted), \
            proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
        async with asyncio.timeout(5):
            writer.write(b"GET /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(10) == b"0123456789"
            writer.write(b"HEAD /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"GET /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), \
                (head, second)  # no stray body bytes in front of the next answer
            assert await reader.readexactly(10) == b"0123456789"
        writer.close()
        assert len(accepted) == 3  # neither runtime connection was used again


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
LENGTH_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
SPLIT = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nEVIL!"
# How a runtime answers /v2/models/sum/ready?shape=N: the reads of a whole answer (head, body),
# then bytes that are not part of it (another response, or garbage) at the end of the last.
SHAPES = {
    "chunked, then a response, in one read":
        ([CHUNKED_HEAD + b"5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"], SPLIT),
    "chunked with trailers, its end in a later read, then a response":
        ([CHUNKED_HEAD + b"5\r\n01234\r\n", b"5;x=1\r\n56789\r\n0\r\nx-t: 1\r\n\r\n"], SPLIT),
    "chunked, its end in a later read, then garbage":
        ([CHUNKED_HEAD + b"5\r\n01234\r\n", b"5\r\n56789\r\n0\r\n\r\n"], b"GARBAGE"),
    "content-length, then garbage, in one read": ([LENGTH_HEAD + b"0123456789"], b"GARBAGE"),
    "content-length, its end in a later read, then garbage":
        ([LENGTH_HEAD + b"01234", b"56789"], b"GARBAGE"),
}


async def test_a_whole_answer_with_bytes_after_it_is_relayed_and_the_bytes_are_dropped(tmp_path):
    # After a chunked answer, a second response the runtime wrote reached the client as the
    # answer to its next request (a split response), and the runtime connection was used
    # again. Garbage after an answer, in the same read or the one that ended it, lost the whole
    # answer: a 502, or a body cut short and the client's connection closed.
    def answer(head):
        reads, extra = list(SHAPES.values())[int(re.search(rb"shape=(\d+)", head)[1])]
        return reads[:-1] + [reads[-1] + extra]

    async with sloppy_runtime(answer) as (rt, accepted), \
            proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.http_port)
        for shape, (name, (reads, _)) in enumerate(list(SHAPES.items()) + [
                (f"again: {n}", s) for n, s in list(SHAPES.items())[:1]]):
            body = b"".join(reads).split(b"\r\n\r\n", 1)[1]
            async with asyncio.timeout(5):
                writer.write(b"GET /v2/models/sum/ready?shape=%d HTTP/1.1\r\nHost: x\r\n\r\n"
                             % (shape % len(SHAPES)))
                # a stray byte in front of this answer would show here
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200"), name
                assert await reader.readexactly(len(body)) == body, name
            assert len(accepted) == shape + 1, name  # that runtime connection was not used again
        writer.close()


async def test_an_upgrade_request_with_a_body_and_a_model_header_on_a_repository_path_are_refused(
        tmp_path):
    # llhttp ends an Upgrade request at its head, so its body was parsed here as a request of
    # its own (routed past any front proxy that passes Upgrade on) while the runtime waited
    # for it. And a `model` header routed any path: an unload on /v2/repository/... reached
    # the runtime and unloaded a model, where gRPC refuses repository calls.
    async with recording_runtime("r1", ["sum", "secret"]) as (rt, heads):
        async with proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
            upgrade = await raw(p.http_port,
                                carrying_smuggled(b"Connection: upgrade\r\nUpgrade: h2c"))
            unload = await raw(p.http_port, b"POST /v2/repository/models/secret/unload HTTP/1.1\r\n"
                               b"Host: x\r\nmodel: sum\r\nConnection: close\r\n"
                               b"Content-Length: 0\r\n\r\n")
            plain = await raw(p.http_port, b"GET /v2/models/sum/ready HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: upgrade, close\r\nUpgrade: h2c\r\n\r\n")
            # without a model header it was a 400 telling the client to set one (which led
            # to the 501): tritonclient.http's load_model showed that
            load = await raw(p.http_port, b"POST /v2/repository/models/secret/load HTTP/1.1\r\n"
                             b"Host: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            index = await raw(p.http_port, b"POST /v2/repository/index HTTP/1.1\r\n"
                              b"Host: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert statuses(upgrade) == [400] and b"Upgrade" in upgrade
    assert statuses(unload) == [501] and b"repository" in unload
    assert statuses(load) == [501] and b"repository" in load
    assert statuses(index) == [200] and b"secret" in index  # the proxy's own index
    assert statuses(plain) == [200]  # an upgrade request without a body is served as HTTP/1.1
    assert [h.split(b"\r\n")[0] for h in heads] == [b"GET /v2/models/sum/ready HTTP/1.1"]


async def test_what_the_drain_deadline_cuts_off_and_late_answers_are_still_counted(tmp_path):
    # The drain deadline aborts what is left; the access log used to close before those
    # connections' bookkeeping ran, so their lines were lost. And an answer that comes after
    # its runtime left the table went into a cached cell already folded away: it was missing
    # from the per-model totals.
    log = tmp_path / "access.log"
    extra = f"telemetry: {{access_log: {{path: '{log}'}}}}\ndrain_timeout: 0.2s\n"
    async with runtimes(("slow", ["sum"]), latency_ms=600) as (slow,):
        p = ProxyApp(load_text(config(rt_yaml(slow), extra=extra)))
        await p.start()
        stopped = False
        try:
            async with aiohttp.ClientSession() as s:
                assert (await infer(s, p.http_port))[0] == 200
                late = asyncio.ensure_future(infer(s, p.http_port))
                await eventually(lambda: p.ctx.snapshot.endpoints["slow"].active == 1, timeout=2)
                p.update("v2", [], [])  # `slow` leaves while its answer is on its way
                assert (await late)[0] == 200
                assert metric(p, "meshproxy_request_duration_seconds_count", model="sum") == 2
                cut = asyncio.ensure_future(infer(s, p.http_port, model="sum"))
                p.update("v3", [p.config.runtimes[0]], [])
                await eventually(lambda: p.ctx.snapshot.endpoints["slow"].active == 1, timeout=2)
                await p.stop()  # drains for 0.2 s, then cuts the request off
                stopped = True
                with contextlib.suppress(aiohttp.ClientError):
                    await cut
        finally:
            if not stopped:
                await p.stop()
    lines = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert [ln["status"] for ln in lines] == [200, 200, 0]


async def test_an_edit_applies_its_static_resources_and_names_what_waits_for_a_restart(tmp_path):
    # /config_dump kept showing the bootstrap read at start after an edit applied, and an edit
    # to drain_timeout or telemetry was logged "applied" while it did nothing.
    async with runtimes(("r1", ["sum"]), ("r2", ["identity"])) as (r1, r2):
        path = tmp_path / "p.yaml"
        async with proxy_file(path, config(rt_yaml(r1))) as p:
            edited = config(rt_yaml(r2), extra="drain_timeout: 3s\n")
            new = tmp_path / "p.yaml.new"
            new.write_text(edited)
            new.replace(path)
            await eventually(lambda: "r2" in p.ctx.snapshot.endpoints, timeout=5)
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{p.admin_port}/config_dump") as r:
                dump = await r.json()
            assert dump["restart_pending"] == ["drain_timeout"]
            boot = dump["bootstrap"]
            assert [rt["name"] for rt in boot["static_resources"]["runtimes"]] == ["r2"]
            assert "drain_timeout" not in boot  # what is in force: as started
            assert p.config.drain_timeout != 3.0


async def test_a_connection_that_answered_500_is_not_given_to_the_next_request(tmp_path):
    # uvicorn (under MLServer and KServe) answers an unhandled error 500 without
    # `connection: close`, then closes a few ms later. Pooled again, that connection failed
    # the next request, another client's: 23 of 30 such requests got 502 in the review.
    async def crashy(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if b"crash" in head.split(b"\r\n", 1)[0]:
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\n"
                             b"oops!")
                await writer.drain()
                await asyncio.sleep(0.05)  # the scenario: the close comes a moment later
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with served_by(crashy, "crashy") as rt, \
            proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
        async with aiohttp.ClientSession() as a, aiohttp.ClientSession() as b:
            for _ in range(5):
                async with a.get(f"http://127.0.0.1:{p.http_port}/v2/models/sum/crash") as r:
                    assert r.status == 500
                async with b.get(f"http://127.0.0.1:{p.http_port}/v2/models/sum/ready") as r:
                    assert (r.status, await r.text()) == (200, "ok")


async def test_a_model_name_with_a_percent_encoded_colon_in_the_path_is_routed(tmp_path):
    # tritonclient.http quotes the name in the path (iris:c -> iris%3Ac): it got 400.
    async with recording_runtime("r1", ["iris:c"]) as (rt, heads), \
            proxy_file(tmp_path / "p.yaml", config(rt_yaml(rt))) as p:
        got = await raw(p.http_port, b"GET /v2/models/iris%3Ac/ready HTTP/1.1\r\nHost: x\r\n"
                        b"model: iris:c\r\nConnection: close\r\n\r\n")
        other = await raw(p.http_port, b"GET /v2/models/iris%2Fc/ready HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert statuses(got) == [200] and statuses(other) == [400]
    assert heads[0].startswith(b"GET /v2/models/iris%3Ac/ready ")  # the path as it came
