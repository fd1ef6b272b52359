"""ProxyError hierarchy: the one place errors become KServe v2 JSON responses or gRPC codes."""

from __future__ import annotations

import json
import math


_REASONS = {
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout", 413: b"Payload Too Large", 426: b"Upgrade Required",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    507: b"Insufficient Storage",
}


class ProxyError(Exception):
    """An error the proxy answers itself. `status` is the HTTP code, `grpc_code` the gRPC name."""

    status = 500
    grpc_code = "INTERNAL"
    # Whether the client connection must be closed after the answer (framing is in doubt).
    close = False
    # For upstream failures: the retry_on condition it meets (connect-failure, reset).
    kind = ""

    def __init__(self, message: str, model: str = "", kind: str = ""):
        super().__init__(message)
        self.message = message
        self.model = model
        if kind:
            self.kind = kind


class BadRequest(ProxyError):
    status, grpc_code = 400, "INVALID_ARGUMENT"


class MalformedRequest(BadRequest):
    """The bytes on the wire are not valid HTTP/1.1: answer and close."""

    close = True


class UpgradeRequired(ProxyError):
    status, grpc_code, close = 426, "INVALID_ARGUMENT", True


class RequestTimeout(ProxyError):
    """The request head did not arrive within header_read_timeout."""

    status, grpc_code, close = 408, "DEADLINE_EXCEEDED", True


class UnknownModel(ProxyError):
    status, grpc_code = 404, "NOT_FOUND"


class NoHealthyUpstream(ProxyError):
    status, grpc_code = 503, "UNAVAILABLE"


class Overloaded(ProxyError):
    """A circuit breaker is open: answered at once instead of queueing."""

    status, grpc_code = 503, "UNAVAILABLE"


class RateLimited(ProxyError):
    status, grpc_code = 429, "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, model: str = "", retry_after: float = 1.0):
        super().__init__(message, model)
        self.retry_after = retry_after


class UpstreamFailure(ProxyError):
    """Connect failure, reset or a response that is not HTTP."""

    status, grpc_code, kind = 502, "UNAVAILABLE", "reset"


class UpstreamTimeout(ProxyError):
    status, grpc_code = 504, "DEADLINE_EXCEEDED"


class BodyTooLarge(ProxyError):
    status, grpc_code, close = 413, "RESOURCE_EXHAUSTED", True


class HeadersTooLarge(ProxyError):
    status, grpc_code, close = 431, "RESOURCE_EXHAUSTED", True


class UnsupportedCoding(ProxyError):
    """A request body in a transfer coding other than chunked (gzip, deflate, ...): it cannot
    be relayed without changing what the runtime reads (RFC 9112 section 6.1)."""

    status, grpc_code, close = 501, "UNIMPLEMENTED", True


class RetryBufferExceeded(ProxyError):
    """A retry was due, but the request body outgrew the route's replay buffer before it could
    be sent (Envoy answers 507 here too)."""

    status, grpc_code = 507, "RESOURCE_EXHAUSTED"


class InternalError(ProxyError):
    """A bug in meshproxy met while reading a request (logged with its traceback): the
    connection's state cannot be trusted any more, so it is answered and closed."""

    status, grpc_code, close = 500, "INTERNAL", True


class Unimplemented(ProxyError):
    """A method of the served API that the proxy does not carry (gRPC)."""

    status, grpc_code = 501, "UNIMPLEMENTED"


def render_grpc(err: ProxyError) -> tuple["grpc.StatusCode", str, tuple[tuple[str, str], ...]]:
    """The gRPC status, message and trailing metadata for `err`."""
    import grpc  # here, so the config loader (and the --workers supervisor) does not load grpc
    trailers = ()
    if isinstance(err, RateLimited):
        trailers = (("retry-after", str(max(1, math.ceil(err.retry_after)))),)
    return grpc.StatusCode[err.grpc_code], err.message, trailers


def render_http(err: ProxyError, keep_alive: bool, extra_headers: bytes = b"") -> bytes:
    """The whole HTTP/1.1 response for `err`: v2 JSON body `{"error": ...}`."""
    body = json.dumps({"error": err.message}).encode()
    keep = keep_alive and not err.close
    if isinstance(err, RateLimited):
        extra_headers += b"retry-after: %d\r\n" % max(1, math.ceil(err.retry_after))
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (err.status, _REASONS.get(err.status, b"Error")),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        extra_headers,
        b"" if keep else b"connection: close\r\n",
        b"\r\n",
        body,
    ))
