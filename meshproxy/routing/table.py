"""The immutable model -> endpoints snapshot; `match` is a pure lookup on the hot path.

How it works: the runtimes are inverted into clusters (the endpoints holding a
model READY, with a balancer), routes are joined onto them, and the whole thing
is frozen into a Snapshot. An update builds a new Snapshot and swaps one
reference; requests keep the one they started with. Endpoint objects outlive
snapshots (EndpointRegistry) so in-flight counters and keep-alive pools survive.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, Iterable

from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.cluster.balancer import BALANCERS, DEFAULT_BALANCER, LoadBalancer, Random
from meshproxy.cluster.endpoints import Endpoint
from meshproxy.config import parse_address
from meshproxy.errors import NoHealthyUpstream, UnknownModel
from meshproxy.upstream.retry import RetryPolicy, from_proto as retry_from_proto

DEFAULT_RETRY = RetryPolicy()

READY = resources_pb2.LoadedModel.READY


class Target:
    """Where one route sends a share of its traffic: a model (and version) and its cluster."""

    __slots__ = ("model", "version", "weight", "balancer", "timeout", "rewrite", "model_bytes",
                 "retry")

    def __init__(self, model: str, version: str | None, weight: int, balancer: LoadBalancer | None,
                 timeout: float, rewrite: bool, retry: RetryPolicy = DEFAULT_RETRY):
        self.model = model
        self.model_bytes = model.encode()
        self.version = version
        self.weight = weight
        self.balancer = balancer  # None: no runtime holds the model READY
        self.timeout = timeout
        self.rewrite = rewrite    # the upstream must be asked for `model`, not the client's name
        self.retry = retry


class Route:
    __slots__ = ("model", "targets", "_cumulative")

    def __init__(self, model: str, targets: list[Target]):
        self.model = model
        self.targets = tuple(targets)
        self._cumulative = list(itertools.accumulate(t.weight for t in targets))

    def pick(self, rnd: Random) -> Target:
        if len(self.targets) == 1:
            return self.targets[0]
        return self.targets[bisect.bisect_right(self._cumulative, rnd() * self._cumulative[-1])]


class EndpointRegistry:
    """Keeps one Endpoint per runtime across snapshots; `attach` gives each new one its pool."""

    def __init__(self, attach: Callable[[Endpoint], None] = lambda e: None):
        self._attach = attach
        self.endpoints: dict[str, Endpoint] = {}

    def get(self, rt: resources_pb2.Runtime) -> Endpoint:
        addr = parse_address(rt.http_address, f"runtime {rt.name}")
        weight = rt.weight.value if rt.HasField("weight") else 1
        e = self.endpoints.get(rt.name)
        if e is None or (e.host, e.port) != (addr.host, addr.port):
            e = Endpoint(rt.name, addr.host, addr.port, weight)
            self._attach(e)
            self.endpoints[rt.name] = e
        e.weight = weight
        return e

    def retain(self, names: set[str]) -> list[Endpoint]:
        """Forget endpoints not in `names`; return them so their pools can be closed."""
        gone = [e for n, e in self.endpoints.items() if n not in names]
        for e in gone:
            del self.endpoints[e.name]
        return gone


class Snapshot:
    """A frozen table. Build with `build`; look up with `match`."""

    def __init__(self, version: str, runtimes, routes, endpoints: dict[str, Endpoint],
                 table: dict[str, Route], known: frozenset[str],
                 versioned: dict[tuple[str, str], LoadBalancer]):
        self.version = version
        self.runtimes = tuple(runtimes)
        self.routes = tuple(routes)
        self.endpoints = endpoints
        self._table = table
        self._known = known
        self._versioned = versioned

    def match(self, model: str, version: str | None, rnd: Random) -> tuple[Target, LoadBalancer]:
        """The target and balancer for a request; raises UnknownModel or NoHealthyUpstream."""
        route = self._table.get(model)
        if route is None:
            raise UnknownModel(f"model {model!r} is not known to this proxy", model)
        target = route.pick(rnd)
        balancer = target.balancer
        if version is not None and not target.rewrite:
            balancer = self._versioned.get((model, version), balancer)
        if balancer is None:
            raise NoHealthyUpstream(
                f"model {target.model!r} has no ready runtime", model)
        return target, balancer

    def is_known(self, model: str) -> bool:
        return model in self._known

    def index(self) -> list[dict]:
        """The repository index answered by the proxy: each model and where it is ready."""
        rows = []
        for model in sorted(self._known):
            holders = sorted(
                rt.name for rt in self.runtimes
                for m in rt.models if m.name == model and m.state == READY)
            rows.append({"name": model, "state": "READY" if holders else "UNAVAILABLE",
                         "runtimes": holders})
        return rows


def build(version: str, runtimes: Iterable[resources_pb2.Runtime],
          routes: Iterable[resources_pb2.ModelRoute], registry: EndpointRegistry,
          default_timeout: float) -> tuple[Snapshot, list[Endpoint]]:
    """A new Snapshot, and the endpoints that left (their pools should be closed)."""
    runtimes, routes = list(runtimes), list(routes)
    holders: dict[str, list[Endpoint]] = {}
    by_version: dict[tuple[str, str], list[Endpoint]] = {}
    known: set[str] = set()
    for rt in runtimes:
        endpoint = registry.get(rt)
        for m in rt.models:
            known.add(m.name)
            if m.state == READY:
                _add(holders.setdefault(m.name, []), endpoint)
                if m.version:
                    _add(by_version.setdefault((m.name, m.version), []), endpoint)
    gone = registry.retain({rt.name for rt in runtimes})
    balancer_names = {r.model: r.balancer or DEFAULT_BALANCER for r in routes}

    def balancer_for(model: str, name: str) -> LoadBalancer | None:
        eps = holders.get(model)
        return BALANCERS[name](eps) if eps else None

    table: dict[str, Route] = {}
    for r in routes:
        timeout = r.timeout.ToNanoseconds() / 1e9 if r.HasField("timeout") else default_timeout
        specs = r.targets or [resources_pb2.WeightedTarget(model=r.model, weight=1)]
        policy = retry_from_proto(r.retry_policy) if r.HasField("retry_policy") else DEFAULT_RETRY
        table[r.model] = Route(r.model, [
            Target(t.model, t.version or None, max(t.weight, 1),
                   balancer_for(t.model, balancer_names[r.model]), timeout,
                   t.model != r.model or bool(t.version), policy)
            for t in specs])
    for model in holders:
        if model not in table:
            table[model] = Route(model, [Target(model, None, 1, balancer_for(model, DEFAULT_BALANCER),
                                                default_timeout, False)])
    for model in known - table.keys():
        table[model] = Route(model, [Target(model, None, 1, None, default_timeout, False)])
    versioned = {}
    for (model, v), eps in by_version.items():
        # Runtimes that list the model without a version may serve any version.
        unversioned = [e for e in holders[model] if e not in eps and not _lists_version(runtimes, e.name, model)]
        versioned[(model, v)] = BALANCERS[balancer_names.get(model, DEFAULT_BALANCER)](eps + unversioned)
    snap = Snapshot(version, runtimes, routes, dict(registry.endpoints), table,
                    frozenset(known | table.keys()), versioned)
    return snap, gone


def _add(eps: list[Endpoint], e: Endpoint) -> None:
    if e not in eps:
        eps.append(e)


def _lists_version(runtimes, name: str, model: str) -> bool:
    return any(m.name == model and m.version for rt in runtimes if rt.name == name for m in rt.models)
