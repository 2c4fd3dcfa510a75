"""The one event loop of a virtwire process: fds, eventfds, timers, signals, batch flushes.

Theory of operation
-------------------
Everything a serving process waits on is a file descriptor: the vhost-user sockets, the guest's
kick eventfds, the TAP fds, the control socket, and (through ``signal.set_wakeup_fd``) signals.
One ``selectors`` (epoll) loop per process waits on all of them; no threads.

One iteration:

1. wait until an fd is ready or the next timer is due;
2. run the ready fds' callbacks -- a kick callback only *drains* its eventfd and marks its queue
   as having work (``defer``), it does not process the queue;
3. run due timers and ``call_soon`` callbacks;
4. run the deferred callbacks, each at most once per iteration (coalesced by key). This is
   where a device processes a queue: several kicks and TAP wake-ups that arrived together become
   one batch -- pop everything available, one used-index publish, at most one interrupt (the
   interrupt itself is also a deferred callback keyed by its call eventfd, so several queues
   sharing one irq signal it once).

A deferred callback may defer again (an interrupt after a batch; work left because a budget ran
out): up to four rounds run in the same iteration, then the rest waits for the next iteration,
after a zero-timeout poll lets the other fds in. Exceptions from callbacks are our bugs:
they are logged with a traceback and counted in ``errors`` (``raise_errors=True`` in tests makes
them propagate), so one broken port never takes a whole switch down silently.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["EventLoop", "EventFd", "TimerHandle"]

Callback = Callable[..., Any]


class EventFd:
    """A non-blocking Linux eventfd (kick/call notifications), owned or adopted.

    ``read`` drains the counter and returns it (0 when nothing was pending); ``write`` adds to it.
    """

    __slots__ = ("fd", "_owned")

    def __init__(self, fd: int | None = None, *, owned: bool = True) -> None:
        if fd is None:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            os.set_blocking(fd, False)
        self.fd = fd
        self._owned = owned

    def fileno(self) -> int:
        return self.fd

    def read(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def write(self, value: int = 1) -> None:
        try:
            os.eventfd_write(self.fd, value)
        except BlockingIOError:
            pass  # counter saturated: the reader is woken anyway

    def close(self) -> None:
        if self.fd >= 0 and self._owned:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1

    def __repr__(self) -> str:
        return f"EventFd({self.fd})"


class TimerHandle:
    __slots__ = ("when", "callback", "args", "cancelled", "interval")

    def __init__(self, when: float, callback: Callback, args: tuple, interval: float | None):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self.interval = interval

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """selectors-based loop; see the module docstring for the iteration order."""

    def __init__(self, *, raise_errors: bool = False) -> None:
        self._sel = selectors.DefaultSelector()
        self._readers: dict[int, tuple[Callback, tuple]] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._soon: deque[tuple[Callback, tuple]] = deque()
        self._deferred: dict[Hashable, tuple[Callback, tuple]] = {}
        self._signal_handlers: dict[int, Callback] = {}
        self._old_handlers: dict[int, Any] = {}
        self._pending_signals: list[int] = []
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_wakeup_fd: int | None = None
        self._running = False
        self._stopping = False
        self.raise_errors = raise_errors
        self.errors = 0
        self.iterations = 0

    # -- registration -----------------------------------------------------------------------
    def add_reader(self, fd: int | Any, callback: Callback, *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is readable (replaces an earlier one)."""
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fd in self._readers:
            self._sel.modify(fd, selectors.EVENT_READ)
        else:
            self._sel.register(fd, selectors.EVENT_READ)
        self._readers[fd] = (callback, args)

    def remove_reader(self, fd: int | Any) -> bool:
        fd = fd if isinstance(fd, int) else fd.fileno()
        if self._readers.pop(fd, None) is None:
            return False
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        return True

    def call_soon(self, callback: Callback, *args: Any) -> None:
        self._soon.append((callback, args))

    def call_later(self, delay: float, callback: Callback, *args: Any) -> TimerHandle:
        h = TimerHandle(time.monotonic() + max(0.0, delay), callback, args, None)
        heapq.heappush(self._timers, (h.when, next(self._seq), h))
        return h

    def call_every(self, interval: float, callback: Callback, *args: Any) -> TimerHandle:
        """A repeating timer (first run after ``interval``); ``cancel()`` stops it."""
        h = TimerHandle(time.monotonic() + interval, callback, args, interval)
        heapq.heappush(self._timers, (h.when, next(self._seq), h))
        return h

    def defer(self, key: Hashable, callback: Callback, *args: Any) -> None:
        """Run ``callback`` once at the end of this iteration, however often it is deferred."""
        if key not in self._deferred:
            self._deferred[key] = (callback, args)

    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        """Run ``callback(signum)`` from the loop, not the signal context (main thread only)."""
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(),
                                                       warn_on_full_buffer=False)
            self.add_reader(self._wake_r.fileno(), self._drain_signals)
        self._signal_handlers[signum] = callback
        old = signal.signal(signum, self._on_signal)
        self._old_handlers.setdefault(signum, old)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending_signals.append(signum)

    def _drain_signals(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(512):
                pass
        except BlockingIOError:
            pass
        pending, self._pending_signals = self._pending_signals, []
        for signum in pending:
            cb = self._signal_handlers.get(signum)
            if cb is not None:
                self._run_cb(cb, (signum,))

    # -- running ----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    @property
    def running(self) -> bool:
        return self._running

    def _run_cb(self, cb: Callback, args: tuple) -> None:
        try:
            cb(*args)
        except Exception:
            self.errors += 1
            if self.raise_errors:
                raise
            log.exception("event loop: callback %r failed", cb)

    def _timeout(self, limit: float | None) -> float | None:
        if self._soon or self._deferred or self._pending_signals:
            return 0.0
        t = limit
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            t = due if t is None else min(t, due)
        return t

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration (see module docstring); waits at most ``timeout`` seconds."""
        self.iterations += 1
        t = self._timeout(timeout)
        if self._readers:
            events = self._sel.select(t)
        else:
            if t is None:
                raise RuntimeError("event loop has nothing to wait for")
            time.sleep(t)
            events = []
        for key, _mask in events:
            entry = self._readers.get(key.fd)
            if entry is not None:
                self._run_cb(*entry)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _when, _seq, h = heapq.heappop(self._timers)
            if h.cancelled:
                continue
            if h.interval is not None:
                h.when = now + h.interval
                heapq.heappush(self._timers, (h.when, next(self._seq), h))
            self._run_cb(h.callback, h.args)
        for _ in range(len(self._soon)):
            cb, args = self._soon.popleft()
            self._run_cb(cb, args)
        # Deferred work may defer more (a queue batch defers its interrupt): a few rounds here,
        # so interrupts go out in the same iteration; anything beyond waits for the next one.
        for _round in range(4):
            if not self._deferred:
                break
            batch, self._deferred = self._deferred, {}
            for cb, args in batch.values():
                self._run_cb(cb, args)

    def run(self, timeout: float | None = None) -> None:
        """Run until ``stop()`` (or until ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._running = True
        self._stopping = False
        try:
            while not self._stopping:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.run_once(left)
        finally:
            self._running = False

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Run until ``predicate()`` is true; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.run_once(min(left, 0.05))
        return True

    def close(self) -> None:
        for signum in list(self._signal_handlers):
            old = self._old_handlers.get(signum)
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._signal_handlers.clear()
        self._old_handlers.clear()
        if self._wake_r is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup_fd if self._old_wakeup_fd is not None
                                     else -1)
            except ValueError:
                pass
            self.remove_reader(self._wake_r.fileno())
            self._wake_r.close()
            assert self._wake_w is not None
            self._wake_w.close()
            self._wake_r = self._wake_w = None
        self._readers.clear()
        self._sel.close()
