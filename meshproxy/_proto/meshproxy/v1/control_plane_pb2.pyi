import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from meshproxy._proto.meshproxy.v1 import bootstrap_pb2 as _bootstrap_pb2
from meshproxy._proto.meshproxy.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ControlPlaneConfig(_message.Message):
    __slots__ = ("grpc_address", "admin_address", "resources", "discovery", "registration", "watch_interval", "identifier", "keepalive")
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    WATCH_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    grpc_address: str
    admin_address: str
    resources: _bootstrap_pb2.StaticResources
    discovery: Discovery
    registration: Registration
    watch_interval: _duration_pb2.Duration
    identifier: str
    keepalive: _bootstrap_pb2.Keepalive
    def __init__(self, grpc_address: _Optional[str] = ..., admin_address: _Optional[str] = ..., resources: _Optional[_Union[_bootstrap_pb2.StaticResources, _Mapping]] = ..., discovery: _Optional[_Union[Discovery, _Mapping]] = ..., registration: _Optional[_Union[Registration, _Mapping]] = ..., watch_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., identifier: _Optional[str] = ..., keepalive: _Optional[_Union[_bootstrap_pb2.Keepalive, _Mapping]] = ...) -> None: ...

class Discovery(_message.Message):
    __slots__ = ("runtimes", "poll_interval", "grace", "request_timeout")
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    POLL_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    runtimes: _containers.RepeatedCompositeFieldContainer[_resources_pb2.Runtime]
    poll_interval: _duration_pb2.Duration
    grace: _duration_pb2.Duration
    request_timeout: _duration_pb2.Duration
    def __init__(self, runtimes: _Optional[_Iterable[_Union[_resources_pb2.Runtime, _Mapping]]] = ..., poll_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Registration(_message.Message):
    __slots__ = ("heartbeat_interval", "grace", "state_path")
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    STATE_PATH_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval: _duration_pb2.Duration
    grace: _duration_pb2.Duration
    state_path: str
    def __init__(self, heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., state_path: _Optional[str] = ...) -> None: ...
