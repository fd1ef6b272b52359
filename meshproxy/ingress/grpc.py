"""gRPC listener: inference.GRPCInferenceService proxied over raw bytes with grpc.aio generic handlers.

How it works: one generic handler maps each method of the service to a coroutine that receives
the request message as bytes (no deserializer: no tensor is ever decoded). The model comes from
the request metadata (the REST model header names) or from field 1 of the message, read with
`grpc_wire.scan`; both present and different is INVALID_ARGUMENT. The snapshot is read fresh
per call and matched as on REST (header rules see the metadata); `upstream.grpc_forward` sends
the call and relays the answer. ModelInfer, ModelReady and ModelMetadata are routed unary calls;
a ModelStreamInfer stream is routed by its metadata or first message and stays on one runtime.
ServerLive/Ready/Metadata and the repository index are answered here; methods the proxy does
not carry get UNIMPLEMENTED. Errors the proxy makes are ProxyErrors rendered by errors.py, and
every call is counted once, with its gRPC status name, when it ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc

from meshproxy import __version__, grpc_wire
from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy.errors import BadRequest, NoHealthyUpstream, ProxyError, Unimplemented, render_grpc
from meshproxy.ingress.grpc_tracing import GrpcTracing
from meshproxy.model_name import validate
from meshproxy.upstream.grpc_forward import GrpcForwarder, StreamOutcome
from meshproxy.upstream.grpc_pool import GrpcChannels

SERVICE = "/inference.GRPCInferenceService/"
STREAM = SERVICE + "ModelStreamInfer"
# Not forwarded: they describe this hop (grpc core sets its own) or the deadline travels apart.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "transfer-encoding",
                        "upgrade", "host", "user-agent", "content-type", "grpc-timeout",
                        "grpc-encoding", "grpc-accept-encoding"))
_TRUE = b"\x08\x01"  # {live|ready: true}; false is the empty message


class GrpcContext:
    """What every call on the listener shares. `snapshot()` returns the table in force now."""

    def __init__(self, model_headers: tuple[bytes, ...], upstream_header: bool, metrics,
                 snapshot: Callable, ready: Callable[[], bool], rnd: Callable[[], float],
                 channels: GrpcChannels, outlier_success: Callable | None = None,
                 outlier_failure: Callable | None = None, tracing=None, access_log=None):
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
        # Spans when traces are on (telemetry.tracing.Tracing shared with REST), else None.
        self.tracing = GrpcTracing(tracing) if tracing is not None else None
        self.access_log = access_log  # telemetry.access_log.AccessLog when it is on


class Request:
    """One routed call: the model, the message with what scan() found, the metadata to forward."""

    __slots__ = ("model", "message", "named", "version", "front", "metadata", "model_keys",
                 "span", "target", "endpoint", "tries")

    def __init__(self, model: str, message: bytes | None, named: bool, version: bytes | None,
                 front: int, metadata: tuple, model_keys: frozenset[str]):
        self.model = model
        self.message = message
        self.named = named  # field 1 is set
        self.version = version
        self.front = front
        self.metadata = metadata
        self.model_keys = model_keys
        self.span = None  # the call's server span when traced
        self.target = self.endpoint = None  # set as the call is routed and tried
        self.tries = 0

    def header_of(self, name: str) -> bytes | None:
        """A metadata value by (lower-case) name, for header rules and hash keys."""
        for key, value in self.metadata:
            if key == name:
                return value if isinstance(value, bytes) else value.encode()
        return None

    def version_name(self) -> str | None:
        return validate(self.version, "the request's model_version (field 2)") \
            if self.version else None

    def upstream_message(self, target) -> bytes:
        """The message as the runtime must get it: field 1 naming the target model (a split,
        or a call routed by metadata alone); otherwise the same bytes."""
        if target.rewrite:
            return grpc_wire.with_name(self.message, self.front, target.model_bytes,
                                       target.version.encode() if target.version else None)
        if not self.named:
            return grpc_wire.with_name(self.message, self.front, self.model.encode(), self.version)
        return self.message

    def forwarded_metadata(self, target) -> tuple:
        """The metadata for the runtime; a split's target replaces the model entries."""
        if not target.rewrite:
            return self.metadata
        keys = self.model_keys
        return tuple((k, target.model) if k in keys else (k, v) for k, v in self.metadata)

    def for_message(self, message: bytes) -> "Request":
        """The same call carrying another message of its stream, which must name the same model
        (or none)."""
        raw, version, front = grpc_wire.scan(message)
        if raw and raw != self.model.encode():
            raise BadRequest(f"stream for model {self.model!r} got a message for model "
                             f"{raw[:64].decode('latin-1')!r}: a stream serves one model",
                             self.model)
        return Request(self.model, message, bool(raw), version, front, self.metadata,
                       self.model_keys)


class CallLog:
    """A finished call in the shape the access log reads (the fields of a REST Exchange)."""

    __slots__ = ("span", "t0", "t_sent", "method", "url", "model", "target", "status",
                 "endpoint", "tries", "body_bytes", "bytes_out")

    def __init__(self, method: str, req: Request | None, code: str, t0: float, bytes_in: int,
                 bytes_out: int):
        self.method, self.url, self.status, self.t0, self.t_sent = b"POST", method, code, t0, None
        self.model = req.model if req is not None else ""
        self.span = req.span if req is not None else None
        self.target = req.target if req is not None else None
        self.endpoint = req.endpoint if req is not None else None
        self.tries = req.tries if req is not None else 0
        self.body_bytes, self.bytes_out = bytes_in, bytes_out


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
    return Request(model, message, bool(raw), version or None, front, tuple(forward), names)


