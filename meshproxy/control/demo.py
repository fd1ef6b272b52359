"""`meshproxy demo --control-plane`: runtimes, a control plane discovering them, a proxy on ADS.

The demo loads a model on a runtime through its repository API and shows traffic moving to it
without restarting anything, then unloads it from another runtime and shows traffic leaving.
"""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp

from meshproxy.app import ProxyApp
from meshproxy.config import load_text as load_proxy
from meshproxy.control.app import ControlPlaneApp
from meshproxy.control.config import load_text as load_cp
from meshproxy.devtools.runtime import DevRuntime, RuntimeOptions

RUNTIMES = [("runtime-a", ["identity", "sum"]), ("runtime-b", ["sum", "mnist"]),
            ("runtime-c", ["mnist"])]
POLL = 0.5
BODY = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}


def _cp_config(runtimes: list[DevRuntime]) -> str:
    rows = "".join(f"    - {{name: {rt.name}, http_address: '127.0.0.1:{rt.http_port}', "
                   f"dialect: TRITON}}\n" for rt in runtimes)
    return ("grpc_address: 127.0.0.1:0\nadmin_address: 127.0.0.1:0\n"
            f"discovery:\n  poll_interval: {POLL}s\n  runtimes:\n{rows}")


def _proxy_config(cp_port: int) -> str:
    return ("node: {id: demo-proxy}\n"
            "listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
            "admin: {address: '127.0.0.1:0'}\n"
            f"dynamic_resources: {{ads_addresses: ['127.0.0.1:{cp_port}']}}\n"
            # Round robin, so each step's 12 requests show every holder; least_request's
            # random draws skip one of three holders in 12 tries about once in 130 runs.
            "static_resources: {routes: [{model: sum, balancer: round_robin}]}\n")


async def _served(session, port: int, model: str, n: int = 12) -> str:
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        async with session.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                json=BODY) as resp:
            await resp.read()
            counts[resp.headers.get("x-meshproxy-upstream") or f"HTTP {resp.status}"] += 1
    return ", ".join(f"{name} x{c}" for name, c in sorted(counts.items()))


async def _until(predicate, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit("demo: the table did not change in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _holders(proxy: ProxyApp, model: str) -> set[str]:
    return {rt.name for rt in proxy.ctx.snapshot.runtimes
            if any(m.name == model and m.state == 0 for m in rt.models)}


async def _step(session, proxy: ProxyApp, title: str, model: str, lines: list[str]) -> None:
    served = await _served(session, proxy.http_port, model)
    lines.append(f"{title:<52} {model:<9} {served}")
    print(lines[-1], flush=True)


async def run(once: bool = False) -> None:
    runtimes = [DevRuntime(RuntimeOptions(name=n, models=m, http_port=0, grpc_port=None,
                                          load_delay_ms=200)) for n, m in RUNTIMES]
    for rt in runtimes:
        await rt.start()
    cp = ControlPlaneApp(load_cp(_cp_config(runtimes)))
    await cp.start()
    proxy = ProxyApp(load_proxy(_proxy_config(cp.grpc_port)))
    await proxy.start()
    lines: list[str] = []
    try:
        await proxy.opened  # its ports listen once the control plane's first table is in force
        print(f"control plane grpc=127.0.0.1:{cp.grpc_port} admin=127.0.0.1:{cp.admin_port}; "
              f"proxy rest=127.0.0.1:{proxy.http_port} admin=127.0.0.1:{proxy.admin_port}")
        await _until(lambda: _holders(proxy, "mnist") == {"runtime-b", "runtime-c"})
        async with aiohttp.ClientSession() as s:
            for model in ("identity", "sum", "mnist"):
                await _step(s, proxy, "table learned from discovery", model, lines)
            c = runtimes[2]
            async with s.post(f"http://127.0.0.1:{c.http_port}/v2/repository/models/sum/load"):
                pass
            took = await _until(lambda: "runtime-c" in _holders(proxy, "sum"))
            await _step(s, proxy, f"sum loaded on runtime-c (+{took * 1000:.0f} ms)", "sum", lines)
            a = runtimes[0]
            async with s.post(f"http://127.0.0.1:{a.http_port}/v2/repository/models/sum/unload"):
                pass
            took = await _until(lambda: "runtime-a" not in _holders(proxy, "sum"))
            await _step(s, proxy, f"sum unloaded from runtime-a (+{took * 1000:.0f} ms)", "sum",
                        lines)
        print(f"(changes reach the proxy within one poll interval, {POLL:.1f} s, "
              "after the runtime reports them)")
        if not once:
            print("running; Ctrl-C stops", flush=True)
            await asyncio.Event().wait()
    finally:
        await proxy.stop()
        await cp.stop()
        for rt in runtimes:
            await rt.stop()
