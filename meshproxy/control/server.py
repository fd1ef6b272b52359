"""The ADS gRPC server: one session per stream, fed by the proxy's requests and cache changes.

Each stream runs one loop over one queue: a reader task puts the proxy's requests on it and
the cache's change callback puts a (coalesced) CHANGED marker on it, so session state is only
ever touched by that loop and every response is written in order.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from meshproxy._proto.meshproxy.v1 import discovery_pb2_grpc
from meshproxy.control.cache import ResourceCache
from meshproxy.control.metrics import ControlPlaneMetrics
from meshproxy.control.sessions import DeltaSession, ProxyStatus, SotwSession

log = logging.getLogger("meshproxy.control")
_CHANGED, _END = object(), object()


class ProxyRegistry:
    """The connected proxies' statuses, for /proxies and metrics."""

    def __init__(self):
        self.statuses: dict[int, ProxyStatus] = {}

    def add(self, status: ProxyStatus) -> None:
        self.statuses[id(status)] = status

    def remove(self, status: ProxyStatus) -> None:
        self.statuses.pop(id(status), None)


class AdsServicer(discovery_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: ResourceCache, registry: ProxyRegistry,
                 metrics: ControlPlaneMetrics, identifier: str):
        self.cache = cache
        self.registry = registry
        self.metrics = metrics
        self.identifier = identifier
        self._streams: set[asyncio.Task] = set()

    async def StreamAggregatedResources(self, request_iterator, context):
        await self._serve(SotwSession, "sotw", request_iterator, context)

    async def DeltaAggregatedResources(self, request_iterator, context):
        await self._serve(DeltaSession, "delta", request_iterator, context)

    async def _serve(self, session_class, protocol: str, requests, context) -> None:
        status = ProxyStatus(peer=context.peer(), protocol=protocol, connected_at=time.time())
        session = session_class(self.cache, status, self.identifier)
        session.on_nack = lambda t, msg: self._nacked(status, t, msg)
        queue: asyncio.Queue = asyncio.Queue()
        pending = [False]
        changed_at = [0.0]

        def changed() -> None:
            if not pending[0]:
                pending[0] = True
                changed_at[0] = time.perf_counter()
                queue.put_nowait(_CHANGED)

        reader = asyncio.get_running_loop().create_task(self._read(requests, queue))
        self._streams.add(asyncio.current_task())
        self.registry.add(status)
        self.cache.watch(changed)
        self.metrics.proxies.labels(protocol).inc()
        try:
            while (item := await queue.get()) is not _END:
                if item is _CHANGED:
                    pending[0] = False
                    responses = session.on_change()
                else:
                    responses = session.on_request(item)
                for response in responses:
                    await context.write(response)
                    self.metrics.sent(protocol, response.type_url, response.ByteSize())
                if item is _CHANGED and responses:
                    self.metrics.push_latency.labels(protocol).observe(
                        time.perf_counter() - changed_at[0])
        finally:
            self.cache.unwatch(changed)
            self.registry.remove(status)
            self.metrics.proxies.labels(protocol).dec()
            self._streams.discard(asyncio.current_task())
            reader.cancel()
            log.info("proxy %s (%s) disconnected", status.node_id or "?", status.peer)

    async def _read(self, requests, queue: asyncio.Queue) -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        finally:
            queue.put_nowait(_END)

    def _nacked(self, status: ProxyStatus, type_url: str, message: str) -> None:
        self.metrics.nacks.labels(type_url).inc()
        log.warning("NACK from proxy %s (%s) for %s: %s", status.node_id or "?", status.peer,
                    type_url, message)

    def cancel_streams(self) -> None:
        for task in list(self._streams):
            task.cancel()
