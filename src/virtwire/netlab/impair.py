"""One direction's impairments, with ``tc netem``'s names and meanings where they overlap.

Theory of operation
-------------------
A ``Lane`` takes frames (``bytes``, with the virtio-net header first when the backend carries
one) and says which leave now and which later; the caller (``backends.shape``) moves frames and
arms a timer for ``next_wakeup()``, it never sleeps. Per frame, in netem's order:

1. ``loss``: dropped with probability P (independent), or by the Gilbert-Elliott model
   (``gemodel``: P(good->bad) = p, P(bad->good) = r, loss probability 1-h in the bad state and
   1-k in the good one; the state moves first, then the loss is drawn in the new state);
2. ``duplicate``: with probability P a second copy follows the frame;
3. ``corrupt``: with probability P one random bit after the Ethernet header is flipped. A frame
   whose checksum the guest left to us (NEEDS_CSUM, not GSO) gets its checksum finished first,
   so the receiver's check sees the damage ("after the checksum"). In a GSO super-frame the
   checksums are computed later, over the damaged bytes: such flips are counted in
   ``corrupted_gso`` and go unnoticed by the receiver, as on a real NIC doing TSO;
4. ``delay`` + ``jitter``: held until now + delay + uniform(-jitter, +jitter) (never < 0); with
   jitter, frames may overtake each other, as in netem. Held frames sit in a heap keyed by due
   time (ties: arrival order);
5. ``reorder``: with delay, a chosen frame skips the delay (netem: "sent immediately"); without
   delay, a chosen frame waits for the next frame to pass and follows it (at most 10 ms).

``limit``: at most N frames held at once. Unlike netem (which drops over the limit), a full lane
pushes back: ``room()`` is False and the caller takes no more frames (TX: they wait on the ring;
RX: they wait in the backend). Every decision draws from one seeded ``random.Random``, so a
run repeats exactly for the same seed and frame sequence.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from virtwire.net.header import finish_checksum
from virtwire.netlab.bucket import BucketSpec
from virtwire.virtio.spec import VIRTIO_NET_HDR_F_NEEDS_CSUM

__all__ = ["DirSpec", "Lane", "GeModel", "LANE_COUNTERS", "REORDER_GAP"]

ETH_HLEN = 14
REORDER_GAP = 0.010  # a reordered frame without delay waits at most this long for a successor
LANE_COUNTERS = ("passed", "lost", "duplicated", "corrupted", "corrupted_gso", "reordered",
                 "delayed", "queued", "limit_waits")


@dataclass(frozen=True)
class GeModel:
    """Gilbert-Elliott parameters (probabilities 0..1), netem's ``gemodel p r 1-h 1-k``."""

    p: float
    r: float
    bad_loss: float = 1.0  # 1-h
    good_loss: float = 0.0  # 1-k


@dataclass(frozen=True)
class DirSpec:
    """Everything configurable for one direction of one port (all off by default)."""

    loss: float = 0.0
    gemodel: GeModel | None = None
    delay: float = 0.0  # seconds
    jitter: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    limit: int = 1000
    bandwidth: BucketSpec = field(default_factory=BucketSpec)
    ops: BucketSpec = field(default_factory=BucketSpec)

    @property
    def impairs(self) -> bool:
        return bool(self.loss or self.gemodel or self.delay or self.jitter or self.reorder
                    or self.duplicate or self.corrupt)

    @property
    def limits(self) -> bool:
        return self.bandwidth.enabled or self.ops.enabled

    @property
    def active(self) -> bool:
        return self.impairs or self.limits


class Lane:
    """The impairments of one direction (see module docstring)."""

    def __init__(self, spec: DirSpec, rng: random.Random, clock: Callable[[], float],
                 hdr_len: int = 0) -> None:
        self.spec = spec
        self.rng = rng
        self.clock = clock
        self.hdr_len = hdr_len
        self.heap: list[tuple[float, int, bytes]] = []
        self.swap: list[tuple[float, bytes]] = []  # reordered frames waiting for a successor
        self.seq = 0
        self.ge_bad = False
        self.counters = {k: 0 for k in LANE_COUNTERS}

    # -- queries ------------------------------------------------------------------------------
    def queued(self) -> int:
        return len(self.heap) + len(self.swap)

    def room(self) -> bool:
        if self.queued() < self.spec.limit:
            return True
        self.counters["limit_waits"] += 1
        return False

    def next_wakeup(self) -> float | None:
        """The clock time the next held frame is due (None: nothing held)."""
        times = [t for t, _d in self.swap]
        if self.heap:
            times.append(self.heap[0][0])
        return min(times) if times else None

    # -- frames -------------------------------------------------------------------------------
    def push(self, frame: bytes) -> list[bytes]:
        """One frame in; the frames that leave right now out (in order)."""
        c = self.counters
        if self._lost():
            c["lost"] += 1
            return []
        copies = [frame]
        if self.spec.duplicate and self.rng.random() < self.spec.duplicate:
            c["duplicated"] += 1
            copies.append(frame)
        if self.spec.corrupt and self.rng.random() < self.spec.corrupt:
            copies[0] = self._corrupt(frame)
        out: list[bytes] = []
        now = self.clock()
        for data in copies:
            out.extend(self._schedule(data, now))
        return out

    def _lost(self) -> bool:
        ge = self.spec.gemodel
        rnd = self.rng.random
        if ge is not None:
            if self.ge_bad:
                if rnd() < ge.r:
                    self.ge_bad = False
            elif rnd() < ge.p:
                self.ge_bad = True
            return rnd() < (ge.bad_loss if self.ge_bad else ge.good_loss)
        return bool(self.spec.loss) and rnd() < self.spec.loss

    def _schedule(self, data: bytes, now: float) -> list[bytes]:
        s = self.spec
        c = self.counters
        d = s.delay
        if s.jitter:
            d = max(0.0, d + self.rng.uniform(-s.jitter, s.jitter))
        if s.reorder and self.rng.random() < s.reorder:
            c["reordered"] += 1
            if s.delay:
                d = 0.0  # netem: a reordered frame is sent at once, the others wait
            else:
                self.swap.append((now + REORDER_GAP, data))
                return []
        if d > 0:
            c["delayed"] += 1
            heapq.heappush(self.heap, (now + d, self.seq, data))
            self.seq += 1
            self._count_queue()
            return []
        c["passed"] += 1
        out = [data]
        if self.swap:  # the frames reordered behind this one follow it
            out += [f for _t, f in self.swap]
            c["passed"] += len(self.swap)
            self.swap.clear()
        return out

    def _count_queue(self) -> None:
        self.counters["queued"] = self.queued()

    def release(self) -> list[bytes]:
        """The held frames that are due now, in due order."""
        now = self.clock()
        out: list[bytes] = []
        heap = self.heap
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        if self.swap and min(t for t, _f in self.swap) <= now:
            out += [f for _t, f in self.swap]
            self.swap.clear()
        self.counters["passed"] += len(out)
        self._count_queue()
        return out

    def flush(self) -> list[bytes]:
        """Everything held, in due order (impairments switched off at run time)."""
        out = [f for _t, _s, f in sorted(self.heap)] + [f for _t, f in self.swap]
        self.heap.clear()
        self.swap.clear()
        self.counters["passed"] += len(out)
        self._count_queue()
        return out

    def _corrupt(self, frame: bytes) -> bytes:
        hl = self.hdr_len
        if len(frame) <= hl + ETH_HLEN:
            return frame
        buf = bytearray(frame)
        gso = False
        if hl:
            flags, gso_type = buf[0], buf[1]
            gso = bool(gso_type)
            if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not gso:
                cs = int.from_bytes(buf[6:8], "little")
                co = int.from_bytes(buf[8:10], "little")
                eth = memoryview(buf)[hl:]
                try:
                    finish_checksum(eth, cs, co)
                    buf[0] = flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM
                except ValueError:
                    pass  # a bad offset: the device or the receiver counts it
                del eth
        pos = self.rng.randrange(hl + ETH_HLEN, len(buf))
        buf[pos] ^= 1 << self.rng.randrange(8)
        self.counters["corrupted_gso" if gso else "corrupted"] += 1
        return bytes(buf)
