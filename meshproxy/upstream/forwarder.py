"""Exchange: one request's tries against the runtimes, retries, and the relay of the answer.

How it works: the listener routes a request head and hands the Exchange a
target, a balancer and the upstream head bytes. Each try takes an endpoint
(another one on a retry when there is one), a pooled connection, and sends
the head and the body so far. The body is kept for replay while it fits the
policy's buffer. A try that fails before any response byte reached the client
(connect failure, reset, a retriable status, a per-try timeout) is retried
after a jittered backoff if the policy, the try count and the retry budget
allow; otherwise it ends as a ProxyError. Once the response head is relayed
the exchange is committed: a failure after that aborts the client connection.
"""

from __future__ import annotations

import asyncio
import time

from meshproxy.errors import (NoHealthyUpstream, Overloaded, ProxyError, RetryBufferExceeded,
                              UpstreamTimeout)
from meshproxy.telemetry import metrics

NEVER = float("inf")  # a deadline that does not come


class Exchange:
    """One request/response on a client connection; the upstream connection reports to it."""

    __slots__ = ("conn", "url", "headers", "method", "head_done", "request_done", "keep_alive",
                 "model", "endpoint", "upstream", "outbox", "outbox_size", "chunked", "started",
                 "response_done", "status", "t0", "body_bytes", "discard", "close_after",
                 "routed", "target", "balancer", "key", "replay", "replay_size", "tries",
                 "in_try", "swallow", "retrying", "deadline", "try_deadline", "mirror",
                 "t_try", "t_sent", "overhead", "bytes_out", "span", "try_span", "base_head",
                 "retry_reason", "known", "logged")

    def __init__(self, conn):
        self.conn = conn  # ingress.http.HttpConnection
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.head_done = self.request_done = self.started = self.response_done = False
        self.chunked = self.discard = self.close_after = self.routed = self.logged = False
        self.in_try = self.swallow = self.retrying = False
        self.keep_alive = True
        self.model = ""
        self.endpoint = self.upstream = self.target = self.balancer = self.key = None
        self.replay: list[bytes] | None = None
        self.outbox: list[bytes] = []
        self.outbox_size = self.replay_size = self.status = self.body_bytes = self.tries = 0
        self.deadline = self.try_deadline = NEVER
        # known: the ingress SeenHead when the head was read without llhttp
        self.mirror = self.span = self.try_span = self.base_head = self.retry_reason = \
            self.known = None
        self.t0 = time.perf_counter()
        self.t_try = self.t_sent = self.overhead = 0.0
        self.bytes_out = 0

    def header(self, name: str) -> bytes | None:
        """The value of request header `name` (lower case), for header rules and hashing."""
        want = name.encode()
        for n, v in self.headers:
            if len(n) == len(want) and n.lower() == want:
                return v
        return None

    # -- tries
    def first_try(self, target, balancer, endpoint, head: bytes, now: float) -> None:
        """Start the exchange: keep what replay needs, then send the first try."""
        self.target, self.balancer, self.routed = target, balancer, True
        self.outbox.append(head)  # empty till now: body read before routing comes after it
        if target.retry.num_retries > 0 or self.mirror is not None:
            self.replay = [head]
        target.budget.active_requests += 1
        self.deadline = now + target.timeout
        self.send_try(endpoint, now)

    def send_try(self, endpoint, now: float) -> None:
        limits, pool = endpoint.limits, endpoint.pool
        self.endpoint = endpoint
        self.swallow = False  # whatever an earlier try's 5xx was, this try's answer is relayed
        per_try = self.target.retry.per_try_timeout
        if per_try:
            self.try_deadline = now + per_try
            self.conn.deadline = min(self.deadline, self.try_deadline)
        else:
            self.try_deadline = NEVER
            self.conn.deadline = self.deadline
        conn = pool.acquire()
        if conn is None and (pool.open >= limits.max_connections
                             or pool.connecting >= limits.max_pending_requests):
            self.conn.ctx.metrics.record_overflow(endpoint.name, "connections")
            raise Overloaded(f"model {self.model!r}: runtime {endpoint.name} is at its "
                             f"connection limit", self.model)
        endpoint.active += 1
        endpoint.total += 1
        self.in_try = True
        if self.span is not None:  # set only when tracing is on and this request is sampled
            self.try_span, self.outbox[0] = self.conn.ctx.tracing.start_try(self, endpoint)
        self.t_try = time.perf_counter()
        if conn is not None:
            self.upstream = conn
            if not self.t_sent:
                self.t_sent = self.t_try  # written by the listener's flush, in this callback
            conn.start(self, b"", self.method == b"HEAD")
        else:
            pool.connect(self)

    def end_try(self, outcome: int | str = "cancelled") -> None:
        """The try is over: a status (int) or why it failed."""
        conn = self.conn
        if conn.upstream_full:  # that connection's full buffer no longer holds the client back
            conn.upstream_full = False
            conn.resume_client()
        if self.in_try:
            self.in_try = False
            endpoint = self.endpoint
            endpoint.active -= 1
            attempts = endpoint.attempts
            if attempts is None:
                attempts = endpoint.attempts = self.conn.ctx.metrics.stats.attempts_of(endpoint.name)
            metrics.record_attempt(attempts, outcome, time.perf_counter() - self.t_try)
            if self.try_span is not None:
                self.conn.ctx.tracing.end_try(self, str(outcome))

    def body(self, pieces: tuple[bytes, ...], size: int) -> None:
        """Body bytes (already framed for the upstream) from the client."""
        self.outbox.extend(pieces)
        if self.replay is not None:
            self.replay.extend(pieces)
            self.replay_size += size
            if self.replay_size > self.target.retry.max_buffered_body_bytes:
                self.replay = None  # too large to keep: streamed, not retried

    def can_retry(self) -> bool:
        t = self.target
        if (self.replay is None or self.tries >= t.retry.num_retries or self.response_done
                or self.conn.closed):
            return False
        if not t.budget.allows(t.retry) and not self.retrying:
            self.conn.ctx.metrics.record_budget_exhausted(self.model)
            return False
        return True

    def schedule_retry(self, reason: str) -> None:
        t = self.target
        self.tries += 1
        if not self.retrying:
            self.retrying = True
            t.budget.active_retries += 1
        ctx = self.conn.ctx
        ctx.metrics.record_retry(self.model, reason)
        self.retry_reason = reason
        self.conn.deadline = self.deadline
        asyncio.get_running_loop().call_later(t.retry.backoff(self.tries, ctx.rnd), self.retry)

    def retry(self) -> None:
        conn = self.conn
        if self.response_done or conn.closed or not conn.queue or conn.queue[0] is not self:
            return
        if self.replay is None:  # the body outgrew the replay buffer after the retry was decided
            conn.reply_error(self, RetryBufferExceeded(
                f"model {self.model!r}: the request body outgrew max_buffered_body_bytes "
                f"before the retry (the try on runtime {self.endpoint.name} failed: "
                f"{self.retry_reason}) could be sent", self.model))
            return
        ctx = conn.ctx
        endpoint = (self.balancer.pick(ctx.rnd, self.endpoint, self.key)
                    or self.balancer.pick(ctx.rnd, None, self.key))
        try:
            if endpoint is None:
                raise NoHealthyUpstream(f"model {self.target.model!r} has no healthy runtime left "
                                        f"to retry on", self.model)
            self.outbox = list(self.replay)
            self.send_try(endpoint, ctx.now)
        except ProxyError as err:
            conn.reply_error(self, err)
            return
        conn.flush()

    def finished(self) -> None:
        """Give back what the exchange held in the budget (called once, when it ends)."""
        if self.routed:
            budget = self.target.budget
            budget.active_requests -= 1
            if self.retrying:
                budget.active_retries -= 1
            self.routed = False

    def timed_out(self) -> None:
        """A timeout (per try, or the route's) ended the try in flight: a gateway failure of
        its runtime for outlier detection, as Envoy counts it, unless the try's 5xx, being
        read to its end, was counted already."""
        if self.in_try and not self.swallow and self.endpoint is not None:
            self.conn.ctx.outlier_failure(self.endpoint, 0)

    def try_timed_out(self, now: float) -> None:
        """The per-try timeout passed before the response: retry or give up with 504."""
        self.conn.ctx.metrics.record_attempt_timeout(self.endpoint.name)
        self.timed_out()
        self.abort_upstream("timeout")
        if self.can_retry():
            self.schedule_retry("per-try-timeout")
            return
        self.conn.reply_error(self, UpstreamTimeout(
            f"model {self.model!r}: runtime {self.endpoint.name} did not answer within the "
            f"per-try timeout", self.model))

    # -- ResponseSink: what the upstream connection reports
    def upstream_ready(self, upstream) -> None:
        if self.response_done or self.conn.closed or not self.in_try:
            upstream.pool.release(upstream)  # answered (timeout) while connecting
            return
        self.upstream = upstream
        if not self.t_sent:
            self.t_sent = time.perf_counter()
        data = b"".join(self.outbox)
        self.outbox.clear()
        self.outbox_size = 0
        upstream.start(self, data, self.method == b"HEAD")
        self.conn.resume_client()

    def response_head(self, head: bytes, status: int, until_close: bool, rest: bytes) -> None:
        t_in = time.perf_counter()
        ctx = self.conn.ctx
        endpoint = self.endpoint
        if status >= 500:
            ctx.outlier_failure(endpoint, status)
        elif endpoint.failures_5xx or endpoint.failures_gateway:  # a success ends a run of failures
            ctx.outlier.success(endpoint)
        if not self.request_done:  # the runtime may not have read the whole body
            self.upstream.forbid_reuse()
        self.status = status
        if status >= 500:
            reason = self.target.retry.on_status(status)
            if reason is not None and self.can_retry():
                self.swallow = reason
                return
        self.started = True
        if until_close or not self.request_done:
            # the runtime answered before the whole body arrived: say the connection closes,
            # then read and drop the rest of the body before closing (a lingering close)
            self.close_after = True
        self.conn.relay_head(self, head, rest)
        self.overhead = (self.t_sent - self.t0) + (time.perf_counter() - t_in)

    def response_body(self, data: bytes) -> None:
        if not self.swallow:
            self.bytes_out += len(data)
            self.conn.transport.write(data)

    def response_complete(self, reusable: bool) -> None:
        self.upstream = None
        self.end_try(self.status)
        if self.swallow:
            reason, self.swallow = self.swallow, False
            self.schedule_retry(reason)
            return
        self.response_done = True
        if self.request_done:
            self.conn.finish(self)
        else:  # the runtime answered before reading the whole body: read and drop the rest
            self.discard = True
            self.close_after = True

    def upstream_failed(self, err: ProxyError, response_started: bool) -> None:
        self.upstream = None
        if self.response_done or not self.in_try:
            return  # already answered here (a timeout): nothing is waiting
        self.end_try(err.kind or "error")
        if self.swallow:  # a retriable 5xx (counted already) broke off: nothing of it was relayed
            reason, self.swallow = self.swallow, False
            self.schedule_retry(reason)
            return
        self.conn.ctx.outlier_failure(self.endpoint, 0)
        if response_started or self.started:
            self.response_done = True
            self.conn.abort()  # half a response cannot be mended
            return
        reason = self.target.retry.on_failure(err.kind)
        if reason is not None and self.can_retry():
            self.schedule_retry(reason)
            return
        err.model = self.model
        err.message = f"model {self.model!r}: {err.message}"
        self.conn.reply_error(self, err)

    def upstream_paused(self, paused: bool) -> None:
        """The runtime's side is full (or has room again): hold back the client's body."""
        conn = self.conn
        conn.upstream_full = paused
        if paused:
            conn.pause_client()
        else:
            conn.resume_client()

    def abort_upstream(self, outcome: str = "cancelled") -> None:
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self.end_try(outcome)
