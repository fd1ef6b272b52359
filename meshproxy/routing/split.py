"""Header matches and weighted splits (pure): which targets a request's headers select."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
from typing import Callable, Sequence

from meshproxy._proto.meshproxy.v1 import resources_pb2

Header = Callable[[str], "bytes | None"]  # lower-case name -> raw value, or None when absent
Random = Callable[[], float]


class HeaderCondition:
    """One compiled HeaderMatcher."""

    __slots__ = ("name", "kind", "value", "invert")

    def __init__(self, m: resources_pb2.HeaderMatcher, where: str = "header"):
        self.name = m.name.lower()
        self.invert = m.invert
        self.kind = m.WhichOneof("match")
        if not self.name:
            raise ValueError(f"{where}.name: required")
        if self.kind is None:
            raise ValueError(f"{where}: one of exact, prefix, regex or present is required")
        if self.kind == "regex":
            try:
                self.value = re.compile(m.regex.encode())
            except re.error as e:
                raise ValueError(f"{where}.regex: {e}") from None
        elif self.kind == "present":
            self.value = m.present
        else:
            self.value = getattr(m, self.kind).encode()

    def holds(self, header: Header) -> bool:
        """As Envoy's HeaderMatcher: a missing header never matches exact, prefix or regex,
        inverted or not; `present` with `invert` means absent."""
        got = header(self.name)
        kind = self.kind
        if kind == "present":
            return (got is not None) == (self.value != self.invert)
        if got is None:
            return False
        if kind == "exact":
            ok = got == self.value
        elif kind == "prefix":
            ok = got.startswith(self.value)
        else:
            ok = self.value.fullmatch(got) is not None
        return ok != self.invert


class Split:
    """Weighted targets; picks at random or, with a hash header, by the header's value."""

    def __init__(self, targets: Sequence, hash_header: str = ""):
        self.targets = tuple(targets)
        self.hash_header = hash_header.lower()
        self._cumulative = list(itertools.accumulate(t.weight for t in self.targets))

    def pick(self, rnd: Random, header: Header | None = None):
        if len(self.targets) == 1:
            return self.targets[0]
        point = rnd()
        if self.hash_header and header is not None:
            value = header(self.hash_header)
            if value is not None:
                point = unit_hash(value)
        return self.targets[bisect.bisect_right(self._cumulative, point * self._cumulative[-1])]


class HeaderRule:
    __slots__ = ("conditions", "split")

    def __init__(self, conditions: list[HeaderCondition], split: Split):
        self.conditions = conditions
        self.split = split

    def holds(self, header: Header) -> bool:
        return all(c.holds(header) for c in self.conditions)


def first_match(rules: Sequence[HeaderRule], default: Split, header: Header | None) -> Split:
    """The split of the first rule whose headers all match, else the default."""
    if header is not None:
        for rule in rules:
            if rule.holds(header):
                return rule.split
    return default


def unit_hash(value: bytes) -> float:
    """A stable hash of `value` in [0, 1) (same value, same point, in every process)."""
    digest = hashlib.blake2b(value, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64
