"""Token buckets and the rate limiter: Firecracker's arithmetic on a fake clock."""

from __future__ import annotations

import pytest

from virtwire.netlab.bucket import BucketSpec, RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_starts_full_and_refills_linearly() -> None:
    b = TokenBucket(BucketSpec(size=1000, refill_ms=100), now=0.0)
    assert b.rate == 10_000
    assert b.can_take(1000, 0.0)
    b.take(1000, 0.0)
    assert not b.can_take(1, 0.0)
    assert b.wait(500, 0.0) == pytest.approx(0.05, abs=1e-5)
    assert not b.can_take(500, 0.049)
    assert b.can_take(500, 0.0501)
    b.refill(10.0)
    assert b.budget == 1000  # never above size


def test_one_time_burst_is_spent_first_and_never_refills() -> None:
    b = TokenBucket(BucketSpec(size=100, refill_ms=1000, burst=250), now=0.0)
    b.take(200, 0.0)
    assert (b.burst_left, b.budget) == (50, 100)
    b.take(120, 0.0)
    assert (b.burst_left, b.budget) == (0, 30)
    b.refill(100.0)
    assert (b.burst_left, b.budget) == (0, 100)


def test_frame_larger_than_bucket_passes_when_full_and_leaves_debt() -> None:
    b = TokenBucket(BucketSpec(size=1000, refill_ms=1000), now=0.0)
    assert b.can_take(65536, 0.0)
    b.take(65536, 0.0)
    assert b.budget == 1000 - 65536
    # the debt is paid back at 1000 tokens/s before the next frame of any size passes
    assert b.wait(1, 0.0) == pytest.approx(64.537, abs=1e-3)
    assert not b.can_take(1, 60.0)
    assert b.can_take(1, 64.6)


def test_zero_size_is_unlimited() -> None:
    b = TokenBucket(BucketSpec(), now=0.0)
    assert b.can_take(10**12, 0.0) and b.wait(10**12, 0.0) == 0
    with pytest.raises(ValueError):
        TokenBucket(BucketSpec(size=10, refill_ms=0), now=0.0)


def test_limiter_needs_both_buckets_and_counts_throttling() -> None:
    clk = Clock()
    lim = RateLimiter(BucketSpec(size=3000, refill_ms=1000), BucketSpec(size=2, refill_ms=1000),
                      clk)
    assert lim.admit(1000) and lim.admit(1000)
    assert not lim.admit(100)  # ops bucket empty, bandwidth still has 1000
    assert lim.throttled == 1
    assert lim.wait(100) == pytest.approx(0.5, abs=1e-5)  # one op refills in 0.5 s
    clk.t += 0.5
    assert lim.admit(100)
    st = lim.state()
    assert st["ops_tokens"] == 0 and st["bw_tokens"] == 2400  # 1000 + 0.5 s * 3000/s - 100
    assert set(st) == {"bw_tokens", "bw_burst_left", "ops_tokens", "ops_burst_left",
                       "throttled"}


def test_limiter_long_run_rate_matches_spec() -> None:
    """Offer 1500-byte frames as fast as admitted for 10 simulated seconds: 10 Mbit/s out."""
    clk = Clock()
    lim = RateLimiter(BucketSpec(size=125_000, refill_ms=100), BucketSpec(), clk)
    start, sent = clk.t, 0
    while clk.t < start + 10.0:
        if lim.admit(1500):
            sent += 1500
        else:
            clk.t += lim.wait(1500)
    bits = sent * 8 / 10.0
    # exact up to the initial full bucket (125 kB over 10 s = 0.1 Mbit/s) and one frame
    assert 10e6 <= bits <= 10e6 + 125_000 * 8 / 10 + 1500 * 8
