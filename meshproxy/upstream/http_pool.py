"""Keep-alive pools of upstream HTTP/1.1 connections, one pool per endpoint, LIFO so warm ones stay warm.

An UpstreamConnection carries one exchange at a time. It parses the response
with llhttp only to learn the status and where the message ends; the bytes are
passed to the exchange as they came (head, then raw body pieces), so the body
is never re-framed or copied into Python objects. A runtime mostly sends the
same head again (its Date changes once a second): a 200 head framed by
Content-Length is kept, and a response starting with exactly those bytes is
taken without llhttp, its body counted by that length.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Protocol

import httptools

from meshproxy.errors import ProxyError, UpstreamFailure, UpstreamTimeout

MAX_RESPONSE_HEAD = 64 * 1024
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked[ \t]*\r\n", re.IGNORECASE)


class ResponseSink(Protocol):
    """What an upstream connection reports to (the ingress exchange)."""

    def upstream_ready(self, conn: "UpstreamConnection") -> None: ...
    def response_head(self, head: bytes, status: int, until_close: bool, rest: bytes) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self, reusable: bool) -> None: ...
    def upstream_failed(self, err: ProxyError, response_started: bool) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "sink", "_parser", "_head", "_statuses", "_status",
                 "_in_head", "_done", "_until_close", "_keep_alive", "_no_body", "last_head",
                 "last_kept", "known_head", "known_length", "_body_left", "paused", "idle_since",
                 "counted", "_by_length", "_body_read", "_chunks")

    def __init__(self, pool: "HttpPool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        # The last response head relayed and what of it went to the client (ingress/http.py).
        self.last_head = self.last_kept = b""
        # A 200 head framed by Content-Length, read by llhttp before, and that length.
        self.known_head = b""
        self.known_length = 0
        self.paused = False  # reading stopped: the client is not taking the response as it comes
        self.idle_since = 0.0  # time.monotonic() when it went back to the pool
        self.counted = False  # in pool.open: from connection_made until close() or connection_lost
        self._reset()

    def _reset(self) -> None:
        self._head = b""
        self._statuses: list[int] = []  # of heads llhttp finished and we have not taken yet
        self._status = 0  # of the message llhttp is in
        self._in_head = True
        self._done = self._until_close = self._no_body = False
        self._keep_alive = True
        self._body_left = 0  # of a response whose head was known
        self._by_length = False  # the response llhttp reads is framed by Content-Length
        self._body_read = 0  # its body bytes llhttp found in the read being parsed
        self._chunks: _ChunkScan | None = None  # where a chunked response ends

    # -- used by the exchange
    def start(self, sink: ResponseSink, data: bytes, no_body: bool = False) -> None:
        """Give this connection to `sink` and send the first bytes of its request."""
        self.sink = sink
        self._no_body = no_body  # HEAD: the response has a head only, whatever it says
        if data:
            self.transport.write(data)

    def forbid_reuse(self) -> None:
        """Close after this response: the request may not have been read to its end."""
        self._keep_alive = False

    def pause(self) -> None:
        """Stop reading the response until resume(): the client's side is full."""
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close it, and stop counting it open at once: connection_lost comes a loop turn or
        more later, and until then a request must not find the runtime at its connection
        limit because of a connection that is going away. With request bytes still queued
        (a runtime that answered before reading them all), it is dropped: a graceful close
        would wait for a runtime that may never read them, uncounted."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()
        self._uncount()

    def abort(self) -> None:
        """Drop the connection (the exchange gave up on it)."""
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
            self._uncount()

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.pool.open -= 1

    # -- llhttp callbacks
    def on_headers_complete(self) -> None:
        self._status = status = self._parser.get_status_code()
        self._statuses.append(status)
        # After a 500 (an unhandled error) the runtime may close the connection without having
        # said so: uvicorn, under MLServer and KServe, does within a few ms. Reused, it would
        # fail the next request, most likely another client's, with a 502.
        self._keep_alive = self._parser.should_keep_alive() and status != 500

    def on_message_complete(self) -> None:
        if self._status >= 200:
            self._done = True

    def on_body(self, body: bytes) -> None:
        if not self._done:
            self._body_read += len(body)

    # -- asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.pool.open += 1
        self.counted = True

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # bytes from an idle connection: it cannot be trusted any more
            self.abort()
            return
        if self._body_left:
            self._known_body(sink, data)
            return
        known = self.known_head
        if (known and self._in_head and not self._head and not self._no_body
                and data.startswith(known)):  # llhttp is between messages: no bytes of this one
            size = len(data) - len(known)
            if size <= self.known_length:
                self._in_head = False
                self._body_left = self.known_length - size
                sink.response_head(known, 200, False, data[len(known):] if size else b"")
                if not self._body_left and self.sink is sink:
                    self._complete(self._keep_alive)
                return
        self._body_read = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self._done:
                self._fail(UpstreamFailure(f"runtime {self.pool.name} sent invalid HTTP: {e}"))
                return
            self._keep_alive = False  # what follows a whole response is not HTTP: cut below
        if self._in_head:
            self._take_head(sink, data)
        else:
            if self._chunks is not None:
                data = self._chunked_part(data)
            elif self._done and self._by_length and len(data) > self._body_read:
                # bytes after the end of the response: not the client's, and the connection
                # cannot be trusted with another request
                self._keep_alive = False
                data = data[:self._body_read]
            sink.response_body(data)
        if self._done or (self._no_body and not self._in_head):
            self._complete(self._keep_alive and not self._until_close)

    def _take_head(self, sink: ResponseSink, data: bytes) -> None:
        # Most heads arrive whole in one read: work on `data` itself, no buffer copies.
        buf = self._head + data if self._head else data
        while self._statuses:
            status = self._statuses.pop(0)
            end = buf.find(b"\r\n\r\n") + 4
            head, rest = buf[:end], buf[end:]
            if status < 200:  # an interim response: drop it, the final one follows
                buf = rest
                continue
            self._head = b""
            self._in_head = False
            # A message llhttp already saw end was framed; only one still open may run to EOF.
            self._until_close = (not self._done and not self._no_body
                                 and status not in (204, 304) and _no_framing(head))
            self._chunks = (_ChunkScan() if not self._no_body and status not in (204, 304)
                            and _CHUNKED.search(head) else None)
            if self._no_body and rest:  # a HEAD's answer has no body, whatever it says
                self._keep_alive = False
                rest = b""
            elif self._chunks is not None:
                rest = self._chunked_part(rest)
            elif self._done and rest:
                rest = self._within_length(head, status, rest)
            self._by_length = not self._done and _content_length(head) is not None
            if status == 200 and head != self.known_head:
                self._learn(head)
            sink.response_head(head, status, self._until_close, rest)
            return
        self._head = buf
        if len(buf) > MAX_RESPONSE_HEAD:
            self._fail(UpstreamFailure(f"runtime {self.pool.name} sent a response head over 64 KiB"))

    def _within_length(self, head: bytes, status: int, rest: bytes) -> bytes:
        """The body of a response that ended in this read, without any bytes after it: those
        are not the client's, and the connection is not used again."""
        length = 0 if self._no_body or status in (204, 304) else _content_length(head)
        if length is not None and len(rest) > length:
            self._keep_alive = False
            return rest[:length]
        return rest

    def _chunked_part(self, data: bytes) -> bytes:
        """`data` up to the end of the chunked body when it ends in it: bytes after the last
        chunk are not the client's (llhttp reports the end, not where it is), and the
        connection is not used again."""
        end = self._chunks.feed(data)
        if end < 0:
            if self._done:  # llhttp saw an end the scan did not: keep the bytes, not the connection
                self._keep_alive = False
            return data
        if end < len(data):
            self._keep_alive = False
            return data[:end]
        return data

    def _learn(self, head: bytes) -> None:
        """Keep a 200 head llhttp read, if later ones equal to it can be framed by its length."""
        length = _content_length(head)
        if (length is not None and self._keep_alive and not self._no_body
                and not self._until_close):
            self.known_head, self.known_length = head, length
        else:
            self.known_head = b""

    def _known_body(self, sink: ResponseSink, data: bytes) -> None:
        left = self._body_left
        if len(data) > left:  # more than the length said: the rest cannot be trusted
            self._keep_alive = False
            data = data[:left]
        self._body_left = left - len(data)
        sink.response_body(data)
        if not self._body_left and self.sink is sink:
            self._complete(self._keep_alive)

    def _complete(self, reusable: bool) -> None:
        sink, self.sink = self.sink, None
        if self._no_body:
            self._parser = httptools.HttpResponseParser(self)  # llhttp still expects the body
        self._reset()
        if reusable:
            if self.paused:  # the last bytes came in the read that filled the client's side
                self.resume()
            self.pool.release(self)
        else:
            self.close()
        sink.response_complete(reusable)

    def _fail(self, err: ProxyError) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.upstream_failed(err, not self._in_head)

    def connection_lost(self, exc) -> None:
        self._uncount()
        self.pool.forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._until_close and not self._in_head:
            sink.response_complete(False)
            return
        sink.upstream_failed(UpstreamFailure(
            f"runtime {self.pool.name} closed the connection before the response was complete"),
            not self._in_head)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(False)


