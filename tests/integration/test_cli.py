"""The `meshproxy` command as users run it: check-config, proxy lifecycle, demo."""

import asyncio
import os
import re
import signal
import sys

import aiohttp
import pytest

from tests.integration.harness import free_port

MESHPROXY = [sys.executable, "-m", "meshproxy"]


async def spawn(*args):
    return await asyncio.create_subprocess_exec(
        *MESHPROXY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def first_line(proc, pattern: str, timeout: float = 15.0) -> re.Match:
    async with asyncio.timeout(timeout):
        while line := await proc.stdout.readline():
            m = re.search(pattern, line.decode())
            if m:
                return m
    raise AssertionError(f"no line matching {pattern!r}; stderr: {await proc.stderr.read()}")


async def run(*args, timeout: float = 60.0):
    proc = await spawn(*args)
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_accepts_good_and_names_the_bad_field(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("static_resources: {runtimes: [{name: a, http_address: '127.0.0.1:1', "
                    "models: [{name: m}]}]}\n")
    code, out, _ = await run("check-config", str(good))
    assert code == 0 and "ok" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("static_resources: {runtimes: [{name: a, http_adress: '127.0.0.1:1'}]}\n")
    code, _, err = await run("check-config", str(bad))
    assert code == 64 and "http_adress" in err and "bad.yaml" in err
    # A control-plane config is told by its keys, and checked as one.
    cp = tmp_path / "cp.yaml"
    cp.write_text("grpc_address: 127.0.0.1:18000\ndiscovery: {runtimes: [{name: a, "
                  "http_address: '127.0.0.1:1', models: [{name: m}]}]}\n")
    code, _, err = await run("check-config", str(cp))
    assert code == 64 and "discovery.runtimes[0].models" in err and "cp.yaml" in err


async def test_proxy_with_bad_config_exits_64_before_listening(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                   "static_resources: {routes: [{model: m, balancer: fastest}]}\n")
    code, out, err = await run("proxy", "-c", str(bad))
    assert code == 64 and "static_resources.routes[0].balancer" in err and "ready" not in out


@pytest.mark.parametrize("mistake, field", [
    ("admin: {address: '127.0.0.1:{port}'}\n", "admin.address: 127.0.0.1:{port} is also "
                                               "listeners.http_address"),
    ("admin: {address: '127.0.0.1:0'}\ntelemetry: {access_log: {path: /nonexistent/access.log}}\n",
     "telemetry.access_log.path: '/nonexistent'"),
], ids=["rest-and-admin-on-one-address", "access-log-directory-missing"])
async def test_proxy_config_mistakes_found_only_by_binding_exit_64_too(tmp_path, mistake, field):
    port = free_port()
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(f"listeners: {{http_address: '127.0.0.1:{port}', grpc_address: disabled}}\n"
                   + mistake.replace("{port}", str(port)))
    for workers in ("1", "2"):
        code, out, err = await run("proxy", "-c", str(cfg), "--workers", workers)
        assert code == 64 and field.replace("{port}", str(port)) in err, err
        assert "cannot listen" not in err and "ready" not in out


async def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    runtime = await spawn("runtime", "--name", "slow", "--models", "sum", "--http-port", "0",
                          "--grpc-port", "none", "--latency-ms", "700")
    proxy = None
    try:
        rport = (await first_line(runtime, r"http=127\.0\.0\.1:(\d+)")).group(1)
        cfg = tmp_path / "proxy.yaml"
        cfg.write_text(f"listeners: {{http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}}\n"
                       f"admin: {{address: '127.0.0.1:0'}}\n"
                       f"static_resources: {{runtimes: [{{name: slow, http_address: '127.0.0.1:{rport}', "
                       f"models: [{{name: sum}}]}}]}}\n")
        proxy = await spawn("proxy", "-c", str(cfg), "--workers", "1")  # one admin sees all
        m = await first_line(proxy, r"rest=127\.0\.0\.1:(\d+) admin=127\.0\.0\.1:(\d+)")
        port, admin = m.group(1), m.group(2)
        async with aiohttp.ClientSession() as s:
            body = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [2, 3]}]}
            pending = asyncio.ensure_future(s.post(f"http://127.0.0.1:{port}/v2/models/sum/infer", json=body))
            active = {"n": 0}

            async def poll():
                async with s.get(f"http://127.0.0.1:{admin}/clusters") as r:
                    active["n"] = (await r.json())["endpoints"][0]["active_requests"]
            async with asyncio.timeout(10):
                while active["n"] != 1:
                    await poll()
            proxy.send_signal(signal.SIGTERM)
            resp = await pending
            assert resp.status == 200 and (await resp.json())["outputs"][0]["data"] == [5]
            assert resp.headers.get("connection") == "close"
        async with asyncio.timeout(15):
            assert await proxy.wait() == 0
    finally:
        for p in (proxy, runtime):
            if p is not None and p.returncode is None:
                p.kill()
                await p.wait()


async def test_demo_once_shows_every_model_served_only_by_its_holders():
    code, out, err = await run("demo", "--once")
    assert code == 0, err
    rows = [ln for ln in out.splitlines() if ln.count("|") == 3 and not ln.startswith("model")]
    assert len(rows) == 5, out
    assert all(ln.rstrip().endswith("yes") for ln in rows), out
    assert "curl" in out


async def opened_for_writing(fifo, timeout: float = 15.0) -> int:
    """The read end of `fifo` once a process opened it for writing (both opens block until
    the other end is there); fails after `timeout`."""
    opening = asyncio.get_running_loop().run_in_executor(None, os.open, fifo, os.O_RDONLY)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(opening)
    except TimeoutError:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the waiting open return
        os.close(await opening)
        raise AssertionError(f"nothing opened {fifo} for writing") from None


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_while_starting_stops_cleanly_with_exit_0(tmp_path, workers):
    """The access log is a FIFO, so the proxy (worker 0 with --workers 2) is held inside its
    startup until the test opens the other end: SIGTERM lands there, mid-start."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("listeners: {http_address: '127.0.0.1:0', grpc_address: '127.0.0.1:0'}\n"
                   "admin: {address: '127.0.0.1:0'}\n"
                   f"telemetry: {{access_log: {{path: '{fifo}'}}}}\n")
    proxy = await spawn("proxy", "-c", str(cfg), "--workers", workers)
    try:
        reader = await opened_for_writing(fifo)
        try:
            proxy.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                out, err = await proxy.communicate()
        finally:
            os.close(reader)
        assert proxy.returncode == 0, err.decode()
        assert b"ready" not in out  # it never announced itself
    finally:
        if proxy.returncode is None:
            proxy.kill()
            await proxy.wait()


@pytest.mark.parametrize("flags, option", [
    (("--http-port", "70000"), "http_port"), (("--grpc-port", "99999"), "grpc_port"),
    (("--latency-ms", "-1"), "latency_ms"), (("--fail-rate", "nan"), "fail_rate")])
async def test_a_bad_runtime_option_is_a_usage_error_naming_it(flags, option):
    # Ports past 65535 wrapped (70000 listened on 4464); a negative latency or a NaN fail rate
    # ended in a traceback.
    code, out, err = await run("runtime", *flags, timeout=30)
    assert code == 2 and f"runtime option {option}" in err and "Traceback" not in err
