"""REST heads: one pass over the request headers, the head the runtime gets, and the response
head cleaned of hop-by-hop headers. Plain functions on bytes, no I/O."""

from __future__ import annotations

from meshproxy.errors import BadRequest, BodyTooLarge, MalformedRequest

# Not forwarded: they describe this hop, or the proxy answers them itself (Expect).
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"transfer-encoding", b"upgrade", b"expect", b"http2-settings"))
RESPONSE_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"upgrade"))


class RequestHead:
    """What one pass over the request headers found."""

    __slots__ = ("model_value", "kept", "tokens", "xff", "expect", "chunked")

    def __init__(self, model_value, kept, tokens, xff, expect, chunked):
        self.model_value = model_value  # raw value of the first model header, or None
        self.kept = kept                # [(lower name, name, value)] to forward
        self.tokens = tokens            # header names listed in Connection (dropped upstream)
        self.xff = xff                  # x-forwarded-for so far, or None
        self.expect = expect            # Expect: 100-continue
        self.chunked = chunked          # Transfer-Encoding present (llhttp checked it is chunked)


def scan(headers, model_headers, max_body: int) -> RequestHead:
    """One pass over the request headers: the model header, what to forward, framing."""
    hosts = 0
    model_value = xff = None
    expect = chunked = False
    content_length = -1
    tokens = ()
    kept = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                chunked = True
            elif lname == b"connection":
                tokens = tokens + tuple(t.strip() for t in value.lower().split(b","))
            elif lname == b"expect" and value.lower() == b"100-continue":
                expect = True
            continue
        if lname == b"host":
            hosts += 1
        elif lname == b"content-length":
            content_length = int(value)
        elif lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname in model_headers:
            if model_value is not None and model_value != value:
                raise BadRequest("the request names two different models in its headers")
            model_value = value
        kept.append((lname, name, value))
    if hosts != 1:
        raise MalformedRequest("a request must have exactly one Host header")
    if content_length > max_body:
        raise BodyTooLarge(
            f"request body of {content_length} bytes is larger than {max_body} bytes")
    return RequestHead(model_value, kept, tokens, xff, expect, chunked)


def upstream_head(method: bytes, url: bytes, model: str, target, req: RequestHead,
                  client_ip: bytes, model_headers) -> bytes:
    """The request head as the runtime gets it: rewritten to the target, hop-by-hop dropped."""
    if target.rewrite:
        url = rewrite_path(url, model, target)
    head = [b"%s %s HTTP/1.1\r\n" % (method, url)]
    tokens = req.tokens
    for lname, name, value in req.kept:
        if tokens and lname in tokens:
            continue
        if target.rewrite and lname in model_headers:
            value = target.model_bytes
        head.append(b"%s: %s\r\n" % (name, value))
    xff = req.xff
    head.append(b"x-forwarded-for: %s\r\n" % (client_ip if xff is None else xff + b", " + client_ip))
    if req.chunked:
        head.append(b"transfer-encoding: chunked\r\n")
    head.append(b"\r\n")
    return b"".join(head)


def rewrite_path(url: bytes, model: str, target) -> bytes:
    """Point a /v2/models/{model}/... path at the target model (and version) a split chose."""
    prefix = b"/v2/models/" + model.encode()
    if not url.startswith(prefix):
        return url
    rest = url[len(prefix):]
    if rest.startswith(b"/versions/"):
        rest = rest[len(b"/versions/"):]
        rest = rest[rest.find(b"/"):] if b"/" in rest else b""
    version = b"/versions/" + target.version.encode() if target.version else b""
    return b"/v2/models/" + target.model_bytes + version + rest


def clean_response_head(head: bytes) -> bytes:
    """`head` without hop-by-hop headers; most heads have none or one Connection line."""
    lower = head.lower()
    if (b"\r\nconnection:" in lower or b"\r\nkeep-alive:" in lower
            or b"\r\nproxy-connection:" in lower or b"\r\nupgrade:" in lower):
        return strip_hop_by_hop(head, lower)
    return head


def strip_hop_by_hop(head: bytes, lower: bytes | None = None) -> bytes:
    """Drop Connection, Keep-Alive, Upgrade and the headers Connection names from a response head."""
    if lower is None:
        lower = head.lower()
    # The common case, one `Connection: keep-alive` (or close) line and no other hop-by-hop
    # header, is cut out by offsets: this runs on most responses (nginx, Triton send it).
    start = lower.find(b"\r\nconnection:")
    if start >= 0 and not (b"\r\nkeep-alive:" in lower or b"\r\nproxy-connection:" in lower
                           or b"\r\nupgrade:" in lower):
        end = lower.find(b"\r\n", start + 2)
        value = lower[start + 14:end].strip()
        if value in (b"keep-alive", b"close") and lower.find(b"\r\nconnection:", end) < 0:
            return head[:start] + head[end:]
    lines = head[:-4].split(b"\r\n")
    named = set()
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            named.update(t.strip() for t in value.lower().split(b","))
    drop = RESPONSE_HOP_BY_HOP | named
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in drop]
    return b"\r\n".join(kept) + b"\r\n\r\n"


