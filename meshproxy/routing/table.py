"""The immutable model -> endpoints snapshot; `match` is a pure lookup on the hot path.

How it works: the runtimes are inverted into clusters (the endpoints holding a
model READY, with a balancer), routes are joined onto them, and the whole thing
is frozen into a Snapshot. An update builds a new Snapshot and swaps one
reference; requests keep the one they started with. Endpoint objects outlive
snapshots (EndpointRegistry) so in-flight counters and keep-alive pools survive; so do a
route's rate-limit bucket and its mirror's count of copies in flight, while the settings
that made them stay the same (EndpointRegistry.carried).
"""

from __future__ import annotations

from typing import Callable, Iterable

from meshproxy._proto.meshproxy.v1 import resources_pb2
from meshproxy.cluster.balancer import BALANCERS, DEFAULT_BALANCER, LoadBalancer, Random
from meshproxy.cluster.endpoints import Endpoint, Limits
from meshproxy.cluster.outlier import settings_from_proto
from meshproxy.config import parse_address
from meshproxy.errors import NoHealthyUpstream, RateLimited, UnknownModel
from meshproxy.routing.ratelimit import TokenBucket
from meshproxy.routing.split import Header, HeaderCondition, HeaderRule, Split, first_match
from meshproxy.upstream.retry import RetryBudget, RetryPolicy, from_proto as retry_from_proto

DEFAULT_RETRY = RetryPolicy()
DEFAULT_CHOICES = 2  # least_request's choice_count when a route sets none
READY = resources_pb2.LoadedModel.READY


class Target:
    """Where one route sends a share of its traffic: a model (and version) and its cluster."""

    __slots__ = ("model", "version", "weight", "balancer", "timeout", "rewrite", "model_bytes",
                 "retry", "budget", "route")

    def __init__(self, model: str, version: str | None, weight: int, balancer: LoadBalancer | None,
                 timeout: float, rewrite: bool, retry: RetryPolicy = DEFAULT_RETRY,
                 budget: RetryBudget | None = None):
        self.model = model
        self.model_bytes = model.encode()
        self.version = version
        self.weight = weight
        self.balancer = balancer  # None: no runtime holds the model READY
        self.timeout = timeout
        self.rewrite = rewrite    # the upstream must be asked for `model`, not the client's name
        self.retry = retry
        self.budget = budget or RetryBudget()  # shared by every target of the same model
        self.route: Route | None = None


