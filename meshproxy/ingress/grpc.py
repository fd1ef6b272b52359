"""gRPC listener: inference.GRPCInferenceService proxied over raw bytes with grpc.aio generic handlers.

How it works: one generic handler maps each method of the service to a coroutine that receives
the request message as bytes (no deserializer: no tensor is ever decoded). The model comes from
the request metadata (the REST model header names) or from field 1 of the message, read with
`grpc_wire.scan`; both present and different is INVALID_ARGUMENT. The snapshot is read fresh
per call, matched like REST, an endpoint picked, and the bytes sent on that runtime's channel
(`upstream.grpc_pool`) with the client's deadline capped by the route timeout and the metadata
minus hop-by-hop entries. The runtime's initial metadata (plus x-meshproxy-upstream), message,
status, details and trailers go back as they came. Unary calls that fail before an answer
(UNAVAILABLE, RESOURCE_EXHAUSTED, connect failure, per the route's retry policy and budget) are
tried again, on another runtime when there is one. A ModelStreamInfer stream is routed by its
metadata or first message and stays on one runtime. Server-level methods and the repository
index are answered here. Every error the proxy makes itself is a ProxyError rendered by errors.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc

from meshproxy import __version__, grpc_wire
from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy.errors import (BadRequest, NoHealthyUpstream, ProxyError, Unimplemented,
                              UpstreamFailure, UpstreamTimeout, render_grpc)
from meshproxy.model_name import validate
from meshproxy.routing.split import unit_hash
from meshproxy.upstream.grpc_pool import GrpcChannels
from meshproxy.upstream.retry import CONNECT_FAILURE

SERVICE = "/inference.GRPCInferenceService/"
UPSTREAM_KEY = "x-meshproxy-upstream"
# Not forwarded: they describe this hop (grpc core sets its own) or the deadline travels apart.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "host", "user-agent", "content-type", "grpc-timeout",
                        "grpc-encoding", "grpc-accept-encoding"))
# gRPC status -> the HTTP status outlier detection counts (Envoy's grpcToHttpStatus).
_AS_HTTP = {"UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "INTERNAL": 500, "UNKNOWN": 500,
            "DATA_LOSS": 500, "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 404}
_OK = grpc.StatusCode.OK
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_TRUE = b"\x08\x01"  # {live|ready: true}; false is the empty message


class GrpcContext:
    """What every call on the listener shares. `snapshot()` returns the table in force now."""

    def __init__(self, model_headers: tuple[bytes, ...], upstream_header: bool, metrics,
                 snapshot: Callable, ready: Callable[[], bool], rnd: Callable[[], float],
                 channels: GrpcChannels, outlier_success: Callable | None = None,
                 outlier_failure: Callable | None = None):
        self.model_headers = frozenset(h.decode() for h in model_headers)
        self.first_header = model_headers[0].decode() if model_headers else "model"
        self.upstream_header = upstream_header
        self.metrics = metrics
        self.snapshot = snapshot
        self.ready = ready
        self.rnd = rnd
        self.channels = channels
        # Each try is reported: success(endpoint), failure(endpoint, HTTP-equivalent status).
        self.outlier_success = outlier_success or (lambda endpoint: None)
        self.outlier_failure = outlier_failure or (lambda endpoint, status: None)


class Request:
    """One routed call: the model, the message with what scan() found, the metadata to forward."""

    __slots__ = ("model", "message", "named", "version", "front", "metadata")

    def __init__(self, model: str, message: bytes | None, named: bool, version: bytes | None,
                 front: int, metadata: tuple):
        self.model = model
        self.message = message
        self.named = named  # field 1 is set
        self.version = version
        self.front = front
        self.metadata = metadata

    def header_of(self, name: str) -> bytes | None:
        """A metadata value by (lower-case) name, for header rules and hash keys."""
        for key, value in self.metadata:
            if key == name:
                return value if isinstance(value, bytes) else value.encode()
        return None

    def upstream_message(self, target) -> bytes:
        """The message as the runtime must get it: field 1 naming the target model (a split,
        or a call routed by metadata alone); otherwise the same bytes."""
        if target.rewrite:
            return grpc_wire.with_name(self.message, self.front, target.model_bytes,
                                       target.version.encode() if target.version else None)
        if not self.named:
            return grpc_wire.with_name(self.message, self.front, self.model.encode(), self.version)
        return self.message


def read_request(ctx: GrpcContext, invocation_metadata, message: bytes | None) -> Request | None:
    """The model a call names (metadata, else field 1 of `message`) and the metadata to forward.

    None when neither names one. `message` is None for a stream routed before its first message.
    """
    header_value = None
    forward = []
    names = ctx.model_headers
    for key, value in invocation_metadata:
        if key in HOP_BY_HOP:
            continue
        if key in names:
            if header_value is not None and header_value != value:
                raise BadRequest("the request names two different models in its metadata")
            header_value = value
        forward.append((key, value))
    body_name = raw = version = None
    front = 0
    if message is not None:
        raw, version, front = grpc_wire.scan(message)
        if raw:
            body_name = validate(raw, "the request's model_name (field 1)")
    if header_value is None:
        if body_name is None:
            return None
        model = body_name
    else:
        model = validate(header_value.strip().encode(), f"the {ctx.first_header!r} metadata")
        if body_name is not None and body_name != model:
            raise BadRequest(f"the metadata names model {model!r} but the request's model_name "
                             f"is {body_name!r}", model)
    return Request(model, message, bool(raw), version or None, front, tuple(forward))


class InferenceProxy(grpc.GenericRpcHandler):
    """The generic handler: each method name -> its handler; unknown methods get None
    (grpc answers UNIMPLEMENTED)."""

    def __init__(self, ctx: GrpcContext):
        self.ctx = ctx
        routed = {name: grpc.unary_unary_rpc_method_handler(self._routed(SERVICE + name))
                  for name in ("ModelInfer", "ModelReady", "ModelMetadata")}
        local = {name: grpc.unary_unary_rpc_method_handler(getattr(self, name))
                 for name in ("ServerLive", "ServerReady", "ServerMetadata", "RepositoryIndex",
                              "RepositoryModelLoad", "RepositoryModelUnload")}
        stream = {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer)}
        self._handlers = {SERVICE + k: v for k, v in {**routed, **local, **stream}.items()}
        self._server_metadata = pb.ServerMetadataResponse(
            name="meshproxy", version=__version__, extensions=["model_repository"]
        ).SerializeToString()

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)

    # -- routed unary methods
    def _routed(self, method: str):
        ready_check = method.endswith("/ModelReady")

        async def handler(message: bytes, context: grpc.aio.ServicerContext):
            return await self.unary(method, message, context, ready_check)

        return handler

    async def unary(self, method: str, message: bytes, context, ready_check: bool = False):
        """Route one unary call, forward it (with retries) and relay the answer."""
        ctx = self.ctx
        t0 = time.perf_counter()
        model = runtime = ""
        code = "OK"
        try:
            req = read_request(ctx, context.invocation_metadata(), message)
            if req is None:
                raise BadRequest(f"no model named: set the {ctx.first_header!r} metadata or the "
                                 f"request's model_name (field 1)")
            model = req.model
            try:
                response, runtime, code = await self._forward(method, req, context)
            except NoHealthyUpstream:
                if not ready_check:
                    raise
                return b""  # ModelReady of a model no runtime holds ready: {ready: false}
            return response
        except ProxyError as err:
            code = self._fail(context, err, model)
            return None
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            snapshot = ctx.snapshot()
            ctx.metrics.record_request(model if snapshot.is_known(model) else "", "grpc", code,
                                       runtime, time.perf_counter() - t0)

    async def _forward(self, method: str, req: Request, context):
        ctx = self.ctx
        snapshot = ctx.snapshot()
        version = (validate(req.version, "the request's model_version (field 2)")
                   if req.version else None)
        target, balancer = snapshot.match(req.model, version, ctx.rnd, req.header_of,
                                          time.monotonic())
        message = req.upstream_message(target)
        metadata = _rewritten(req.metadata, ctx.model_headers, target) if target.rewrite \
            else req.metadata
        route = target.route
        key = None
        if route is not None and route.hash_header:
            value = req.header_of(route.hash_header)
            key = unit_hash(value) if value is not None else None
        policy, budget = target.retry, target.budget
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + (target.timeout if remaining is None
                                  else min(remaining, target.timeout))
        budget.active_requests += 1
        retrying = False
        endpoint = None
        tries = 0
        try:
            while True:
                endpoint = (balancer.pick(ctx.rnd, endpoint, key) if endpoint is not None
                            else None) or balancer.pick(ctx.rnd, None, key)
                if endpoint is None:
                    raise NoHealthyUpstream(
                        f"model {target.model!r} has no healthy runtime", req.model)
                channel = ctx.channels.get(snapshot, endpoint)
                if channel is None:
                    raise NoHealthyUpstream(f"model {target.model!r}: runtime {endpoint.name} "
                                            f"has no gRPC address", req.model)
                left = deadline - loop.time()
                timeout = left if policy.per_try_timeout is None else min(
                    left, policy.per_try_timeout)
                call, outcome = await self._try(channel, method, message, metadata, timeout,
                                                endpoint)
                if outcome is None:
                    return await self._relay_ok(context, call, endpoint), endpoint.name, "OK"
                reason = self._retry_reason(outcome, policy, deadline - loop.time())
                if reason is not None and tries < policy.num_retries and not (
                        retrying or budget.allows(policy)):
                    ctx.metrics.record_budget_exhausted(req.model)
                    reason = None
                if reason is None or tries >= policy.num_retries:
                    return None, endpoint.name, await self._relay_error(
                        context, outcome, req.model, endpoint, deadline - loop.time())
                tries += 1
                ctx.metrics.record_retry(req.model, reason)
                if not retrying:
                    retrying = True
                    budget.active_retries += 1
                pause = policy.backoff(tries, ctx.rnd)
                if pause >= deadline - loop.time():
                    return None, endpoint.name, await self._relay_error(
                        context, outcome, req.model, endpoint, deadline - loop.time())
                await asyncio.sleep(pause)
        finally:
            budget.active_requests -= 1
            if retrying:
                budget.active_retries -= 1

    async def _try(self, channel, method: str, message: bytes, metadata, timeout: float, endpoint):
        """One call to one runtime: (call, None) when it answered, else (call, the AioRpcError)."""
        endpoint.active += 1
        endpoint.total += 1
        call = channel.unary(method)(message, timeout=max(timeout, 0.0), metadata=metadata)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            self._report(endpoint, e.code().name)
            return call, e
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            endpoint.active -= 1
        self.ctx.outlier_success(endpoint)
        return call, None

    def _report(self, endpoint, code: str) -> None:
        if code == "OK":
            self.ctx.outlier_success(endpoint)
        elif code in _AS_HTTP:
            self.ctx.outlier_failure(endpoint, _AS_HTTP[code])

    @staticmethod
    def _retry_reason(err: grpc.aio.AioRpcError, policy, left: float) -> str | None:
        if left <= 0:
            return None
        code = err.code()
        if code is _UNAVAILABLE and not err.initial_metadata():
            return policy.on_failure(CONNECT_FAILURE) or policy.on_grpc_status("UNAVAILABLE")
        return policy.on_grpc_status(code.name)

    async def _relay_ok(self, context, call, endpoint) -> bytes:
        """Send the runtime's initial metadata and trailers; return its answer."""
        response = await call
        initial = await call.initial_metadata()
        if self.ctx.upstream_header:
            await context.send_initial_metadata((*initial, (UPSTREAM_KEY, endpoint.name)))
        elif initial:
            await context.send_initial_metadata(tuple(initial))
        trailers = await call.trailing_metadata()
        if trailers:
            context.set_trailing_metadata(tuple(trailers))
        return response

    async def _relay_error(self, context, err: grpc.aio.AioRpcError, model: str, endpoint,
                     left: float) -> str:
        """End the call as the runtime ended it, or with the proxy's own error when there was no
        answer (connect failure, the route's deadline); returns the status name."""
        code = err.code()
        initial = err.initial_metadata()
        if code is _UNAVAILABLE and not initial:
            raise UpstreamFailure(f"model {model!r}: runtime {endpoint.name} is unavailable: "
                                  f"{err.details()}", model)
        if code is _DEADLINE and left <= 0.001:
            raise UpstreamTimeout(f"model {model!r}: runtime {endpoint.name} did not answer "
                                  f"in time", model)
        md = tuple(initial or ())
        if self.ctx.upstream_header:
            md += ((UPSTREAM_KEY, endpoint.name),)
        if md:
            await context.send_initial_metadata(md)
        trailers = err.trailing_metadata()
        if trailers:
            context.set_trailing_metadata(tuple(trailers))
        context.set_code(code)
        context.set_details(err.details() or "")
        return code.name

    def _fail(self, context, err: ProxyError, model: str) -> str:
        code, message, trailers = render_grpc(err)
        self.ctx.metrics.record_local_error(err.status, type(err).__name__)
        if trailers:
            context.set_trailing_metadata(trailers)
        context.set_code(code)
        context.set_details(message)
        return code.name

    # -- the stream
    async def ModelStreamInfer(self, requests, context):
        """Route by the metadata or the first message; pinned to one runtime for its life."""
        ctx = self.ctx
        t0 = time.perf_counter()
        model = runtime = ""
        code = "OK"
        call = None
        pump = None
        endpoint = None
        try:
            md = context.invocation_metadata()
            req = read_request(ctx, md, None)
            first = None
            if req is None:
                try:
                    first = await requests.__anext__()
                except StopAsyncIteration:
                    return
                req = read_request(ctx, md, first)
                if req is None:
                    raise BadRequest(f"no model named: set the {ctx.first_header!r} metadata or "
                                     f"model_name (field 1) in the stream's first message")
            model = req.model
            snapshot = ctx.snapshot()
            target, balancer = snapshot.match(model, None, ctx.rnd, req.header_of,
                                              time.monotonic())
            endpoint = balancer.pick(ctx.rnd)
            if endpoint is None:
                raise NoHealthyUpstream(f"model {target.model!r} has no healthy runtime", model)
            channel = ctx.channels.get(snapshot, endpoint)
            if channel is None:
                raise NoHealthyUpstream(f"model {target.model!r}: runtime {endpoint.name} has "
                                        f"no gRPC address", model)
            runtime = endpoint.name
            metadata = _rewritten(req.metadata, ctx.model_headers, target) if target.rewrite \
                else req.metadata
            pump = StreamPump(model, target, first, requests)
            endpoint.active += 1
            endpoint.total += 1
            call = channel.stream(SERVICE + "ModelStreamInfer")(
                pump.messages(), timeout=context.time_remaining(), metadata=metadata)
            try:
                initial = await call.initial_metadata()
                md_out = tuple(initial or ())
                if ctx.upstream_header:
                    md_out += ((UPSTREAM_KEY, endpoint.name),)
                if md_out:
                    await context.send_initial_metadata(md_out)
                async for response in call:
                    yield response
                if pump.error is not None:
                    raise pump.error
                status = await call.code()
                trailers = await call.trailing_metadata()
                if trailers:
                    context.set_trailing_metadata(tuple(trailers))
                if status is not _OK:
                    context.set_code(status)
                    context.set_details(await call.details() or "")
                code = status.name
            except grpc.aio.AioRpcError as e:
                if pump.error is not None:
                    raise pump.error from None
                code = await self._relay_error(context, e, model, endpoint, 1.0)
            finally:
                endpoint.active -= 1
        except ProxyError as err:
            code = self._fail(context, err, model)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if call is not None and not call.done():
                call.cancel()
            snapshot = ctx.snapshot()
            ctx.metrics.record_request(model if snapshot.is_known(model) else "", "grpc", code,
                                       runtime, time.perf_counter() - t0)

    # -- answered here
    async def ServerLive(self, message, context):
        return self._local(_TRUE)

    async def ServerReady(self, message, context):
        return self._local(_TRUE if self.ctx.ready() else b"")

    async def ServerMetadata(self, message, context):
        return self._local(self._server_metadata)

    async def RepositoryIndex(self, message, context):
        request = pb.RepositoryIndexRequest.FromString(message)
        out = pb.RepositoryIndexResponse()
        for row in self.ctx.snapshot().index():
            if request.ready and row["state"] != "READY":
                continue
            out.models.add(name=row["name"], state=row["state"],
                           reason="" if row["runtimes"] else "no runtime holds it ready")
        return self._local(out.SerializeToString())

    async def RepositoryModelLoad(self, message, context):
        return self._refuse(context, "load")

    async def RepositoryModelUnload(self, message, context):
        return self._refuse(context, "unload")

    def _refuse(self, context, what: str):
        err = Unimplemented(f"the proxy does not {what} models: ask the runtime, or change the "
                            f"control plane's config")
        self.ctx.metrics.record_request("", "grpc", self._fail(context, err, ""), "", 0.0)
        return None

    def _local(self, response: bytes) -> bytes:
        self.ctx.metrics.record_request("", "grpc", "OK", "", 0.0)
        return response


