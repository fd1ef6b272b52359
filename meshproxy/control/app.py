"""Wires the control plane: sources -> table -> cache -> ADS server, plus the admin listener.

Startup: the table is built from the config file (polled runtimes start with no models), the
gRPC server binds, the admin binds, then the pollers and the file watcher start, so the first
proxies may connect before the first poll and are told of models as they are found.
Shutdown: stop the sources, cancel the streams (proxies keep their snapshots and reconnect
elsewhere or later), stop the gRPC server, stop the admin.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import grpc
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshproxy._proto.meshproxy.v1 import discovery_pb2_grpc
from meshproxy.admin import start_admin, stats_response
from meshproxy.config import ConfigError
from meshproxy.config_watch import FileWatcher
from meshproxy.control.cache import ResourceCache
from meshproxy.control.config import ControlPlaneSettings, load_file
from meshproxy.control.metrics import ControlPlaneMetrics
from meshproxy.control.registration import Registrations, RegistrationServicer
from meshproxy.control.server import AdsServicer, ProxyRegistry
from meshproxy.control.sources import DiscoveryPoller
from meshproxy.discovery.client import keepalive_options
from meshproxy.discovery.state import TYPE_URLS

log = logging.getLogger("meshproxy.control")


# Settings bound into the listeners, the ADS server, the sessions or the polling client: an
# edit to them waits for a restart.
RESTART_FIELDS = ("grpc_address", "admin_address", "identifier", "request_timeout",
                  "heartbeat_interval", "registration_state_path", "keepalive_interval",
                  "keepalive_timeout")


class ControlPlaneApp:
    def __init__(self, settings: ControlPlaneSettings, path: str | None = None):
        self.settings = settings
        self.path = path
        self.metrics = ControlPlaneMetrics()
        self.cache = ResourceCache()
        self.proxies = ProxyRegistry()
        self.poller = DiscoveryPoller(self.publish, self.metrics)
        self.registrations = Registrations(self.publish, settings.registration_grace,
                                           taken=self._configured,
                                           state_path=settings.registration_state_path)
        self.ads = AdsServicer(self.cache, self.proxies, self.metrics, settings.identifier)
        self.watcher: FileWatcher | None = None
        self.restart_pending: list[str] = []  # settings the file changed that wait for a restart
        self.grpc_port = 0
        self.admin_port = 0
        self._server: grpc.aio.Server | None = None
        self._admin_runner = None
        self.started_at = time.time()

    # --- the table --------------------------------------------------------------------------

    def publish(self) -> None:
        """Merge the sources into the cache; streams are told if anything changed."""
        s = self.settings
        runtimes = list(s.runtimes)
        runtimes += [self.poller.views[rt.name].message() for rt in s.discovered
                     if rt.name in self.poller.views]
        taken = {rt.name for rt in runtimes}  # a file edit may claim a registered name
        runtimes += [rt for rt in self.registrations.runtimes() if rt.name not in taken]
        if self.cache.set_all(runtimes, s.routes):
            for type_url in TYPE_URLS:
                self.metrics.resources.labels(type_url).set(len(self.cache.get(type_url).entries))

    def _configured(self, name: str) -> bool:
        return any(rt.name == name for rt in (*self.settings.runtimes, *self.settings.discovered))

    def reconfigure(self, settings: ControlPlaneSettings) -> None:
        """A good config edit: new pollers, new static resources, pushed at once."""
        pending = [f for f in RESTART_FIELDS if getattr(settings, f) != getattr(self.settings, f)]
        if pending:
            log.warning("config: %s changed; that takes a restart, the old values stay in force",
                        ", ".join(pending))
        self.restart_pending = pending
        # those stay as they were started with; the rest applies now
        self.settings = dataclasses.replace(
            settings, **{f: getattr(self.settings, f) for f in pending})
        self.registrations.grace = settings.registration_grace
        if self.watcher is not None:
            self.watcher.interval = settings.watch_interval
        self.poller.configure(settings.discovered, settings.poll_interval, settings.grace,
                              settings.request_timeout)
        self.publish()

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.poller.configure(s.discovered, s.poll_interval, s.grace, s.request_timeout)
        # Serve a table only once each runtime has been asked what it holds: a control plane
        # restarted under load must not tell every proxy that the runtimes hold nothing.
        unpolled = await self.poller.first_round(s.request_timeout + 1.0)
        if unpolled:
            log.warning("starting before these runtimes answered their first poll: %s",
                        ", ".join(unpolled))
        self.registrations.restore()
        self.publish()
        self._server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            # proxies ping at least 1 s apart (config.py); timer slack must not be a strike
            ("grpc.http2.min_ping_interval_without_data_ms", 500),
            # pings of our own, so that a proxy that vanished without closing is noticed
            *keepalive_options(s.keepalive_interval, s.keepalive_timeout),
        ])
        discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, self._server)
        discovery_pb2_grpc.add_RuntimeRegistrationServiceServicer_to_server(
            RegistrationServicer(self.registrations, s.heartbeat_interval, self.metrics),
            self._server)
        self.grpc_port = self._server.add_insecure_port(str(s.grpc_address))
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {s.grpc_address}")
        await self._server.start()
        self._admin_runner, self.admin_port = await start_admin(
            self._admin(), s.admin_address.host, s.admin_address.port)
        self.registrations.start()
        if self.path is not None:
            self.watcher = FileWatcher(
                self.path, load_file, self.reconfigure, (ConfigError,), s.watch_interval,
                lambda result: self.metrics.config_reloads.labels(result).inc())
            self.watcher.start()
        log.info("control plane listening: grpc=%s:%d admin=%s:%d", s.grpc_address.host,
                 self.grpc_port, s.admin_address.host, self.admin_port)

    async def stop(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.poller.close()
        await self.registrations.close()
        self.ads.cancel_streams()
        if self._server is not None:
            await self._server.stop(grace=0.2)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    # --- admin ------------------------------------------------------------------------------

    def _admin(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/live", self._live)
        app.router.add_get("/config_dump", self._config_dump)
        app.router.add_get("/proxies", self._proxies)
        return app

    async def _ready(self, _):
        return web.Response(text="LIVE\n")

    async def _stats(self, _):
        return stats_response(self.metrics.registry)

    async def _live(self, _):
        return web.Response(text="LIVE\n")

    async def _metrics(self, _):
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"content-type": CONTENT_TYPE_LATEST})

    async def _config_dump(self, _):
        dump = lambda m: json_format.MessageToDict(m, preserving_proto_field_name=True)
        cache = self.cache.dump()
        return _json({
            "config": dump(self.settings.source),
            "restart_pending": self.restart_pending,
            "config_error": self.watcher.last_error if self.watcher else "",
            "versions": {t: v["version"] for t, v in cache.items()},
            "runtimes": [dump(e.message) for e in self._entries(0)],
            "routes": [dump(e.message) for e in self._entries(1)],
            "discovery": {name: {"models": len(v.models), "last_answer_age_s": _age(v.last_answer),
                                 "error": v.error}
                          for name, v in sorted(self.poller.views.items())},
            "registrations": self.registrations.dump(),
        })

    def _entries(self, index: int):
        snap = self.cache.get(TYPE_URLS[index])
        return [snap.entries[n] for n in sorted(snap.entries)]

    async def _proxies(self, _):
        rows = []
        for st in sorted(self.proxies.statuses.values(), key=lambda s: (s.node_id, s.peer)):
            rows.append({"node_id": st.node_id, "cluster": st.cluster, "peer": st.peer,
                         "protocol": st.protocol, "connected_at": st.connected_at,
                         "responses": st.responses, "bytes_sent": st.bytes_sent,
                         "types": {t: vars(ts) for t, ts in st.types.items()}})
        return _json({"proxies": rows})


def _age(t: float | None):
    return None if t is None else round(time.monotonic() - t, 3)


def _json(data) -> web.Response:
    return web.Response(text=json.dumps(data, indent=2) + "\n", content_type="application/json")
