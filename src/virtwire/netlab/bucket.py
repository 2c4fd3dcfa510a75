"""Token buckets and rate limiters with Firecracker's semantics.

Theory of operation
-------------------
A ``TokenBucket`` holds up to ``size`` tokens and refills linearly, ``size`` tokens per
``refill_ms`` milliseconds (so ``size / refill_ms`` is the sustained rate); it starts full.
``burst`` is a one-time extra budget spent before the regular tokens and never refilled
(Firecracker's ``one_time_burst``). A bucket with ``size == 0`` is unlimited.

Taking ``n`` tokens needs ``min(n, size)`` of them to be available: a frame larger than the
whole bucket (a 64 KiB TSO frame against a small bucket) is let through when the bucket is
full and leaves it in debt, which the refill pays back before anything else passes (Firecracker's
"over-consumption"), so the long-run rate holds for any frame size.

A ``RateLimiter`` is a bandwidth bucket (bytes) and an ops bucket (frames): a frame passes only
when both have room, and then takes from both. ``wait(nbytes)`` says how long until it would
pass: the caller arms a timer for that long instead of polling. The clock is injected so tests
run on a fake one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TokenBucket", "RateLimiter", "BucketSpec"]


@dataclass(frozen=True)
class BucketSpec:
    """One bucket's parameters: ``size`` tokens per ``refill_ms`` ms, ``burst`` once."""

    size: int = 0
    refill_ms: float = 1000.0
    burst: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0


class TokenBucket:
    """See module docstring. ``now`` is the clock reading the bucket starts at."""

    def __init__(self, spec: BucketSpec, now: float) -> None:
        if spec.size < 0 or spec.burst < 0 or (spec.size and spec.refill_ms <= 0):
            raise ValueError(f"bad token bucket {spec}")
        self.spec = spec
        self.budget = float(spec.size)
        self.burst_left = spec.burst
        self.last = now

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.spec.size * 1000.0 / self.spec.refill_ms

    def refill(self, now: float) -> None:
        if now > self.last:
            self.budget = min(float(self.spec.size),
                              self.budget + (now - self.last) * self.rate)
        self.last = max(self.last, now)

    def can_take(self, n: int, now: float) -> bool:
        if not self.spec.size or n <= self.burst_left:
            return True
        self.refill(now)
        return self.budget + self.burst_left >= min(n, self.spec.size) - 1e-9

    def take(self, n: int, now: float) -> None:
        """Take ``n`` tokens (the caller checked ``can_take``): burst first, then budget."""
        if not self.spec.size:
            return
        self.refill(now)
        from_burst = min(n, self.burst_left)
        self.burst_left -= from_burst
        self.budget -= n - from_burst

    def wait(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens can be taken (0 when they can now)."""
        if self.can_take(n, now):
            return 0.0
        need = min(n, self.spec.size) - self.burst_left - self.budget
        return max(need, 0.0) / self.rate + 1e-6  # never short: the caller's timer re-checks

    def state(self) -> dict[str, int]:
        return {"tokens": int(self.budget), "burst_left": self.burst_left}


class RateLimiter:
    """A bandwidth bucket and an ops bucket (either may be unlimited)."""

    def __init__(self, bandwidth: BucketSpec, ops: BucketSpec,
                 clock: Callable[[], float]) -> None:
        now = clock()
        self.clock = clock
        self.bw = TokenBucket(bandwidth, now)
        self.ops = TokenBucket(ops, now)
        self.throttled = 0  # times a frame had to wait
        self.passed_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.bw.spec.enabled or self.ops.spec.enabled

    def admit(self, nbytes: int) -> bool:
        """Take the tokens for one frame of ``nbytes`` if both buckets have them."""
        now = self.clock()
        if not (self.bw.can_take(nbytes, now) and self.ops.can_take(1, now)):
            self.throttled += 1
            return False
        self.bw.take(nbytes, now)
        self.ops.take(1, now)
        self.passed_bytes += nbytes
        return True

    def allows(self, nbytes: int) -> bool:
        """Whether a frame of ``nbytes`` would pass now (nothing taken)."""
        now = self.clock()
        return self.bw.can_take(nbytes, now) and self.ops.can_take(1, now)

    def wait(self, nbytes: int) -> float:
        now = self.clock()
        return max(self.bw.wait(nbytes, now), self.ops.wait(1, now))

    def state(self) -> dict[str, int]:
        b, o = self.bw.state(), self.ops.state()
        return {"bw_tokens": b["tokens"], "bw_burst_left": b["burst_left"],
                "ops_tokens": o["tokens"], "ops_burst_left": o["burst_left"],
                "throttled": self.throttled}
