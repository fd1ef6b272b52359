"""The server side of one ADS stream (sans-IO): requests and cache changes in, responses out.

How it works: per type the session remembers what it sent (nonce, version) and what the proxy
ACKed. A request whose response_nonce is not the last one sent for its type is stale and
ignored. A NACK (error_detail set) is recorded in the proxy's status and nothing is resent:
the next response for that type goes out only when the cache changes, so a bad resource is
never retried in a loop. State of the world sends a type's whole set whenever the type's
version differs from what was last sent (or from the version_info a reconnecting proxy says it
holds). Delta keeps the version of each resource the proxy holds (seeded by
initial_resource_versions) and sends only changed resources and removed names; a type the
proxy holds nothing of gets a first response even when it is empty. Types are
always handled runtimes first, so a route never arrives before the runtimes it relies on.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from google.protobuf.message import Message

from meshproxy._proto.meshproxy.v1 import discovery_pb2
from meshproxy.control.cache import ResourceCache
from meshproxy.discovery.state import TYPE_URLS, WILDCARD


@dataclasses.dataclass
class TypeStatus:
    """One type as one proxy sees it; shown by /proxies."""
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    acked_at: float | None = None
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""
    last_nack_nonce: str = ""


@dataclasses.dataclass
class ProxyStatus:
    peer: str
    protocol: str
    connected_at: float
    node_id: str = ""
    cluster: str = ""
    responses: int = 0
    bytes_sent: int = 0
    types: dict[str, TypeStatus] = dataclasses.field(default_factory=dict)


class _Session:
    def __init__(self, cache: ResourceCache, status: ProxyStatus, identifier: str = "",
                 clock: Callable[[], float] = time.time):
        self.cache = cache
        self.status = status
        self._clock = clock
        self._nonces = itertools.count(1)
        self._control_plane = discovery_pb2.ControlPlane(identifier=identifier)
        self.on_nack: Callable[[str, str], None] | None = None  # (type_url, message)

    def _type_status(self, type_url: str) -> TypeStatus:
        return self.status.types.setdefault(type_url, TypeStatus())

    def _note_node(self, node) -> None:
        if node.id and not self.status.node_id:
            self.status.node_id, self.status.cluster = node.id, node.cluster

    def _answer(self, type_url: str, request: Message, version: str) -> None:
        """Record the ACK or NACK carried by a request whose nonce is current."""
        ts = self._type_status(type_url)
        if request.HasField("error_detail"):
            ts.nacks += 1
            ts.last_nack, ts.last_nack_nonce = request.error_detail.message, request.response_nonce
            if self.on_nack is not None:
                self.on_nack(type_url, request.error_detail.message)
        else:
            ts.acks += 1
            ts.acked_version, ts.acked_at = version, self._clock()

    def _sent(self, type_url: str, response: Message, version: str) -> Message:
        ts = self._type_status(type_url)
        ts.sent_version, ts.sent_nonce = version, response.nonce
        self.status.responses += 1
        self.status.bytes_sent += response.ByteSize()
        return response


_NACKED = "\0nacked"  # a version no resource has: the next diff sends the name again


class SotwSession(_Session):
    """State of the world: every response holds all resources of its type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._subscribed: set[str] = set()

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> list[Message]:
        self._note_node(request.node)
        t = request.type_url
        if t not in TYPE_URLS:
            return []
        if request.response_nonce:
            if t in self._subscribed and request.response_nonce == self._type_status(t).sent_nonce:
                self._answer(t, request, request.version_info)
            return []  # an ACK, a NACK or a stale nonce: nothing to send
        self._subscribed.add(t)
        if request.version_info == self.cache.get(t).version:
            ts = self._type_status(t)  # a reconnecting proxy that holds the current version
            ts.sent_version = ts.acked_version = request.version_info
            return []
        return [self._response(t)]

    def on_change(self) -> list[Message]:
        return [self._response(t) for t in TYPE_URLS
                if t in self._subscribed
                and self.cache.get(t).version != self._type_status(t).sent_version]

    def _response(self, type_url: str) -> Message:
        snap = self.cache.get(type_url)
        response = discovery_pb2.DiscoveryResponse(
            version_info=snap.version, type_url=type_url, nonce=str(next(self._nonces)),
            resources=[e.any for e in snap.entries.values()], control_plane=self._control_plane)
        return self._sent(type_url, response, snap.version)


class DeltaSession(_Session):
    """Delta: only changed resources and removed names; per-resource versions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: dict[str, dict[str, str]] = {}      # type -> name -> version the proxy holds
        # type -> nonce -> (system version, the names the response updated or removed)
        self._pending: dict[str, dict[str, tuple[str, list[str]]]] = {}

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[Message]:
        self._note_node(request.node)
        t = request.type_url
        if t not in TYPE_URLS:
            return []
        if request.response_nonce:
            sent = self._pending.get(t, {}).pop(request.response_nonce, None)
            if sent is not None:
                self._answer(t, request, sent[0])
                if request.HasField("error_detail"):
                    self._unknown(t, sent[1])
            return []  # unknown nonces are stale: ignored
        held = self._held.get(t)
        first = held is None
        if first:  # first request of this type on the stream
            held = self._held[t] = dict(request.initial_resource_versions)
            self._pending[t] = {}
        for name in request.resource_names_subscribe:
            if name != WILDCARD:
                held.pop(name, None)  # an explicit subscribe is always answered
        # A type the proxy holds nothing of is answered even when it is empty: a proxy waits
        # for a first response of each type before it reports ready, and one whose first
        # stream broke between types may hold some types and not others. Of a type it holds,
        # it is sent only what changed, maybe nothing.
        response = self._diff(t, always=first and not held)
        if response is None:  # the proxy already holds the current version of everything
            ts = self._type_status(t)
            ts.sent_version = ts.acked_version = self.cache.get(t).version
            return []
        return [response]

    def on_change(self) -> list[Message]:
        out = [self._diff(t) for t in TYPE_URLS if t in self._held]
        return [r for r in out if r is not None]

    def _unknown(self, type_url: str, names: list[str]) -> None:
        """A NACKed response was not applied: the proxy still holds whatever it held of those
        names before, which is not known here, so the next change sends each again (as an
        update if it exists then, a removal if not). Not at once: the same push would be
        NACKed again."""
        held = self._held[type_url]
        for name in names:
            held[name] = _NACKED

    def _diff(self, type_url: str, always: bool = False) -> Message | None:
        snap, held = self.cache.get(type_url), self._held[type_url]
        updated = [e.resource for name, e in snap.entries.items() if held.get(name) != e.version]
        removed = [name for name in held if name not in snap.entries]
        if not updated and not removed and not always:
            return None
        for r in updated:
            held[r.name] = r.version
        for name in removed:
            del held[name]
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version, type_url=type_url, nonce=str(next(self._nonces)),
            resources=updated, removed_resources=removed, control_plane=self._control_plane)
        self._pending[type_url][response.nonce] = (
            snap.version, [r.name for r in updated] + removed)
        if len(self._pending[type_url]) > 64:  # a proxy that never answers: keep the newest
            del self._pending[type_url][next(iter(self._pending[type_url]))]
        return self._sent(type_url, response, snap.version)