def _cancelled(context) -> str:
    """The status of a call grpc cancelled under its handler: the client's deadline passing
    (grpc answers DEADLINE_EXCEEDED), or the client or the server ending it."""
    left = context.time_remaining()
    return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"


class InferenceProxy(grpc.GenericRpcHandler):
    """The generic handler: method name -> handler; unknown methods get None (UNIMPLEMENTED)."""

    def __init__(self, ctx: GrpcContext):
        self.ctx = ctx
        self.forwarder = GrpcForwarder(ctx)
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

    def _no_model(self, where: str) -> BadRequest:
        return BadRequest(f"no model named: set the {self.ctx.first_header!r} metadata or "
                          f"model_name (field 1) in {where}")

    def _routed(self, method: str):
        ready_check = method.endswith("/ModelReady")

        async def handler(message: bytes, context: grpc.aio.ServicerContext):
            return await self.unary(method, message, context, ready_check)

        return handler

    async def unary(self, method: str, message: bytes, context, ready_check: bool = False):
        """Route one unary call, forward it (with retries) and relay the answer."""
        ctx = self.ctx
        t0 = time.perf_counter()
        code = "OK"
        req = response = None
        try:
            req = read_request(ctx, context.invocation_metadata(), message)
            if req is None:
                raise self._no_model("the request")
            if ctx.tracing is not None:
                req.span = ctx.tracing.start_call(method, req.model, req.metadata)
            snapshot = ctx.snapshot()
            try:
                target, balancer = snapshot.match(req.model, req.version_name(), ctx.rnd,
                                                  req.header_of, time.monotonic())
                req.target = target
                response, code = await self.forwarder.unary(
                    method, req, snapshot, target, balancer, context)
            except NoHealthyUpstream:
                if not ready_check:
                    raise
                return b""  # ModelReady of a model no runtime holds ready: {ready: false}
            return response
        except ProxyError as err:
            code = self._fail(context, err)
            return None
        except asyncio.CancelledError:
            code = _cancelled(context)
            raise
        finally:
            self._finish(method, req, code, t0, len(message), len(response or b""))

    async def ModelStreamInfer(self, requests, context):
        """Route by the metadata or the first message; pinned to one runtime for its life."""
        ctx = self.ctx
        t0 = time.perf_counter()
        outcome = StreamOutcome()
        req = None
        try:
            md = context.invocation_metadata()
            req, first = read_request(ctx, md, None), None
            if req is None:
                try:
                    first = await requests.__anext__()
                except StopAsyncIteration:
                    return  # an empty stream without a model: nothing to answer
                req = read_request(ctx, md, first)
                if req is None:
                    raise self._no_model("the stream's first message")
            if ctx.tracing is not None:
                req.span = ctx.tracing.start_call(STREAM, req.model, req.metadata)
            snapshot = ctx.snapshot()
            target, balancer = snapshot.match(
                req.model, req.version_name(), ctx.rnd, req.header_of, time.monotonic())
            req.target = target
            async for response in self.forwarder.stream(req, first, requests, snapshot, target,
                                                        balancer, context, outcome):
                yield response
        except ProxyError as err:
            outcome.code = self._fail(context, err)
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: cancelled mid-write
            outcome.code = _cancelled(context)
            raise
        finally:
            self._finish(STREAM, req, outcome.code, t0, outcome.bytes_in, outcome.bytes_out)

    def _finish(self, method: str, req: Request | None, code: str, t0: float,
                bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Count the call, end its span, log it: once per call, when it ends."""
        ctx = self.ctx
        model = req.model if req is not None else ""
        runtime = req.endpoint.name if req is not None and req.endpoint is not None else ""
        known = model if model and ctx.snapshot().is_known(model) else ""
        ctx.metrics.record_request(known, "grpc", code, runtime, time.perf_counter() - t0,
                                   bytes_in, bytes_out)
        if req is not None and req.span is not None:
            ctx.tracing.end(req.span, code, runtime)
        if ctx.access_log is not None:
            ctx.access_log.record(CallLog(method, req, code, t0, bytes_in, bytes_out), "grpc")

    def _fail(self, context, err: ProxyError) -> str:
        code, message, trailers = render_grpc(err)
        # The HTTP-equivalent status, so the label means the same for both listeners.
        self.ctx.metrics.record_local_error(err.status, type(err).__name__)
        if trailers:
            context.set_trailing_metadata(trailers)
        context.set_code(code)
        context.set_details(message)
        return code.name

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
        self.ctx.metrics.record_request("", "grpc", self._fail(context, err), "", 0.0)
        return None

    def _local(self, response: bytes) -> bytes:
        self.ctx.metrics.record_request("", "grpc", "OK", "", 0.0)
        return response


def bind_server(ctx: GrpcContext, host: str, port: int, max_message_bytes: int,
                reuse_port: bool = False) -> grpc.aio.Server:
    """A server listening on host:port (grpc core listens when the port is added, and the calls
    queue until `start`). Without `reuse_port` (worker processes sharing the port) a busy port
    fails here."""
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    server.add_generic_rpc_handlers((InferenceProxy(ctx),))
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(target)
    except RuntimeError as e:  # grpc's way of saying the bind failed
        raise OSError(f"cannot listen for gRPC on {host}:{port}: {e}") from None
    return server
