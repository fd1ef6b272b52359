"""Control-plane bench: one control plane process, many ADS clients, a big table (not a test).

How it works: `meshproxy control-plane` runs as its own process (so its CPU and RSS are its
own, read from /proc). This process opens one registration stream per runtime (the sidecar
source: the control plane sees a change the moment a request arrives, so "source sees the
change" is the moment we send it) and registers RUNTIMES runtimes holding MODELS models in
total. Then PROXIES real `AdsClient`s (meshproxy.discovery.client, same code as the proxy,
with a recording apply callback instead of a table build) connect at once; we time until all
hold the full table. Then CHANGES times one model is loaded on one runtime; for each, the time
until the last client applied it. Bytes per change come from the control plane's
meshproxy_cp_xds_response_bytes counter, per client. Run for delta and state of the world,
and for a fifth of the table to show delta bytes per change do not grow with it.

    .venv/bin/python bench/xds_bench.py [--proxies 100 --runtimes 200 --models 10000 --changes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2, discovery_pb2_grpc  # noqa: E402
from meshproxy._proto.meshproxy.v1 import resources_pb2  # noqa: E402
from meshproxy.config import load_text  # noqa: E402
from meshproxy.discovery.client import AdsClient  # noqa: E402
from meshproxy.discovery.state import RUNTIME_TYPE  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlaneProcess:
    def __init__(self):
        self.grpc_port, self.admin_port = free_port(), free_port()
        self.dir = tempfile.TemporaryDirectory()
        cfg = Path(self.dir.name) / "cp.yaml"
        cfg.write_text(f"grpc_address: 127.0.0.1:{self.grpc_port}\n"
                       f"admin_address: 127.0.0.1:{self.admin_port}\n"
                       "registration: {heartbeat_interval: 10s, grace: 60s}\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "--log-level", "warning", "control-plane",
             "-c", str(cfg)], stdout=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline().decode()
        if "ready" not in line:
            raise SystemExit(f"control plane did not start: {line!r}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def response_bytes(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics") as r:
            text = r.read().decode()
        return sum(float(v) for v in re.findall(
            r'^meshproxy_cp_xds_response_bytes_total\{[^}]*\} (\S+)$', text, re.M))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


class Fleet:
    """The registered runtimes: one registration stream each, driven from this process."""

    def __init__(self, address: str, runtimes: int, models: int):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = discovery_pb2_grpc.RuntimeRegistrationServiceStub(self.channel)
        per = models // runtimes
        self.runtimes = [resources_pb2.Runtime(
            name=f"rt-{i:03d}", http_address=f"10.0.{i // 250}.{i % 250 + 1}:8000", dialect=1,
            models=[resources_pb2.LoadedModel(name=f"model-{i:03d}-{j:03d}") for j in range(per)])
            for i in range(runtimes)]
        self.queues = [asyncio.Queue() for _ in self.runtimes]
        self.calls = []

    async def _requests(self, i: int):
        node = bootstrap_pb2.Node(id=f"sidecar-{i}")
        while True:
            runtime = await self.queues[i].get()
            if runtime is None:
                return
            yield discovery_pb2.RegisterRequest(node=node, runtime=runtime)

    async def start(self) -> None:
        for i, rt in enumerate(self.runtimes):
            self.queues[i].put_nowait(rt)
            call = self.stub.Register(self._requests(i))
            self.calls.append(call)
        await asyncio.gather(*(call.read() for call in self.calls))

    def load(self, i: int, model: str) -> None:
        rt = resources_pb2.Runtime()
        rt.CopyFrom(self.runtimes[i])
        rt.models.add(name=model)
        self.runtimes[i] = rt
        self.queues[i].put_nowait(rt)

    async def close(self) -> None:
        for q in self.queues:
            q.put_nowait(None)
        for call in self.calls:
            call.cancel()
        await self.channel.close()


class Proxies:
    """N real ADS clients; `apply` records what each holds instead of building a table."""

    def __init__(self, address: str, n: int, delta: bool):
        protocol = "DELTA" if delta else "STATE_OF_THE_WORLD"
        settings = load_text(f"dynamic_resources: {{ads_addresses: ['{address}'], "
                             f"protocol: {protocol}}}\n").dynamic
        self.clients = []
        self.target = None
        self.done = asyncio.Event()
        self.applied_at: dict[int, float] = {}
        for i in range(n):
            client = AdsClient(settings, bootstrap_pb2.Node(id=f"bench-{i}"),
                               lambda v, rts, routes: None)
            client.on_update = (lambda i=i, c=client: self._updated(i, c))
            self.clients.append(client)

    def models_held(self, client: AdsClient) -> int:
        return sum(len(m.models) for _, m in client.state.types[RUNTIME_TYPE].resources.values())

    def _updated(self, i: int, client: AdsClient) -> None:
        if self.target is None or i in self.applied_at:
            return
        if self.target(client):
            self.applied_at[i] = time.perf_counter()
            if len(self.applied_at) == len(self.clients):
                self.done.set()

    async def wait_for(self, predicate, timeout: float) -> float:
        """Seconds until every client satisfies `predicate` (checked on each of its updates)."""
        self.target, self.applied_at, self.done = predicate, {}, asyncio.Event()
        for i, c in enumerate(self.clients):
            self._updated(i, c)
        await asyncio.wait_for(self.done.wait(), timeout)
        return max(self.applied_at.values())

    async def start(self) -> None:
        for c in self.clients:
            await c.start()

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients))


def holds(runtime: str, model: str):
    def check(client: AdsClient) -> bool:
        entry = client.state.types[RUNTIME_TYPE].resources.get(runtime)
        return entry is not None and any(m.name == model for m in entry[1].models)
    return check


async def scenario(proxies: int, runtimes: int, models: int, changes: int, delta: bool) -> dict:
    cp = ControlPlaneProcess()
    address = f"127.0.0.1:{cp.grpc_port}"
    fleet = Fleet(address, runtimes, models)
    group = None
    try:
        await fleet.start()
        total = runtimes * (models // runtimes)
        cpu0 = cp.cpu_seconds()
        group = Proxies(address, proxies, delta)
        t0 = time.perf_counter()
        await group.start()
        full = await group.wait_for(lambda c: group.models_held(c) == total, 300) - t0
        sync_cpu = cp.cpu_seconds() - cpu0
        await asyncio.sleep(1.0)
        bytes0, cpu1 = cp.response_bytes(), cp.cpu_seconds()
        latencies = []
        for k in range(changes):
            i = (k * 37) % runtimes
            model = f"loaded-{k}"
            sent = time.perf_counter()
            fleet.load(i, model)
            last = await group.wait_for(holds(fleet.runtimes[i].name, model), 30)
            latencies.append((last - sent) * 1000)
            await asyncio.sleep(0.02)
        change_cpu = (cp.cpu_seconds() - cpu1) / changes
        per_change = (cp.response_bytes() - bytes0) / changes / proxies
        latencies.sort()
        return {
            "protocol": "delta" if delta else "sotw", "proxies": proxies, "runtimes": runtimes,
            "models": total, "full_table_s": round(full, 2), "sync_cpu_s": round(sync_cpu, 2),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "max_ms": round(latencies[-1], 1),
            "bytes_per_change_per_proxy": round(per_change),
            "cp_cpu_ms_per_change": round(change_cpu * 1000, 1), "cp_rss_mib": round(cp.rss_mib(), 1),
        }
    finally:
        if group is not None:
            await group.stop()
        await fleet.close()
        cp.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--runtimes", type=int, default=200)
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--sotw-changes", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import uvloop
    rows = []
    # The second row has a fifth of the table with the same models per runtime: delta bytes
    # per change should not move, state-of-the-world bytes grow with the table.
    small = (args.runtimes // 5, args.models // 5)
    plan = [((args.runtimes, args.models), True, args.changes), (small, True, args.changes),
            ((args.runtimes, args.models), False, args.sotw_changes),
            (small, False, args.sotw_changes)]
    for (runtimes, models), delta, changes in plan:
        row = uvloop.run(scenario(args.proxies, runtimes, models, changes, delta))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
