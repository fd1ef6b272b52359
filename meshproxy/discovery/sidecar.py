"""Sidecar mode: report the local runtime's loaded models to the control plane over a stream.

Every poll_interval the local runtime is observed (the same dialect APIs the control plane's
poller uses) and the whole Runtime is sent on the Register stream; an unchanged one is the
heartbeat. A runtime that does not answer is reported with no models. The stream is reopened
with the ADS client's jittered backoff; the control plane keeps the last report for its grace.
Requests for other models still reach the runtimes holding them straight from this proxy's
table (one hop, never through another proxy, so no loop).
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
import grpc

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2, discovery_pb2_grpc
from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.config import DynamicSettings
from meshproxy.control.sources import NoAnswer, observe
from meshproxy.discovery.client import channel_options, connect
from meshproxy.discovery.state import reconnect_delay

log = logging.getLogger("meshproxy.discovery")


class SidecarReporter:
    def __init__(self, settings: DynamicSettings, node: bootstrap_pb2.Node, rnd=random.random):
        self.settings = settings
        self.node = node
        self._rnd = rnd
        self._task: asyncio.Task | None = None
        self.registered = False
        self.reports = 0

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sidecar")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        s = self.settings
        addresses = [str(a) for a in s.ads_addresses]
        attempt, index = 0, 0
        # Retried at least once a poll interval (a heartbeat), however long the control plane
        # is away: a registration it keeps for `grace` (restored after a restart) must be
        # taken back within it. One refused connect per sidecar per interval costs little.
        ceiling = max(s.initial_backoff, min(s.max_backoff, s.sidecar_poll_interval))
        timeout = aiohttp.ClientTimeout(total=min(2.0, self.settings.sidecar_poll_interval))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                address = addresses[index % len(addresses)]
                try:
                    await self._stream(address, session)
                except (grpc.aio.AioRpcError, asyncio.TimeoutError, OSError) as e:
                    log.warning("registration stream to %s lost: %s", address, e)
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling():
                        raise  # stop()
                    # grpc cancels the call when the request generator raised: reconnect
                    log.warning("registration stream to %s was cancelled", address)
                except Exception:  # noqa: BLE001 - reporting must not stop for good
                    log.exception("registration stream to %s failed", address)
                if self.registered:
                    attempt = 0
                else:
                    index += 1
                self.registered = False
                await asyncio.sleep(reconnect_delay(attempt, s.initial_backoff, ceiling,
                                                    self._rnd()))
                attempt += 1

    async def _stream(self, address: str, session: aiohttp.ClientSession) -> None:
        options = channel_options(self.settings)
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            await connect(channel)
            stub = discovery_pb2_grpc.RuntimeRegistrationServiceStub(channel)
            call = stub.Register(self._reports(session))
            async for response in call:
                if response.HasField("error"):
                    log.error("control plane refused the registration: %s",
                              response.error.message)
                    return
                self.registered = True

    async def _reports(self, session: aiohttp.ClientSession):
        local = self.settings.sidecar
        while True:
            runtime = resources_pb2.Runtime()
            runtime.CopyFrom(local)
            try:
                runtime.models.extend(await observe(session, local))
            except NoAnswer as e:
                log.debug("local runtime %s does not answer: %s", local.name, e)
            except Exception as e:  # noqa: BLE001 - an odd answer is reported as no answer
                log.warning("local runtime %s gave an unusable answer: %s: %s", local.name,
                            type(e).__name__, e)
            yield discovery_pb2.RegisterRequest(node=self.node, runtime=runtime)
            self.reports += 1
            await asyncio.sleep(self.settings.sidecar_poll_interval)
