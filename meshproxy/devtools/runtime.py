"""The devtools runtime: a small KServe v2 server (REST + gRPC) for demos, tests and the bench.

Model state lives in `models.Repository`; `DevRuntime` adds the clock, the injected latency and
failures, and the two listeners. REST answers are JSON; every error is `{"error": "..."}` and
is produced by `_errors` alone. Choices where KServe runtimes differ:
  - `/v2/models/{m}/ready` answers 200 or 503 (Triton uses 400), never 404.
  - infer/metadata on an unknown or unloaded model is 404; on a LOADING model 503.
  - models named at start are READY at once; `load_delay_ms` applies to repository loads.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from typing import Callable

from aiohttp import web

from meshproxy import __version__
from meshproxy.devtools.grpc_service import start_server
from meshproxy.devtools.options import RuntimeOptions
from meshproxy.devtools.models import (LOADING, PLATFORM, READY, BadInput, DevError, InferRequest,
                                       InferResponse, InjectedFailure, LoadAborted, Repository,
                                       Tensor, run_infer)


class DevRuntime:
    """One runtime: its repository, its knobs, and the REST and gRPC servers in front."""

    def __init__(self, options: RuntimeOptions):
        self.options, self.name = options, options.name
        self.http_port, self.grpc_port = options.http_port, options.grpc_port
        self.repository = Repository(options.name, options.capacity)
        self.ready = False
        self._rng = random.Random(options.seed)
        self._latency, self._delay = options.latency_ms / 1000, options.load_delay_ms / 1000
        self._runner: web.AppRunner | None = None
        self._grpc = None
        for model in options.models:
            self.repository.load(model, time.monotonic())

    async def infer(self, request: InferRequest) -> InferResponse:
        entry = self.repository.use(request.model, request.version, time.monotonic())
        outputs = run_infer(entry.model, request)
        if self._latency:
            await asyncio.sleep(self._latency)
        if self.options.fail_rate and self._rng.random() < self.options.fail_rate:
            raise InjectedFailure(f"injected failure on runtime {self.name} "
                                  f"(fail_rate={self.options.fail_rate})")
        return InferResponse(request.model, "1", request.id, {"runtime": self.name}, outputs)

    async def load(self, name: str) -> None:
        """Load `name` and wait until it is READY (it may be unloaded or evicted meanwhile)."""
        entry = self.repository.load(name, time.monotonic(), self._delay)
        while entry is not None and entry.state == LOADING:
            await asyncio.sleep(max(0.0, entry.ready_at - time.monotonic()))
            entry = self.repository.entry(name, time.monotonic())
        if entry is None or entry.state != READY:
            raise LoadAborted(f"load of model '{name}' on runtime {self.name} did not finish: "
                              f"{entry.reason if entry else 'unknown'}")

    def unload(self, name: str) -> None:
        self.repository.unload(name, time.monotonic())

    def loaded_models(self) -> list[str]:
        return self.repository.ready(time.monotonic())

    def banner(self) -> str:
        grpc_at = f"{self.options.host}:{self.grpc_port}" if self.grpc_port is not None else "off"
        return (f"runtime {self.name} listening http={self.options.host}:{self.http_port} "
                f"grpc={grpc_at} models={','.join(self.loaded_models())}")

    async def start(self) -> None:
        """Bind HTTP, then gRPC; if either fails, whatever was bound is closed again."""
        self._runner = web.AppRunner(_make_app(self), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.options.host, self.http_port).start()
            self.http_port = self._runner.addresses[0][1]
            if self.grpc_port is not None:
                self._grpc, self.grpc_port = await start_server(
                    self, self.options.host, self.grpc_port)
        except BaseException:
            await self.stop()
            raise
        self.ready = True

    async def stop(self) -> None:
        # Report not-ready first so health checks see it, then close gRPC, then HTTP.
        self.ready = False
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --- REST -----------------------------------------------------------------------------------

RUNTIME = web.AppKey("runtime", DevRuntime)


def _json(body, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status,
                        content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    """The one place REST errors become `{"error": ...}` responses."""
    try:
        return await handler(request)
    except DevError as e:
        return _json({"error": e.message}, e.status)
    except web.HTTPException as e:  # router 404/405
        return _json({"error": f"{e.reason}: {request.method} {request.path}"}, e.status)


async def _served_by(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-served-by"] = request.app[RUNTIME].name


async def _body(request: web.Request):
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"request body is not valid JSON: {e}") from None


def _flatten(data) -> list:
    if not any(isinstance(v, list) for v in data):
        return data
    return [x for v in data for x in (_flatten(v) if isinstance(v, list) else [v])]


def _tensor(obj) -> Tensor:
    if not isinstance(obj, dict):
        raise BadInput("each input must be an object with name, shape, datatype and data")
    try:
        name, shape, datatype, data = obj["name"], obj["shape"], obj["datatype"], obj["data"]
    except KeyError as e:
        raise BadInput(f"input {obj.get('name', '?')!r} lacks field {e.args[0]!r}") from None
    if not isinstance(shape, list) or not isinstance(data, list) or not isinstance(datatype, str):
        raise BadInput(f"input {name!r}: shape and data must be lists, datatype a string")
    return Tensor(str(name), datatype, shape, _flatten(data))


def _infer_request(body, model: str, version: str) -> InferRequest:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise BadInput("request body must be an object with an 'inputs' list")
    outputs = body.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o
                                                for o in outputs):
        raise BadInput("'outputs' must be a list of objects with a 'name'")
    params = body.get("parameters") or {}
    return InferRequest(model, version, str(body.get("id") or ""),
                        [_tensor(t) for t in body["inputs"]], [str(o["name"]) for o in outputs],
                        params if isinstance(params, dict) else {})


def _response_json(r: InferResponse) -> dict:
    outputs = [{"name": t.name, "shape": t.shape, "datatype": t.datatype,
                "data": [v.decode(errors="replace") if isinstance(v, bytes) else v for v in t.data]}
               for t in r.outputs]
    body = {"model_name": r.model, "model_version": r.version, "parameters": r.parameters,
            "outputs": outputs}
    return {**body, "id": r.id} if r.id else body


async def _infer(request: web.Request) -> web.Response:
    m, v = request.match_info["model"], request.match_info.get("version", "")
    req = _infer_request(await _body(request), m, v)
    return _json(_response_json(await request.app[RUNTIME].infer(req)))


async def _model_metadata(request: web.Request) -> web.Response:
    rt, m = request.app[RUNTIME], request.match_info["model"]
    model = rt.repository.use(m, request.match_info.get("version", ""), time.monotonic()).model
    specs = {io: [vars(s) for s in getattr(model, io)] for io in ("inputs", "outputs")}
    return _json({"name": m, "versions": ["1"], "platform": PLATFORM, **specs})


async def _model_ready(request: web.Request) -> web.Response:
    rt, m = request.app[RUNTIME], request.match_info["model"]
    entry = rt.repository.entry(m, time.monotonic())
    if entry is not None and entry.state == READY:
        return _json({"name": m, "ready": True})
    state = entry.state if entry else "unknown"
    return _json({"error": f"model '{m}' is not ready on runtime {rt.name} ({state})"}, 503)


async def _live(_: web.Request) -> web.Response:
    return _json({"live": True})


async def _ready(request: web.Request) -> web.Response:
    ready = request.app[RUNTIME].ready
    return _json({"ready": ready}, 200 if ready else 503)


async def _server_metadata(request: web.Request) -> web.Response:
    return _json({"name": request.app[RUNTIME].name, "version": __version__,
                  "extensions": ["model_repository"]})


async def _index(request: web.Request) -> web.Response:
    body = await _body(request)
    ready_only = bool(body.get("ready")) if isinstance(body, dict) else False
    entries = request.app[RUNTIME].repository.index(time.monotonic(), ready_only)
    return _json([{"name": e.name, "version": "1", "state": e.state, "reason": e.reason}
                  for e in entries])


async def _load(request: web.Request) -> web.Response:
    await request.app[RUNTIME].load(request.match_info["model"])
    return _json({})


async def _unload(request: web.Request) -> web.Response:
    request.app[RUNTIME].unload(request.match_info["model"])
    return _json({})


async def _echo(request: web.Request) -> web.Response:
    """What arrived, as the runtime saw it: for proxy tests of header and body forwarding."""
    body = await request.read()
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    return _json({"method": request.method, "path": request.raw_path, "headers": headers,
                  "body_bytes": len(body), "runtime": request.app[RUNTIME].name})


def _make_app(runtime: DevRuntime) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
    app[RUNTIME] = runtime
    app.on_response_prepare.append(_served_by)
    app.router.add_get("/v2/health/live", _live)
    app.router.add_get("/v2/health/ready", _ready)
    app.router.add_get("/v2", _server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, _model_metadata)
        app.router.add_get(base + "/ready", _model_ready)
        app.router.add_post(base + "/infer", _infer)
    app.router.add_post("/v2/repository/index", _index)
    app.router.add_post("/v2/repository/models/{model}/load", _load)
    app.router.add_post("/v2/repository/models/{model}/unload", _unload)
    app.router.add_route("*", "/debug/echo", _echo)
    app.router.add_route("*", "/debug/echo/{tail:.*}", _echo)
    return app


# --- CLI ------------------------------------------------------------------------------------

async def serve(options: RuntimeOptions, ready: Callable[[DevRuntime], None] | None = None) -> None:
    """Run a runtime until cancelled, then stop it cleanly.

    Without `ready` (the CLI), the banner line is printed to stdout once both servers listen,
    and SIGTERM or SIGINT ends the run too.
    """
    runtime = DevRuntime(options)
    await runtime.start()
    loop, stopped = asyncio.get_running_loop(), asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT) if ready is None else ()
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stopped.set)
        if ready is None:
            print(runtime.banner(), flush=True)
        else:
            ready(runtime)
        await stopped.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runtime.stop()