class _ChunkScan:
    """Follows a chunked body llhttp has parsed, to tell where it ends in a read. It trusts
    the framing (llhttp checks it) and only counts: size lines, data and its CRLF, trailers."""

    __slots__ = ("_left", "_trailers", "_line")

    def __init__(self):
        self._left = 0  # of a chunk's data and the CRLF after it
        self._trailers = False  # past the last chunk: header lines until an empty one
        self._line = b""  # a size or trailer line split over reads

    def feed(self, data: bytes) -> int:
        """The offset in `data` just past the body's end, or -1 when it does not end in it."""
        at, size = 0, len(data)
        while at < size:
            if self._left:
                step = min(self._left, size - at)
                self._left -= step
                at += step
                continue
            nl = data.find(b"\n", at)
            if nl < 0:
                self._line = (self._line + data[at:])[-MAX_RESPONSE_HEAD:]
                return -1
            line, self._line = self._line + data[at:nl], b""
            at = nl + 1
            if self._trailers:
                if line in (b"", b"\r"):
                    return at
            else:
                try:
                    length = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return -1  # not framing llhttp took: leave the cut to it
                if length:
                    self._left = length + 2
                else:
                    self._trailers = True
        return -1


def _content_length(head: bytes) -> int | None:
    """The body length a response head gives, when one Content-Length frames it alone."""
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) != 1 or b"transfer-encoding" in head.lower():
        return None
    return int(lengths[0])


