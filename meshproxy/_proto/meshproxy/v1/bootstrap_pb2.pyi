import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import wrappers_pb2 as _wrappers_pb2
from meshproxy._proto.meshproxy.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Node(_message.Message):
    __slots__ = ("id", "cluster")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    id: str
    cluster: str
    def __init__(self, id: _Optional[str] = ..., cluster: _Optional[str] = ...) -> None: ...

class Listeners(_message.Message):
    __slots__ = ("http_address", "grpc_address")
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    http_address: str
    grpc_address: str
    def __init__(self, http_address: _Optional[str] = ..., grpc_address: _Optional[str] = ...) -> None: ...

class Admin(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class HttpOptions(_message.Message):
    __slots__ = ("model_headers", "max_request_headers_bytes", "max_request_body_bytes", "header_read_timeout", "idle_timeout", "request_timeout", "upstream_header", "connect_timeout", "max_idle_connections", "upstream_idle_timeout")
    MODEL_HEADERS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_HEADERS_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEADER_READ_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HEADER_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_IDLE_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    model_headers: _containers.RepeatedScalarFieldContainer[str]
    max_request_headers_bytes: _wrappers_pb2.UInt32Value
    max_request_body_bytes: _wrappers_pb2.UInt64Value
    header_read_timeout: _duration_pb2.Duration
    idle_timeout: _duration_pb2.Duration
    request_timeout: _duration_pb2.Duration
    upstream_header: _wrappers_pb2.BoolValue
    connect_timeout: _duration_pb2.Duration
    max_idle_connections: _wrappers_pb2.UInt32Value
    upstream_idle_timeout: _duration_pb2.Duration
    def __init__(self, model_headers: _Optional[_Iterable[str]] = ..., max_request_headers_bytes: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., max_request_body_bytes: _Optional[_Union[_wrappers_pb2.UInt64Value, _Mapping]] = ..., header_read_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., upstream_header: _Optional[_Union[_wrappers_pb2.BoolValue, _Mapping]] = ..., connect_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_idle_connections: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., upstream_idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StaticResources(_message.Message):
    __slots__ = ("runtimes", "routes")
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    runtimes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Runtime]
    routes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.ModelRoute]
    def __init__(self, runtimes: _Optional[_Iterable[_Union[_resources_pb2.Runtime, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[_resources_pb2.ModelRoute, _Mapping]]] = ...) -> None: ...

class DynamicResources(_message.Message):
    __slots__ = ("ads_addresses", "protocol", "initial_backoff", "max_backoff", "snapshot_path", "sidecar", "keepalive", "initial_fetch_timeout")
    class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DELTA: _ClassVar[DynamicResources.Protocol]
        STATE_OF_THE_WORLD: _ClassVar[DynamicResources.Protocol]
    DELTA: DynamicResources.Protocol
    STATE_OF_THE_WORLD: DynamicResources.Protocol
    ADS_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_PATH_FIELD_NUMBER: _ClassVar[int]
    SIDECAR_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FETCH_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ads_addresses: _containers.RepeatedScalarFieldContainer[str]
    protocol: DynamicResources.Protocol
    initial_backoff: _duration_pb2.Duration
    max_backoff: _duration_pb2.Duration
    snapshot_path: str
    sidecar: Sidecar
    keepalive: Keepalive
    initial_fetch_timeout: _duration_pb2.Duration
    def __init__(self, ads_addresses: _Optional[_Iterable[str]] = ..., protocol: _Optional[_Union[DynamicResources.Protocol, str]] = ..., initial_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_backoff: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., snapshot_path: _Optional[str] = ..., sidecar: _Optional[_Union[Sidecar, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., initial_fetch_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("interval", "timeout")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    timeout: _duration_pb2.Duration
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Sidecar(_message.Message):
    __slots__ = ("runtime", "poll_interval")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    runtime: _resources_pb2.Runtime
    poll_interval: _duration_pb2.Duration
    def __init__(self, runtime: _Optional[_Union[_resources_pb2.Runtime, _Mapping]] = ..., poll_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Bootstrap(_message.Message):
    __slots__ = ("node", "listeners", "admin", "http", "static_resources", "dynamic_resources", "drain_timeout", "grpc", "telemetry")
    NODE_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    STATIC_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    DRAIN_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    node: Node
    listeners: Listeners
    admin: Admin
    http: HttpOptions
    static_resources: StaticResources
    dynamic_resources: DynamicResources
    drain_timeout: _duration_pb2.Duration
    grpc: GrpcOptions
    telemetry: Telemetry
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., listeners: _Optional[_Union[Listeners, _Mapping]] = ..., admin: _Optional[_Union[Admin, _Mapping]] = ..., http: _Optional[_Union[HttpOptions, _Mapping]] = ..., static_resources: _Optional[_Union[StaticResources, _Mapping]] = ..., dynamic_resources: _Optional[_Union[DynamicResources, _Mapping]] = ..., drain_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., grpc: _Optional[_Union[GrpcOptions, _Mapping]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("tracing", "access_log")
    TRACING_FIELD_NUMBER: _ClassVar[int]
    ACCESS_LOG_FIELD_NUMBER: _ClassVar[int]
    tracing: Tracing
    access_log: AccessLog
    def __init__(self, tracing: _Optional[_Union[Tracing, _Mapping]] = ..., access_log: _Optional[_Union[AccessLog, _Mapping]] = ...) -> None: ...

class Tracing(_message.Message):
    __slots__ = ("exporter", "endpoint", "sampling_ratio", "service_name")
    class Exporter(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[Tracing.Exporter]
        OTLP_GRPC: _ClassVar[Tracing.Exporter]
        OTLP_HTTP: _ClassVar[Tracing.Exporter]
        CONSOLE: _ClassVar[Tracing.Exporter]
    NONE: Tracing.Exporter
    OTLP_GRPC: Tracing.Exporter
    OTLP_HTTP: Tracing.Exporter
    CONSOLE: Tracing.Exporter
    EXPORTER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_RATIO_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    exporter: Tracing.Exporter
    endpoint: str
    sampling_ratio: _wrappers_pb2.DoubleValue
    service_name: str
    def __init__(self, exporter: _Optional[_Union[Tracing.Exporter, str]] = ..., endpoint: _Optional[str] = ..., sampling_ratio: _Optional[_Union[_wrappers_pb2.DoubleValue, _Mapping]] = ..., service_name: _Optional[str] = ...) -> None: ...

class AccessLog(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class GrpcOptions(_message.Message):
    __slots__ = ("max_message_bytes",)
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: _wrappers_pb2.UInt32Value
    def __init__(self, max_message_bytes: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...