class InFlight:
    """The copies of one route's mirror in flight, shared by its Mirror in every snapshot."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class Mirror:
    """A shadow target: a share of requests is copied there and the answer thrown away."""

    __slots__ = ("target", "fraction", "max_concurrent", "_inflight")

    def __init__(self, target: Target, fraction: float, max_concurrent: int,
                 inflight: InFlight | None = None):
        self.target = target
        self.fraction = fraction
        self.max_concurrent = max_concurrent
        self._inflight = inflight or InFlight()

    @property
    def inflight(self) -> int:
        """Copies in flight, counted across snapshots: a copy started under an older table
        still holds its place under max_concurrent."""
        return self._inflight.count

    @inflight.setter
    def inflight(self, count: int) -> None:
        self._inflight.count = count


class Route:
    """Policy for one client-facing model: header rules, a default split, mirror, rate limit."""

    __slots__ = ("model", "rules", "split", "mirror", "limiter", "hash_header", "only")

    def __init__(self, model: str, split: Split, rules: list[HeaderRule] = (),
                 mirror: Mirror | None = None, limiter: TokenBucket | None = None,
                 hash_header: str = ""):
        self.model = model
        self.split = split
        self.rules = tuple(rules)
        self.mirror = mirror
        self.limiter = limiter
        self.hash_header = hash_header
        # The one target every request goes to, when there is nothing to choose (most routes).
        self.only = split.targets[0] if not self.rules and len(split.targets) == 1 else None
        for s in (split, *(r.split for r in self.rules)):
            for t in s.targets:
                t.route = self

    def select(self, rnd: Random, header: Header | None) -> Target:
        split = first_match(self.rules, self.split, header) if self.rules else self.split
        return split.pick(rnd, header)


class EndpointRegistry:
    """Keeps one Endpoint per runtime across snapshots; `attach` gives each new one its pool.

    `carried` keeps the route state that must outlive snapshots too, by route model and the
    settings that made it: token buckets (a table update must not refill a burst) and mirror
    in-flight counts. Each build replaces it with what the new table uses.
    """

    def __init__(self, attach: Callable[[Endpoint], None] = lambda e: None):
        self._attach = attach
        self.endpoints: dict[str, Endpoint] = {}
        self._replaced: list[Endpoint] = []  # by a new address since the last retain()
        self.carried: dict[tuple, object] = {}

    def get(self, rt: resources_pb2.Runtime) -> Endpoint:
        addr = parse_address(rt.http_address, f"runtime {rt.name}")
        e = self.endpoints.get(rt.name)
        if e is None or (e.host, e.port) != (addr.host, addr.port):
            if e is not None:
                self._replaced.append(e)
            e = Endpoint(rt.name, addr.host, addr.port)
            self._attach(e)
            self.endpoints[rt.name] = e
        e.weight = rt.weight.value if rt.HasField("weight") else 1
        e.outlier = settings_from_proto(
            rt.outlier_detection if rt.HasField("outlier_detection") else None)
        e.limits = Limits.from_proto(rt.circuit_breakers if rt.HasField("circuit_breakers") else None)
        return e

    def retain(self, names: set[str]) -> list[Endpoint]:
        """Forget endpoints not in `names`; return them, and those a new address replaced, so
        their pools can be closed."""
        gone = [e for n, e in self.endpoints.items() if n not in names]
        for e in gone:
            del self.endpoints[e.name]
        gone += self._replaced
        self._replaced = []
        return gone


class Snapshot:
    """A frozen table. Build with `build`; look up with `match`."""

    def __init__(self, version: str, runtimes, routes, endpoints: dict[str, Endpoint],
                 table: dict[str, Route], known: frozenset[str],
                 versioned: dict[tuple[str, str], LoadBalancer],
                 clusters: dict[str, tuple[Endpoint, ...]]):
        self.version = version
        self.runtimes = tuple(runtimes)
        self.routes = tuple(routes)
        self.endpoints = endpoints
        self.clusters = clusters  # model -> endpoints holding it READY
        self._table = table
        self._known = known
        self._versioned = versioned

    def match(self, model: str, version: str | None, rnd: Random, header: Header | None = None,
              now: float | None = None) -> tuple[Target, LoadBalancer]:
        """The target and balancer for a request; raises UnknownModel, RateLimited or
        NoHealthyUpstream. `header` looks up request headers (for header rules and sticky
        splits); `now` enables the route's rate limit."""
        route = self._table.get(model)
        if route is None:
            raise UnknownModel(f"model {model!r} is not known to this proxy", model)
        if route.limiter is not None and now is not None:
            wait = route.limiter.take(now)
            if wait:
                raise RateLimited(f"model {model!r} is over its rate limit", model, wait)
        target = route.only or route.select(rnd, header)
        balancer = target.balancer
        if version is not None and not target.rewrite:
            balancer = self._versioned.get((model, version), balancer)
        if balancer is None:
            raise NoHealthyUpstream(f"model {target.model!r} has no ready runtime", model)
        return target, balancer

    def is_known(self, model: str) -> bool:
        return model in self._known

    def index(self) -> list[dict]:
        """The repository index answered by the proxy: each model and where it is ready."""
        return [{"name": model,
                 "state": "READY" if self.clusters.get(model) else "UNAVAILABLE",
                 "runtimes": sorted(e.name for e in self.clusters.get(model, ()))}
                for model in sorted(self._known)]


