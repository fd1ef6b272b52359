"""REST listener: one asyncio Protocol per client connection, llhttp parsing, callbacks only.

How it works: llhttp (httptools) calls back as bytes arrive; each request is an
Exchange (upstream/forwarder.py) queued on its connection, so pipelined
requests are answered in order. When a head is complete and its exchange is
first in line, the model is read, the snapshot matched, an endpoint picked and
the upstream head built; the forwarder sends it and the body as it arrives.
Bytes for the upstream gathered during one read are written with one call. The
response comes back through the Exchange and goes to the client as it came,
with hop-by-hop headers dropped and x-meshproxy-upstream added. No task or
future is made per request; timeouts are deadlines that one ticker checks
(app.py runs it), so arming one costs an attribute write.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

import httptools

from meshproxy import model_name
from meshproxy.cluster.outlier import OutlierDetector
from meshproxy.errors import (BadRequest, BodyTooLarge, HeadersTooLarge, InternalError,
                              MalformedRequest, NoHealthyUpstream, Overloaded, ProxyError,
                              RequestTimeout, Unimplemented, UpgradeRequired, UpstreamTimeout,
                              render_http)
from meshproxy.ingress import headers
from meshproxy.routing.split import unit_hash
from meshproxy.telemetry import metrics
from meshproxy.upstream import mirror
from meshproxy.upstream.forwarder import NEVER, Exchange

log = logging.getLogger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PAUSE_OUTBOX = 1 << 20  # stop reading the client while this much waits for an upstream


class HttpContext:
    """What every connection of one listener shares. `snapshot` is swapped whole on updates."""

    def __init__(self, settings, metrics, snapshot, local: Callable, rnd: Callable[[], float]):
        self.settings = settings
        self.metrics = metrics
        self.snapshot = snapshot
        self.local = local  # (method, path) -> (status, json bytes) | None
        self.rnd = rnd
        self.header_kinds = headers.header_kinds(settings.model_headers)
        self.now = time.monotonic()  # coarse clock, advanced by the ticker
        self.next_sweep = self.now  # of the runtime connections idle too long
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self.outlier = OutlierDetector()
        self.tracing = None     # telemetry.tracing.Tracing when traces are on
        self.access_log = None  # telemetry.access_log.AccessLog when the access log is on

    def tick(self) -> None:
        """Advance the clock, expire what is overdue, return ejected endpoints (every 100 ms),
        close runtime connections idle too long (every second)."""
        self.now = now = time.monotonic()
        for conn in [c for c in self.connections if c.deadline <= now]:
            conn.expire()
        self.outlier.sweep(now)
        if now >= self.next_sweep:
            self.next_sweep = now + 1.0
            for endpoint in self.snapshot.endpoints.values():
                if endpoint.pool is not None and endpoint.pool.idle:
                    endpoint.pool.sweep(now)

    def outlier_failure(self, endpoint, status: int) -> None:
        if self.outlier.failure(endpoint, status, self.now):
            self.metrics.record_ejection(endpoint.name)

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.drain()


class SeenHead:
    """A request head seen on a connection and what was read from it.

    Clients on a keep-alive connection mostly send the same few heads again and again: the
    same path and headers, the same Content-Length for a fixed-shape tensor, one head per
    model when they call several. A connection keeps its last `SEEN_HEADS` heads two ways:

    - by URL, for heads llhttp parsed: a head equal to one seen (a dict lookup and two
      compares) reuses what was read from it and the upstream head built for the same
      target, instead of reading every header again;
    - by their bytes (`raw`), for heads that can be read without llhttp: HTTP/1.1, kept
      alive, framed by Content-Length or without a body, no Expect, no upgrade. The bytes are
      the head written back canonically (`Name: value` lines), so a later head with exactly
      these bytes parses to exactly this; `HttpConnection.read_known` takes such requests
      straight from the read, and counts their bodies by Content-Length.
    """

    __slots__ = ("url", "headers", "method", "req", "model", "version", "target",
                 "upstream_head", "raw", "length")

    def __init__(self, ex: Exchange, req, model, version):
        self.url, self.headers, self.method = ex.url, ex.headers, ex.method
        self.req, self.model, self.version = req, model, version
        self.target = None
        self.upstream_head = b""
        self.raw = None
        self.length = max(req.length, 0)  # of the body, when read without llhttp

    def canonical(self) -> bytes | None:
        """The head's bytes for reading it without llhttp, or None when it must be parsed."""
        req = self.req
        if (req.chunked or req.expect or self.method == b"CONNECT" or self.model is None
                or any(t != b"keep-alive" for t in req.tokens)):
            return None
        lines = [self.method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


SEEN_HEADS = 8  # per connection: a few KB at most, enough for a client calling several models


def _keep(heads: dict, key: bytes, entry: SeenHead) -> None:
    if len(heads) >= SEEN_HEADS and key not in heads:
        del heads[next(iter(heads))]  # the oldest
    heads[key] = entry


class HttpConnection(asyncio.Protocol):
    """A client connection: parses requests, routes them, relays responses in order."""

    def __init__(self, ctx: HttpContext):
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Exchange] = collections.deque()
        self.cur: Exchange | None = None  # the exchange llhttp is filling
        self.closed = False
        self.fatal: ProxyError | None = None
        self.client_ip = b""
        self.head_size = 0  # bytes read while a head was incomplete
        self.read_size = 0  # bytes of the read being parsed
        self.deadline = ctx.now + ctx.settings.idle_timeout
        self.reading_paused = False
        self.upstream_full = False  # the runtime is not taking the request body as it comes
        self.client_full = False  # the client is not taking the response as it comes
        self.seen: dict[bytes, SeenHead] = {}  # by URL, oldest first
        self.known: dict[bytes, SeenHead] = {}  # by their canonical bytes (SeenHead.raw)
        self.last_known: SeenHead | None = None  # the last of them read_known took
        self.body_left = 0  # of a request read without llhttp

    # -- asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = (peer[0] if peer else "unknown").encode()
        self.ctx.connections.add(self)
        self.deadline = self.ctx.now + self.ctx.settings.header_read_timeout

    def connection_lost(self, exc) -> None:
        """The client went away (or the drain deadline cut it off): each request it had sent
        a head for still gets its access-log line, metrics and span, with status 0 when no
        answer had started (Envoy logs response code 0, flag DC)."""
        self.closed = True
        self.ctx.connections.discard(self)
        queue, self.queue = self.queue, collections.deque()
        for ex in queue:
            ex.abort_upstream()
            if ex.head_done and not ex.logged:
                if not ex.started:
                    ex.status = 0
                self.finish(ex)
            else:
                ex.finished()

    def eof_received(self) -> bool:
        """The client half-closed. The requests it sent whole are still answered, in order, and
        the connection closes after the last (RFC 9112 9.6: a half-close does not end a
        request or the client's interest in the answer). With nothing in flight, or a request
        that can now never end, the transport closes at once."""
        if self.closed or not self.queue or self.cur is not None or self.body_left:
            return False
        if self.fatal is None:  # else the error for the bytes after them closes it, once sent
            self.queue[-1].close_after = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.body_left or (self.known and self.cur is None):
            data = self.read_known(data)
            if not data:
                self.flush()
                return
        self.read_size = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade_ignored(data[e.args[0]:])
        except httptools.HttpParserCallbackError as e:
            err = self._callback_error(e.__context__ or e)  # logged even if it goes unanswered
            if not self.closed and self.fatal is None:
                self.protocol_error(err)
        except httptools.HttpParserError as e:
            self.protocol_error(MalformedRequest(f"invalid HTTP request: {_parser_reason(e)}"))
        cur = self.cur
        if cur is not None and not cur.head_done and not self.closed:
            self.head_size += len(data)
            if self.head_size > self.ctx.settings.max_request_headers_bytes:
                self.protocol_error(HeadersTooLarge("request headers are too large"))
        self.flush()

    def read_known(self, data: bytes) -> bytes:
        """Take the requests at the start of `data` whose head is one llhttp read before on this
        connection (SeenHead.raw), and their bodies by Content-Length; what is left (a head not
        seen, or part of one) goes to llhttp, which is between messages then."""
        known = self.known
        try:
            while data and not self.closed and self.fatal is None:
                if not self.body_left:
                    seen = self.last_known
                    if seen is not None and data.startswith(seen.raw):
                        end = len(seen.raw)  # the same head again: no search, no hashing
                    else:
                        end = data.find(b"\r\n\r\n") + 4
                        seen = known.get(data[:end]) if end > 3 else None
                        if seen is None:
                            return data
                        self.last_known = seen
                    self.on_message_begin()
                    ex = self.cur
                    ex.url, ex.headers, ex.method, ex.known = seen.url, seen.headers, seen.method, seen
                    ex.head_done = True
                    if ex is self.queue[0]:
                        self.start(ex)
                        if self.closed:
                            return b""
                    else:
                        self.pause_client()  # pipelined: held until the ones before are answered
                    self.body_left = seen.length
                    data = data[end:] if end < len(data) else b""
                    if not self.body_left:
                        self.on_message_complete()
                        continue
                    if not data:
                        return b""
                left = self.body_left
                body, data = (data, b"") if len(data) <= left else (data[:left], data[left:])
                self.body_left = left = left - len(body)
                self.on_body(body)
                if left:
                    return b""
                self.on_message_complete()
        except Exception as e:  # noqa: BLE001 - a bug here is answered like one in a callback
            err = self._callback_error(e)
            if not self.closed and self.fatal is None:
                self.protocol_error(err)
            return b""
        return data

    @staticmethod
    def _callback_error(cause: BaseException) -> ProxyError:
        """What to answer when one of our llhttp callbacks raised `cause`: a ProxyError says
        what was wrong with the request; anything else is a bug here, logged, not blamed on
        the client."""
        if isinstance(cause, ProxyError):
            return cause
        log.error("internal error while reading a request", exc_info=cause)
        return InternalError(f"internal error in meshproxy ({type(cause).__name__}); "
                             f"see its log")

    def _upgrade_ignored(self, rest: bytes) -> None:
        # llhttp stops after a request asking to upgrade (h2c, websocket). The
        # proxy does not upgrade: the request was served as HTTP/1.1, go on.
        if rest and not self.closed:
            self.data_received(rest)

    def flush(self) -> None:
        """Write what this read gathered for the upstream in one call."""
        if self.queue:
            ex = self.queue[0]
            up = ex.upstream
            if up is not None and ex.outbox:
                up.transport.writelines(ex.outbox)
                ex.outbox.clear()
                ex.outbox_size = 0

    def pause_writing(self) -> None:
        self.client_full = True
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.pause()

    def resume_writing(self) -> None:
        self.client_full = False
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.resume()

    def resume_client(self) -> None:
        """Read from the client again, unless a request is still waiting for its turn or the
        runtime is not taking the body (Exchange.upstream_paused)."""
        if self.reading_paused and len(self.queue) <= 1 and not self.upstream_full \
                and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def pause_client(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        if self.closed or self.fatal is not None:
            raise MalformedRequest("request after the connection was closed")
        ex = self.cur = Exchange(self)
        self.queue.append(ex)
        self.head_size = 0
        if len(self.queue) == 1:
            self.deadline = self.ctx.now + self.ctx.settings.header_read_timeout

    def on_url(self, url: bytes) -> None:
        self.cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.cur
        ex.head_done = True
        if ex.url[:1] != b"/" and b"://" in ex.url[:10]:
            ex.url = _origin_form(ex.url)
        ex.method = self.parser.get_method()
        if self.parser.should_upgrade() and ex.method != b"CONNECT" and _has_body(ex.headers):
            # llhttp ends an upgrade request at its head: its body would be read as requests
            # of their own here, while the runtime waited for it (an h2c smuggling shape)
            raise MalformedRequest("an Upgrade request with a body is not served; send it "
                                   "without Upgrade (this port serves HTTP/1.1)")
        ex.keep_alive = self.parser.should_keep_alive()
        limit = self.ctx.settings.max_request_headers_bytes
        # The head came in this read and the ones before it: count it only when those could
        # hold more than the limit.
        if self.head_size + self.read_size > limit and \
                sum(len(n) + len(v) + 4 for n, v in ex.headers) + len(ex.url) > limit:
            raise HeadersTooLarge("request headers are too large")
        if ex is self.queue[0]:
            self.start(ex)
        else:
            self.pause_client()  # pipelined: hold it until the ones before are answered

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        ex.body_bytes += len(body)
        if ex.body_bytes > self.ctx.settings.max_request_body_bytes and not ex.discard:
            raise BodyTooLarge(
                f"request body is larger than {self.ctx.settings.max_request_body_bytes} bytes")
        if ex.discard:
            return
        if not ex.routed:  # pipelined, not started yet: kept until its turn
            ex.outbox.append(body)
        elif ex.chunked:
            ex.body((b"%x\r\n" % len(body), body, b"\r\n"), len(body))
        else:
            ex.body((body,), len(body))
        if ex.upstream is None:
            ex.outbox_size += len(body)
            if ex.outbox_size > _PAUSE_OUTBOX:
                self.pause_client()

    def on_message_complete(self) -> None:
        ex = self.cur
        self.cur = None
        ex.request_done = True
        if ex.routed:
            if ex.chunked and not ex.discard:
                ex.body((b"0\r\n\r\n",), 0)
        elif not ex.discard:  # pipelined: whether it is chunked is known when it routes
            ex.outbox.append(None)  # the end of the body, framed then
        if ex.mirror is not None:
            mirror.send(ex, self.ctx)
        if ex.response_done and self.queue and ex is self.queue[0]:  # (empty: answered, closed)
            self.finish(ex)

    # -- the exchange's life
    def start(self, ex: Exchange) -> None:
        """Route a complete head and send it upstream, or answer it here."""
        self.deadline = self.ctx.now + self.ctx.settings.request_timeout
        try:
            self.route(ex)
        except ProxyError as err:
            self.reply_error(ex, err)
        except Exception as e:  # noqa: BLE001 - a bug: this request gets a 500, not a hang
            self.reply_error(ex, self._callback_error(e))

    def route(self, ex: Exchange) -> None:
        ctx = self.ctx
        settings = ctx.settings
        seen = ex.known
        if seen is None:  # parsed by llhttp
            seen = self.seen.get(ex.url)
            if seen is None or seen.headers != ex.headers or seen.method != ex.method:
                seen = self.remember(ex)
            # llhttp takes HTTP/0.9, 1.0, 1.1 and 2.0 request lines; all but 1.1 keep the
            # connection open only when it says keep-alive, so a kept-alive one without
            # Connection is 1.1. (A known head's bytes say HTTP/1.1.)
            if (not ex.keep_alive or seen.req.tokens) and self.parser.get_http_version() != "1.1":
                raise UpgradeRequired("only HTTP/1.1 is served; send HTTP/1.1 requests")
        req, model, version = seen.req, seen.model, seen.version
        ex.chunked = req.chunked
        if ex.url.startswith(b"/v2/repository/") and (
                model is not None or ex.url != b"/v2/repository/index"):
            raise Unimplemented("repository operations (load, unload) are not proxied: send "
                                "them to the runtime itself", model)
        if model is None:
            self.answer_local(ex)
            return
        ex.model = model
        if ctx.tracing is not None:  # before the lookups: their errors get a span too
            ctx.tracing.start_request(ex, model)
        target, balancer = ctx.snapshot.match(model, version, ctx.rnd, ex.header, ctx.now)
        route = target.route
        if route.hash_header:
            value = ex.header(route.hash_header)
            ex.key = unit_hash(value) if value is not None else None
        endpoint = self.pick(ex, balancer, model, target)
        pending = ex.outbox or ()  # body pieces of a pipelined request, read before its turn
        if pending:
            ex.outbox = []
        m = route.mirror
        if m is not None and m.inflight < m.max_concurrent and ctx.rnd() < m.fraction:
            ex.mirror = (m, headers.shadow_host(headers.upstream_head(
                ex.method, ex.url, model, m.target, req, self.client_ip, settings.model_headers)))
        if seen.target is target:
            head = seen.upstream_head
        else:
            head = seen.upstream_head = headers.upstream_head(
                ex.method, ex.url, model, target, req, self.client_ip, settings.model_headers)
            seen.target = target
        ex.first_try(target, balancer, endpoint, head, ctx.now)
        for piece in pending:
            if piece is None:
                if ex.chunked:
                    ex.body((b"0\r\n\r\n",), 0)
            else:
                ex.body((b"%x\r\n" % len(piece), piece, b"\r\n") if ex.chunked else (piece,),
                        len(piece))
        if ex.mirror is not None and ex.request_done:
            mirror.send(ex, ctx)
        if req.expect and not ex.request_done:
            self.transport.write(_CONTINUE)

    def remember(self, ex: Exchange) -> SeenHead:
        """Read a head llhttp parsed, and keep what was read (SeenHead)."""
        settings = self.ctx.settings
        req = headers.scan(ex.headers, self.ctx.header_kinds, settings.max_request_body_bytes)
        model, version = model_name.resolve(req.model_value, ex.url)
        entry = SeenHead(ex, req, model, version)
        _keep(self.seen, ex.url, entry)
        if ex.keep_alive:
            raw = entry.raw = entry.canonical()
            if raw is not None:
                _keep(self.known, raw, entry)
        return entry

    def pick(self, ex: Exchange, balancer, model: str, target):
        """An endpoint with room for one more request, or the ProxyError that says why not."""
        rnd = self.ctx.rnd
        endpoint = balancer.pick(rnd, None, ex.key)
        if endpoint is None:
            raise NoHealthyUpstream(f"model {target.model!r} has no healthy runtime", model)
        if endpoint.active >= endpoint.limits.max_requests:
            other = balancer.pick(rnd, endpoint, ex.key)
            if other is None or other.active >= other.limits.max_requests:
                self.ctx.metrics.record_overflow(endpoint.name, "requests")
                raise Overloaded(f"model {model!r}: every runtime holding it is at its "
                                 f"request limit", model)
            endpoint = other
        return endpoint

    def relay_head(self, ex: Exchange, head: bytes, rest: bytes) -> None:
        """Send the runtime's response head (and any body bytes after it) to the client."""
        settings = self.ctx.settings
        close = ex.close_after or not ex.keep_alive or self.ctx.draining
        up = ex.upstream
        if self.client_full and up is not None:  # still full from an earlier answer
            up.pause()
        if up is not None and head == up.last_head:  # a runtime mostly repeats its heads
            kept = up.last_kept
        else:
            kept = headers.strip_hop_by_hop(head)[:-2]
            if kept[5:8] == b"1.0":
                kept = b"HTTP/1.1" + kept[8:]
            if up is not None:
                up.last_head, up.last_kept = head, kept
        parts = [kept]
        size = len(kept) + 2 + len(rest)
        if settings.upstream_header:
            parts.append(ex.endpoint.served_header)
            size += len(ex.endpoint.served_header)
        if close:
            parts.append(b"connection: close\r\n")
            size += 19
        parts.append(b"\r\n")
        if rest:
            parts.append(rest)
        ex.bytes_out += size
        self.transport.writelines(parts)

    def answer_local(self, ex: Exchange) -> None:
        path = ex.url.split(b"?", 1)[0]
        answer = self.ctx.local(ex.method, path)
        if answer is None:
            raise BadRequest(
                "no model named: set the 'model' header or use a /v2/models/{name}/... path")
        status, body = answer
        ex.status = status
        ex.started = ex.response_done = ex.discard = True
        keep = ex.keep_alive and not self.ctx.draining
        answer = b"".join((
            b"HTTP/1.1 %d %s\r\n" % (status, b"OK" if status == 200 else b"Service Unavailable"),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"" if keep else b"connection: close\r\n", b"\r\n", body))
        ex.bytes_out += len(answer)
        self.transport.write(answer)
        if ex.request_done:
            self.finish(ex)

    def reply_error(self, ex: Exchange, err: ProxyError) -> None:
        """Answer `ex` with the error (if nothing was sent yet) and drop its upstream."""
        ex.abort_upstream()
        ex.discard = True
        ex.outbox.clear()
        ex.outbox_size = 0
        self.resume_client()  # held while body waited for a try: the rest is read and dropped
        self.ctx.metrics.record_local_error(err.status, type(err).__name__)
        if not ex.started:  # a body still arriving is read and dropped, then the next request
            ex.started = True
            ex.status = err.status
            ex.close_after = ex.close_after or err.close
            answer = render_http(err, ex.keep_alive and not ex.close_after and not self.ctx.draining)
            ex.bytes_out += len(answer)
            self.transport.write(answer)
        ex.response_done = True
        if err.close:
            self.finish(ex, force_close=True)
        elif ex.request_done:
            self.finish(ex)

    def finish(self, ex: Exchange, force_close: bool = False) -> None:
        """The exchange is over both ways: record it and move on to the next or close."""
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        ex.logged = True
        routed = ex.target is not None
        if self.ctx.access_log is not None:
            self.ctx.access_log.record(ex, "rest")
        if ex.span is not None:
            self.ctx.tracing.end_request(ex)
        if routed:
            endpoint = ex.endpoint
            cell = endpoint.cells.get(ex.model)
            if cell is None:
                cell = endpoint.cells[ex.model] = self.ctx.metrics.stats.cell(
                    ex.model, "rest", endpoint.name)
            metrics.record(cell, ex.status, time.perf_counter() - ex.t0, ex.body_bytes,
                           ex.bytes_out, ex.overhead if ex.started else None)
        else:
            self.ctx.metrics.record_request(
                ex.model if self.ctx.snapshot.is_known(ex.model) else "", "rest", ex.status, "",
                time.perf_counter() - ex.t0, ex.body_bytes, ex.bytes_out)
        if ex.routed:
            ex.finished()
        if self.closed:
            return
        if force_close or ex.close_after or not ex.keep_alive or self.ctx.draining:
            self.close()
            return
        if self.fatal is not None and not self.queue:
            self.protocol_error(self.fatal)
            return
        if self.queue:
            nxt = self.queue[0]
            self.resume_client()
            if nxt.head_done:
                self.start(nxt)
                self.flush()
        else:
            self.deadline = self.ctx.now + self.ctx.settings.idle_timeout
            if self.reading_paused:
                self.resume_client()

    def protocol_error(self, err: ProxyError) -> None:
        """The client sent bytes that are not valid HTTP: answer after earlier requests, then close."""
        cur = self.cur
        if cur is not None and cur.head_done and cur is self.queue[0]:
            if cur.started:
                self.abort()
            else:
                self.reply_error(cur, err)
            return
        if cur is not None and self.queue and self.queue[-1] is cur:
            self.queue.pop()  # it will get this error as its answer, after those before it
            self.cur = None
        if self.queue:  # earlier requests are still being answered
            self.fatal = err
            self.pause_client()
            return
        if cur is None or cur.logged:  # no head was begun: the line has no method or path
            cur = Exchange(self)
        cur.status, cur.logged = err.status, True
        answer = render_http(err, False)
        cur.bytes_out = len(answer)
        self.ctx.metrics.record_local_error(err.status, type(err).__name__)
        self.ctx.metrics.record_request("", "rest", err.status, "", time.perf_counter() - cur.t0,
                                        cur.body_bytes, cur.bytes_out)
        if self.ctx.access_log is not None:
            self.ctx.access_log.record(cur, "rest")
        self.transport.write(answer)
        self.close()

    def expire(self) -> None:
        """The deadline passed: close an idle connection, answer 408 or 504."""
        if not self.queue:
            if self.cur is not None or self.fatal is not None:
                self.protocol_error(RequestTimeout("the request head did not arrive in time"))
            else:
                self.close()
            return
        ex = self.queue[0]
        now = self.ctx.now
        if not ex.head_done:
            self.protocol_error(RequestTimeout("the request head did not arrive in time"))
        elif ex.response_done:  # answered; the rest of the body did not come in time
            self.close()
        elif ex.started:  # relaying: only the whole-request timeout applies now
            if now >= ex.deadline:
                ex.timed_out()
                self.abort()
            else:
                self.deadline = ex.deadline
        elif now < ex.deadline:
            if ex.in_try and now >= ex.try_deadline:
                ex.try_timed_out(now)
            else:
                self.deadline = min(ex.deadline, ex.try_deadline if ex.in_try else ex.deadline)
        else:
            ex.timed_out()
            name = ex.endpoint.name if ex.endpoint is not None else "the runtime"
            self.reply_error(ex, UpstreamTimeout(
                f"model {ex.model!r}: {name} did not answer in time", ex.model))
            self.deadline = self.ctx.now + self.ctx.settings.idle_timeout

    def drain(self) -> None:
        if not self.queue and self.cur is None:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline = NEVER
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.deadline = NEVER
        for ex in self.queue:
            ex.abort_upstream()
        self.transport.abort()


def _has_body(headers) -> bool:
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding" or (lname == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _origin_form(url: bytes) -> bytes:
    """The path and query of an absolute-form target (`http://host/v2/models/m/infer`, as a
    client sends through a configured HTTP proxy). RFC 9112 section 3.2.2 says servers must
    accept it; like Envoy, the proxy routes on its path and sends the runtime that path."""
    rest = url.split(b"://", 1)[1]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[cut:]
    return path if path[:1] == b"/" else b"/" + path


def _parser_reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if text.startswith("Pause on PRI"):  # llhttp met the HTTP/2 preface: an h2 or gRPC client
        return ("an HTTP/2 connection preface: this port serves HTTP/1.1; send gRPC to the "
                "gRPC listener (listeners.grpc_address)")
    return text.replace("HPE_", "").lower() if text.startswith("HPE_") else text


