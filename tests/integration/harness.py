"""Real servers on 127.0.0.1 port 0 for integration tests: devtools runtimes, a proxy, raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import textwrap

from meshproxy.app import ProxyApp
from meshproxy.config import load_text
from meshproxy.devtools.runtime import DevRuntime, RuntimeOptions


@contextlib.asynccontextmanager
async def runtimes(*specs: tuple[str, list[str]], grpc_port: int | None = None, **options):
    """Start one devtools runtime per (name, models); yield them; stop them. REST is on a free
    port; gRPC is off unless `grpc_port` is given (0: a free port)."""
    started = []
    try:
        for name, models in specs:
            rt = DevRuntime(RuntimeOptions(name=name, models=models, http_port=0,
                                           grpc_port=grpc_port, **options))
            await rt.start()
            started.append(rt)
        yield started
    finally:
        for rt in started:
            await rt.stop()


def runtime_yaml(name: str, port: int, models: list[str]) -> str:
    ms = ", ".join("{name: %s}" % m for m in models)
    return f"    - name: {name}\n      http_address: 127.0.0.1:{port}\n      models: [{ms}]\n"


@contextlib.asynccontextmanager
async def proxy(rts=(), extra: str = "", listed: dict[str, list[str]] | None = None,
                dead: dict[str, list[str]] | None = None, routes: str = ""):
    """A ProxyApp in front of `rts` (each listed with its own models unless `listed` says
    otherwise); `dead` adds runtimes at ports where nothing listens."""
    body = "".join(runtime_yaml(rt.name, rt.http_port, (listed or {}).get(rt.name, rt.loaded_models()))
                   for rt in rts)
    for name, models in (dead or {}).items():
        body += runtime_yaml(name, free_port(), models)
    text = ("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
            "admin: {address: '127.0.0.1:0'}\n"
            + textwrap.dedent(extra) + "static_resources:\n  runtimes:\n" + body
            + ("  routes:\n" + textwrap.indent(textwrap.dedent(routes), "    ") if routes else ""))
    app = ProxyApp(load_text(text))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; read until the server closes (or `timeout`, then return what came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        chunks.append(b"<still open>")
    writer.close()
    return b"".join(chunks)


def statuses(raw_response: bytes) -> list[int]:
    """The status codes of the responses in a raw byte stream, in order."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) [A-Z]", raw_response)]


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll `predicate` until true or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def proxy_file(path, text: str):
    """A ProxyApp from a config file it watches (edits to `path` apply live)."""
    from meshproxy.config import load_file
    path.write_text(textwrap.dedent(text))
    app = ProxyApp(load_file(str(path)), config_path=str(path))
    app.watch_interval = 0.05  # edits show within a test's deadline
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def rt_yaml(rt, models=None, extra: str = "") -> str:
    """One runtime entry for a config's static_resources.runtimes."""
    ms = ", ".join("{name: %s}" % m for m in (models or rt.loaded_models()))
    return (f"    - name: {rt.name}\n      http_address: 127.0.0.1:{rt.http_port}\n"
            f"      models: [{ms}]\n" + textwrap.indent(textwrap.dedent(extra), "      "))
