"""Sidecar registration: runtimes reported over a gRPC stream, dropped `grace` after it goes.

How it works: each request on a Register stream carries the sidecar's runtime as it is now
(an unchanged one is the heartbeat). A registration expires `grace` after its stream ended,
or `grace` after it fell silent for three heartbeat intervals; until then its last reported
models stay in the table. A name already held by another live stream, or a runtime that fails
validation, is refused with an error response and the stream is closed.

With a `state_path`, the registrations are written there on every change and read back at
start, each as if its stream had just ended: a restarted control plane serves them for
`grace`, so the proxies that reconnect before the sidecars do keep routing to them, and a
sidecar that registers again within `grace` takes its registration back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from typing import Callable

from google.protobuf import duration_pb2, json_format

from meshproxy._proto.meshproxy.v1 import discovery_pb2, discovery_pb2_grpc, resources_pb2
from meshproxy.config import ConfigError, validate_resources

log = logging.getLogger("meshproxy.control")
SILENT_HEARTBEATS = 3


@dataclasses.dataclass
class Registration:
    runtime: resources_pb2.Runtime
    node_id: str
    last_seen: float
    stream: int            # id of the stream that owns it
    closed_at: float | None = None


class Registrations:
    """The registered runtimes (clock passed in; `start` runs the expiry ticker)."""

    def __init__(self, changed: Callable[[], None], grace: float, heartbeat: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 taken: Callable[[str], bool] = lambda name: False, state_path: str = ""):
        self.entries: dict[str, Registration] = {}
        self._taken = taken  # names the control plane's own file uses
        self.grace = grace
        self.heartbeat = heartbeat
        self._on_change = changed
        self._clock = clock
        self._task: asyncio.Task | None = None
        self.state_path = state_path

    def _changed(self) -> None:
        self._save()
        self._on_change()

    # -- the state file
    def restore(self) -> None:
        """Read the registrations saved by an earlier run, each with its stream just ended.
        An unreadable file, or an entry no longer valid, is logged and skipped."""
        path = self.state_path
        if not path or not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            entries = [(e["node_id"], json_format.ParseDict(e["runtime"], resources_pb2.Runtime()))
                       for e in saved["registrations"]]
        except (OSError, ValueError, KeyError, TypeError, json_format.ParseError) as e:
            log.warning("ignoring registration state %s: %s", path, e)
            return
        now = self._clock()
        for node_id, runtime in entries:
            try:
                validate_resources([runtime], [], "runtime")
            except ConfigError as e:
                log.warning("ignoring saved registration of %r: %s", runtime.name, e)
                continue
            if self._taken(runtime.name):
                continue  # the file configures that name now
            self.entries[runtime.name] = Registration(runtime, node_id, now, stream=0,
                                                      closed_at=now)
        if self.entries:
            log.info("restored %d registrations from %s; each expires in %gs unless its "
                     "sidecar registers again", len(self.entries), path, self.grace)

    def _save(self) -> None:
        path = self.state_path
        if not path:
            return
        data = {"registrations": [
            {"node_id": r.node_id, "runtime": json_format.MessageToDict(
                r.runtime, preserving_proto_field_name=True)}
            for _, r in sorted(self.entries.items())]}
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write registration state %s: %s", path, e)

    def report(self, stream: int, node_id: str, runtime: resources_pb2.Runtime) -> str:
        """Record a request; '' or the reason it is refused."""
        try:
            validate_resources([runtime], [], "runtime")
        except ConfigError as e:
            return str(e).replace("runtime.runtimes[0]", "runtime")
        if self._taken(runtime.name):
            return f"runtime {runtime.name!r} is configured in the control plane's file"
        now = self._clock()
        reg = self.entries.get(runtime.name)
        if reg is not None and reg.stream != stream and not self._expired(reg, now) \
                and reg.closed_at is None:
            return f"runtime {runtime.name!r} is already registered by node {reg.node_id!r}"
        changed = reg is None or reg.runtime != runtime or reg.closed_at is not None
        self.entries[runtime.name] = Registration(runtime, node_id, now, stream)
        if changed:
            self._changed()
        return ""

    def closed(self, stream: int) -> None:
        now = self._clock()
        for reg in self.entries.values():
            if reg.stream == stream and reg.closed_at is None:
                reg.closed_at = now

    def _expired(self, reg: Registration, now: float) -> bool:
        gone = reg.closed_at if reg.closed_at is not None else (
            reg.last_seen + SILENT_HEARTBEATS * self.heartbeat)
        return now >= gone + self.grace

    def expire(self) -> bool:
        now = self._clock()
        dead = [n for n, r in self.entries.items() if self._expired(r, now)]
        for name in dead:
            log.info("registered runtime %s expired; its models leave the table", name)
            del self.entries[name]
        if dead:
            self._changed()
        return bool(dead)

    def runtimes(self) -> list[resources_pb2.Runtime]:
        return [self.entries[n].runtime for n in sorted(self.entries)]

    def dump(self) -> dict:
        now = self._clock()
        return {n: {"node_id": r.node_id, "models": len(r.runtime.models),
                    "seen_s_ago": round(now - r.last_seen, 3), "stream_open": r.closed_at is None}
                for n, r in sorted(self.entries.items())}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="registrations")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(min(self.grace, self.heartbeat) / 4)
            self.expire()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class RegistrationServicer(discovery_pb2_grpc.RuntimeRegistrationServiceServicer):
    def __init__(self, registrations: Registrations, heartbeat: float, metrics):
        self.registrations = registrations
        self.registrations.heartbeat = heartbeat
        self.heartbeat = duration_pb2.Duration()
        self.heartbeat.FromNanoseconds(int(heartbeat * 1e9))
        self.metrics = metrics

    async def Register(self, request_iterator, context):
        stream = id(context)
        self.metrics.registrations.inc()
        try:
            first = True
            async for request in request_iterator:
                error = self.registrations.report(stream, request.node.id, request.runtime)
                if error:
                    log.warning("registration from %s refused: %s", context.peer(), error)
                    yield discovery_pb2.RegisterResponse(
                        error=discovery_pb2.RpcStatus(code=3, message=error))
                    return
                if first:
                    log.info("runtime %s registered by node %s", request.runtime.name,
                             request.node.id)
                    yield discovery_pb2.RegisterResponse(heartbeat_interval=self.heartbeat)
                    first = False
        finally:
            self.registrations.closed(stream)
            self.metrics.registrations.dec()
