"""``ShapedBackend`` around the in-memory backend: back-pressure, timers, RX, run-time changes."""

from __future__ import annotations

import select
import time

from virtwire.backends.memory import MemoryBackend
from virtwire.backends.null import NullBackend
from virtwire.backends.shape import ShapedBackend
from virtwire.netlab.bucket import BucketSpec
from virtwire.netlab.impair import DirSpec


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fr(i: int, size: int = 100) -> list[memoryview]:
    return [memoryview(i.to_bytes(2, "big") * (size // 2))]


def readable(b: ShapedBackend, timeout: float = 0.0) -> bool:
    r, _, _ = select.select([b.fileno()], [], [], timeout)
    return bool(r)


def test_tx_rate_limit_takes_fewer_frames_and_wakes_on_refill() -> None:
    inner = MemoryBackend()
    clk = Clock()
    b = ShapedBackend(inner, tx=DirSpec(bandwidth=BucketSpec(size=300, refill_ms=100)),
                      clock=clk)
    assert b.send([fr(i) for i in range(5)]) == 3  # 300 bytes: three 100-byte frames
    assert len(inner.sent) == 3
    st = b.stats()
    assert st["tx.throttled"] == 1 and st["tx.bw_tokens"] == 0
    # the timer is armed for the refill of one frame (100 bytes at 3000 B/s: 33 ms)
    assert b.timer.deadline is not None and 0.03 < b.timer.deadline - clk.t < 0.04
    assert readable(b, 0.5)  # real timerfd fired: the loop would wake the device
    clk.t += 0.034
    b.drain_wakeup()
    assert not readable(b)
    assert b.send([fr(i) for i in range(3, 5)]) == 1
    assert len(inner.sent) == 4  # nothing was dropped, the rest waits on the ring


def test_tx_ops_bucket_and_refund_when_inner_refuses() -> None:
    inner = MemoryBackend(tx_limit=1)
    clk = Clock()
    b = ShapedBackend(inner, tx=DirSpec(ops=BucketSpec(size=3, refill_ms=1000)), clock=clk)
    assert b.send([fr(i) for i in range(3)]) == 1
    assert b.tx.limiter.ops.budget == 2  # the two refused frames got their tokens back


def test_tx_delay_releases_through_the_timer_without_sleeping() -> None:
    inner = MemoryBackend()
    b = ShapedBackend(inner, tx=DirSpec(delay=0.03))  # real clock
    t0 = time.monotonic()
    assert b.send([fr(i) for i in range(4)]) == 4  # taken (copied), held
    assert inner.sent == [] and b.stats()["tx.queued"] == 4
    assert readable(b, 1.0)
    assert time.monotonic() - t0 >= 0.029
    b.drain_wakeup()
    assert [f[:2] for f in inner.sent] == [i.to_bytes(2, "big") for i in range(4)]
    assert b.stats()["tx.passed"] == 4 and b.stats()["tx.queued"] == 0
    b.close()


def test_tx_loss_counts_and_outbox_back_pressure() -> None:
    inner = MemoryBackend()
    b = ShapedBackend(inner, tx=DirSpec(loss=0.5), seed=11)
    assert b.send([fr(i) for i in range(400)]) == 400
    st = b.stats()
    assert st["tx.lost"] + len(inner.sent) == 400 and 140 < st["tx.lost"] < 260
    inner.stall = True
    n = b.send([fr(i) for i in range(10)])
    assert n == 10 and b.stats()["tx.outbox"] > 0
    assert b.send([fr(0)]) == 0  # nothing new is taken while the outbox waits
    inner.stall = False
    b.drain_wakeup()
    assert b.stats()["tx.outbox"] == 0


def test_rx_limit_reports_nothing_until_refill_and_unwatches_inner() -> None:
    inner = MemoryBackend()
    clk = Clock()
    b = ShapedBackend(inner, rx=DirSpec(bandwidth=BucketSpec(size=250, refill_ms=100)),
                      clock=clk)
    for i in range(3):
        inner.inject(bytes([i]) * 100)
    buf = bytearray(200)
    b.drain_wakeup()
    got = []
    while b.pending_len():
        n = b.recv([memoryview(buf)])
        got.append(bytes(buf[:n]))
    assert [g[0] for g in got] == [0, 1]
    assert b.pending_len() == 0 and b.stats()["rx.throttled"] >= 0
    assert b.rx.blocked_until is not None
    clk.t = b.rx.blocked_until
    assert b.pending_len() == 100 and b.recv([memoryview(buf)]) == 100 and buf[0] == 2


def test_rx_delay_and_ready_bound() -> None:
    inner = MemoryBackend()
    clk = Clock()
    b = ShapedBackend(inner, rx=DirSpec(delay=0.01, limit=5), clock=clk)
    for i in range(8):
        inner.inject(bytes([i]) * 60)
    b.drain_wakeup()
    assert b.pending_len() == 0 and b.rx.lane.queued() == 5  # limit: the rest stays inside
    assert len(inner.rx) == 3 and not b.inner_watched
    clk.t += 0.011
    assert b.pending_len() == 60
    buf = bytearray(64)
    seen = []
    while b.pending_len():
        b.recv([memoryview(buf)])
        seen.append(buf[0])
    assert seen == [0, 1, 2, 3, 4] and b.rx.lane.queued() == 3
    clk.t += 0.011
    while b.pending_len():
        b.recv([memoryview(buf)])
        seen.append(buf[0])
    assert seen == list(range(8))


def test_passthrough_lends_native_fd_and_runtime_update() -> None:
    inner = NullBackend()
    b = ShapedBackend(inner)
    assert b.native_fd() == -1  # nothing configured: the C path may write directly
    assert b.send([fr(0)]) == 1 and inner.stats()["tx_frames"] == 1
    b.update(DirSpec(delay=5.0), DirSpec())
    assert b.native_fd() is None
    b.send([fr(1), fr(2)])
    assert b.stats()["tx.queued"] == 2
    b.update(DirSpec(), DirSpec())  # nothing holds frames any more: released at once
    assert b.stats()["tx.queued"] == 0 and inner.stats()["tx_frames"] == 3
    assert b.native_fd() == -1


def test_all_counter_keys_present_from_the_start() -> None:
    st = ShapedBackend(MemoryBackend()).stats()
    for d in ("tx", "rx"):
        for k in ("passed", "lost", "duplicated", "corrupted", "reordered", "delayed", "queued",
                  "limit_waits", "bw_tokens", "ops_tokens", "throttled"):
            assert st[f"{d}.{k}"] == 0, (d, k)


def test_timer_is_rearmed_for_the_next_held_frame_after_a_release() -> None:
    inner = MemoryBackend()
    clk = Clock()
    b = ShapedBackend(inner, tx=DirSpec(delay=0.05), clock=clk)
    b.send([fr(0)])
    clk.t += 0.02
    b.send([fr(1)])
    assert b.timer.deadline == clk.t + 0.03
    clk.t += 0.03
    b.drain_wakeup()  # frame 0 leaves; the timer must now point at frame 1
    assert len(inner.sent) == 1 and b.timer.deadline == clk.t + 0.02
