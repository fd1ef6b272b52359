"""Toy KServe v2 models and the model repository state of the devtools runtime (sans-IO).

Both front ends (REST in `runtime.py`, gRPC in `grpc_service.py`) convert their wire format to
the neutral `Tensor` / `InferRequest` here and back, so the model logic exists once.

How the repository works: every model ever named has an immutable `Entry`. A load marks it
LOADING until `now + delay`; reads turn LOADING into READY once the clock passes `ready_at`,
so no timer is needed and tests drive time by passing `now`. Held models (READY or LOADING)
are kept in recency order: an infer or a load moves a model to the back, and a load past
`capacity` evicts from the front (least recently used) and marks the victim UNAVAILABLE.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from operator import mul
from typing import Protocol

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
VERSION = "1"
PLATFORM = "meshproxy-devtools"

_INTS = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOATS = {"FP16", "FP32", "FP64"}
# Python types a datatype's elements may have once decoded from JSON or protobuf.
_ELEMENT_TYPES = {**{t: (int,) for t in _INTS}, **{t: (int, float) for t in _FLOATS},
                  "BOOL": (bool,), "BYTES": (str, bytes)}


class DevError(Exception):
    """An error the runtime answers: `status` is its HTTP code, `grpc_code` a StatusCode name."""

    status, grpc_code = 500, "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(DevError):
    status, grpc_code = 400, "INVALID_ARGUMENT"


class ModelNotFound(DevError):
    status, grpc_code = 404, "NOT_FOUND"


class ModelNotReady(DevError):
    status, grpc_code = 503, "UNAVAILABLE"


class LoadAborted(DevError):
    """A load that ended with the model unloaded or evicted before it became READY."""

    status, grpc_code = 409, "ABORTED"


class InjectedFailure(DevError):
    """The failure `fail_rate` asks for; the only 500 the runtime gives."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list  # flat, row-major; BYTES elements are str (REST) or bytes (gRPC)


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # requested output names; empty = all
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    id: str
    parameters: dict
    outputs: list[Tensor]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]


class Model(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, inputs: list[Tensor]) -> list[Tensor]: ...


class Identity:
    """Echoes each input as `output<i>`: same shape, datatype and data. Input names are free."""

    inputs = [TensorSpec("input0", "FP32", [-1])]
    outputs = [TensorSpec("output0", "FP32", [-1])]

    def infer(self, inputs: list[Tensor]) -> list[Tensor]:
        return [Tensor(f"output{i}", t.datatype, t.shape, t.data) for i, t in enumerate(inputs)]


class Sum:
    """One output `sum`, shape [1]: the sum of every element of every input.

    INT64 when all inputs are integer or BOOL (exact), else FP64 via `math.fsum`, which is
    correctly rounded and so independent of element order.
    """

    inputs = [TensorSpec("input0", "FP64", [-1])]
    outputs = [TensorSpec("sum", "FP64", [1])]

    def infer(self, inputs: list[Tensor]) -> list[Tensor]:
        if any(t.datatype == "BYTES" for t in inputs):
            raise BadInput("sum: BYTES inputs cannot be summed")
        values = [v for t in inputs for v in t.data]
        if all(t.datatype in _INTS or t.datatype == "BOOL" for t in inputs):
            return [Tensor("sum", "INT64", [1], [int(sum(values))])]
        return [Tensor("sum", "FP64", [1], [math.fsum(values)])]


def mnist_weight(k: int, i: int) -> float:
    """Weight from pixel i to digit k: a multiple of 1/16 in [-0.5, 0.5]."""
    return ((7 * i + 13 * k) % 17 - 8) / 16


MNIST_BIAS = [(k - 4.5) / 10 for k in range(10)]
_MNIST_W = [[mnist_weight(k, i) for i in range(784)] for k in range(10)]


class Mnist:
    """Fixed-weight linear classifier: logits[k] = bias[k] + sum_i weight(k, i) * x[i].

    weight(k, i) = ((7*i + 13*k) % 17 - 8) / 16 and bias[k] = (k - 4.5) / 10, so an all-zero
    image is labelled 9. Logits are rounded to float32 so REST and gRPC answer the same numbers;
    `label` is the first index of the largest logit.
    """

    inputs = [TensorSpec("input0", "FP32", [1, 784])]
    outputs = [TensorSpec("logits", "FP32", [1, 10]), TensorSpec("label", "INT64", [1])]

    def infer(self, inputs: list[Tensor]) -> list[Tensor]:
        if len(inputs) != 1:
            raise BadInput(f"mnist: expects 1 input, got {len(inputs)}")
        x = inputs[0]
        if x.datatype not in ("FP32", "FP64"):
            raise BadInput(f"mnist: input '{x.name}' must be FP32, got {x.datatype}")
        if len(x.data) != 784 or x.shape not in ([784], [1, 784]):
            raise BadInput(f"mnist: input '{x.name}' must have 784 elements in shape [1, 784] "
                           f"or [784], got {len(x.data)} in shape {x.shape}")
        raw = [b + sum(map(mul, w, x.data)) for w, b in zip(_MNIST_W, MNIST_BIAS)]
        logits = list(struct.unpack("<10f", struct.pack("<10f", *raw)))
        label = logits.index(max(logits))
        return [Tensor("logits", "FP32", [1, 10], logits), Tensor("label", "INT64", [1], [label])]


