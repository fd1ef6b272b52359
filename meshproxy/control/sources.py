"""Sources of truth for the table: the watched config file and the runtime discovery poller.

Runtime discovery: each runtime listed under `discovery` is polled every poll_interval with
the API of its dialect (POLLERS). A runtime that answers "not ready" loses its models at once;
one that does not answer keeps the models it last reported for `grace`, then loses them, and
gets them back as soon as it answers again. `RuntimeView` holds that rule and nothing else
(pure, clock passed in); the poller task around it does the HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import aiohttp

from meshproxy._proto.meshproxy.v1 import resources_pb2

log = logging.getLogger("meshproxy.control")
Runtime, LoadedModel = resources_pb2.Runtime, resources_pb2.LoadedModel
STATES = {"READY": LoadedModel.READY, "LOADING": LoadedModel.LOADING,
          "UNLOADING": LoadedModel.UNLOADING}


class NoAnswer(Exception):
    """The runtime could not be reached or answered nonsense."""


# --- what a runtime reports (pure parsers) ------------------------------------------------------

def models_from_index(body) -> list[LoadedModel]:
    """A v2 repository index (Triton, MLServer): held models, READY/LOADING/UNLOADING only."""
    if not isinstance(body, list):
        raise NoAnswer("repository index is not a JSON list")
    out = {}
    for entry in body:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        state = STATES.get(str(entry.get("state", "")).upper())
        if state is not None:
            m = LoadedModel(name=entry["name"], version=str(entry.get("version") or ""),
                            state=state)
            out[(m.name, m.version)] = m
    return [out[k] for k in sorted(out)]


async def _get_json(session: aiohttp.ClientSession, method: str, url: str):
    async with session.request(method, url, json={} if method == "POST" else None) as resp:
        if resp.status != 200:
            raise NoAnswer(f"{method} {url}: HTTP {resp.status}")
        try:
            return await resp.json(content_type=None)
        except ValueError as e:
            raise NoAnswer(f"{method} {url}: not JSON: {e}") from None


async def poll_index(session: aiohttp.ClientSession, base: str) -> list[LoadedModel]:
    return models_from_index(await _get_json(session, "POST", f"{base}/v2/repository/index"))


async def poll_kserve(session: aiohttp.ClientSession, base: str) -> list[LoadedModel]:
    """KServe ModelServer: GET /v2/models, then each model's /ready."""
    body = await _get_json(session, "GET", f"{base}/v2/models")
    names = body.get("models") if isinstance(body, dict) else None
    if not isinstance(names, list):
        raise NoAnswer(f"GET {base}/v2/models: no 'models' list")
    held = []
    for name in sorted(n for n in names if isinstance(n, str)):
        async with session.get(f"{base}/v2/models/{name}/ready") as resp:
            # listed but not ready (loading): known, not routed (503 rather than 404)
            held.append(LoadedModel(name=name, state=LoadedModel.READY if resp.status == 200
                                    else LoadedModel.LOADING))
    return held


Poller = Callable[[aiohttp.ClientSession, str], Awaitable[list[LoadedModel]]]
POLLERS: dict[int, Poller] = {
    Runtime.TRITON: poll_index, Runtime.MLSERVER: poll_index, Runtime.GENERIC: poll_index,
    Runtime.TORCHSERVE: poll_index, Runtime.KSERVE: poll_kserve,
}


async def observe(session: aiohttp.ClientSession, rt: Runtime) -> list[LoadedModel]:
    """The runtime's models with their own states; NoAnswer when it does not answer.

    /v2/health/ready is not asked: MLServer, and Triton with strict readiness (its default),
    answer it 400 while any one model is not ready, which would take the ready ones out of
    the table too. A runtime that is going away unloads its models, and its index says so."""
    base = f"http://{rt.http_address}"
    try:
        return await POLLERS[rt.dialect](session, base)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise NoAnswer(f"{type(e).__name__}: {e}") from None


# --- the grace rule (pure) ----------------------------------------------------------------------

