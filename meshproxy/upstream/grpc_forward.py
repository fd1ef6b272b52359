"""gRPC forwarding: a routed call's tries on the runtimes' channels, retries, and the relay back.

How it works: `unary` picks an endpoint (least-request, circuit-breaker limits as on REST),
sends the bytes on that runtime's channel with the deadline left (the client's, capped by the
route timeout and the per-try timeout) and relays the answer: the runtime's initial metadata
plus x-meshproxy-upstream, the message, and trailers. A try that ended without an answer the
client may see yet (for a unary call: any try) is tried again when the route's retry policy
names its status (UNAVAILABLE, RESOURCE_EXHAUSTED, ...) or a connect failure, the retry budget
allows it and the deadline leaves room for the backoff; the next try goes to another runtime
when there is one. Otherwise the runtime's own status, details and trailers go back as they
came, except that a runtime never reached (a connect failure) or a route deadline that ran out
become the proxy's own errors naming the model. `stream` pins a ModelStreamInfer stream to one
runtime, connected before the call starts, so a runtime that cannot be reached is retried on
another (connect-failure) before any message is taken from the client; then it relays both
ways. Every try reports to outlier detection with the HTTP status Envoy maps the gRPC one to.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from meshproxy.errors import (NoHealthyUpstream, Overloaded, ProxyError, UpstreamFailure,
                              UpstreamTimeout)
from meshproxy.routing.split import unit_hash
from meshproxy.upstream.grpc_pool import connected
from meshproxy.upstream.retry import CONNECT_FAILURE

UPSTREAM_KEY = "x-meshproxy-upstream"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
# gRPC status -> the HTTP status outlier detection is told (Envoy's grpcToHttpStatus). Only
# the 5xx ones count as failures; the others (load shedding's RESOURCE_EXHAUSTED is a 429)
# are answers, and reset the runtime's run of failures as an OK does.
_AS_HTTP = {"CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
            "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
            "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409,
            "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 404, "INTERNAL": 500, "UNAVAILABLE": 503,
            "DATA_LOSS": 500, "UNAUTHENTICATED": 401}
_OK = grpc.StatusCode.OK
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
# How grpc core words an UNAVAILABLE for a call it could not send (no connection to pick), and
# how _channel_closed does. Any other UNAVAILABLE came from the runtime, or from a connection
# that broke after the call went out: the runtime may have acted on it.
_NOT_SENT = ("failed to connect to all addresses", "DNS resolution failed", "empty address list",
             "the channel to runtime ")


def never_reached(err: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call never reached its runtime (a connect failure)."""
    return err.code() is _UNAVAILABLE and (err.details() or "").startswith(_NOT_SENT)


