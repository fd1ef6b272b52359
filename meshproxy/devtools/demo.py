"""`meshproxy demo`: three devtools runtimes with overlapping models, a proxy in front, a table."""

from __future__ import annotations

import asyncio
import collections
import signal
import socket

import aiohttp

from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from meshproxy.devtools.runtime import DevRuntime, RuntimeOptions

RUNTIMES = [
    ("runtime-a", ["identity", "sum", "bert"]),
    ("runtime-b", ["sum", "mnist"]),
    ("runtime-c", ["mnist", "identity", "resnet"]),
]
REQUESTS_PER_MODEL = 6


def _port(preferred: int, fixed: bool) -> int:
    """`preferred` when it is free and we want fixed ports, else 0 (any)."""
    if not fixed:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def _config(runtimes: list[DevRuntime], http_port: int, admin_port: int, grpc_port: int = 0) -> str:
    lines = [f"listeners: {{http_address: '127.0.0.1:{http_port}', "
             f"grpc_address: '127.0.0.1:{grpc_port}'}}",
             f"admin: {{address: '127.0.0.1:{admin_port}'}}",
             "static_resources:", "  runtimes:"]
    for rt in runtimes:
        models = ", ".join(f"{{name: {m}}}" for m in rt.loaded_models())
        lines += [f"    - name: {rt.name}", f"      http_address: 127.0.0.1:{rt.http_port}",
                  f"      models: [{models}]"]
    return "\n".join(lines) + "\n"


def _body(model: str) -> dict:
    if model == "mnist":
        data, shape = [((i * 7) % 255) / 255 for i in range(784)], [1, 784]
    else:
        data, shape = [1.0, 2.0, 3.0], [3]
    return {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}


async def _drive(port: int) -> dict[str, collections.Counter]:
    served: dict[str, collections.Counter] = {}
    async with aiohttp.ClientSession() as session:
        for model in sorted({m for _, ms in RUNTIMES for m in ms}):
            counts = served[model] = collections.Counter()
            for _ in range(REQUESTS_PER_MODEL):
                async with session.post(f"http://127.0.0.1:{port}/v2/models/{model}/infer",
                                        json=_body(model)) as resp:
                    await resp.read()
                    counts[resp.headers.get("x-meshproxy-upstream", f"HTTP {resp.status}")] += 1
    return served


def _table(served: dict[str, collections.Counter]) -> str:
    holders = {m: sorted(n for n, ms in RUNTIMES if m in ms) for m in served}
    rows = [("model", "held by", "served by (requests)", "only holders?")]
    for model, counts in served.items():
        by = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        rows.append((model, ", ".join(holders[model]), by,
                     "yes" if set(counts) <= set(holders[model]) else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _try_next(port: int, admin: int) -> str:
    return f"""
Try next (the proxy is at 127.0.0.1:{port}, admin at 127.0.0.1:{admin}):
  curl -s -i -H 'content-type: application/json' \\
    -d '{{"inputs":[{{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}}]}}' \\
    http://127.0.0.1:{port}/v2/models/sum/infer
  curl -s -i -H 'model: identity' -H 'content-type: application/json' \\
    -d '{{"inputs":[{{"name":"x","shape":[2],"datatype":"INT64","data":[4,2]}}]}}' \\
    http://127.0.0.1:{port}/v2/models/identity/infer
  curl -s -i http://127.0.0.1:{port}/v2/models/nosuch/infer -d '{{}}'      # 404, names the model
  curl -s -X POST http://127.0.0.1:{port}/v2/repository/index             # which model is where
  curl -s http://127.0.0.1:{admin}/clusters
  curl -s http://127.0.0.1:{admin}/metrics | grep meshproxy_requests_total
"""


async def run(once: bool = False) -> None:
    runtimes = []
    try:
        for i, (name, models) in enumerate(RUNTIMES):
            rt = DevRuntime(RuntimeOptions(name=name, models=models,
                                           http_port=_port(8101 + i, not once), grpc_port=None))
            await rt.start()
            runtimes.append(rt)
            print(f"started {name} on 127.0.0.1:{rt.http_port} holding {', '.join(models)}")
        app = ProxyApp(load_text(_config(runtimes, _port(8008, not once), _port(9901, not once),
                                         _port(8033, not once)),
                                 source="demo"))
        await app.start()
        print(f"started meshproxy on 127.0.0.1:{app.http_port} (admin 127.0.0.1:{app.admin_port})\n")
        try:
            served = await _drive(app.http_port)
            print(f"{REQUESTS_PER_MODEL} requests per model through the proxy:\n")
            print(_table(served))
            print(_try_next(app.http_port, app.admin_port))
            if not once:
                print("Running; Ctrl-C stops the proxy and the runtimes.", flush=True)
                await _until_interrupted()
        finally:
            await app.stop()
    finally:
        for rt in runtimes:
            await rt.stop()


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
