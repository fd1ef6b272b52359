"""YAML -> Bootstrap proto -> a frozen, validated ProxyConfig; ConfigError names the field path."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re

import yaml
from google.protobuf import json_format

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, resources_pb2
from meshproxy.cluster.balancer import BALANCERS
from meshproxy.errors import BadRequest
from meshproxy.model_name import validate as validate_model_name
from meshproxy.routing.split import HeaderCondition
from meshproxy.upstream.retry import from_proto as retry_from_proto

EXIT_CONFIG = 64  # EX_USAGE, as linkerd2-proxy exits on bad config
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,252}[A-Za-z0-9_])?")  # or an IPv4 address
# A runtime's name goes into a response header (x-meshproxy-upstream), metric labels and the
# admin pages: the model name's characters only.
_RUNTIME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")
_DIALECTS = frozenset(resources_pb2.Runtime.Dialect.values())


class ConfigError(Exception):
    """A config problem; the message starts with the field path."""


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class HttpSettings:
    model_headers: tuple[bytes, ...]
    max_request_headers_bytes: int
    max_request_body_bytes: int
    header_read_timeout: float
    idle_timeout: float
    request_timeout: float
    connect_timeout: float
    upstream_header: bool
    max_idle_connections: int
    upstream_idle_timeout: float


@dataclasses.dataclass(frozen=True)
class GrpcSettings:
    max_message_bytes: int = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TelemetrySettings:
    tracing_exporter: str = "NONE"     # NONE, OTLP_GRPC, OTLP_HTTP, CONSOLE
    tracing_endpoint: str = ""
    sampling_ratio: float = 1.0
    service_name: str = "meshproxy"
    access_log: str = ""               # "": off, "-": stdout, else a file path


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    node_id: str
    http_address: Address
    admin_address: Address
    http: HttpSettings
    drain_timeout: float
    runtimes: tuple[resources_pb2.Runtime, ...]
    routes: tuple[resources_pb2.ModelRoute, ...]
    source: bootstrap_pb2.Bootstrap
    dynamic: DynamicSettings | None = None  # None: static resources only
    grpc_address: Address | None = None  # None: no gRPC listener
    grpc: GrpcSettings = GrpcSettings()
    telemetry: TelemetrySettings = TelemetrySettings()


@dataclasses.dataclass(frozen=True)
class DynamicSettings:
    """dynamic_resources: the ADS stream's control planes and behaviour."""
    ads_addresses: tuple[Address, ...]
    delta: bool
    initial_backoff: float
    max_backoff: float
    snapshot_path: str
    sidecar: resources_pb2.Runtime | None  # sidecar mode: the local runtime to report
    sidecar_poll_interval: float
    keepalive_interval: float  # pings on the control-plane connection
    keepalive_timeout: float
    initial_fetch_timeout: float  # ready without a first response after this; 0: never


def read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """yaml.safe_load's rules (with libyaml's parser when it is there), but a key given twice
    in one mapping is an error: the last would win, silently dropping what the first said."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys a merge brings in may be overridden: that is what it is for
            key = self.construct_object(key_node, deep=True)
            try:
                again = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str):
    """The YAML document in `text` (yaml.YAMLError, RecursionError when nested too deeply)."""
    return yaml.load(text, Loader=_StrictLoader)


def parse_yaml(text: str, msg, source: str):
    """YAML text into the proto message `msg` (json_format: an unknown field is an error
    naming its path); ConfigError messages start with `source`."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        json_format.ParseDict(data, msg)
    except json_format.ParseError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    return msg


def load_file(path: str) -> ProxyConfig:
    """Read, parse and validate a proxy config file."""
    return load_text(read_file(path), source=path)


def load_text(text: str, source: str = "<config>") -> ProxyConfig:
    return parse_config(text, bootstrap_pb2.Bootstrap(), _build, source)


