"""The devtools runtime's options and its command-line flags, apart from the server code so
`meshproxy` builds its argument parser without loading aiohttp or grpc."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


@dataclass
class RuntimeOptions:
    name: str = "runtime"
    models: list[str] = field(default_factory=lambda: ["identity", "sum", "mnist"])
    host: str = "127.0.0.1"
    http_port: int = 8000  # 0 = pick a free port
    grpc_port: int | None = 8001  # 0 = pick a free port, None = no gRPC server
    latency_ms: float = 0.0
    fail_rate: float = 0.0
    load_delay_ms: float = 0.0
    capacity: int = 0  # 0 = unlimited
    seed: int | None = None

    def __post_init__(self):
        # Checked here so a bad value fails before any port is bound.
        for name in ("latency_ms", "load_delay_ms", "capacity"):
            if getattr(self, name) < 0:
                raise ValueError(f"runtime option {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.fail_rate <= 1.0:  # NaN fails this too
            raise ValueError(f"runtime option fail_rate must be in [0, 1], got {self.fail_rate}")
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"runtime option {name} must be a port (0-65535), got {port}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RuntimeOptions()
    parser.add_argument("--name", default=d.name)
    parser.add_argument("--models", default=",".join(d.models), help="comma-separated model names")
    parser.add_argument("--host", default=d.host)
    parser.add_argument("--http-port", type=int, default=d.http_port, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=_grpc_port, default=d.grpc_port,
                        help="0 picks a free port; -1 or 'none' disables gRPC")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every infer")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="probability an infer fails")
    parser.add_argument("--load-delay-ms", type=float, default=0.0, help="how long a load takes")
    parser.add_argument("--capacity", type=int, default=0, help="models held at once; 0 = no limit")
    parser.add_argument("--seed", type=int, default=None, help="seed of the fail_rate draws")


def _grpc_port(text: str) -> int | None:
    if text.strip().lower() == "none" or text.strip() == "-1":
        return None
    return int(text)


def options_from_args(args: argparse.Namespace,
                      parser: argparse.ArgumentParser | None = None) -> RuntimeOptions:
    """The options, or (given the parser) a usage error naming the bad one, exit 2."""
    try:
        return _options(args)
    except ValueError as e:
        if parser is None:
            raise
        parser.error(str(e))


def _options(args: argparse.Namespace) -> RuntimeOptions:
    return RuntimeOptions(
        name=args.name, models=[m.strip() for m in args.models.split(",") if m.strip()],
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        latency_ms=args.latency_ms, fail_rate=args.fail_rate, load_delay_ms=args.load_delay_ms,
        capacity=args.capacity, seed=args.seed)
