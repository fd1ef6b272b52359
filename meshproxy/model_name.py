"""The model a request is for: from a header, the REST path or a gRPC body's field 1, validated."""

from __future__ import annotations

from meshproxy.errors import BadRequest

MAX_NAME_LENGTH = 256
# Letters, digits and . _ - : (Triton, MLServer and KServe names), starting with a letter or digit.
_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ALLOWED = _ALNUM + b"._:-"
_PREFIX = b"/v2/models/"
# Request targets already resolved (valid ones only: an invalid name raises before it is kept).
# Clients send the same few paths again and again; the bound keeps odd ones from piling up.
_BY_PATH: dict[bytes, tuple[str | None, str | None]] = {}
_BY_PATH_SIZE = 4096


def validate(name: bytes, where: str) -> str:
    """Return `name` as str, or raise BadRequest saying what is wrong with it and where it came from."""
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"invalid model name in {where}: longer than {MAX_NAME_LENGTH} bytes")
    # bytes.translate with a delete set checks the charset in C, cheaper than a regex here
    if not name or name.translate(None, _ALLOWED) or name[:1].translate(None, _ALNUM):
        shown = name[:64].decode("latin-1")
        raise BadRequest(
            f"invalid model name {shown!r} in {where}: use letters, digits and . _ - : only")
    return name.decode("ascii")


def from_path(target: bytes) -> tuple[bytes, bytes | None] | None:
    """(name, version) from `/v2/models/{name}[/versions/{v}]/...`, raw and unvalidated; None if not such a path."""
    if not target.startswith(_PREFIX):
        return None
    path = target.split(b"?", 1)[0]
    parts = path[len(_PREFIX):].split(b"/", 3)
    version = parts[2] if len(parts) > 2 and parts[1] == b"versions" else None
    return parts[0], version


def resolve(header_value: bytes | None, target: bytes) -> tuple[str | None, str | None]:
    """The (model, version) a REST request names; (None, None) if it names none.

    The header and the path must agree when both are present: a request that
    names two models is refused rather than routed by one and served by the other.
    """
    if header_value is None:
        found = _BY_PATH.get(target)
        if found is None:
            found = _resolve(None, target)
            if len(_BY_PATH) >= _BY_PATH_SIZE:
                _BY_PATH.clear()
            _BY_PATH[target] = found
        return found
    return _resolve(header_value, target)


def unquote(raw: bytes) -> bytes:
    """A path segment's model name with `%3A` read as `:`, the one allowed character clients
    percent-encode (tritonclient quotes names); any other escape stays, and is refused."""
    return raw.replace(b"%3A", b":").replace(b"%3a", b":") if b"%" in raw else raw


def _resolve(header_value: bytes | None, target: bytes) -> tuple[str | None, str | None]:
    in_path = from_path(target)
    path_name = version = None
    if in_path is not None:
        path_name = validate(unquote(in_path[0]), "path")
        if in_path[1] is not None:
            version = validate(in_path[1], "path version")
    if header_value is None:
        return path_name, version
    header_name = validate(header_value.strip(b" \t"), "model header")
    if path_name is not None and path_name != header_name:
        raise BadRequest(
            f"model header names {header_name!r} but the path names {path_name!r}", header_name)
    return header_name, version