def parse_config(text: str, msg, build, source: str):
    """`build(msg)` of the YAML `text` parsed into `msg`; every ConfigError starts with `source`."""
    parsed = parse_yaml(text, msg, source)
    try:
        return build(parsed)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _build(b: bootstrap_pb2.Bootstrap) -> ProxyConfig:
    validate_resources(b.static_resources.runtimes, b.static_resources.routes, "static_resources")
    config = ProxyConfig(
        node_id=b.node.id or "meshproxy",
        http_address=parse_address(b.listeners.http_address or "0.0.0.0:8008", "listeners.http_address"),
        admin_address=parse_address(b.admin.address or "127.0.0.1:9901", "admin.address"),
        http=_http_settings(b.http),
        drain_timeout=_seconds(b, "drain_timeout", 10.0),
        runtimes=tuple(b.static_resources.runtimes),
        routes=tuple(b.static_resources.routes),
        source=b,
        dynamic=_dynamic(b),
        grpc_address=(None if b.listeners.grpc_address == "disabled" else parse_address(
            b.listeners.grpc_address or "0.0.0.0:8033", "listeners.grpc_address")),
        grpc=_grpc_settings(b.grpc),
        telemetry=_telemetry(b.telemetry),
    )
    _validate_listeners(config)
    return config


def _validate_listeners(c: ProxyConfig) -> None:
    """No two listeners on one host:port: the second bind would fail ("cannot listen", exit 1),
    or, with --workers' SO_REUSEPORT, REST and gRPC would share the port. Port 0 is a new free
    port for each listener, never a clash."""
    taken: list[tuple[Address, str]] = []
    for field, address in (("listeners.http_address", c.http_address),
                           ("listeners.grpc_address", c.grpc_address),
                           ("admin.address", c.admin_address)):
        if address is None or address.port == 0:
            continue
        for other, other_field in taken:
            if _overlap(address, other):
                raise ConfigError(f"{field}: {address} is also {other_field}"
                                  + ("" if address == other else f" ({other})"))
        taken.append((address, field))


def _overlap(a: Address, b: Address) -> bool:
    """Whether two listener addresses may take the same connections: one port, and the same
    host, a wildcard (0.0.0.0, ::) or a name (it may resolve to the other's address)."""
    if a.port != b.port:
        return False
    ips = _ip(a.host), _ip(b.host)
    return a.host == b.host or None in ips or any(ip.is_unspecified for ip in ips)


def _telemetry(t: bootstrap_pb2.Telemetry) -> TelemetrySettings:
    tr = t.tracing
    ratio = tr.sampling_ratio.value if tr.HasField("sampling_ratio") else 1.0
    if not 0 <= ratio <= 1:
        raise ConfigError("telemetry.tracing.sampling_ratio: must be between 0 and 1")
    exporter = bootstrap_pb2.Tracing.Exporter.Name(tr.exporter)
    if tr.endpoint and exporter == "OTLP_GRPC":
        parse_address(tr.endpoint.removeprefix("http://"), "telemetry.tracing.endpoint")
    return TelemetrySettings(exporter, tr.endpoint, ratio, tr.service_name or "meshproxy",
                             _access_log_path(t.access_log.path))


def _access_log_path(path: str) -> str:
    """"" (off), "-" (stdout; "stdout" too) or a file the proxy can append to, which it opens
    (relative to the working directory) only once it starts: a missing or read-only directory
    is a config error here, before any port is bound."""
    if path in ("", "-", "stdout"):
        return "-" if path == "stdout" else path
    where, directory = "telemetry.access_log.path", os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise ConfigError(f"{where}: {path!r} is a directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{where}: {directory!r} is not an existing directory")
    if not os.access(path if os.path.exists(path) else directory, os.W_OK):
        raise ConfigError(f"{where}: {path!r} is not writable")
    return path


def _grpc_settings(g: bootstrap_pb2.GrpcOptions) -> GrpcSettings:
    size = g.max_message_bytes.value if g.HasField("max_message_bytes") else 64 * 1024 * 1024
    if not 1024 <= size <= 2**31 - 1:
        raise ConfigError("grpc.max_message_bytes: must be between 1024 and 2147483647")
    return GrpcSettings(max_message_bytes=size)