class StreamOutcome:
    """How a relayed stream ended (its gRPC status name) and the message bytes each way, for
    the listener's metrics and access log."""

    __slots__ = ("code", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.code = "OK"
        self.bytes_in = self.bytes_out = 0


class GrpcForwarder:
    """Sends routed calls upstream; `ctx` is the listener's GrpcContext."""

    def __init__(self, ctx):
        self.ctx = ctx

    def pick(self, balancer, model: str, target, key, exclude=None):
        """An endpoint with a channel and room for one more call, or the ProxyError why not."""
        ctx = self.ctx
        endpoint = (balancer.pick(ctx.rnd, exclude, key) if exclude is not None else None) \
            or balancer.pick(ctx.rnd, None, key)
        if endpoint is None:
            raise NoHealthyUpstream(f"model {target.model!r} has no healthy runtime", model)
        if endpoint.active >= endpoint.limits.max_requests:
            other = balancer.pick(ctx.rnd, endpoint, key)
            if other is None or other.active >= other.limits.max_requests:
                ctx.metrics.record_overflow(endpoint.name, "requests")
                raise Overloaded(f"model {model!r}: every runtime holding it is at its "
                                 f"request limit", model)
            endpoint = other
        return endpoint

    def channel(self, snapshot, endpoint, target, model: str):
        channel = self.ctx.channels.get(snapshot, endpoint)
        if channel is None:
            raise NoHealthyUpstream(f"model {target.model!r}: runtime {endpoint.name} has no "
                                    f"gRPC address in the table in force", model)
        return channel

    @staticmethod
    def hash_key(req, target) -> float | None:
        route = target.route
        if route is None or not route.hash_header:
            return None
        value = req.header_of(route.hash_header)
        return unit_hash(value) if value is not None else None

    # -- unary
    async def unary(self, method: str, req, snapshot, target, balancer, context):
        """Forward one unary call with retries; (response or None, status name). The runtime
        of the last try and the retries made are left in req.endpoint and req.tries."""
        ctx = self.ctx
        message = req.upstream_message(target)
        metadata = req.forwarded_metadata(target)
        key = self.hash_key(req, target)
        policy, budget = target.retry, target.budget
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + (target.timeout if remaining is None
                                  else min(remaining, target.timeout))
        retries = _Retries(budget)
        endpoint = reason = None
        tries = 0
        try:
            while True:
                current = ctx.snapshot()
                if tries and current is not snapshot:
                    snapshot, balancer = current, self._holders_now(current, req, target,
                                                                     balancer)
                endpoint = self.pick(balancer, req.model, target, key, endpoint)
                # The channel from the table in force now, not the one the call began under:
                # a retry after an update must not bring back a channel the update closed.
                channel = self.channel(current, endpoint, target, req.model)
                req.endpoint, req.tries = endpoint, tries
                now = loop.time()
                try_deadline = deadline if policy.per_try_timeout is None else min(
                    deadline, now + policy.per_try_timeout)
                call, response, err = await self._try(
                    channel.unary(method), message, metadata, try_deadline - now, endpoint, req,
                    target, tries, reason)
                if err is None:
                    await self._relay_ok(context, call, endpoint)
                    return response, "OK"
                now = loop.time()
                try_expired = (err.code() is _DEADLINE and try_deadline < deadline
                               and now >= try_deadline - 0.001)
                if try_expired:
                    ctx.metrics.record_attempt_timeout(endpoint.name)
                reason = "per-try-timeout" if try_expired else self._retry_reason(
                    err, policy, deadline - now)
                pause = policy.backoff(tries + 1, ctx.rnd)
                if pause >= deadline - now or not self._may_retry(
                        reason, tries, retries.retrying, policy, budget, req.model):
                    if try_expired:
                        raise UpstreamTimeout(f"model {req.model!r}: runtime {endpoint.name} did "
                                              f"not answer within the per-try timeout", req.model)
                    code = await self.relay_error(context, err, req.model, endpoint,
                                                  deadline - now)
                    return None, code
                tries += 1
                retries.count(ctx.metrics, req.model, reason)
                await asyncio.sleep(pause)
        finally:
            retries.end()

    def _holders_now(self, snapshot, req, target, balancer):
        """For a retry after a table update: the balancer over the runtimes that hold the
        call's target now (its policy, budget and message stay those it began with), or the
        old one when the new table routes the call elsewhere or not at all."""
        try:
            now_target, now_balancer = snapshot.match(req.model, req.version_name(),
                                                      self.ctx.rnd, req.header_of,
                                                      time.monotonic())
        except ProxyError:
            return balancer
        return now_balancer if now_target.model == target.model else balancer

    def _may_retry(self, reason, tries: int, retrying: bool, policy, budget, model: str) -> bool:
        if reason is None or tries >= policy.num_retries:
            return False
        if not retrying and not budget.allows(policy):
            self.ctx.metrics.record_budget_exhausted(model)
            return False
        return True

    async def _try(self, callable_, message: bytes, metadata, timeout: float, endpoint, req,
                   target, tries: int, reason: str | None):
        """One call to one runtime: (call, answer, None), or (call, None, its AioRpcError)."""
        tracing, span = self.ctx.tracing, None
        if req.span is not None:
            span, metadata = tracing.start_try(req.span, metadata, endpoint, target.model,
                                               tries + 1, reason)
        endpoint.active += 1
        endpoint.total += 1
        call = callable_(message, timeout=max(timeout, 0.0), metadata=metadata)
        code = "CANCELLED"
        try:
            response = await call
            code = "OK"
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            self._report(endpoint, e.code())
            return call, None, e
        except asyncio.CancelledError:
            call.cancel()
            if _cancelled_here():
                raise
            err = _channel_closed(endpoint)
            code = err.code().name
            return call, None, err
        finally:
            endpoint.active -= 1
            if span is not None:
                tracing.end(span, code)
        self.ctx.outlier_success(endpoint)
        return call, response, None

    def _report(self, endpoint, code: grpc.StatusCode) -> None:
        status = 200 if code is _OK else _AS_HTTP.get(code.name, 500)
        if status >= 500:
            self.ctx.outlier_failure(endpoint, status)
        else:
            self.ctx.outlier_success(endpoint)

    @staticmethod
    def _retry_reason(err: grpc.aio.AioRpcError, policy, left: float) -> str | None:
        if left <= 0:
            return None
        if never_reached(err):
            return policy.on_failure(CONNECT_FAILURE) or policy.on_grpc_status("UNAVAILABLE")
        return policy.on_grpc_status(err.code().name)

    async def _send_initial(self, context, initial, endpoint) -> None:
        if self.ctx.upstream_header:
            await context.send_initial_metadata((*(initial or ()), (UPSTREAM_KEY, endpoint.name)))
        elif initial:
            await context.send_initial_metadata(tuple(initial))

    async def _relay_ok(self, context, call, endpoint) -> None:
        """Pass on the runtime's initial metadata and trailers (the answer is returned)."""
        await self._send_initial(context, await call.initial_metadata(), endpoint)
        trailers = await call.trailing_metadata()
        if trailers:
            context.set_trailing_metadata(tuple(trailers))

    async def relay_error(self, context, err: grpc.aio.AioRpcError, model: str, endpoint,
                          left: float, initial_sent: bool = False) -> str:
        """End the call as the runtime ended it, or with the proxy's own error when there was no
        answer (connect failure, the route's deadline); returns the status name. A stream's
        initial metadata may have gone out already (`initial_sent`)."""
        code = err.code()
        initial = err.initial_metadata()
        if never_reached(err):
            raise UpstreamFailure(f"model {model!r}: runtime {endpoint.name} is unavailable: "
                                  f"{err.details()}", model)
        if code is _DEADLINE and left <= 0.001:
            raise UpstreamTimeout(f"model {model!r}: runtime {endpoint.name} did not answer "
                                  f"in time", model)
        if not initial_sent:
            await self._send_initial(context, initial, endpoint)
        trailers = err.trailing_metadata()
        if trailers:
            context.set_trailing_metadata(tuple(trailers))
        context.set_code(code)
        context.set_details(err.details() or "")
        return code.name

    # -- the stream
    async def stream(self, req, first, requests, snapshot, target, balancer, context,
                     outcome: StreamOutcome):
        """Relay a ModelStreamInfer stream on one runtime; yields the runtime's messages."""
        endpoint, channel = await self._connect_stream(req, snapshot, target, balancer, context)
        pump = StreamPump(req, target, first, requests, outcome)
        metadata, span = req.forwarded_metadata(target), None
        if req.span is not None:
            span, metadata = self.ctx.tracing.start_try(req.span, metadata, endpoint,
                                                        target.model, req.tries + 1, None)
        endpoint.active += 1
        endpoint.total += 1
        call = channel.stream(STREAM_METHOD)(pump.messages(), timeout=context.time_remaining(),
                                             metadata=metadata)
        initial_sent = False
        try:
            initial = await call.initial_metadata()
            await self._send_initial(context, initial, endpoint)
            initial_sent = True
            async for response in call:
                outcome.bytes_out += len(response)
                yield response
            if pump.error is not None:
                raise pump.error
            code = await call.code()
            self._report(endpoint, code)
            trailers = await call.trailing_metadata()
            if trailers:
                context.set_trailing_metadata(tuple(trailers))
            if code is not _OK:
                context.set_code(code)
                context.set_details(await call.details() or "")
            outcome.code = code.name
        except grpc.aio.AioRpcError as e:
            if pump.error is not None:
                raise pump.error from None
            self._report(endpoint, e.code())
            outcome.code = await self.relay_error(context, e, req.model, endpoint, 1.0,
                                                  initial_sent)
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            outcome.code = await self.relay_error(context, _channel_closed(endpoint), req.model,
                                                  endpoint, 1.0, initial_sent)
        finally:
            endpoint.active -= 1
            if not call.done():
                call.cancel()
            if span is not None:
                self.ctx.tracing.end(span, outcome.code)

    async def _connect_stream(self, req, snapshot, target, balancer, context):
        """A runtime for the stream whose channel is connected: one that cannot be reached is
        an outlier failure and, as the route's policy allows, the next try goes to another."""
        ctx, policy, budget = self.ctx, target.retry, target.budget
        key = self.hash_key(req, target)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = loop.time() + (ctx.channels.connect_timeout if remaining is None
                                  else min(remaining, ctx.channels.connect_timeout))
        endpoint, tries, retries = None, 0, _Retries(budget)
        try:
            while True:
                endpoint = self.pick(balancer, req.model, target, key, endpoint)
                channel = self.channel(snapshot, endpoint, target, req.model)
                req.endpoint, req.tries = endpoint, tries
                try:
                    await connected(channel.channel, max(deadline - loop.time(), 0.0))
                    return endpoint, channel
                except (ConnectionError, TimeoutError):
                    ctx.outlier_failure(endpoint, 503)
                reason = policy.on_failure(CONNECT_FAILURE)
                pause = policy.backoff(tries + 1, ctx.rnd)
                if pause >= deadline - loop.time() or not self._may_retry(
                        reason, tries, retries.retrying, policy, budget, req.model):
                    raise UpstreamFailure(f"model {req.model!r}: runtime {endpoint.name} is "
                                          f"unavailable: cannot connect", req.model)
                tries += 1
                retries.count(ctx.metrics, req.model, reason)
                await asyncio.sleep(pause)
        finally:
            retries.end()


class _Retries:
    """One call's place in its route's retry budget: a request in flight until `end`, and a
    retry in flight from its first retry on."""

    __slots__ = ("budget", "retrying")

    def __init__(self, budget):
        self.budget = budget
        self.retrying = False
        budget.active_requests += 1

    def count(self, metrics, model: str, reason: str) -> None:
        metrics.record_retry(model, reason)
        if not self.retrying:
            self.retrying = True
            self.budget.active_retries += 1

    def end(self) -> None:
        self.budget.active_requests -= 1
        if self.retrying:
            self.budget.active_retries -= 1


def _cancelled_here() -> bool:
    """Whether the CancelledError being handled is this call's own (the client cancelled, or
    the server is stopping), rather than grpc cancelling the upstream call under it, which it
    does when the call's channel is closed (its runtime left the table or moved)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _channel_closed(endpoint) -> grpc.aio.AioRpcError:
    """The error a call whose channel was closed under it ends with: UNAVAILABLE with no
    response metadata, so it is retried like a runtime never reached, or answered as one."""
    return grpc.aio.AioRpcError(
        _UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details=f"the channel to runtime {endpoint.name} was closed (it left the table or moved)")


class StreamPump:
    """The client's messages on their way to the runtime: each must name the stream's model
    (or none); a split's target is written in. A message naming another model, or not valid
    protobuf, half-closes the upstream stream and is kept in `error`: the client gets the
    answers to the messages before it, then INVALID_ARGUMENT."""

    def __init__(self, req, target, first: bytes | None, requests, outcome: StreamOutcome):
        self.req = req
        self.target = target
        self.first = first
        self.requests = requests
        self.outcome = outcome
        self.error: ProxyError | None = None

    async def messages(self):
        try:
            if self.first is not None:
                self.outcome.bytes_in += len(self.first)
                yield self.req.for_message(self.first).upstream_message(self.target)
                self.first = None
            async for message in self.requests:
                self.outcome.bytes_in += len(message)
                yield self.req.for_message(message).upstream_message(self.target)
        except ProxyError as err:
            self.error = err  # ends the request stream here; grpc half-closes the call