def _no_framing(head: bytes) -> bool:
    lower = head.lower()
    return b"\r\ncontent-length:" not in lower and b"\r\ntransfer-encoding:" not in lower


class HttpPool:
    """Idle keep-alive connections to one endpoint, newest first out. One idle for
    `idle_timeout` is closed rather than reused: a runtime closes its own idle connections
    after its keep-alive timeout, and a request sent as that close is on its way fails."""

    def __init__(self, name: str, host: str, port: int, connect_timeout: float, max_idle: int,
                 idle_timeout: float):
        self.name = name
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[UpstreamConnection] = []  # oldest first
        self.connecting = 0
        self.open = 0
        self.closed = False

    def acquire(self) -> UpstreamConnection | None:
        """The newest idle connection, unless it has been idle `idle_timeout`; then every one
        has, and they are closed."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport.is_closing():
                continue
            now = time.monotonic()
            if now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
            self.sweep(now)  # the older ones
        return None

    def sweep(self, now: float) -> None:
        """Close the connections idle for `idle_timeout` by `now` (a time.monotonic() reading)."""
        idle, stale = self.idle, 0
        while stale < len(idle) and now - idle[stale].idle_since >= self.idle_timeout:
            idle[stale].close()
            stale += 1
        del idle[:stale]

    def connect(self, sink: ResponseSink) -> None:
        """Open a new connection for `sink`; it hears upstream_ready or upstream_failed."""
        asyncio.get_running_loop().create_task(self._connect(sink))

    async def _connect(self, sink: ResponseSink) -> None:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout)
        except asyncio.TimeoutError:
            sink.upstream_failed(UpstreamTimeout(
                f"connect to runtime {self.name} ({self.host}:{self.port}) timed out",
                kind="connect-failure"), False)
        except OSError as e:
            sink.upstream_failed(UpstreamFailure(
                f"cannot connect to runtime {self.name} ({self.host}:{self.port}): "
                f"{e.strerror or e}", kind="connect-failure"), False)
        else:
            if conn.transport.is_closing():
                # Lost in the loop turns between the handshake and this task resuming (a runtime
                # killed or resetting as it accepts): connection_lost found no sink to tell.
                sink.upstream_failed(UpstreamFailure(
                    f"runtime {self.name} ({self.host}:{self.port}) closed the connection as "
                    f"soon as it was opened"), False)
            else:
                sink.upstream_ready(conn)
        finally:
            self.connecting -= 1

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= self.max_idle or conn.transport.is_closing():
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()