def _http_settings(h: bootstrap_pb2.HttpOptions) -> HttpSettings:
    headers = []
    for i, name in enumerate(h.model_headers or ["model"]):
        if not _HEADER_NAME.fullmatch(name.lower()):
            raise ConfigError(f"http.model_headers[{i}]: {name!r} is not a valid header name")
        headers.append(name.lower().encode())
    max_head = h.max_request_headers_bytes.value if h.HasField("max_request_headers_bytes") else 60 * 1024
    if not 1024 <= max_head <= 1024 * 1024:
        raise ConfigError("http.max_request_headers_bytes: must be between 1024 and 1048576")
    return HttpSettings(
        model_headers=tuple(headers),
        max_request_headers_bytes=max_head,
        max_request_body_bytes=(h.max_request_body_bytes.value
                                if h.HasField("max_request_body_bytes") else 64 * 1024 * 1024),
        header_read_timeout=_seconds(h, "header_read_timeout", 10.0, "http."),
        idle_timeout=_seconds(h, "idle_timeout", 300.0, "http."),
        request_timeout=_seconds(h, "request_timeout", 60.0, "http."),
        connect_timeout=_seconds(h, "connect_timeout", 5.0, "http."),
        upstream_header=h.upstream_header.value if h.HasField("upstream_header") else True,
        max_idle_connections=(h.max_idle_connections.value
                              if h.HasField("max_idle_connections") else 64),
        upstream_idle_timeout=_seconds(h, "upstream_idle_timeout", 4.0, "http."),
    )


def _seconds(msg, field: str, default: float, prefix: str = "", zero: bool = False) -> float:
    """A Duration field in seconds; `zero`: 0 is allowed (it means "off" or "forever")."""
    if not msg.HasField(field):
        return default
    value = getattr(msg, field).ToNanoseconds() / 1e9
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{prefix}{field}: must be {'non-negative' if zero else 'positive'}")
    return value


def _dynamic(b: bootstrap_pb2.Bootstrap) -> DynamicSettings | None:
    if not b.HasField("dynamic_resources"):
        return None
    d, where = b.dynamic_resources, "dynamic_resources."
    if not d.ads_addresses:
        raise ConfigError(f"{where}ads_addresses: at least one control-plane host:port is required")
    addresses = tuple(parse_address(a, f"{where}ads_addresses[{i}]")
                      for i, a in enumerate(d.ads_addresses))
    initial = _seconds(d, "initial_backoff", 0.5, where)
    maximum = _seconds(d, "max_backoff", 30.0, where)
    if maximum < initial:
        raise ConfigError(f"{where}max_backoff: must be at least initial_backoff")
    sidecar = None
    if d.HasField("sidecar"):
        sidecar = d.sidecar.runtime
        if sidecar.models:
            raise ConfigError(f"{where}sidecar.runtime.models: polled from the runtime, not listed")
        if any(rt.name == sidecar.name for rt in b.static_resources.runtimes):
            raise ConfigError(f"{where}sidecar.runtime.name: {sidecar.name!r} is also a static "
                              "runtime (the control plane sends it back as a dynamic one)")
        try:
            validate_resources([sidecar], [], f"{where}sidecar")
        except ConfigError as e:
            raise ConfigError(str(e).replace(".runtimes[0]", ".runtime")) from None
    interval = _seconds(d.keepalive, "interval", 10.0, f"{where}keepalive.")
    if interval < 1.0:  # the control plane counts faster pings as abuse and closes the stream
        raise ConfigError(f"{where}keepalive.interval: must be at least 1s")
    return DynamicSettings(addresses, d.protocol == bootstrap_pb2.DynamicResources.DELTA, initial,
                           maximum, d.snapshot_path, sidecar,
                           _seconds(d.sidecar, "poll_interval", 2.0, f"{where}sidecar."),
                           interval, _seconds(d.keepalive, "timeout", 5.0, f"{where}keepalive."),
                           _seconds(d, "initial_fetch_timeout", 15.0, where, zero=True))