class StreamPump:
    """The client's messages on their way to the runtime: each must name the stream's model
    (or none); a split's target is written in. A message naming another model, or not valid
    protobuf, half-closes the upstream stream and is kept in `error`: the client gets the
    answers to the messages before it, then INVALID_ARGUMENT."""

    def __init__(self, model: str, target, first: bytes | None, requests):
        self.model = model
        self.model_bytes = model.encode()
        self.target = target
        self.first = first
        self.requests = requests
        self.error: ProxyError | None = None

    async def messages(self):
        try:
            if self.first is not None:
                yield self.check(self.first)
                self.first = None
            async for message in self.requests:
                yield self.check(message)
        except ProxyError as err:
            self.error = err  # ends the request stream here; grpc half-closes the call

    def check(self, message: bytes) -> bytes:
        raw, version, front = grpc_wire.scan(message)
        if raw and raw != self.model_bytes:
            raise BadRequest(
                f"stream for model {self.model!r} got a message for model "
                f"{raw[:64].decode('latin-1')!r}: a stream serves one model", self.model)
        return Request(self.model, message, bool(raw), version, front, ()).upstream_message(
            self.target)


def _rewritten(metadata: tuple, names: frozenset[str], target) -> tuple:
    """The metadata with every model entry naming the split's target model."""
    return tuple((k, target.model) if k in names else (k, v) for k, v in metadata)


async def start_server(ctx: GrpcContext, host: str, port: int,
                       max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Bind and start the listener; returns the server and the port it got."""
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),  # a second proxy on a busy port must fail, not share it
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    server.add_generic_rpc_handlers((InferenceProxy(ctx),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc's way of saying the bind failed
        raise OSError(f"cannot listen for gRPC on {host}:{port}: {e}") from None
    await server.start()
    return server, bound
