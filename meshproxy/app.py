"""Wires one proxy process: REST listener, admin, the snapshot; start, drain and stop in order."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random

from meshproxy import __version__
from meshproxy._proto.meshproxy.v1 import bootstrap_pb2
from meshproxy.admin import build_admin, start_admin
from meshproxy.config import ConfigError, ProxyConfig, load_file
from meshproxy.cluster.health import HealthChecker
from meshproxy.config_watch import FileWatcher
from meshproxy.ingress import grpc as grpc_ingress
from meshproxy.ingress import listener
from meshproxy.ingress.http import HttpConnection, HttpContext
from meshproxy.routing import table
from meshproxy.telemetry import tracing
from meshproxy.telemetry.access_log import AccessLog
from meshproxy.telemetry.metrics import ProxyMetrics
from meshproxy.upstream.grpc_pool import GrpcChannels
from meshproxy.upstream.http_pool import HttpPool

log = logging.getLogger("meshproxy")
TICK = 0.1  # seconds between deadline checks: the precision of every timeout
# The config file's settings that an edit cannot change in a running proxy.
RESTART_FIELDS = ("node", "listeners", "admin", "http", "grpc", "drain_timeout", "telemetry",
                  "dynamic_resources")


class ProxyApp:
    """One proxy. Startup: snapshot, ADS client and sidecar stream when configured (a snapshot
    saved on disk is in force before the listener opens), REST listener, admin, ticker.

    Shutdown (stop): end the ADS and sidecar streams (the snapshot stays); stop
    accepting; close idle client connections and let busy ones finish their
    exchange (responses say `connection: close`) within drain_timeout; abort what
    is left; close upstream pools; stop admin.
    """

    reuse_port = False  # set by meshproxy/workers.py: worker processes share the listeners

    def __init__(self, config: ProxyConfig, metrics: ProxyMetrics | None = None,
                 config_path: str | None = None, span_exporter=None):
        self.config = config
        self.span_exporter = span_exporter  # tests pass an in-memory one
        self.config_path = config_path  # watched: edits to static_resources apply live
        self.metrics = metrics or ProxyMetrics()
        self.registry = table.EndpointRegistry(attach=self._attach_pool)
        snap, _ = table.build("static", config.runtimes, config.routes, self.registry,
                              config.http.request_timeout)
        self.ctx = HttpContext(config.http, self.metrics, snap, self._local, random.random)
        self.metrics.watch_endpoints(lambda: self.ctx.snapshot)
        # read when scraped, not kept up to date by the ticker
        self.metrics.downstream_connections.set_function(lambda: len(self.ctx.connections))
        self.metrics.ejected.set_function(lambda: len(self.ctx.outlier.ejected))
        self.ctx.outlier.set_clusters(snap.clusters.values())
        self.health = HealthChecker()
        self.watcher: FileWatcher | None = None
        self.restart_pending: list[str] = []  # settings the file changed that wait for a restart
        self.watch_interval = 1.0
        self.servers: list[asyncio.Server] = []  # REST, one per address the host resolves to
        self._rest_sockets: list = []  # bound, not yet handed to a server
        self._grpc_hold: list = []     # the gRPC port, bound, until grpc core binds it
        self.opened: asyncio.Future | None = None  # done once taking connections (or failed)
        self.serving = False
        self._opening: asyncio.Task | None = None
        self.http_port = 0
        self.admin_port = 0
        self._admin_runner = None
        self._ticker: asyncio.Task | None = None
        self.discovery = None  # the ADS client when config.dynamic is set
        self.sidecar = None    # the registration stream when config.dynamic.sidecar is set
        self.grpc_server = None
        self.grpc_port = 0
        self.grpc_channels = GrpcChannels(config.grpc.max_message_bytes, config.drain_timeout,
                                          config.http.connect_timeout)

    def _attach_pool(self, endpoint) -> None:
        s = self.config.http
        endpoint.pool = HttpPool(endpoint.name, endpoint.host, endpoint.port,
                                 s.connect_timeout, s.max_idle_connections,
                                 s.upstream_idle_timeout)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        telemetry = self.config.telemetry
        self.ctx.tracing = tracing.build(telemetry, self.span_exporter)
        if telemetry.access_log:
            self.ctx.access_log = AccessLog(telemetry.access_log)
        if self.config.dynamic is not None:
            from meshproxy.discovery.client import AdsClient
            self.discovery = AdsClient(self.config.dynamic, self.config.source.node, self.update,
                                       self.config.runtimes, self.config.routes)
            await self.discovery.start()  # a snapshot saved on disk is in force from here
            self.metrics.watch_discovery(lambda: self.discovery)
            if self.config.dynamic.sidecar is not None:
                from meshproxy.discovery.sidecar import SidecarReporter
                self.sidecar = SidecarReporter(self.config.dynamic, self.config.source.node)
                await self.sidecar.start()
        addr, grpc_addr = self.config.http_address, self.config.grpc_address
        self._rest_sockets = listener.bind(addr.host, addr.port, self.reuse_port)
        self.http_port = self._rest_sockets[0].getsockname()[1]
        if grpc_addr is not None:  # held until opened: grpc core listens as it binds
            self._grpc_hold = listener.bind(grpc_addr.host, grpc_addr.port, self.reuse_port)
            self.grpc_port = self._grpc_hold[0].getsockname()[1]
        admin = self.config.admin_address
        web_app = build_admin(self)
        if self.discovery is not None:
            web_app.router.add_get("/xds", self._xds_dump)
        self._admin_runner, self.admin_port = await start_admin(web_app, admin.host, admin.port)
        self._ticker = loop.create_task(self._tick())
        self.health.sync(self.ctx.snapshot)
        if self.config_path is not None:
            self.watcher = FileWatcher(self.config_path, load_file, self._reload, (ConfigError,),
                                       self.watch_interval)
            self.watcher.start()
        self.opened = loop.create_future()
        if self.discovery is None or self.discovery.initialized:
            self._open()
            await self.opened
        else:
            log.info("waiting for the control plane's first table (initial_fetch_timeout %gs) "
                     "before taking connections", self.config.dynamic.initial_fetch_timeout)
            self.discovery.on_initialized = self._open

    def _open(self) -> None:
        """Take connections: the sockets listen now, so what comes from here on waits in the
        backlog for the accept loops `_serve` starts. Called by start, or by the ADS client
        once the first table is in force or the initial fetch timed out."""
        if self.opened.done():  # stopped before the table came
            return
        try:
            listener.listen(self._rest_sockets)
            if self.config.grpc_address is not None:
                g = self.config.grpc_address
                if not self.reuse_port:  # its own socket binds the port exclusively
                    self._close_hold()
                self.grpc_server = grpc_ingress.bind_server(
                    self._grpc_context(), g.host, self.grpc_port,
                    self.config.grpc.max_message_bytes, reuse_port=self.reuse_port)
                self._close_hold()
        except OSError as e:
            self._open_failed(e)
            return
        self._opening = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._rest_sockets:
                sock = self._rest_sockets.pop(0)
                self.servers.append(await loop.create_server(
                    lambda: HttpConnection(self.ctx), sock=sock, backlog=listener.BACKLOG))
            if self.grpc_server is not None:
                await self.grpc_server.start()
        except OSError as e:
            self._open_failed(e)
            return
        if not self.opened.done():
            self.serving = True
            self.opened.set_result(None)
        addr = self.config.http_address
        log.info("meshproxy listening: rest=%s:%d grpc=%s admin=%s:%d", addr.host,
                 self.http_port, f"{self.config.grpc_address.host}:{self.grpc_port}"
                 if self.grpc_server is not None else "off", self.config.admin_address.host,
                 self.admin_port)

    def _open_failed(self, e: OSError) -> None:
        log.error("cannot listen: %s", e)
        if not self.opened.done():
            self.opened.set_exception(e)
            self.opened.exception()  # retrieved: serve_proxy exits with it; a test may not wait

    def _close_hold(self) -> None:
        for sock in self._grpc_hold:
            sock.close()
        self._grpc_hold = []

    def _grpc_context(self) -> grpc_ingress.GrpcContext:
        # The snapshot is read through self.ctx on every call: update() swaps it there.
        return grpc_ingress.GrpcContext(
            self.config.http.model_headers, self.config.http.upstream_header, self.metrics,
            lambda: self.ctx.snapshot, self.ready, random.random, self.grpc_channels,
            self.ctx.outlier.success, self.ctx.outlier_failure, self.ctx.tracing,
            self.ctx.access_log)

    def ready(self) -> bool:
        return self.state() == "LIVE"

    def state(self) -> str:
        """LIVE, DRAINING, or INITIALIZING: not serving yet, or waiting for the control
        plane's first table (dynamic_resources.initial_fetch_timeout), as Envoy's /ready."""
        if self.ctx.draining:
            return "DRAINING"
        if not self.serving:
            return "INITIALIZING"
        return "LIVE"

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.ctx.tick()

    def _reload(self, config: ProxyConfig) -> None:
        """A new version of the config file: its static resources apply now; every other
        setting is bound into listeners, connections or tasks and waits for a restart (named in
        the log and in /config_dump's restart_pending)."""
        old, new = self.config.source, config.source
        self.restart_pending = [name for name in RESTART_FIELDS if old.HasField(name) !=
                                new.HasField(name) or getattr(old, name) != getattr(new, name)]
        if self.restart_pending:
            log.warning("config file: %s changed; that takes a restart (the static resources "
                        "apply now)", ", ".join(self.restart_pending))
        # What is in force: the settings read at start, the file's static resources.
        in_force = bootstrap_pb2.Bootstrap()
        in_force.CopyFrom(old)
        in_force.static_resources.CopyFrom(new.static_resources)
        self.config = dataclasses.replace(self.config, runtimes=config.runtimes,
                                          routes=config.routes, source=in_force)
        if self.discovery is not None:  # static resources sit next to the dynamic ones
            self.discovery.set_static(config.runtimes, config.routes)
            return
        self.update(f"file-{self.watcher.generation}", config.runtimes, config.routes)

    def update(self, version: str, runtimes, routes) -> None:
        """Swap in a new snapshot; pools of runtimes that left are closed, and their series
        leave /metrics."""
        snap, gone = table.build(version, runtimes, routes, self.registry,
                                 self.config.http.request_timeout)
        self.ctx.snapshot = snap
        self.ctx.outlier.set_clusters(snap.clusters.values())
        if self._ticker is not None:  # started: health loops follow the runtimes
            self.health.sync(snap)
        for endpoint in gone:
            endpoint.pool.close()
            if endpoint.name not in snap.endpoints:  # not just moved to a new address
                self.metrics.forget_runtime(endpoint.name)
                # an answer still on its way is counted through stats.cell() (the per-model
                # totals), not into the cells this endpoint cached
                endpoint.cells.clear()
                endpoint.attempts = None

    async def stop(self) -> None:
        if self.sidecar is not None:
            await self.sidecar.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.opened is not None and not self.opened.done():
            self.opened.cancel()  # a table that comes from here on opens nothing
        if self._opening is not None:
            await asyncio.gather(self._opening, return_exceptions=True)
        for server in self.servers:
            server.close()
        for sock in self._rest_sockets:
            sock.close()
        self._close_hold()
        self.ctx.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        # gRPC stops taking calls now and drains alongside REST, within the same deadline.
        grpc_stopped = (loop.create_task(self.grpc_server.stop(self.config.drain_timeout))
                        if self.grpc_server is not None else None)
        while self.ctx.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.ctx.connections):
            conn.abort()
        # connection_lost (which logs and counts what the deadline cut off) comes a loop turn
        # after abort(); let it run before the access log and the tracer close
        for _ in range(2):
            await asyncio.sleep(0)
        if grpc_stopped is not None:
            await grpc_stopped
        await self.grpc_channels.close()
        for endpoint in self.registry.endpoints.values():
            endpoint.pool.close()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.health.close()
        if self.ctx.tracing is not None:
            self.ctx.tracing.shutdown()
        if self.ctx.access_log is not None:
            self.ctx.access_log.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    def _local(self, method: bytes, path: bytes):
        """Requests the proxy answers itself: (status, JSON body) or None."""
        if method in (b"GET", b"HEAD"):
            if path == b"/v2/health/live":
                return 200, b'{"live": true}'
            if path == b"/v2/health/ready":
                ok = self.ready()
                return (200 if ok else 503), b'{"ready": %s}' % (b"true" if ok else b"false")
            if path == b"/v2":
                return 200, json.dumps({"name": "meshproxy", "version": __version__,
                                        "extensions": ["model_repository"]}).encode()
        if method == b"POST" and path == b"/v2/repository/index":
            return 200, json.dumps(self.ctx.snapshot.index()).encode()
        return None

    async def _xds_dump(self, _request):
        """Admin /xds: per type the version, when it was applied, ACK/NACK counts, last NACK."""
        from aiohttp import web
        return web.json_response(self.discovery.dump(), dumps=lambda d: json.dumps(d, indent=2))
