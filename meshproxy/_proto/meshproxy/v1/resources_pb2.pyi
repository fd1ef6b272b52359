import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import wrappers_pb2 as _wrappers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadedModel(_message.Message):
    __slots__ = ("name", "version", "state")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        READY: _ClassVar[LoadedModel.State]
        LOADING: _ClassVar[LoadedModel.State]
        UNLOADING: _ClassVar[LoadedModel.State]
        UNAVAILABLE: _ClassVar[LoadedModel.State]
    READY: LoadedModel.State
    LOADING: LoadedModel.State
    UNLOADING: LoadedModel.State
    UNAVAILABLE: LoadedModel.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: LoadedModel.State
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[LoadedModel.State, str]] = ...) -> None: ...

class Runtime(_message.Message):
    __slots__ = ("name", "http_address", "grpc_address", "dialect", "models", "capacity", "weight", "labels")
    class Dialect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GENERIC: _ClassVar[Runtime.Dialect]
        TRITON: _ClassVar[Runtime.Dialect]
        MLSERVER: _ClassVar[Runtime.Dialect]
        KSERVE: _ClassVar[Runtime.Dialect]
        TORCHSERVE: _ClassVar[Runtime.Dialect]
    GENERIC: Runtime.Dialect
    TRITON: Runtime.Dialect
    MLSERVER: Runtime.Dialect
    KSERVE: Runtime.Dialect
    TORCHSERVE: Runtime.Dialect
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DIALECT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    http_address: str
    grpc_address: str
    dialect: Runtime.Dialect
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    capacity: int
    weight: _wrappers_pb2.UInt32Value
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., http_address: _Optional[str] = ..., grpc_address: _Optional[str] = ..., dialect: _Optional[_Union[Runtime.Dialect, str]] = ..., models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., capacity: _Optional[int] = ..., weight: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WeightedTarget(_message.Message):
    __slots__ = ("model", "version", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class ModelRoute(_message.Message):
    __slots__ = ("model", "targets", "timeout", "balancer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    BALANCER_FIELD_NUMBER: _ClassVar[int]
    model: str
    targets: _containers.RepeatedCompositeFieldContainer[WeightedTarget]
    timeout: _duration_pb2.Duration
    balancer: str
    def __init__(self, model: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[WeightedTarget, _Mapping]]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., balancer: _Optional[str] = ...) -> None: ...
