"""The control plane's versioned resource cache: per type, name -> (version, packed resource).

How it works: `set_resources(type_url, messages)` replaces a type's whole set. Each resource's
version is a hash of its serialized bytes, so it changes exactly when the content does and
stays the same across control-plane restarts (a delta client reconnecting with
initial_resource_versions is then sent nothing it already holds). A type's version (sent as
state-of-the-world version_info) is a hash of its names and versions. Every set is an
immutable TypeSnapshot; streams read the current one and are told of changes by callbacks,
runtimes before routes (make-before-break). Unchanged message objects are not re-serialized.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshproxy._proto.meshproxy.v1 import discovery_pb2
from meshproxy.discovery.state import TYPE_URLS, resource_name


class Entry:
    """One resource as streams send it; built once, shared by every stream."""

    __slots__ = ("name", "version", "message", "any", "resource")

    def __init__(self, name: str, message: Message, raw: bytes, type_url: str):
        self.name = name
        self.version = hashlib.blake2b(raw, digest_size=8).hexdigest()
        self.message = message
        self.any = any_pb2.Any(type_url=type_url, value=raw)
        self.resource = discovery_pb2.Resource(name=name, version=self.version, resource=self.any)


class TypeSnapshot:
    __slots__ = ("type_url", "version", "entries")

    def __init__(self, type_url: str, entries: dict[str, Entry]):
        self.type_url = type_url
        self.entries = entries
        digest = hashlib.blake2b(digest_size=8)
        for name in sorted(entries):
            digest.update(f"{name}\0{entries[name].version}\0".encode())
        self.version = digest.hexdigest() if entries else "empty"


class ResourceCache:
    """The table every stream serves from."""

    def __init__(self):
        self._types = {t: TypeSnapshot(t, {}) for t in TYPE_URLS}
        self._watchers: list[Callable[[], None]] = []

    def get(self, type_url: str) -> TypeSnapshot:
        return self._types[type_url]

    def set_all(self, runtimes: Iterable[Message], routes: Iterable[Message]) -> bool:
        """Replace both types; watchers are told once. True when anything changed."""
        changed = [self._set(t, msgs) for t, msgs in zip(TYPE_URLS, (runtimes, routes))]
        if any(changed):
            self._notify()
        return any(changed)

    def set_resources(self, type_url: str, messages: Iterable[Message]) -> bool:
        changed = self._set(type_url, messages)
        if changed:
            self._notify()
        return changed

    def _set(self, type_url: str, messages: Iterable[Message]) -> bool:
        old = self._types[type_url].entries
        entries: dict[str, Entry] = {}
        changed = False
        for msg in messages:
            name = resource_name(msg)
            prev = old.get(name)
            if prev is not None and prev.message is msg:
                entries[name] = prev
                continue
            raw = msg.SerializeToString(deterministic=True)
            if prev is not None and prev.any.value == raw:
                entries[name] = prev
                continue
            entries[name] = Entry(name, msg, raw, type_url)
            changed = True
        if not changed and entries.keys() == old.keys():
            return False
        self._types[type_url] = TypeSnapshot(type_url, entries)
        return True

    def watch(self, callback: Callable[[], None]) -> None:
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def _notify(self) -> None:
        for callback in list(self._watchers):
            callback()

    def dump(self) -> dict:
        return {t: {"version": s.version,
                    "resources": {n: e.version for n, e in sorted(s.entries.items())}}
                for t, s in self._types.items()}
