"""``ShapedBackend``: impairments and rate limiters around any backend, per direction.

Theory of operation
-------------------
The wrapper sits between a ``VirtioNet`` device and its real backend (TAP, switch port, null,
memory) and implements the ``NetBackend`` protocol itself. Each direction (``tx``: what the
guest sends, ``rx``: what it receives) has a rate limiter (``netlab.bucket``: Firecracker's
bandwidth + ops token buckets) and a ``netlab.impair.Lane`` (loss, delay, jitter, reorder,
duplicate, corrupt, limit). Nothing ever sleeps: a timerfd is armed for the next moment
something is due (a delayed frame, a bucket refill), and it is part of ``fileno()``:

    fileno() = epoll { timerfd, the inner backend's fd (while we want its frames) }

so the event loop wakes the device (``VirtioNet.backend_ready``), which retries pending TX and
serves RX; ``drain_wakeup`` (called before every RX pass) reads the timer and moves what is due.

TX: ``send`` first admits frames through the limiter; the first frame over the limit and the
rest are *not taken* -- they stay on the guest's ring (back-pressure, nothing dropped) and the
timer fires when the bucket has refilled. With impairments, taken frames are copied (the guest
gets its buffers back at once) and pass the lane; what leaves goes to the inner backend (an
outbox keeps what it refuses, and no new frame is taken before that drained). A full lane
(``limit``) also pushes back. Without impairments the frames go to the inner backend as they
are (zero-copy) and tokens are returned for frames it refused.

RX: frames are read from the inner backend into the lane (bounded: ``limit`` held, 256 ready),
and ``pending_len``/``recv`` hand out the ready ones while the limiter allows; over the limit
they report nothing until the refill (the device stops; the timer wakes it). While we do not
want more frames from the inner backend (full, or throttled) its fd leaves our epoll, so a
level-triggered TAP cannot spin the loop.

A direction with nothing configured is a straight pass-through; a wrapper with nothing at all
configured even lends the device the inner TAP's fd for the native fast path.
``update(tx, rx)`` changes everything at run time: held frames are kept (or released at once
when the new settings hold nothing), buckets whose parameters changed start full again
(Firecracker's PATCH semantics), counters continue.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
import select
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from virtwire.backends.base import Frame
from virtwire.net.backend import NetBackend
from virtwire.net.header import MAX_FRAME, scatter
from virtwire.netlab.bucket import RateLimiter
from virtwire.netlab.impair import LANE_COUNTERS, DirSpec, Lane

__all__ = ["ShapedBackend", "TimerFd", "RX_READY_MAX"]

log = logging.getLogger(__name__)

RX_READY_MAX = 256  # RX frames read ahead of the guest at most
OUTBOX_RETRY = 0.001  # the inner backend refused TX frames: try again this much later
_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class TimerFd:
    """A one-shot CLOCK_MONOTONIC timerfd (ctypes; ``os.timerfd_*`` needs Python 3.13)."""

    _libc: Any = None

    def __init__(self) -> None:
        if TimerFd._libc is None:
            TimerFd._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                        use_errno=True)
        fd = TimerFd._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_create: {os.strerror(e)}")
        self.fd: int = fd
        self.deadline: float | None = None

    def fileno(self) -> int:
        return self.fd

    def arm_at(self, deadline: float | None, now: float) -> None:
        """Fire at ``deadline`` (``time.monotonic`` clock); None disarms."""
        if deadline == self.deadline:
            return
        self.deadline = deadline
        if deadline is None:
            sec = nsec = 0
        else:
            delay = max(deadline - now, 1e-6)
            sec, nsec = int(delay), int((delay % 1.0) * 1e9) or 1
        spec = struct.pack("qqqq", 0, 0, sec, nsec)  # it_interval 0: one-shot
        buf = ctypes.create_string_buffer(spec, len(spec))
        if TimerFd._libc.timerfd_settime(self.fd, 0, buf, None) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_settime: {os.strerror(e)}")

    def drain(self) -> bool:
        """Read the expiry count; True when it had fired."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return False
        self.deadline = None
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Direction:
    """One direction's limiter, lane and wake-up deadline."""

    def __init__(self, name: str, spec: DirSpec, rng: random.Random,
                 clock: Callable[[], float]) -> None:
        self.name = name
        self.clock = clock
        self.spec = spec
        self.lane = Lane(spec, rng, clock)
        self.limiter = RateLimiter(spec.bandwidth, spec.ops, clock)
        self.blocked_until: float | None = None  # the limiter refused a frame until then

    def update(self, spec: DirSpec) -> list[bytes]:
        """New settings; returns held frames to release now (the new settings hold none)."""
        old = self.spec
        self.spec = spec
        self.lane.spec = spec
        if (spec.bandwidth, spec.ops) != (old.bandwidth, old.ops):
            throttled = self.limiter.throttled
            self.limiter = RateLimiter(spec.bandwidth, spec.ops, self.clock)
            self.limiter.throttled = throttled
            self.blocked_until = None
        if not (spec.delay or spec.jitter or spec.reorder):
            return self.lane.flush()
        return []

    def admit(self, nbytes: int) -> bool:
        lim = self.limiter
        if not lim.enabled or lim.admit(nbytes):
            return True
        self.blocked_until = self.clock() + lim.wait(nbytes)
        return False

    def stats(self) -> dict[str, int]:
        c = self.lane.counters
        out = {f"{self.name}.{k}": c[k] for k in LANE_COUNTERS}
        for k, v in self.limiter.state().items():
            out[f"{self.name}.{k}"] = v
        return out


