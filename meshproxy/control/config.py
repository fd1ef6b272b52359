"""YAML -> ControlPlaneConfig proto -> frozen ControlPlaneSettings; ConfigError names the field."""

from __future__ import annotations

import dataclasses

from meshproxy._proto.meshproxy.v1 import control_plane_pb2, resources_pb2
from meshproxy.config import (Address, ConfigError, parse_address, parse_config, read_file,
                              validate_resources)


@dataclasses.dataclass(frozen=True)
class ControlPlaneSettings:
    grpc_address: Address
    admin_address: Address
    identifier: str
    runtimes: tuple[resources_pb2.Runtime, ...]      # published as listed
    routes: tuple[resources_pb2.ModelRoute, ...]
    discovered: tuple[resources_pb2.Runtime, ...]    # polled for their models
    poll_interval: float
    grace: float
    request_timeout: float
    heartbeat_interval: float
    registration_grace: float
    registration_state_path: str
    watch_interval: float
    keepalive_interval: float
    keepalive_timeout: float
    source: control_plane_pb2.ControlPlaneConfig


def load_file(path: str) -> ControlPlaneSettings:
    return load_text(read_file(path), source=path)


def load_text(text: str, source: str = "<config>") -> ControlPlaneSettings:
    return parse_config(text, control_plane_pb2.ControlPlaneConfig(), _build, source)


def _build(c: control_plane_pb2.ControlPlaneConfig) -> ControlPlaneSettings:
    validate_resources(c.resources.runtimes, c.resources.routes, "resources")
    d = c.discovery
    validate_resources(d.runtimes, [], "discovery")
    listed = {rt.name for rt in c.resources.runtimes}
    for i, rt in enumerate(d.runtimes):
        if rt.models:
            raise ConfigError(f"discovery.runtimes[{i}].models: polled from the runtime, not listed")
        if rt.name in listed:
            raise ConfigError(f"discovery.runtimes[{i}].name: {rt.name!r} is also in resources")
    poll = _seconds(d, "poll_interval", 2.0, "discovery.")
    heartbeat = _seconds(c.registration, "heartbeat_interval", 2.0, "registration.")
    return ControlPlaneSettings(
        grpc_address=parse_address(c.grpc_address or "0.0.0.0:18000", "grpc_address"),
        admin_address=parse_address(c.admin_address or "127.0.0.1:19000", "admin_address"),
        identifier=c.identifier or "meshproxy-control-plane",
        runtimes=tuple(c.resources.runtimes),
        routes=tuple(c.resources.routes),
        discovered=tuple(d.runtimes),
        poll_interval=poll,
        grace=_seconds(d, "grace", 3 * poll, "discovery."),
        request_timeout=_seconds(d, "request_timeout", min(poll, 2.0), "discovery."),
        heartbeat_interval=heartbeat,
        registration_grace=_seconds(c.registration, "grace", 3 * heartbeat, "registration."),
        registration_state_path=c.registration.state_path,
        watch_interval=_seconds(c, "watch_interval", 1.0),
        keepalive_interval=_seconds(c.keepalive, "interval", 30.0, "keepalive."),
        keepalive_timeout=_seconds(c.keepalive, "timeout", 10.0, "keepalive."),
        source=c,
    )


def _seconds(msg, field: str, default: float, prefix: str = "") -> float:
    if not msg.HasField(field):
        return default
    value = getattr(msg, field).ToNanoseconds() / 1e9
    if value <= 0:
        raise ConfigError(f"{prefix}{field}: must be positive")
    return value
