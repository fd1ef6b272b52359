"""Retry decisions with Envoy's retry_policy semantics, jittered backoff and a retry budget (pure)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from meshproxy._proto.meshproxy.v1 import resources_pb2

Random = Callable[[], float]

# What each failure kind is called in retry_on.
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
REFUSED_STREAM = "refused-stream"
_GATEWAY_CODES = frozenset((502, 503, 504))
GRPC_CONDITIONS = {"UNAVAILABLE": "unavailable", "RESOURCE_EXHAUSTED": "resource-exhausted",
                   "CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline-exceeded",
                   "INTERNAL": "internal"}
KNOWN_CONDITIONS = frozenset({CONNECT_FAILURE, RESET, REFUSED_STREAM, "5xx", "gateway-error",
                              "retriable-status-codes", *GRPC_CONDITIONS.values()})
# Istio's default for a route without a policy.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset(DEFAULT_RETRY_ON.split(","))
    num_retries: int = 2
    per_try_timeout: float | None = None
    retriable_status_codes: frozenset[int] = frozenset({503})
    base_interval: float = 0.025
    max_interval: float = 0.25
    budget_percent: float = 20.0
    min_retry_concurrency: int = 3
    max_buffered_body_bytes: int = 1 << 20

    def on_failure(self, kind: str) -> str | None:
        """The reason to retry a try that failed before a response (connect-failure, reset, ...)."""
        if kind in self.retry_on:
            return kind
        if kind == RESET and "5xx" in self.retry_on:
            return RESET  # Envoy's 5xx includes resets and connect failures
        if kind == CONNECT_FAILURE and ("5xx" in self.retry_on or "gateway-error" in self.retry_on):
            return kind
        return None

    def on_status(self, status: int) -> str | None:
        """The reason to retry a response with this HTTP status, or None."""
        if status >= 500 and "5xx" in self.retry_on:
            return "5xx"
        if status in _GATEWAY_CODES and "gateway-error" in self.retry_on:
            return "gateway-error"
        if status in self.retriable_status_codes and "retriable-status-codes" in self.retry_on:
            return f"status-{status}"
        return None

    def on_grpc_status(self, code: str) -> str | None:
        """The reason to retry a gRPC call that ended with `code` (e.g. "UNAVAILABLE"), or None."""
        condition = GRPC_CONDITIONS.get(code)
        return condition if condition in self.retry_on else None

    def backoff(self, retry: int, rnd: Random) -> float:
        """Seconds to wait before retry number `retry` (1-based): full jitter, capped."""
        return rnd() * min(self.max_interval, self.base_interval * (2 ** (retry - 1)))


class RetryBudget:
    """Retries in flight may be at most budget_percent of requests in flight (or the minimum)."""

    __slots__ = ("active_requests", "active_retries")

    def __init__(self) -> None:
        self.active_requests = 0
        self.active_retries = 0

    def allows(self, policy: RetryPolicy) -> bool:
        limit = max(policy.min_retry_concurrency,
                    self.active_requests * policy.budget_percent / 100.0)
        return self.active_retries < limit


def from_proto(msg: resources_pb2.RetryPolicy | None, where: str = "retry_policy") -> RetryPolicy:
    """A RetryPolicy from its proto; ValueError names the bad field."""
    if msg is None:
        return RetryPolicy()
    base = RetryPolicy()
    conditions = frozenset(c.strip() for c in msg.retry_on.split(",") if c.strip()) \
        if msg.retry_on else base.retry_on
    unknown = conditions - KNOWN_CONDITIONS
    if unknown:
        raise ValueError(f"{where}.retry_on: unknown condition {sorted(unknown)[0]!r}; known: "
                         f"{', '.join(sorted(KNOWN_CONDITIONS))}")
    interval = (msg.backoff.base_interval.ToNanoseconds() / 1e9
                if msg.backoff.HasField("base_interval") else base.base_interval)
    max_interval = (msg.backoff.max_interval.ToNanoseconds() / 1e9
                    if msg.backoff.HasField("max_interval") else interval * 10)
    if interval <= 0 or max_interval < interval:
        raise ValueError(f"{where}.backoff: need 0 < base_interval <= max_interval")
    per_try = msg.per_try_timeout.ToNanoseconds() / 1e9 if msg.HasField("per_try_timeout") else None
    if per_try is not None and per_try <= 0:
        raise ValueError(f"{where}.per_try_timeout: must be positive")
    return RetryPolicy(
        retry_on=conditions,
        num_retries=msg.num_retries.value if msg.HasField("num_retries") else base.num_retries,
        per_try_timeout=per_try,
        retriable_status_codes=(frozenset(msg.retriable_status_codes)
                                or base.retriable_status_codes),
        base_interval=interval,
        max_interval=max_interval,
        budget_percent=(msg.budget.budget_percent.value
                        if msg.budget.HasField("budget_percent") else base.budget_percent),
        min_retry_concurrency=(msg.budget.min_retry_concurrency.value
                               if msg.budget.HasField("min_retry_concurrency")
                               else base.min_retry_concurrency),
        max_buffered_body_bytes=(msg.max_buffered_body_bytes.value
                                 if msg.HasField("max_buffered_body_bytes")
                                 else base.max_buffered_body_bytes),
    )
