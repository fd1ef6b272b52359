"""Protobuf wire reading for the gRPC listener: fields 1 and 2 of a message, without parsing it.

Every request the proxy routes (ModelInferRequest, ModelReadyRequest, ModelMetadataRequest)
carries the model name in field 1 and the version in field 2, both strings. `scan` walks the
top-level fields only (a length-delimited field is skipped by its length, so a 64 MiB tensor
costs what a 3-byte one does) and returns the last value of each, as a protobuf parser would.
`with_name` re-encodes just those two fields in front of the rest, which parsers accept since
field order on the wire is free.
"""

from __future__ import annotations

from meshproxy.errors import BadRequest

_NAME_TAG = 0x0A     # field 1, wire type 2 (length-delimited)
_VERSION_TAG = 0x12  # field 2, wire type 2


class WireError(BadRequest):
    """The request message is not valid protobuf where the proxy had to read it."""


def _varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while i < end:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            break
    raise WireError("the request message is not valid protobuf (bad varint)")


def scan(data: bytes) -> tuple[bytes | None, bytes | None, int]:
    """(field 1, field 2, front), raw and unvalidated; a field absent is None.

    `front` is where the rest of the message starts when fields 1 and 2 each appear at most
    once and only at the start (the way every protobuf library writes them), else -1.
    """
    name = version = None
    front = 0
    i, end = 0, len(data)
    while i < end:
        at = i
        tag = data[i]
        if tag < 0x80:
            i += 1
        else:
            tag, i = _varint(data, i, end)
        wire = tag & 7
        if wire == 2:
            if i < end and data[i] < 0x80:
                size = data[i]
                i += 1
            else:
                size, i = _varint(data, i, end)
            stop = i + size
            if stop > end:
                raise WireError("the request message is not valid protobuf (field past the end)")
            if tag == _NAME_TAG or tag == _VERSION_TAG:
                if at != front or (name if tag == _NAME_TAG else version) is not None:
                    front = -1
                elif front >= 0:
                    front = stop
                if tag == _NAME_TAG:
                    name = data[i:stop]
                else:
                    version = data[i:stop]
            i = stop
        elif wire == 0:
            _, i = _varint(data, i, end)
        elif wire == 1 or wire == 5:
            i += 8 if wire == 1 else 4
        else:
            raise WireError(f"the request message is not valid protobuf (wire type {wire})")
        field = tag >> 3
        if field == 0 or (field <= 2 and wire != 2):
            raise WireError(f"the request message is not valid protobuf (field {field})")
    if i != end:
        raise WireError("the request message is not valid protobuf (truncated)")
    return name, version, front


def _field(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    out = bytearray((tag,))
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + value


def without_fields_1_2(data: bytes) -> bytes:
    """`data` with every field 1 and field 2 removed (the rest byte for byte)."""
    parts = []
    i, end, start = 0, len(data), 0
    while i < end:
        at = i
        tag, i = _varint(data, i, end)
        wire = tag & 7
        if wire == 2:
            size, i = _varint(data, i, end)
            i += size
        elif wire == 0:
            _, i = _varint(data, i, end)
        else:
            i += 8 if wire == 1 else 4
        if tag in (_NAME_TAG, _VERSION_TAG):
            parts.append(data[start:at])
            start = i
    parts.append(data[start:])
    return b"".join(parts)


def with_name(data: bytes, front: int, name: bytes, version: bytes | None) -> bytes:
    """`data` asking for model `name` (and `version`, or none): fields 1 and 2 re-encoded
    in front of the rest, which goes byte for byte. `front` is scan()'s third answer."""
    rest = data[front:] if front >= 0 else without_fields_1_2(data)
    head = _field(_NAME_TAG, name)
    if version:
        head += _field(_VERSION_TAG, version)
    return head + rest

