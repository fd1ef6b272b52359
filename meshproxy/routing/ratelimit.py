"""A local token bucket per model (pure: the caller passes the time)."""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = float(max(1, burst))
        self.tokens = self.burst
        self.stamp: float | None = None

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one will be there (for Retry-After)."""
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate
