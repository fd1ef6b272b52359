"""Mirroring: a copy of a request sent to a shadow target, fire and forget.

The copy leaves once the whole request is read (from the replay buffer), goes
to an endpoint of the mirror target with `-shadow` added to its Host (as Envoy
does, so the shadow side can tell copies apart), and its answer is read and
thrown away. A request answered with an error before its body was all read is
not copied (its body was not kept).
It never delays or changes the primary response; copies in flight are capped
per route and each outcome is counted. A copy that does not finish within the
route timeout is dropped.
"""

from __future__ import annotations

import asyncio

from meshproxy.errors import ProxyError


def send(ex, ctx) -> None:
    """Send `ex`'s mirror copy if it has one and its body was kept whole."""
    m, head = ex.mirror
    ex.mirror = None
    if ex.replay is None:
        ctx.metrics.record_mirror(ex.model, "body_too_large")
        return
    if ex.discard:  # answered before the body was all read (an error): the rest was dropped
        ctx.metrics.record_mirror(ex.model, "primary_failed")
        return
    target = m.target
    endpoint = target.balancer.pick(ctx.rnd) if target.balancer is not None else None
    if endpoint is None:
        ctx.metrics.record_mirror(ex.model, "no_endpoint")
        return
    Shadow(m, ex.model, endpoint, ctx, b"".join([head, *ex.replay[1:]]), target.timeout,
           ex.method == b"HEAD")


class Shadow:
    """ResponseSink for a mirrored copy: counts the outcome, keeps nothing."""

    __slots__ = ("mirror", "model", "endpoint", "ctx", "data", "status", "timer", "conn", "done",
                 "no_body")

    def __init__(self, m, model: str, endpoint, ctx, data: bytes, timeout: float,
                 no_body: bool = False):
        self.mirror, self.model, self.endpoint, self.ctx, self.data = m, model, endpoint, ctx, data
        self.no_body = no_body  # a HEAD: its answer has a head only
        self.status = 0
        self.conn = None
        self.done = False
        m.inflight += 1
        endpoint.active += 1
        self.timer = asyncio.get_running_loop().call_later(timeout, self._expire)
        conn = endpoint.pool.acquire()
        if conn is not None:
            self.upstream_ready(conn)
        else:
            endpoint.pool.connect(self)

    def _finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        self.timer.cancel()
        self.mirror.inflight -= 1
        self.endpoint.active -= 1
        self.ctx.metrics.record_mirror(self.model, outcome)

    def _expire(self) -> None:
        if self.conn is not None:
            self.conn.abort()
        self._finish("timeout")

    def upstream_ready(self, conn) -> None:
        if self.done:
            conn.pool.release(conn)
            return
        self.conn = conn
        conn.start(self, self.data, self.no_body)

    def response_head(self, head: bytes, status: int, until_close: bool, rest: bytes) -> None:
        self.status = status

    def response_body(self, data: bytes) -> None:
        pass

    def response_complete(self, reusable: bool) -> None:
        self.conn = None
        self._finish("ok" if self.status < 500 else "error")

    def upstream_failed(self, err: ProxyError, response_started: bool) -> None:
        self.conn = None
        self._finish("failed")

    def upstream_paused(self, paused: bool) -> None:
        pass