def parse_address(text: str, where: str) -> Address:
    """host:port, where host is a name, an IPv4 address or an IPv6 one ([::1]:80)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (not sep or not host or not port.isascii() or not port.isdigit()
            or not 0 <= int(port) <= 65535 or not _host(host)):
        raise ConfigError(f"{where}: {text!r} is not host:port")
    return Address(host, int(port))


def _host(host: str) -> bool:
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOST_NAME.fullmatch(host))


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def validate_resources(runtimes, routes, prefix: str) -> None:
    """Semantic checks json_format cannot make; shared by the file loader and (later) the xDS client."""
    seen: set[str] = set()
    for i, rt in enumerate(runtimes):
        where = f"{prefix}.runtimes[{i}]"
        if not rt.name:
            raise ConfigError(f"{where}.name: required")
        if not _RUNTIME_NAME.fullmatch(rt.name):
            raise ConfigError(f"{where}.name: {rt.name[:64]!r}: use letters, digits and . _ - : "
                              f"only, starting with a letter or digit, at most 256")
        if rt.dialect not in _DIALECTS:
            raise ConfigError(f"{where}.dialect: unknown dialect {rt.dialect}")
        _runtime_policy(rt, where)
        if rt.name in seen:
            raise ConfigError(f"{where}.name: duplicate runtime name {rt.name!r}")
        seen.add(rt.name)
        if not rt.http_address:
            raise ConfigError(f"{where}.http_address: required")
        parse_address(rt.http_address, f"{where}.http_address")
        if rt.grpc_address:
            parse_address(rt.grpc_address, f"{where}.grpc_address")
        if rt.HasField("weight") and rt.weight.value < 1:
            raise ConfigError(f"{where}.weight: must be at least 1")
        for j, m in enumerate(rt.models):
            _model(m.name, f"{where}.models[{j}].name")
    _validate_routes(routes, prefix)


def _runtime_policy(rt, where: str) -> None:
    """Health check and outlier detection settings a loop or a ratio could not work with."""
    if rt.HasField("health_check"):
        for name in ("interval", "timeout"):
            if rt.health_check.HasField(name) and \
                    getattr(rt.health_check, name).ToNanoseconds() <= 0:
                raise ConfigError(f"{where}.health_check.{name}: must be positive")
    if rt.HasField("outlier_detection"):
        od = rt.outlier_detection
        for name in ("base_ejection_time", "max_ejection_time"):
            if od.HasField(name) and getattr(od, name).ToNanoseconds() <= 0:
                raise ConfigError(f"{where}.outlier_detection.{name}: must be positive")
        if od.HasField("max_ejection_percent") and od.max_ejection_percent.value > 100:
            raise ConfigError(f"{where}.outlier_detection.max_ejection_percent: at most 100")


def _validate_routes(routes, prefix: str) -> None:
    seen: set[str] = set()
    for i, route in enumerate(routes):
        where = f"{prefix}.routes[{i}]"
        _model(route.model, f"{where}.model")
        if route.model in seen:
            raise ConfigError(f"{where}.model: duplicate route for {route.model!r}")
        seen.add(route.model)
        if route.balancer and route.balancer not in BALANCERS:
            raise ConfigError(f"{where}.balancer: unknown balancer {route.balancer!r}; "
                              f"known: {', '.join(sorted(BALANCERS))}")
        for j, t in enumerate(route.targets):
            _model(t.model, f"{where}.targets[{j}].model")
            if len(route.targets) > 1 and t.weight < 1:
                raise ConfigError(f"{where}.targets[{j}].weight: must be at least 1 in a split")
        if route.HasField("timeout") and route.timeout.ToNanoseconds() <= 0:
            raise ConfigError(f"{where}.timeout: must be positive")
        for k, rule in enumerate(route.matches):
            for h, matcher in enumerate(rule.headers):
                try:
                    HeaderCondition(matcher, f"{where}.matches[{k}].headers[{h}]")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
            for j, t in enumerate(rule.targets):
                _model(t.model, f"{where}.matches[{k}].targets[{j}].model")
                if len(rule.targets) > 1 and t.weight < 1:
                    raise ConfigError(f"{where}.matches[{k}].targets[{j}].weight: must be at "
                                      f"least 1 in a split")
        if route.HasField("mirror"):
            _model(route.mirror.model, f"{where}.mirror.model")
            if not 0 <= route.mirror.fraction.value <= 1:
                raise ConfigError(f"{where}.mirror.fraction: must be between 0 and 1")
        if route.rate_limit.requests_per_second < 0:
            raise ConfigError(f"{where}.rate_limit.requests_per_second: must not be negative")
        if route.HasField("choice_count") and not 2 <= route.choice_count.value <= 100:
            raise ConfigError(f"{where}.choice_count: must be between 2 and 100 (as Envoy, at "
                              f"least 2)")
        if route.balancer in ("ring_hash", "maglev") and not route.hash_header:
            raise ConfigError(f"{where}.hash_header: required by balancer {route.balancer}")
        if route.HasField("retry_policy"):
            try:
                retry_from_proto(route.retry_policy, f"{where}.retry_policy")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def _model(name: str, where: str) -> None:
    if not name:
        raise ConfigError(f"{where}: required")
    try:
        validate_model_name(name.encode(), where)
    except BadRequest as e:
        raise ConfigError(f"{where}: {e.message}") from None
