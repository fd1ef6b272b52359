"""Active health checks: GET /v2/health/ready on each runtime that asks for it.

How it works: one task per checked endpoint asks the runtime every `interval`;
a 200 within `timeout` is a pass, anything else a failure. `unhealthy_threshold`
failures in a row take the endpoint out of balancing (checked_ok False),
`healthy_threshold` passes in a row bring it back. Endpoints start healthy, so
a new runtime takes traffic before its first check. The counting is HealthState
(pure); HealthChecker only runs the loops and follows snapshot updates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import aiohttp
import yarl

from meshproxy.cluster.endpoints import Endpoint

log = logging.getLogger("meshproxy.health")


@dataclasses.dataclass(frozen=True)
class HealthSettings:
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1

    @classmethod
    def from_proto(cls, msg) -> "HealthSettings":
        base = cls()
        sec = lambda f, d: getattr(msg, f).ToNanoseconds() / 1e9 if msg.HasField(f) else d
        num = lambda f, d: max(1, getattr(msg, f).value) if msg.HasField(f) else d
        return cls(sec("interval", base.interval), sec("timeout", base.timeout),
                   num("unhealthy_threshold", base.unhealthy_threshold),
                   num("healthy_threshold", base.healthy_threshold))


class HealthState:
    """Consecutive passes and failures of one endpoint; `record` says when the verdict flips."""

    def __init__(self, settings: HealthSettings):
        self.settings = settings
        self.healthy = True
        self.passes = self.failures = 0

    def record(self, ok: bool) -> bool:
        """Count one check; True when the endpoint's health changed."""
        if ok:
            self.passes, self.failures = self.passes + 1, 0
            if not self.healthy and self.passes >= self.settings.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.failures, self.passes = self.failures + 1, 0
            if self.healthy and self.failures >= self.settings.unhealthy_threshold:
                self.healthy = False
                return True
        return False


def ready_url(e: Endpoint) -> yarl.URL:
    """The runtime's readiness URL; an IPv6 host is bracketed ('http://[::1]:8000/...')."""
    return yarl.URL.build(scheme="http", host=e.host, port=e.port, path="/v2/health/ready")


class HealthChecker:
    """Runs one check loop per endpoint whose runtime has a health_check."""

    def __init__(self, on_change=lambda endpoint, healthy: None):
        self._tasks: dict[Endpoint, tuple[HealthSettings, asyncio.Task]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._on_change = on_change

    def sync(self, snapshot) -> None:
        """Follow a new snapshot: start, restart or stop loops as runtimes ask."""
        wanted = {}
        for rt in snapshot.runtimes:
            e = snapshot.endpoints.get(rt.name)
            if e is not None and rt.HasField("health_check"):
                wanted[e] = HealthSettings.from_proto(rt.health_check)
        for e, (settings, task) in list(self._tasks.items()):
            if wanted.get(e) != settings:
                task.cancel()
                del self._tasks[e]
                e.checked_ok = True
                e.refresh_health()
        for e, settings in wanted.items():
            if e not in self._tasks:
                task = asyncio.get_running_loop().create_task(self._loop(e, settings))
                self._tasks[e] = (settings, task)

    async def _loop(self, e: Endpoint, settings: HealthSettings) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        state = HealthState(settings)
        url = ready_url(e)
        while True:
            ok = await self._check(url, settings.timeout)
            if state.record(ok):
                e.checked_ok = state.healthy
                e.refresh_health()
                log.warning("runtime %s is now %s (active health check)", e.name,
                            "healthy" if state.healthy else "unhealthy")
                self._on_change(e, state.healthy)
            await asyncio.sleep(settings.interval)

    async def _check(self, url: yarl.URL, timeout: float) -> bool:
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def close(self) -> None:
        for _, task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