class ShapedBackend:
    """See module docstring. ``seed`` makes every random decision repeat."""

    def __init__(self, inner: NetBackend, *, tx: DirSpec | None = None,
                 rx: DirSpec | None = None, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.name = inner.name
        self.vnet_hdr = inner.vnet_hdr
        self.host_offloads = inner.host_offloads
        self.clock = clock
        self.seed = seed
        base = random.Random(seed)
        self.tx = _Direction("tx", tx or DirSpec(), random.Random(base.getrandbits(64)), clock)
        self.rx = _Direction("rx", rx or DirSpec(), random.Random(base.getrandbits(64)), clock)
        self.hdr_len = 0
        self.outbox: deque[bytes] = deque()  # TX frames out of the lane, refused by inner
        self.ready: deque[bytes] = deque()  # RX frames out of the lane, for the guest
        self.timer = TimerFd()
        self._ep = select.epoll()
        self._ep.register(self.timer.fd, select.EPOLLIN)
        self._inner_fd = inner.fileno()
        self.inner_watched = False
        self._watch_inner(True)
        self.counters = {"tx_inner_refused": 0, "rx_read": 0}

    # -- protocol -----------------------------------------------------------------------------
    def fileno(self) -> int | None:
        return self._ep.fileno()

    def configure(self, features: int, hdr_len: int) -> None:
        self.inner.configure(features, hdr_len)
        self.hdr_len = hdr_len if self.vnet_hdr else 0
        self.tx.lane.hdr_len = self.rx.lane.hdr_len = self.hdr_len

    def set_enabled(self, enabled: bool) -> None:
        self.inner.set_enabled(enabled)

    def native_fd(self) -> int | None:
        """The inner TAP's fd for the device's C fast path, only while we are not in the way."""
        if self.tx.spec.active or self.rx.spec.active or self.outbox or self.ready \
                or self.tx.lane.queued() or self.rx.lane.queued():
            return None
        fd_of = getattr(self.inner, "native_fd", None)
        return fd_of() if fd_of is not None else None

    def count_native(self, *, tx_frames: int = 0, tx_bytes: int = 0, tx_errors: int = 0,
                     rx_frames: int = 0, rx_bytes: int = 0, rx_errors: int = 0) -> None:
        """Frames the C path moved on the inner backend's fd are the inner backend's."""
        self.inner.count_native(tx_frames=tx_frames, tx_bytes=tx_bytes, tx_errors=tx_errors,
                                rx_frames=rx_frames, rx_bytes=rx_bytes, rx_errors=rx_errors)

    def drain_wakeup(self) -> None:
        self.timer.drain()
        drain = getattr(self.inner, "drain_wakeup", None)
        if drain is not None:
            drain()
        self._service()
        self._arm()

    def send(self, frames: Sequence[Frame]) -> int:
        self._service()
        d = self.tx
        try:
            if self.outbox:
                return 0  # the inner backend is still full: the guest's frames wait
            if not d.spec.impairs and not d.lane.queued():
                return self._send_direct(frames)
            return self._send_impaired(frames)
        finally:
            self._arm()

    def _send_direct(self, frames: Sequence[Frame]) -> int:
        d = self.tx
        if not d.spec.limits:
            return self.inner.send(frames)
        hl = self.hdr_len
        sizes = []
        for f in frames:
            n = sum(len(v) for v in f) - hl
            if not d.admit(n):
                break
            sizes.append(n)
        if not sizes:
            return 0
        taken = self.inner.send(frames[:len(sizes)])
        for n in sizes[taken:]:  # refused by the inner backend: their tokens come back
            d.limiter.bw.budget += n
            d.limiter.ops.budget += 1
        return taken

    def _send_impaired(self, frames: Sequence[Frame]) -> int:
        d = self.tx
        hl = self.hdr_len
        taken = 0
        for f in frames:
            data = b"".join(f)
            if not d.lane.room() or not d.admit(len(data) - hl):
                break
            taken += 1
            self.outbox.extend(d.lane.push(data))
        self._flush_outbox()
        return taken

    def _flush_outbox(self) -> None:
        box = self.outbox
        while box:
            batch = list(box)
            n = self.inner.send([[memoryview(b)] for b in batch])
            for _ in range(n):
                box.popleft()
            if n < len(batch):
                self.counters["tx_inner_refused"] += 1
                break

    def pending_len(self) -> int | None:
        d = self.rx
        if not d.spec.active and not self.ready and not d.lane.queued():
            return self.inner.pending_len()
        self._service()
        if not self.ready:
            self._arm()
            return 0
        n = len(self.ready[0])
        lim = d.limiter
        if lim.enabled and not lim.allows(n - self.hdr_len):
            d.blocked_until = self.clock() + lim.wait(n - self.hdr_len)
            self._arm()
            return 0
        return n

    def recv(self, bufs: Sequence[memoryview]) -> int:
        d = self.rx
        if not d.spec.active and not self.ready and not d.lane.queued():
            return self.inner.recv(bufs)
        self._service()
        try:
            if not self.ready:
                return 0
            data = self.ready[0]
            if not d.admit(len(data) - self.hdr_len):
                return 0
            self.ready.popleft()
            return scatter(bufs, data)
        finally:
            self._arm()

    def stats(self) -> dict[str, int]:
        out = dict(self.inner.stats())
        out.update(self.counters)
        out.update(self.tx.stats())
        out.update(self.rx.stats())
        out["tx.outbox"] = len(self.outbox)
        out["rx.ready"] = len(self.ready)
        return out

    def close(self) -> None:
        self._ep.close()
        self.timer.close()
        self.inner.close()

    # -- run-time changes ---------------------------------------------------------------------
    def update(self, tx: DirSpec, rx: DirSpec) -> None:
        """New settings for both directions (see module docstring)."""
        self.outbox.extend(self.tx.update(tx))
        self.ready.extend(self.rx.update(rx))
        self._flush_outbox()
        self._service()
        self._arm()

    # -- internals ----------------------------------------------------------------------------
    def _service(self) -> None:
        """Move what is due: held TX frames to the inner backend, inner RX frames through the
        RX lane, held RX frames to the ready queue."""
        now = self.clock()
        for d in (self.tx, self.rx):
            if d.blocked_until is not None and d.blocked_until <= now:
                d.blocked_until = None
        if self.tx.lane.queued():
            self.outbox.extend(self.tx.lane.release())
        if self.outbox:
            self._flush_outbox()
        rx = self.rx
        if rx.lane.queued():
            self.ready.extend(rx.lane.release())
        if rx.spec.active:
            self._pull_rx()
        self._watch_inner(not rx.spec.active or self._rx_room())

    def _rx_room(self) -> bool:
        return len(self.ready) < RX_READY_MAX and self.rx.lane.queued() < self.rx.spec.limit

    def _pull_rx(self) -> None:
        inner = self.inner
        lane = self.rx.lane
        while self._rx_room():
            want = inner.pending_len()
            if want == 0:
                break
            buf = bytearray(want if want is not None else self.hdr_len + MAX_FRAME)
            n = inner.recv([memoryview(buf)])
            if n <= 0:
                break
            self.counters["rx_read"] += 1
            self.ready.extend(lane.push(bytes(buf[:n])))

    def _watch_inner(self, on: bool) -> None:
        fd = self._inner_fd
        if fd is None or fd < 0 or on == self.inner_watched:
            return
        if on:
            self._ep.register(fd, select.EPOLLIN)
        else:
            self._ep.unregister(fd)
        self.inner_watched = on

    def _arm(self) -> None:
        now = self.clock()
        times = [t for t in (self.tx.lane.next_wakeup(), self.rx.lane.next_wakeup(),
                             self.tx.blocked_until, self.rx.blocked_until) if t is not None]
        if self.outbox:
            times.append(now + OUTBOX_RETRY)
        self.timer.arm_at(min(times) if times else None, now)