# Any other name is an alias of identity, so tests can hold "resnet", "bert", ...
MODELS: dict[str, type] = {"identity": Identity, "sum": Sum, "mnist": Mnist}


def make_model(name: str) -> Model:
    return MODELS.get(name, Identity)()


def check_tensor(t: Tensor) -> None:
    """Raise BadInput unless the datatype is known and shape, element count and types agree."""
    allowed = _ELEMENT_TYPES.get(t.datatype)
    if allowed is None:
        raise BadInput(f"input '{t.name}': unknown datatype '{t.datatype}'")
    if any(type(d) is not int or d < 0 for d in t.shape):
        raise BadInput(f"input '{t.name}': shape {t.shape} must be non-negative integers")
    if len(t.data) != math.prod(t.shape):
        raise BadInput(f"input '{t.name}': shape {t.shape} holds {math.prod(t.shape)} "
                       f"elements but data has {len(t.data)}")
    if not all(type(v) in allowed for v in t.data):
        raise BadInput(f"input '{t.name}': data does not match datatype {t.datatype}")


def run_infer(model: Model, request: InferRequest) -> list[Tensor]:
    """Validate the inputs, run the model and keep the requested outputs in requested order."""
    if not request.inputs:
        raise BadInput("request has no inputs")
    for t in request.inputs:
        check_tensor(t)
    outputs = model.infer(request.inputs)
    if not request.outputs:
        return outputs
    by_name = {t.name: t for t in outputs}
    missing = [n for n in request.outputs if n not in by_name]
    if missing:
        raise BadInput(f"model '{request.model}' has no output named {missing[0]!r}")
    return [by_name[n] for n in request.outputs]


@dataclass(frozen=True)
class Entry:
    name: str
    model: Model
    state: str
    ready_at: float = 0.0
    reason: str = ""


class Repository:
    """Which models a runtime holds and in what state; see the module docstring."""

    def __init__(self, runtime: str, capacity: int = 0):
        self.runtime, self.capacity = runtime, capacity
        self._entries: dict[str, Entry] = {}
        self._held: OrderedDict[str, None] = OrderedDict()  # front = least recently used

    def entry(self, name: str, now: float) -> Entry | None:
        e = self._entries.get(name)
        if e is not None and e.state == LOADING and now >= e.ready_at:
            e = self._entries[name] = replace(e, state=READY)
        return e

    def load(self, name: str, now: float, delay: float = 0.0) -> Entry:
        """Start loading `name` (READY at once when delay is 0); a held model is only touched."""
        e = self.entry(name, now)
        if e is not None and e.state != UNAVAILABLE:
            self._held.move_to_end(name)
            return e
        while self.capacity and len(self._held) >= self.capacity:
            victim, _ = self._held.popitem(last=False)
            reason = f"evicted to make room for '{name}' (capacity {self.capacity})"
            self._entries[victim] = replace(self._entries[victim], state=UNAVAILABLE, reason=reason)
        e = Entry(name, make_model(name), LOADING if delay > 0 else READY, now + delay)
        self._entries[name] = e
        self._held[name] = None
        return e

    def unload(self, name: str, now: float) -> None:
        e = self.entry(name, now)
        if e is None or e.state == UNAVAILABLE:
            raise ModelNotFound(f"model '{name}' is not loaded on runtime {self.runtime}")
        self._entries[name] = replace(e, state=UNAVAILABLE, reason="unloaded")
        del self._held[name]

    def use(self, name: str, version: str, now: float) -> Entry:
        """The READY entry for an infer or metadata call, marked most recently used."""
        e = self.entry(name, now)
        if e is None or e.state == UNAVAILABLE:
            raise ModelNotFound(f"model '{name}' is not loaded on runtime {self.runtime}")
        if e.state == LOADING:
            raise ModelNotReady(f"model '{name}' is still loading on runtime {self.runtime}")
        if version not in ("", VERSION):
            raise ModelNotFound(
                f"model '{name}' has no version '{version}' on runtime {self.runtime}")
        self._held.move_to_end(name)
        return e

    def index(self, now: float, ready_only: bool = False) -> list[Entry]:
        entries = [self.entry(n, now) for n in sorted(self._entries)]
        return [e for e in entries if e.state == READY or not ready_only]

    def ready(self, now: float) -> list[str]:
        return [e.name for e in self.index(now, ready_only=True)]
