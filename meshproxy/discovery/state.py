"""xDS subscription state of one proxy (sans-IO): versions, nonces, ACK/NACK, what changed.

How it works: one TypeState per type_url holds the accepted dynamic resources (name ->
version, message). `handle(response, now)` decodes and validates what the response would
change; if anything fails, the answer is a NACK (error_detail, the previous version_info) and
nothing changes, so the last good snapshot stays in force. Otherwise the accepted set is
replaced (state of the world) or patched (delta: updates and removals) and the answer is an
ACK carrying the response's nonce. After a reconnect `initial_requests()` subscribes to every
type again, runtimes first (make-before-break): state of the world with the last accepted
version_info, delta with initial_resource_versions, so the server sends only what changed
while the stream was down. Static resources from the bootstrap are kept apart; a dynamic
resource may not take a static one's name (Envoy rejects such a CDS cluster the same way).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Iterable

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from meshproxy._proto.meshproxy.v1 import bootstrap_pb2, discovery_pb2, resources_pb2
from meshproxy.config import ConfigError, validate_resources

RUNTIME_TYPE = "type.googleapis.com/meshproxy.v1.Runtime"
ROUTE_TYPE = "type.googleapis.com/meshproxy.v1.ModelRoute"
TYPE_URLS = (RUNTIME_TYPE, ROUTE_TYPE)  # subscription and apply order: runtimes first
MESSAGES = {RUNTIME_TYPE: resources_pb2.Runtime, ROUTE_TYPE: resources_pb2.ModelRoute}
WILDCARD = "*"
INVALID_ARGUMENT = 3  # google.rpc.Code


def resource_name(msg: Message) -> str:
    """The xDS name of a resource: the runtime's name, the route's model."""
    return msg.name if isinstance(msg, resources_pb2.Runtime) else msg.model


@dataclasses.dataclass(frozen=True)
class Nack:
    type_url: str
    nonce: str
    version: str
    message: str
    at: float


@dataclasses.dataclass
class TypeState:
    type_url: str
    resources: dict[str, tuple[str, Message]] = dataclasses.field(default_factory=dict)
    version_info: str = ""  # the last accepted response's version (system version in delta)
    applied_at: float | None = None
    acks: int = 0
    nacks: int = 0
    last_nack: Nack | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a response led to: the request to send back, and whether the resources changed.
    `undo` (an accepted response): its type's state before, for SubscriptionState.reject."""
    request: Message
    changed: bool
    nack: Nack | None = None
    undo: tuple | None = None


class Rejected(Exception):
    """A response that cannot be applied; the message goes into error_detail."""


