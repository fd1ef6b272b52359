"""The devtools runtime's gRPC front end: KServe v2 `GRPCInferenceService` over `DevRuntime`.

Tensors arrive in the typed `contents` fields or, for FP32/FP64/INT32/INT64, as little-endian
`raw_input_contents`; a request sent raw is answered raw, as Triton does. Errors become status
codes in `_rescued` alone, except on ModelStreamInfer where they go in `error_message` and the
stream carries on.
"""

from __future__ import annotations

import functools
import struct
import time

import grpc

from meshproxy import __version__
from meshproxy._proto.inference import grpc_service_pb2 as pb
from meshproxy._proto.inference import grpc_service_pb2_grpc as pb_grpc
from meshproxy.devtools.models import (PLATFORM, READY, BadInput, DevError, InferRequest,
                                       InferResponse, Tensor)

_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_RAW_FORMATS = {"FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q"}


def _decode_raw(name: str, datatype: str, raw: bytes) -> list:
    fmt = _RAW_FORMATS.get(datatype)
    if fmt is None:
        raise BadInput(f"input '{name}': raw contents are not supported for {datatype}")
    size = struct.calcsize(fmt)
    if len(raw) % size:
        raise BadInput(f"input '{name}': {len(raw)} raw bytes is not a whole number of {datatype}")
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def _input(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    if raw is not None:
        return Tensor(t.name, t.datatype, list(t.shape), _decode_raw(t.name, t.datatype, raw))
    field = _CONTENTS.get(t.datatype)
    if field is None:
        raise BadInput(f"input '{t.name}': unknown datatype '{t.datatype}'")
    return Tensor(t.name, t.datatype, list(t.shape), list(getattr(t.contents, field)))


def request_from_pb(msg: pb.ModelInferRequest) -> tuple[InferRequest, bool]:
    """The neutral request, and whether its tensors came as raw bytes."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise BadInput(f"{len(raw)} raw_input_contents for {len(msg.inputs)} inputs")
    inputs = [_input(t, raw[i] if raw else None) for i, t in enumerate(msg.inputs)]
    params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in msg.parameters.items()
              if v.WhichOneof("parameter_choice")}
    return InferRequest(msg.model_name, msg.model_version, msg.id, inputs,
                        [o.name for o in msg.outputs], params), bool(raw)


def _set_parameter(param: pb.InferParameter, value) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def response_to_pb(r: InferResponse, raw: bool) -> pb.ModelInferResponse:
    out = pb.ModelInferResponse(model_name=r.model, model_version=r.version, id=r.id)
    for key, value in r.parameters.items():
        _set_parameter(out.parameters[key], value)
    raw = raw and all(t.datatype in _RAW_FORMATS for t in r.outputs)
    for t in r.outputs:
        tensor = out.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if raw:
            out.raw_output_contents.append(
                struct.pack(f"<{len(t.data)}{_RAW_FORMATS[t.datatype]}", *t.data))
        elif t.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(
                v.encode() if isinstance(v, str) else v for v in t.data)
        else:
            getattr(tensor.contents, _CONTENTS[t.datatype]).extend(t.data)
    return out


def _rescued(method):
    """Send `x-served-by`, run a unary method, and turn a DevError into its status code."""

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request, context: grpc.aio.ServicerContext):
        await context.send_initial_metadata(self.metadata)
        try:
            return await method(self, request, context)
        except DevError as e:
            await context.abort(grpc.StatusCode[e.grpc_code], e.message)

    return wrapper


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime
        self.metadata = (("x-served-by", runtime.name),)

    async def _infer(self, msg: pb.ModelInferRequest) -> pb.ModelInferResponse:
        request, raw = request_from_pb(msg)
        return response_to_pb(await self.runtime.infer(request), raw)

    @_rescued
    async def ModelInfer(self, request, context):
        return await self._infer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        await context.send_initial_metadata(self.metadata)
        async for msg in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=await self._infer(msg))
            except DevError as e:
                # The id lets a client match the error to its request; the stream goes on.
                failed = pb.ModelInferResponse(model_name=msg.model_name, id=msg.id)
                yield pb.ModelStreamInferResponse(error_message=e.message, infer_response=failed)

    @_rescued
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_rescued
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    @_rescued
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=self.runtime.name, version=__version__,
                                         extensions=["model_repository"])

    @_rescued
    async def ModelReady(self, request, context):
        entry = self.runtime.repository.entry(request.name, time.monotonic())
        return pb.ModelReadyResponse(ready=entry is not None and entry.state == READY)

    @_rescued
    async def ModelMetadata(self, request, context):
        entry = self.runtime.repository.use(request.name, request.version, time.monotonic())
        specs = {io: [pb.ModelMetadataResponse.TensorMetadata(**vars(s))
                      for s in getattr(entry.model, io)] for io in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(name=request.name, versions=["1"], platform=PLATFORM,
                                        **specs)

    @_rescued
    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        entries = self.runtime.repository.index(time.monotonic(), request.ready)
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version="1", state=e.state, reason=e.reason) for e in entries])

    @_rescued
    async def RepositoryModelLoad(self, request, context):
        if not request.model_name:
            raise BadInput("model_name is required")
        await self.runtime.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @_rescued
    async def RepositoryModelUnload(self, request, context):
        self.runtime.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def start_server(runtime, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC server; returns it and the port it got."""
    # so_reuseport off: a second runtime asking for a busy port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(runtime), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc's way of saying the bind failed; callers expect OSError
        raise OSError(f"cannot listen for gRPC on {host}:{port}: {e}") from None
    await server.start()
    return server, bound