class _Builder:
    """Joins runtimes and routes into the pieces of a Snapshot."""

    def __init__(self, runtimes, registry: EndpointRegistry, default_timeout: float):
        self.holders: dict[str, list[Endpoint]] = {}
        self.by_version: dict[tuple[str, str], list[Endpoint]] = {}
        self.known: set[str] = set()
        self.default_timeout = default_timeout
        self._balancers: dict[tuple, LoadBalancer | None] = {}
        self._kept = registry.carried   # from the table in force
        self.carried: dict[tuple, object] = {}  # what this table uses, kept or new
        for rt in runtimes:
            endpoint = registry.get(rt)
            for m in rt.models:
                self.known.add(m.name)
                if m.state == READY:
                    _add(self.holders.setdefault(m.name, []), endpoint)
                    _add(self.by_version.setdefault((m.name, m.version), []), endpoint)

    def balancer(self, model: str, name: str, choice_count: int) -> LoadBalancer | None:
        key = (model, name, choice_count)
        if key not in self._balancers:
            eps = self.holders.get(model)
            self._balancers[key] = BALANCERS[name](eps, choice_count=choice_count) if eps else None
        return self._balancers[key]

    def carry(self, key: tuple, make: Callable[[], object]):
        """The object the table in force keeps under `key`, else a new one from `make`."""
        obj = self._kept.get(key)
        if obj is None:
            obj = make()
        self.carried[key] = obj
        return obj

    def route(self, r: resources_pb2.ModelRoute) -> Route:
        timeout = r.timeout.ToNanoseconds() / 1e9 if r.HasField("timeout") else self.default_timeout
        policy = retry_from_proto(r.retry_policy) if r.HasField("retry_policy") else DEFAULT_RETRY
        name = r.balancer or DEFAULT_BALANCER
        choices = _choices(r)
        budget = RetryBudget()

        def targets(specs) -> list[Target]:
            specs = specs or [resources_pb2.WeightedTarget(model=r.model, weight=1)]
            return [Target(t.model, t.version or None, max(t.weight, 1),
                           self.balancer(t.model, name, choices), timeout,
                           t.model != r.model or bool(t.version), policy, budget)
                    for t in specs]

        rules = [HeaderRule([HeaderCondition(h, f"route {r.model} header") for h in rule.headers],
                            Split(targets(rule.targets), r.split_hash_header))
                 for rule in r.matches]
        mirror = None
        if r.HasField("mirror"):
            m = r.mirror
            shadow = Target(m.model, m.version or None, 1, self.balancer(m.model, name, choices),
                            timeout, m.model != r.model or bool(m.version), RetryPolicy(num_retries=0))
            # The count follows the copies, not the cap: a new max_concurrent or fraction
            # applies to the copies already in flight; another shadow starts from zero.
            inflight = self.carry(("mirror", r.model, m.model, m.version), InFlight)
            mirror = Mirror(shadow, m.fraction.value if m.HasField("fraction") else 1.0,
                            m.max_concurrent.value if m.HasField("max_concurrent") else 64,
                            inflight)
        limiter = None
        if r.HasField("rate_limit") and r.rate_limit.requests_per_second > 0:
            rate = r.rate_limit.requests_per_second
            burst = r.rate_limit.burst or max(1, int(rate))
            limiter = self.carry(("rate_limit", r.model, rate, burst),
                                 lambda: TokenBucket(rate, burst))
        return Route(r.model, Split(targets(r.targets), r.split_hash_header), rules, mirror,
                     limiter, r.hash_header.lower())

    def plain(self, model: str) -> Route:
        balancer = self.balancer(model, DEFAULT_BALANCER, DEFAULT_CHOICES)
        return Route(model, Split([Target(model, None, 1, balancer, self.default_timeout, False)]))

    def versioned(self, balancers: dict[str, tuple[str, int]]
                  ) -> dict[tuple[str, str], LoadBalancer]:
        """Balancers for requests naming a version; `balancers` gives each routed model's
        balancer name and choice_count (others get the defaults)."""
        out = {}
        for (model, v), eps in self.by_version.items():
            if not v:
                continue
            # Runtimes that list the model without a version may serve any version.
            anyv = self.by_version.get((model, ""), [])
            name, choices = balancers.get(model, (DEFAULT_BALANCER, DEFAULT_CHOICES))
            out[(model, v)] = BALANCERS[name](eps + [e for e in anyv if e not in eps],
                                              choice_count=choices)
        return out


def build(version: str, runtimes: Iterable[resources_pb2.Runtime],
          routes: Iterable[resources_pb2.ModelRoute], registry: EndpointRegistry,
          default_timeout: float) -> tuple[Snapshot, list[Endpoint]]:
    """A new Snapshot, and the endpoints that left (their pools should be closed)."""
    runtimes, routes = list(runtimes), list(routes)
    b = _Builder(runtimes, registry, default_timeout)
    gone = registry.retain({rt.name for rt in runtimes})
    table = {r.model: b.route(r) for r in routes}
    for model in b.holders.keys() | b.known:
        if model not in table:
            table[model] = b.plain(model)
    versioned = b.versioned({r.model: (r.balancer or DEFAULT_BALANCER, _choices(r))
                             for r in routes})
    registry.carried = b.carried
    snap = Snapshot(version, runtimes, routes, dict(registry.endpoints), table,
                    frozenset(b.known | table.keys()), versioned,
                    {m: tuple(eps) for m, eps in b.holders.items()})
    return snap, gone


def _choices(r: resources_pb2.ModelRoute) -> int:
    return r.choice_count.value if r.HasField("choice_count") else DEFAULT_CHOICES


def _add(eps: list[Endpoint], e: Endpoint) -> None:
    if e not in eps:
        eps.append(e)