class SubscriptionState:
    """All types of one ADS session, state of the world or delta."""

    def __init__(self, node: bootstrap_pb2.Node, delta: bool,
                 static_runtimes: Iterable[resources_pb2.Runtime] = (),
                 static_routes: Iterable[resources_pb2.ModelRoute] = ()):
        self.node = node
        self.delta = delta
        self.static = {RUNTIME_TYPE: {r.name: r for r in static_runtimes},
                       ROUTE_TYPE: {r.model: r for r in static_routes}}
        self.types = {t: TypeState(t) for t in TYPE_URLS}

    # --- requests ---------------------------------------------------------------------------

    def initial_requests(self) -> list[Message]:
        """The first request of each type on a new stream."""
        if not self.delta:
            return [discovery_pb2.DiscoveryRequest(node=self.node, type_url=t,
                                                   version_info=self.types[t].version_info)
                    for t in TYPE_URLS]
        return [discovery_pb2.DeltaDiscoveryRequest(
            node=self.node, type_url=t, resource_names_subscribe=[WILDCARD],
            initial_resource_versions={n: v for n, (v, _) in self.types[t].resources.items()})
            for t in TYPE_URLS]

    def handle(self, response: Message, now: float) -> Outcome:
        """Apply a DiscoveryResponse or DeltaDiscoveryResponse; the ACK or NACK to send."""
        ts = self.types.get(response.type_url)
        try:
            if ts is None:
                raise Rejected(f"unknown type_url {response.type_url!r}")
            if self.delta:
                new = self._patched(ts, response)
                version = response.system_version_info
            else:
                new = self._replaced(ts, response)
                version = response.version_info
        except Rejected as e:
            return self._nack(ts, response, str(e), now)
        changed = new != ts.resources
        undo = (ts, ts.resources, ts.version_info, ts.applied_at)
        ts.resources, ts.version_info, ts.applied_at = new, version, now
        ts.acks += 1
        return Outcome(self._answer(ts, response), changed, undo=undo)

    def reject(self, response: Message, accepted: Outcome, message: str, now: float) -> Outcome:
        """`response` passed handle() but could not be put in force: its type goes back to
        what it held before, and the answer is a NACK instead (so a later stream does not
        claim to hold what was never applied)."""
        ts, ts.resources, ts.version_info, ts.applied_at = accepted.undo
        ts.acks -= 1
        return self._nack(ts, response, message, now)

    def _answer(self, ts: TypeState | None, response: Message,
                error: discovery_pb2.RpcStatus | None = None) -> Message:
        if self.delta:
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=response.type_url, response_nonce=response.nonce, error_detail=error)
        return discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, response_nonce=response.nonce, error_detail=error,
            version_info=ts.version_info if ts else "")

    def _nack(self, ts: TypeState | None, response: Message, message: str, now: float) -> Outcome:
        version = response.system_version_info if self.delta else response.version_info
        nack = Nack(response.type_url, response.nonce, version, message, now)
        if ts is not None:
            ts.nacks += 1
            ts.last_nack = nack
        error = discovery_pb2.RpcStatus(code=INVALID_ARGUMENT, message=message)
        return Outcome(self._answer(ts, response, error), False, nack)

    # --- decoding and validation ------------------------------------------------------------

    def _replaced(self, ts: TypeState, response) -> dict[str, tuple[str, Message]]:
        new: dict[str, tuple[str, Message]] = {}
        for any_msg in response.resources:
            msg = self._unpack(ts.type_url, any_msg)
            name = resource_name(msg)
            if name in new:
                raise Rejected(f"duplicate resource {name!r}")
            new[name] = (response.version_info, msg)
        self._validate(ts.type_url, [m for _, m in new.values()])
        # Keep per-resource identity for unchanged resources so `changed` is exact.
        return {n: ts.resources[n] if n in ts.resources and ts.resources[n][1] == m else (v, m)
                for n, (v, m) in new.items()}

    def _patched(self, ts: TypeState, response) -> dict[str, tuple[str, Message]]:
        new = dict(ts.resources)
        updated = []
        seen: set[str] = set()
        for res in response.resources:
            msg = self._unpack(ts.type_url, res.resource)
            name = resource_name(msg)
            if res.name != name:
                raise Rejected(f"resource named {res.name!r} holds {name!r}")
            if name in seen:
                raise Rejected(f"duplicate resource {name!r}")
            seen.add(name)
            new[name] = (res.version, msg)
            updated.append(msg)
        for name in response.removed_resources:
            new.pop(name, None)
        self._validate(ts.type_url, updated)
        return new

    def _unpack(self, type_url: str, any_msg: any_pb2.Any) -> Message:
        if any_msg.type_url != type_url:
            raise Rejected(f"resource of type {any_msg.type_url!r} in a {type_url} response")
        msg = MESSAGES[type_url]()
        try:
            any_msg.Unpack(msg)
        except DecodeError as e:
            raise Rejected(f"undecodable {type_url} resource: {e}") from None
        return msg

    def _validate(self, type_url: str, msgs: list[Message]) -> None:
        """Each new or changed resource alone: names are unique by construction."""
        kind = MESSAGES[type_url].DESCRIPTOR.name
        for msg in msgs:
            name = resource_name(msg)
            if name in self.static[type_url]:
                raise Rejected(f"{kind} {name!r}: the name of a static resource")
            runtimes, routes = ([msg], []) if type_url == RUNTIME_TYPE else ([], [msg])
            try:
                validate_resources(runtimes, routes, kind)
            except ConfigError as e:
                text = str(e).replace(f"{kind}.runtimes[0]", f"{kind} {name!r}")
                raise Rejected(text.replace(f"{kind}.routes[0]", f"{kind} {name!r}")) from None

    # --- views ------------------------------------------------------------------------------

    def runtimes(self) -> list[resources_pb2.Runtime]:
        """Static runtimes, then the dynamic ones in name order."""
        return self._merged(RUNTIME_TYPE)

    def routes(self) -> list[resources_pb2.ModelRoute]:
        return self._merged(ROUTE_TYPE)

    def _merged(self, type_url: str) -> list:
        static, dynamic = self.static[type_url], self.types[type_url].resources
        return [*static.values(), *(dynamic[n][1] for n in sorted(dynamic) if n not in static)]

    def set_static(self, runtimes: Iterable[resources_pb2.Runtime],
                   routes: Iterable[resources_pb2.ModelRoute]) -> None:
        """New static resources (the bootstrap file was edited); on a name clash static wins."""
        self.static = {RUNTIME_TYPE: {r.name: r for r in runtimes},
                       ROUTE_TYPE: {r.model: r for r in routes}}

    def version(self) -> str:
        """The snapshot version: each type's accepted version."""
        return " ".join(f"{MESSAGES[t].DESCRIPTOR.name}={self.types[t].version_info or '-'}"
                        for t in TYPE_URLS)

    def dump(self) -> dict:
        """Per type: version, when applied, ACK/NACK counts, the last NACK (for admin)."""
        out = {}
        for t, ts in self.types.items():
            out[t] = {"version_info": ts.version_info, "applied_at": ts.applied_at,
                      "resources": {n: v for n, (v, _) in sorted(ts.resources.items())},
                      "acks": ts.acks, "nacks": ts.nacks,
                      "last_nack": dataclasses.asdict(ts.last_nack) if ts.last_nack else None}
        return out

    # --- the last good snapshot on disk -----------------------------------------------------

    def saved(self) -> bytes:
        """The accepted dynamic resources, for `snapshot_path`."""
        data = {t: {"version_info": ts.version_info,
                    "resources": [[n, v, base64.b64encode(m.SerializeToString()).decode()]
                                  for n, (v, m) in sorted(ts.resources.items())]}
                for t, ts in self.types.items()}
        return json.dumps(data).encode()

    def restore(self, blob: bytes, now: float) -> None:
        """Load what `saved` wrote; raises ValueError (and changes nothing) when unusable."""
        try:
            data = json.loads(blob)
            staged = {}
            for t in TYPE_URLS:
                entry = data[t]
                resources = {}
                for name, version, raw in entry["resources"]:
                    msg = MESSAGES[t].FromString(base64.b64decode(raw))
                    resources[name] = (version, msg)
                self._validate(t, [m for _, m in resources.values()])
                staged[t] = (entry["version_info"], resources)
        except (ValueError, KeyError, TypeError, DecodeError, Rejected) as e:
            raise ValueError(f"unusable snapshot: {e}") from None
        for t, (version, resources) in staged.items():
            ts = self.types[t]
            ts.version_info, ts.resources, ts.applied_at = version, resources, now


def reconnect_delay(attempt: int, initial: float, maximum: float, rnd: float) -> float:
    """Jittered exponential backoff: in [initial, ceiling], ceiling = initial * 2^attempt capped.

    `rnd` is a draw from [0, 1); the lower half of each step is cut off so retries of many
    proxies spread out without any of them hammering a control plane that just came back.
    """
    ceiling = min(maximum, initial * (2 ** min(attempt, 32)))
    return max(initial, ceiling * (0.5 + 0.5 * rnd))
