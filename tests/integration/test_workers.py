"""`meshproxy proxy --workers 2`: both workers serve one port, SIGTERM drains both, a dead worker
stops the proxy."""

import asyncio
import collections
import contextlib
import os
import re
import signal
import sys

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy._proto.inference import grpc_service_pb2_grpc as pb_grpc
from tests.integration.harness import eventually, free_port, runtimes

MESHPROXY = [sys.executable, "-m", "meshproxy"]
BODY = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [2, 3]}]}
READY = re.compile(r"meshproxy ready rest=127\.0\.0\.1:(\d+) admin=\S+ grpc=127\.0\.0\.1:(\d+) "
                   r"workers=2 pids=(\d+),(\d+) worker_admins=(\S+),(\S+)")


@pytest.fixture
async def workers(tmp_path):
    """A runtime answering in 300 ms and `meshproxy proxy --workers 2` in front of it (port 0:
    worker 1 joins the ports worker 0 got)."""
    async with runtimes(("slow", ["sum"]), latency_ms=300) as (rt,):
        cfg = tmp_path / "proxy.yaml"
        cfg.write_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                       "admin: {address: '127.0.0.1:0'}\ndrain_timeout: 5s\n"
                       "static_resources: {runtimes: [{name: slow, http_address: "
                       f"'127.0.0.1:{rt.http_port}', models: [{{name: sum}}]}}]}}\n")
        proc = await asyncio.create_subprocess_exec(
            *MESHPROXY, "proxy", "-c", str(cfg), "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(15):
                line = (await proc.stdout.readline()).decode()
            m = READY.search(line)
            assert m, (line, await proc.stderr.read())
            yield proc, int(m[1]), (int(m[3]), int(m[4])), (m[5], m[6]), int(m[2])
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def served(session: aiohttp.ClientSession, admin: str) -> float:
    async with session.get(f"http://{admin}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("meshproxy_requests_total{"))


async def by_worker(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with session.get(f"http://{admin}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "meshproxy_requests_total":
                out[smp.labels["worker"]] = out.get(smp.labels["worker"], 0) + smp.value
    return out


async def active(session: aiohttp.ClientSession, admin: str) -> int:
    async with session.get(f"http://{admin}/clusters") as r:
        return (await r.json())["endpoints"][0]["active_requests"]


async def test_both_workers_serve_the_port_and_sigterm_drains_both(workers):
    proc, port, pids, admins, _ = workers
    assert all(_parent(pid) == proc.pid for pid in pids)
    url = f"http://127.0.0.1:{port}/v2/models/sum/infer"
    async with aiohttp.ClientSession() as s:
        # 16 concurrent requests, each on its own connection: the kernel spreads connections
        # over the two listening sockets by hash (all on one worker: p = 2 * 2**-16).
        fresh = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=fresh) as each:
            statuses = await asyncio.gather(*(_post(each, url) for _ in range(16)))
        assert statuses == [200] * 16
        per_worker = await by_worker(s, admins[0])  # worker 0's /metrics: every worker's series
        assert sum(per_worker.values()) == 16 and min(per_worker.values()) > 0, per_worker
        assert set(per_worker) == {"0", "1"}
        assert await served(s, admins[1]) == per_worker["1"]  # worker 1's own view agrees
        # Requests in flight on every connection when SIGTERM comes: all answered, then exit 0.
        pending = [asyncio.ensure_future(_post(s, url)) for _ in range(6)]
        async with asyncio.timeout(10):
            while sum([await active(s, a) for a in admins]) < 6:
                pass
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.gather(*pending) == [200] * 6
    async with asyncio.timeout(15):
        assert await proc.wait() == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


async def test_a_worker_that_dies_stops_the_proxy(workers):
    proc, _, pids, _, _ = workers
    os.kill(pids[1], signal.SIGKILL)
    async with asyncio.timeout(15):
        assert await proc.wait() == 128 + signal.SIGKILL
    assert not os.path.exists(f"/proc/{pids[0]}")
    assert b"worker 1" in await proc.stderr.read()


async def test_a_worker_that_exits_0_on_its_own_still_fails_the_proxy(workers):
    """`kill <pid>` of one worker: it drains and exits 0, but the proxy lost a worker, so the
    parent exits 1 (a supervisor restarting on failure brings the proxy back)."""
    proc, _, pids, _, _ = workers
    os.kill(pids[1], signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await proc.wait() == 1
    assert not os.path.exists(f"/proc/{pids[0]}")
    err = await proc.stderr.read()
    assert b"worker 1" in err and b"exited with 0" in err


async def test_the_grpc_port_is_shared_too(workers):
    """Both workers bound the gRPC port (a failed bind ends the proxy); calls on new
    connections are answered whichever worker takes them."""
    proc, _, _, _, grpc_port = workers
    for _ in range(8):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert (await stub.ServerLive(pb.ServerLiveRequest(), timeout=5)).live
    assert proc.returncode is None


async def test_bad_config_exits_64_before_any_worker_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: {http_address: '127.0.0.1:0'}\nstatic_resources: {runtimes: [{}]}\n")
    proc = await asyncio.create_subprocess_exec(
        *MESHPROXY, "proxy", "-c", str(bad), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(15):
        out, err = await proc.communicate()
    assert proc.returncode == 64 and b"static_resources.runtimes[0]" in err and not out


async def test_sigterm_while_a_worker_starts_stops_every_worker_cleanly(tmp_path):
    """SIGTERM to the parent as soon as worker 1 exists (its interpreter is still importing):
    the signal forwarded to it waits for its handlers, and every worker exits 0."""
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                   "admin: {address: '127.0.0.1:0'}\n")
    proc = await asyncio.create_subprocess_exec(
        *MESHPROXY, "proxy", "-c", str(cfg), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: len(_children(proc.pid)) == 2, timeout=15, interval=0.005)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"ready" not in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _post(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json=BODY) as r:
        await r.read()
        return r.status


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _parent(int(entry)) == pid:
                    found.append(int(entry))
            except (OSError, IndexError):  # it exited while we looked
                pass
    return found


@contextlib.asynccontextmanager
async def holding_relay(target: int, hold: float):
    """A TCP relay to 127.0.0.1:`target` that, on every connection after the first, holds what
    the client sends after its first read (an HTTP/2 preface and SETTINGS: the channel becomes
    ready) until `hold` seconds after it connected; yields its port."""
    accepted = 0

    async def pump(reader, writer, until: float = 0.0):
        try:
            first = True
            while data := await reader.read(65536):
                if not first and (wait := until - asyncio.get_running_loop().time()) > 0:
                    await asyncio.sleep(wait)  # the scenario: a slow control plane
                first = False
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader, writer):
        nonlocal accepted
        accepted += 1
        until = asyncio.get_running_loop().time() + hold if accepted > 1 else 0.0
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pump(reader, up_writer, until), pump(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_worker_takes_no_connection_before_its_own_first_table(tmp_path):
    """Worker 1's ADS stream gets its first table 2 s after worker 0's (a relay in front of
    the control plane holds it). The kernel gives new connections only to listening sockets,
    and a worker listens only once it has a table, so no request meets worker 1 before then
    (it would answer 404): worker 0 serves them all, and both serve once worker 1 has it."""
    from meshproxy.discovery.state import RUNTIME_TYPE
    from tests.integration.test_control_plane import control_plane, cp_yaml
    async with runtimes(("r1", ["sum"])) as (rt,), control_plane(cp_yaml([rt])) as cp, \
            holding_relay(cp.grpc_port, hold=2.0) as relay_port:
        await eventually(lambda: "r1" in cp.cache.get(RUNTIME_TYPE).entries, timeout=5)
        port = free_port()
        cfg = tmp_path / "proxy.yaml"
        cfg.write_text(f"listeners: {{http_address: '127.0.0.1:{port}', grpc_address: "
                       "'127.0.0.1:0'}\nadmin: {address: '127.0.0.1:0'}\n"
                       f"dynamic_resources: {{ads_addresses: ['127.0.0.1:{relay_port}'], "
                       "initial_fetch_timeout: 10s}\n")
        proc = await asyncio.create_subprocess_exec(
            *MESHPROXY, "proxy", "-c", str(cfg), "--workers", "2",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        seen: collections.Counter = collections.Counter()
        url = f"http://127.0.0.1:{port}/v2/models/sum/infer"
        try:
            ready = asyncio.ensure_future(proc.stdout.readline())
            async with asyncio.timeout(20), aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)) as s:
                while not ready.done():  # a fresh connection each, hashed over the listeners
                    try:
                        seen[await _post(s, url)] += 1
                    except aiohttp.ClientConnectionError:
                        seen["refused"] += 1  # before worker 0 has its table
                        await asyncio.sleep(0.01)
                m = READY.search(ready.result().decode())
                assert m, (ready.result(), seen)
                assert seen[200] >= 20 and set(seen) <= {200, "refused"}, seen
                assert sorted(await asyncio.gather(*(_post(s, url) for _ in range(16)))) \
                    == [200] * 16
                counts = await by_worker(s, m[5])
            assert counts.get("1", 0) > 0, counts
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(15):
                    await proc.wait()
