"""REST heads: one pass over the request headers, the head the runtime gets, and the response
head cleaned of hop-by-hop headers. Plain functions on bytes, no I/O."""

from __future__ import annotations

import re

from meshproxy.errors import BadRequest, BodyTooLarge, MalformedRequest, UnsupportedCoding
from meshproxy.model_name import from_path, unquote

# Not forwarded: they describe this hop, or the proxy answers them itself (Expect).
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"transfer-encoding", b"upgrade", b"expect", b"http2-settings"))
# A response header line to drop: (name, value), the line's CRLF before it, not after.
_HOP_LINE = re.compile(rb"\r\n(connection|keep-alive|proxy-connection|upgrade):([^\r\n]*)",
                       re.IGNORECASE)
_CONNECTION_OPTIONS = frozenset((b"keep-alive", b"close", b""))
# Never dropped because Connection names them: the message's framing, and (requests) where it
# goes. A proxy that dropped Content-Length but sent the body on would let the runtime read
# the body as a request of its own (request smuggling).
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_USUAL_VALUES = frozenset((b" keep-alive", b" close", b" Keep-Alive", b" Close"))  # as sent


class RequestHead:
    """What one pass over the request headers found."""

    __slots__ = ("model_value", "kept", "tokens", "xff", "expect", "chunked", "length")

    def __init__(self, model_value, kept, tokens, xff, expect, chunked, length):
        self.model_value = model_value  # raw value of the first model header, or None
        self.kept = kept                # [(lower name, name, value)] to forward
        self.tokens = tokens            # header names listed in Connection (dropped upstream)
        self.xff = xff                  # x-forwarded-for so far, or None
        self.expect = expect            # Expect: 100-continue
        self.chunked = chunked          # Transfer-Encoding present (llhttp checked it is chunked)
        self.length = length            # Content-Length, or -1 when the head has none


# What scan() does with a header, by its lower-case name; absent: forward it as it is.
_HOST, _LENGTH, _XFF, _MODEL, _TE, _CONNECTION, _EXPECT, _DROP = range(8)
_KINDS = {b"host": _HOST, b"content-length": _LENGTH, b"x-forwarded-for": _XFF,
          b"transfer-encoding": _TE, b"connection": _CONNECTION, b"expect": _EXPECT,
          **{name: _DROP for name in HOP_BY_HOP - {b"transfer-encoding", b"connection", b"expect"}}}
_KEPT_KINDS = frozenset((_HOST, _LENGTH, _TE, _MODEL))  # see _FRAMING


def header_kinds(model_headers) -> dict[bytes, int]:
    """scan()'s table for a listener whose model headers are `model_headers` (built once).

    A model header cannot also be Host, Content-Length or a hop-by-hop header: those keep
    their meaning and are not read for the model."""
    return {**{name: _MODEL for name in model_headers}, **_KINDS}


def scan(headers, kinds: dict[bytes, int], max_body: int) -> RequestHead:
    """One pass over the request headers: the model header, what to forward, framing."""
    hosts = 0
    model_value = xff = None
    expect = chunked = False
    content_length = -1
    tokens = ()
    kept = []
    for name, value in headers:
        lname = name.lower()
        kind = kinds.get(lname)
        if kind is None:
            kept.append((lname, name, value))
        elif kind == _HOST:
            hosts += 1
            kept.append((lname, name, value))
        elif kind == _LENGTH:
            content_length = int(value)
            kept.append((lname, name, value))
        elif kind == _MODEL:
            if model_value is not None and model_value != value:
                raise BadRequest("the request names two different models in its headers")
            model_value = value
            kept.append((lname, name, value))
        elif kind == _XFF:
            xff = value if xff is None else xff + b", " + value
        elif kind == _TE:
            if value.strip().lower() != b"chunked":  # llhttp made sure chunked comes last
                raise UnsupportedCoding(f"transfer coding {value.decode('latin-1')!r} is not "
                                        "supported: send the body chunked or by Content-Length")
            chunked = True
        elif kind == _CONNECTION:
            tokens = tokens + tuple(t for t in (t.strip() for t in value.lower().split(b","))
                                    if kinds.get(t) not in _KEPT_KINDS)
        elif kind == _EXPECT:
            expect = expect or value.lower() == b"100-continue"
    if hosts != 1:
        raise MalformedRequest("a request must have exactly one Host header")
    if content_length > max_body:
        raise BodyTooLarge(
            f"request body of {content_length} bytes is larger than {max_body} bytes")
    return RequestHead(model_value, kept, tokens, xff, expect, chunked, content_length)