class RuntimeView:
    """What the table says about one polled runtime, given its answers and the clock."""

    def __init__(self, config: Runtime, grace: float):
        self.config = config
        self.grace = grace
        self.models: list[LoadedModel] = []
        self.last_answer: float | None = None
        self.error = ""
        self._message: Runtime | None = None

    def answered(self, models: list[LoadedModel], now: float) -> None:
        self.last_answer, self.error = now, ""
        self._set(models)

    def failed(self, error: str, now: float) -> None:
        self.error = error
        if self.last_answer is None or now - self.last_answer >= self.grace:
            self._set([])

    def _set(self, models: list[LoadedModel]) -> None:
        if models != self.models:
            self.models, self._message = models, None

    def message(self) -> Runtime:
        """The Runtime resource; the same object while nothing changes (the cache relies on it)."""
        if self._message is None:
            msg = Runtime()
            msg.CopyFrom(self.config)
            msg.models.extend(self.models)
            self._message = msg
        return self._message


# --- the asyncio parts ------------------------------------------------------------------------

class DiscoveryPoller:
    """One task per polled runtime; `changed` is called whenever a runtime's models change."""

    def __init__(self, changed: Callable[[], None], metrics=None):
        self.views: dict[str, RuntimeView] = {}
        self._changed = changed
        self._metrics = metrics
        self._tasks: dict[str, asyncio.Task] = {}
        self._polled: dict[str, asyncio.Event] = {}  # set once a runtime answered or failed
        self._session: aiohttp.ClientSession | None = None
        self.interval = 2.0

    def configure(self, runtimes, interval: float, grace: float, timeout: float) -> None:
        """Start, stop or restart pollers so they match `runtimes` (also on config edits)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout),
                connector=aiohttp.TCPConnector(limit=0, force_close=False))
        self.interval = interval
        wanted = {rt.name: rt for rt in runtimes}
        replaced: dict[str, RuntimeView] = {}
        for name in list(self.views):
            if name not in wanted or self.views[name].config != wanted[name] \
                    or self.views[name].grace != grace:
                self._tasks.pop(name).cancel()
                replaced[name] = self.views.pop(name)
        for name, rt in wanted.items():
            if name not in self.views:
                view = self.views[name] = RuntimeView(rt, grace)
                old = replaced.get(name)
                if old is not None and (old.config.http_address, old.config.dialect) == (
                        rt.http_address, rt.dialect):
                    # Same runtime, new weight or labels: keep what it reported meanwhile.
                    view.models, view.last_answer = old.models, old.last_answer
                self._polled[name] = asyncio.Event()
                self._tasks[name] = asyncio.get_running_loop().create_task(
                    self._poll(view), name=f"poll-{name}")
        for name in list(self._polled):
            if name not in self.views:
                del self._polled[name]

    async def first_round(self, timeout: float) -> list[str]:
        """Wait until every runtime has been polled once (answered or not), at most `timeout`
        seconds; the names of those still unpolled then. A table published before would list
        each runtime with no models, and proxies would drop every route to it."""
        waits = [e.wait() for e in self._polled.values() if not e.is_set()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
            except asyncio.TimeoutError:
                pass
        return sorted(n for n, e in self._polled.items() if not e.is_set())

    async def _poll(self, view: RuntimeView) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            before = view.message()
            try:
                view.answered(await observe(self._session, view.config), time.monotonic())
                result = "ok"
            except Exception as e:  # noqa: BLE001 - an odd answer is a failed poll, not the end
                if not isinstance(e, NoAnswer):  # of polling (its grace would never run out)
                    e = NoAnswer(f"unusable answer: {type(e).__name__}: {e}")
                if not view.error:
                    log.warning("runtime %s (%s) does not answer: %s", view.config.name,
                                view.config.http_address, e)
                view.failed(str(e), time.monotonic())
                result = "no_answer"
            if self._metrics is not None:
                self._metrics.polls.labels(view.config.name, result).inc()
            if view.message() is not before:
                self._changed()
            polled = self._polled.get(view.config.name)
            if polled is not None:
                polled.set()
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
