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
    __slots__ = ("name", "http_address", "grpc_address", "dialect", "models", "capacity", "weight", "labels", "outlier_detection", "health_check", "circuit_breakers")
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
    OUTLIER_DETECTION_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_FIELD_NUMBER: _ClassVar[int]
    CIRCUIT_BREAKERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    http_address: str
    grpc_address: str
    dialect: Runtime.Dialect
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    capacity: int
    weight: _wrappers_pb2.UInt32Value
    labels: _containers.ScalarMap[str, str]
    outlier_detection: OutlierDetection
    health_check: HealthCheck
    circuit_breakers: CircuitBreakers
    def __init__(self, name: _Optional[str] = ..., http_address: _Optional[str] = ..., grpc_address: _Optional[str] = ..., dialect: _Optional[_Union[Runtime.Dialect, str]] = ..., models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., capacity: _Optional[int] = ..., weight: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., outlier_detection: _Optional[_Union[OutlierDetection, _Mapping]] = ..., health_check: _Optional[_Union[HealthCheck, _Mapping]] = ..., circuit_breakers: _Optional[_Union[CircuitBreakers, _Mapping]] = ...) -> None: ...

class OutlierDetection(_message.Message):
    __slots__ = ("consecutive_5xx", "consecutive_gateway_failure", "base_ejection_time", "max_ejection_time", "max_ejection_percent")
    CONSECUTIVE_5XX_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_GATEWAY_FAILURE_FIELD_NUMBER: _ClassVar[int]
    BASE_EJECTION_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_EJECTION_TIME_FIELD_NUMBER: _ClassVar[int]
    MAX_EJECTION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    consecutive_5xx: _wrappers_pb2.UInt32Value
    consecutive_gateway_failure: _wrappers_pb2.UInt32Value
    base_ejection_time: _duration_pb2.Duration
    max_ejection_time: _duration_pb2.Duration
    max_ejection_percent: _wrappers_pb2.UInt32Value
    def __init__(self, consecutive_5xx: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., consecutive_gateway_failure: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., base_ejection_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ejection_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_ejection_percent: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("interval", "timeout", "unhealthy_threshold", "healthy_threshold")
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    timeout: _duration_pb2.Duration
    unhealthy_threshold: _wrappers_pb2.UInt32Value
    healthy_threshold: _wrappers_pb2.UInt32Value
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., unhealthy_threshold: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., healthy_threshold: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...

class CircuitBreakers(_message.Message):
    __slots__ = ("max_connections", "max_pending_requests", "max_requests")
    MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    max_connections: _wrappers_pb2.UInt32Value
    max_pending_requests: _wrappers_pb2.UInt32Value
    max_requests: _wrappers_pb2.UInt32Value
    def __init__(self, max_connections: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., max_pending_requests: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., max_requests: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...

class WeightedTarget(_message.Message):
    __slots__ = ("model", "version", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    weight: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class HeaderMatcher(_message.Message):
    __slots__ = ("name", "exact", "prefix", "regex", "present", "invert")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    name: str
    exact: str
    prefix: str
    regex: str
    present: bool
    invert: bool
    def __init__(self, name: _Optional[str] = ..., exact: _Optional[str] = ..., prefix: _Optional[str] = ..., regex: _Optional[str] = ..., present: _Optional[bool] = ..., invert: _Optional[bool] = ...) -> None: ...

class HeaderRoute(_message.Message):
    __slots__ = ("headers", "targets")
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    headers: _containers.RepeatedCompositeFieldContainer[HeaderMatcher]
    targets: _containers.RepeatedCompositeFieldContainer[WeightedTarget]
    def __init__(self, headers: _Optional[_Iterable[_Union[HeaderMatcher, _Mapping]]] = ..., targets: _Optional[_Iterable[_Union[WeightedTarget, _Mapping]]] = ...) -> None: ...

class Mirror(_message.Message):
    __slots__ = ("model", "version", "fraction", "max_concurrent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    fraction: _wrappers_pb2.DoubleValue
    max_concurrent: _wrappers_pb2.UInt32Value
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., fraction: _Optional[_Union[_wrappers_pb2.DoubleValue, _Mapping]] = ..., max_concurrent: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("requests_per_second", "burst")
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: float
    burst: int
    def __init__(self, requests_per_second: _Optional[float] = ..., burst: _Optional[int] = ...) -> None: ...

class ModelRoute(_message.Message):
    __slots__ = ("model", "targets", "timeout", "balancer", "retry_policy", "matches", "split_hash_header", "mirror", "rate_limit", "hash_header", "choice_count")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    BALANCER_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    MIRROR_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    HASH_HEADER_FIELD_NUMBER: _ClassVar[int]
    CHOICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    model: str
    targets: _containers.RepeatedCompositeFieldContainer[WeightedTarget]
    timeout: _duration_pb2.Duration
    balancer: str
    retry_policy: RetryPolicy
    matches: _containers.RepeatedCompositeFieldContainer[HeaderRoute]
    split_hash_header: str
    mirror: Mirror
    rate_limit: RateLimit
    hash_header: str
    choice_count: _wrappers_pb2.UInt32Value
    def __init__(self, model: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[WeightedTarget, _Mapping]]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., balancer: _Optional[str] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., matches: _Optional[_Iterable[_Union[HeaderRoute, _Mapping]]] = ..., split_hash_header: _Optional[str] = ..., mirror: _Optional[_Union[Mirror, _Mapping]] = ..., rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ..., hash_header: _Optional[str] = ..., choice_count: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("retry_on", "num_retries", "per_try_timeout", "retriable_status_codes", "backoff", "budget", "max_buffered_body_bytes")
    class Backoff(_message.Message):
        __slots__ = ("base_interval", "max_interval")
        BASE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
        MAX_INTERVAL_FIELD_NUMBER: _ClassVar[int]
        base_interval: _duration_pb2.Duration
        max_interval: _duration_pb2.Duration
        def __init__(self, base_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
    class Budget(_message.Message):
        __slots__ = ("budget_percent", "min_retry_concurrency")
        BUDGET_PERCENT_FIELD_NUMBER: _ClassVar[int]
        MIN_RETRY_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
        budget_percent: _wrappers_pb2.DoubleValue
        min_retry_concurrency: _wrappers_pb2.UInt32Value
        def __init__(self, budget_percent: _Optional[_Union[_wrappers_pb2.DoubleValue, _Mapping]] = ..., min_retry_concurrency: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ...) -> None: ...
    RETRY_ON_FIELD_NUMBER: _ClassVar[int]
    NUM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PER_TRY_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETRIABLE_STATUS_CODES_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_BUFFERED_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    retry_on: str
    num_retries: _wrappers_pb2.UInt32Value
    per_try_timeout: _duration_pb2.Duration
    retriable_status_codes: _containers.RepeatedScalarFieldContainer[int]
    backoff: RetryPolicy.Backoff
    budget: RetryPolicy.Budget
    max_buffered_body_bytes: _wrappers_pb2.UInt64Value
    def __init__(self, retry_on: _Optional[str] = ..., num_retries: _Optional[_Union[_wrappers_pb2.UInt32Value, _Mapping]] = ..., per_try_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retriable_status_codes: _Optional[_Iterable[int]] = ..., backoff: _Optional[_Union[RetryPolicy.Backoff, _Mapping]] = ..., budget: _Optional[_Union[RetryPolicy.Budget, _Mapping]] = ..., max_buffered_body_bytes: _Optional[_Union[_wrappers_pb2.UInt64Value, _Mapping]] = ...) -> None: ...