def upstream_head(method: bytes, url: bytes, model: str, target, req: RequestHead,
                  client_ip: bytes, model_headers) -> bytes:
    """The request head as the runtime gets it: rewritten to the target, hop-by-hop dropped."""
    rewrite = target.rewrite
    if rewrite:
        url = rewrite_path(url, model, target)
    head = [method, b" ", url, b" HTTP/1.1\r\n"]
    tokens = req.tokens
    if tokens or (rewrite and req.model_value is not None):
        for lname, name, value in req.kept:
            if tokens and lname in tokens:
                continue
            if rewrite and lname in model_headers:
                value = target.model_bytes
            head += (name, b": ", value, b"\r\n")
    else:  # the usual case: every kept header goes as it came
        for _, name, value in req.kept:
            head += (name, b": ", value, b"\r\n")
    xff = req.xff
    head += (b"x-forwarded-for: ", client_ip if xff is None else xff + b", " + client_ip,
             b"\r\n\r\n" if not req.chunked else b"\r\ntransfer-encoding: chunked\r\n\r\n")
    return b"".join(head)


_HOST_LINE = re.compile(rb"(?i)\r\nhost:[ \t]*([^\r\n]*?)[ \t]*\r\n")


def shadow_host(head: bytes) -> bytes:
    """`head` with `-shadow` added to its Host (before a port), for a mirrored copy."""
    found = _HOST_LINE.search(head)
    if found is None:
        return head
    host = found.group(1)
    name, colon, port = host.rpartition(b":")
    host = name + b"-shadow:" + port if colon and port.isdigit() else host + b"-shadow"
    return head[:found.start(1)] + host + head[found.end(1):]


def rewrite_path(url: bytes, model: str, target) -> bytes:
    """Point a /v2/models/{model}/... path at the target model (and version) a split chose."""
    named = from_path(url)
    if named is None or unquote(named[0]) != model.encode():
        return url
    rest = url[len(b"/v2/models/") + len(named[0]):]
    if rest.startswith(b"/versions/"):
        rest = rest[len(b"/versions/"):]
        rest = rest[rest.find(b"/"):] if b"/" in rest else b""
    version = b"/versions/" + target.version.encode() if target.version else b""
    return b"/v2/models/" + target.model_bytes + version + rest


def strip_hop_by_hop(head: bytes) -> bytes:
    """`head` without Connection, Keep-Alive, Proxy-Connection, Upgrade and the headers
    Connection names.

    One regex split finds the hop-by-hop lines (most heads have none, or one `Connection:
    keep-alive`, which nginx and Triton send); it is several times cheaper here than lowering
    the head and searching it once per name.
    """
    parts = _HOP_LINE.split(head)
    if len(parts) == 1:
        return head
    if len(parts) == 4 and (parts[2] in _USUAL_VALUES or parts[2].strip().lower() in
                            _CONNECTION_OPTIONS) and parts[1].lower() == b"connection":
        return parts[0] + parts[3]  # the usual lone `Connection: keep-alive`
    named = set()
    for i in range(1, len(parts), 3):
        if parts[i].lower() == b"connection":
            named.update(t.strip() for t in parts[i + 1].lower().split(b","))
    named -= _CONNECTION_OPTIONS
    named -= _FRAMING  # the body is relayed as it was framed
    kept = b"".join(parts[0::3])
    if not named:
        return kept
    lines = kept[:-4].split(b"\r\n")
    kept_lines = [lines[0]] + [ln for ln in lines[1:]
                               if ln.partition(b":")[0].strip().lower() not in named]
    return b"\r\n".join(kept_lines) + b"\r\n\r\n"
