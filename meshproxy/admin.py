"""Admin listener (aiohttp): /ready, /live, /config_dump, /clusters, /metrics."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshproxy.telemetry.metrics import merge_workers
from meshproxy.workers import PEERS_ENV


def _json(data, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2) + "\n", status=status,
                        content_type="application/json")


def _peer_admins() -> list[str]:
    """The admin addresses of workers 1..N-1, when this is worker 0 of several."""
    path = os.environ.get(PEERS_ENV)
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().split()[1:]
    except OSError:  # the parent writes it once every worker is ready
        return []


async def _fetch_metrics(address: str) -> str:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            async with s.get(f"http://{address}/metrics") as r:
                return await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return ""  # a worker that does not answer is left out of this scrape


def stats_response(registry) -> web.Response:
    """Envoy-style /stats: one `name{labels}: value` line per sample, sorted."""
    lines = []
    for family in registry.collect():
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            value = int(s.value) if float(s.value).is_integer() else s.value
            lines.append(f"{s.name}{{{labels}}}: {value}" if labels else f"{s.name}: {value}")
    return web.Response(text="\n".join(sorted(lines)) + "\n")


def build_admin(app) -> web.Application:
    """Routes for one ProxyApp (`app` has .ctx, .config, .metrics, .state())."""

    async def ready(_):
        state = app.state()
        return web.Response(text=state + "\n", status=200 if state == "LIVE" else 503)

    async def live(_):
        return web.Response(text="LIVE\n")

    async def config_dump(_):
        snap = app.ctx.snapshot
        dump = lambda m: json_format.MessageToDict(m, preserving_proto_field_name=True)
        return _json({
            "version": snap.version,
            "bootstrap": dump(app.config.source),
            "restart_pending": app.restart_pending,
            "runtimes": [dump(r) for r in snap.runtimes],
            "routes": [dump(r) for r in snap.routes],
        })

    async def clusters(_):
        snap = app.ctx.snapshot
        rows = []
        for rt in snap.runtimes:
            e = snap.endpoints.get(rt.name)
            rows.append({
                "runtime": rt.name, "address": rt.http_address,
                "models": [m.name for m in rt.models if m.state == 0],
                "weight": e.weight if e else 1, "active_requests": e.active if e else 0,
                "requests_total": e.total if e else 0,
                "healthy": e.healthy if e else False,
                "health_check_ok": e.checked_ok if e else False,
                "ejected": e.ejected if e else False,
                "times_ejected": e.times_ejected if e else 0,
                "idle_connections": len(e.pool.idle) if e and e.pool else 0,
            })
        return _json({"version": snap.version, "endpoints": rows})

    async def stats(_):
        return stats_response(app.metrics.registry)

    async def metrics(_):
        body = generate_latest(app.metrics.registry)
        peers = _peer_admins()
        if peers:  # worker 0 of several: every worker's series, labelled by worker
            texts = await asyncio.gather(*(_fetch_metrics(a) for a in peers))
            body = merge_workers([body.decode(), *texts])
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    web_app = web.Application()
    web_app.router.add_get("/ready", ready)
    web_app.router.add_get("/live", live)
    web_app.router.add_get("/config_dump", config_dump)
    web_app.router.add_get("/clusters", clusters)
    web_app.router.add_get("/metrics", metrics)
    web_app.router.add_get("/stats", stats)
    return web_app


async def start_admin(web_app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
