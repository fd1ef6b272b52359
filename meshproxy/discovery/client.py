"""The proxy's ADS stream client: drives SubscriptionState over gRPC and swaps in snapshots.

How it works: one task keeps one stream open to the first control plane that answers
(addresses are tried in order, moving on after each failure). Each response goes through
`SubscriptionState.handle`; an accepted change is applied with `apply(version, runtimes,
routes)` (and written to `snapshot_path`), and the ACK or NACK is written back before the
next read. When the stream ends or fails nothing is torn down: the proxy keeps serving its
last snapshot while the task waits a jittered exponential backoff and reconnects, a delta
client announcing what it holds with initial_resource_versions. A fresh channel is made for
every attempt so gRPC's own reconnect backoff never adds to ours.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Callable

import grpc

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2_grpc
from meshproxy.config import DynamicSettings
from meshproxy.discovery.state import TYPE_URLS, SubscriptionState, reconnect_delay
from meshproxy.upstream.grpc_pool import connected

log = logging.getLogger("meshproxy.discovery")
CONNECT_TIMEOUT = 2.0


def keepalive_options(interval: float, timeout: float) -> list[tuple[str, int]]:
    """gRPC options for a ping after `interval` s without one, and the connection closed
    when a ping is not answered within `timeout` s, also while the streams are quiet."""
    return [
        ("grpc.keepalive_time_ms", round(interval * 1000)),
        ("grpc.keepalive_timeout_ms", round(timeout * 1000)),
        # gRPC 1.81 closes on an unanswered ping only after this (default 1 min)
        ("grpc.http2.ping_timeout_ms", round(timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # by default gRPC stops pinging after 2 pings with no data between them: a quiet
        # xDS stream would stop noticing its peer vanish
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(settings: DynamicSettings) -> list[tuple[str, int]]:
    """Options of a channel to a control plane (ADS and sidecar registration)."""
    return keepalive_options(settings.keepalive_interval, settings.keepalive_timeout) + [
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.initial_reconnect_backoff_ms", 100),
    ]

Apply = Callable[[str, list, list], None]


class AdsClient:
    """One ADS session for one proxy; `start` returns at once, `stop` ends the stream."""

    def __init__(self, settings: DynamicSettings, node: bootstrap_pb2.Node, apply: Apply,
                 static_runtimes=(), static_routes=(), rnd: Callable[[], float] = random.random):
        self.settings = settings
        self.state = SubscriptionState(node, settings.delta, static_runtimes, static_routes)
        self._apply_cb = apply
        self._rnd = rnd
        self._task: asyncio.Task | None = None
        self.connected_to: str | None = None
        # a first response of every type came (or a snapshot was read, or the initial fetch
        # timed out): the proxy may report ready
        self.initialized = False
        self._answered: set[str] = set()
        self._init_timer: asyncio.TimerHandle | None = None
        self.streams = 0          # streams opened
        self.updates = 0          # snapshots applied
        self.on_update: Callable[[], None] | None = None  # test and bench hook
        self.on_initialized: Callable[[], None] | None = None  # the proxy opens its listeners

    async def start(self) -> None:
        self._restore()
        loop = asyncio.get_running_loop()
        wait = self.settings.initial_fetch_timeout
        if not self.initialized and wait > 0:
            self._init_timer = loop.call_later(wait, self._init_timed_out)
        self._task = loop.create_task(self._run(), name="ads-client")

    def _initialized(self) -> None:
        self.initialized = True
        if self._init_timer is not None:
            self._init_timer.cancel()
            self._init_timer = None
        if self.on_initialized is not None:
            self.on_initialized()

    def _init_timed_out(self) -> None:
        self._init_timer = None
        if not self.initialized:
            log.warning("no control plane answered within initial_fetch_timeout (%gs); ready "
                        "with the static resources only", self.settings.initial_fetch_timeout)
            self._initialized()

    async def stop(self) -> None:
        if self._init_timer is not None:
            self._init_timer.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the stream -------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt, index = 0, 0
        addresses = [str(a) for a in self.settings.ads_addresses]
        while True:
            address = addresses[index % len(addresses)]
            try:
                await self._session(address)
                log.warning("ADS stream to %s ended; serving snapshot %s", address,
                            self.state.version())
            except (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError) as e:
                log.warning("ADS stream to %s lost: %s; serving snapshot %s", address,
                            _reason(e), self.state.version())
            except Exception:  # a bug must not end discovery for good
                log.exception("ADS stream to %s failed; serving snapshot %s", address,
                              self.state.version())
            if self.connected_to is not None:
                attempt = 0  # it worked: try the same control plane again first
            else:
                index += 1   # it never answered: fail over to the next one
            self.connected_to = None
            delay = reconnect_delay(attempt, self.settings.initial_backoff,
                                    self.settings.max_backoff, self._rnd())
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self, address: str) -> None:
        """One stream, until the server ends it or it fails."""
        options = channel_options(self.settings)
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            await connect(channel)
            stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = (stub.DeltaAggregatedResources() if self.settings.delta
                    else stub.StreamAggregatedResources())
            for request in self.state.initial_requests():
                await call.write(request)
            self.connected_to, self.streams = address, self.streams + 1
            log.info("ADS stream to %s open (%s)", address,
                     "delta" if self.settings.delta else "state of the world")
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                await call.write(self._handle(response))

    def _handle(self, response):
        now = time.time()
        outcome = self.state.handle(response, now)
        if outcome.changed:
            try:
                self._apply()
            except Exception as e:  # noqa: BLE001 - a bug here: NACKed, the last table stays
                log.exception("cannot apply %s nonce=%s", response.type_url, response.nonce)
                outcome = self.state.reject(
                    response, outcome, f"the proxy failed to apply it ({type(e).__name__}: "
                    f"{e}); see its log", now)
                self._reapply()
            else:
                self._save()
        if outcome.nack is not None:
            log.warning("NACK %s nonce=%s version=%s: %s", response.type_url, outcome.nack.nonce,
                        outcome.nack.version, outcome.nack.message)
        if not self.initialized:  # a first answer, taken or refused, ends the wait (Envoy)
            self._answered.add(response.type_url)
            if self._answered >= set(TYPE_URLS):
                self._initialized()
        return outcome.request

    def _reapply(self) -> None:
        """Apply the state in force again after a failed apply, which may have got part way."""
        try:
            self._apply()
        except Exception:  # noqa: BLE001 - the snapshot serving now stays
            log.exception("cannot apply the resources in force again")

    def _apply(self) -> None:
        self._apply_cb(self.state.version(), self.state.runtimes(), self.state.routes())
        self.updates += 1
        if self.on_update is not None:
            self.on_update()

    def set_static(self, runtimes, routes) -> None:
        """The bootstrap's static resources changed: apply them next to the dynamic ones."""
        self.state.set_static(runtimes, routes)
        self._apply()

    # --- the snapshot on disk ---------------------------------------------------------------

    def _restore(self) -> None:
        path = self.settings.snapshot_path
        if not path or not os.path.exists(path):
            return
        try:
            with open(path, "rb") as f:
                self.state.restore(f.read(), time.time())
        except (OSError, ValueError) as e:
            log.warning("ignoring snapshot %s: %s", path, e)
            return
        log.info("serving snapshot %s from %s until a control plane answers",
                 self.state.version(), path)
        self._apply()
        self._initialized()

    def _save(self) -> None:
        path = self.settings.snapshot_path
        if not path:
            return
        tmp = f"{path}.{os.getpid()}.tmp"  # worker processes may share one snapshot_path
        try:
            with open(tmp, "wb") as f:
                f.write(self.state.saved())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write snapshot %s: %s", path, e)

    def dump(self) -> dict:
        return {"connected_to": self.connected_to, "streams_opened": self.streams,
                "protocol": "delta" if self.settings.delta else "sotw",
                "snapshot_version": self.state.version(), "types": self.state.dump()}


async def connect(channel: grpc.aio.Channel) -> None:
    """Wait until the channel is READY; fail at once on a refused connection (so failover to
    the next address is quick), or after CONNECT_TIMEOUT."""
    await connected(channel, CONNECT_TIMEOUT)


def _reason(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, asyncio.TimeoutError):
        return f"no connection within {CONNECT_TIMEOUT:.0f}s"
    return str(e)
