"""``BackendPump``: the frame backends' side of one event loop, for every host of a net device.

A host (vhost-user serving, the PCI proxy, the KVM host) owns an event loop and a
``net.device.VirtioNet`` whose queue pairs have ``NetBackend``\\ s. The pump watches each
backend's ``fileno()``; when one becomes readable it asks the host once whether the pair can take
frames now (``ready(pair)``) and, if so, has the device serve the pair in the loop's deferred
phase (``device.backend_ready(pair)``: one batch each way). RX flow control: a pair's fd is not
watched while there is a *reason* -- ``"device"``: its RX ring ran dry (the device says so with
``rx_watch(pair, False)`` and ``True`` once an RX kick brought buffers), or ``"ring"``: the host
said it was not ready (ring not started or enabled, device not active); ``kicked(index)`` (an RX
kick) or ``resume_all("ring")`` clears that one. Without this a level-triggered TAP fd would
spin the loop.

Use::

    pump = BackendPump(loop, device, backends, ready=lambda pair: ring_is_started(pair))
    # the host's RX kick handler:   pump.kicked(index)
    # when the host becomes ready:  pump.resume_all("ring")
    # at close:                     pump.close()   (the backends stay open: the host owns them)

The pump sets ``device.rx_watch``; the loop needs ``add_reader``, ``remove_reader`` and
``defer`` (``virtwire.loop.EventLoop``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from virtwire.net.backend import NetBackend

__all__ = ["BackendPump", "DEVICE", "RING"]

DEVICE = "device"  # the pair's RX ring ran dry
RING = "ring"  # the host is not ready for the pair (ring not started/enabled, device inactive)


class BackendPump:
    """Watch the backends of ``device``'s queue pairs on ``loop`` (see module docstring)."""

    def __init__(self, loop: Any, device: Any, backends: Sequence[NetBackend], *,
                 ready: Callable[[int], bool] | None = None) -> None:
        self.loop = loop
        self.device = device
        self.backends = list(backends)
        self.ready = ready or (lambda pair: bool(getattr(device, "active", False)))
        self.paused: list[set[str]] = [set() for _ in self.backends]  # why each fd is unwatched
        self.counters = {"wakeups": 0, "serves": 0, "pauses": 0, "resumes": 0}
        self._key = ("rx", id(self))
        device.rx_watch = self.rx_watch
        for pair in range(len(self.backends)):
            fd = self._fd(pair)
            if fd is not None:
                loop.add_reader(fd, self._on_readable, pair)

    def _fd(self, pair: int) -> int | None:
        if not 0 <= pair < len(self.backends):
            return None
        fd = self.backends[pair].fileno()
        return fd if fd is not None and fd >= 0 else None

    def _on_readable(self, pair: int) -> None:
        """A backend has RX frames for ``pair`` (or room again): serve the pair (one batch)."""
        self.counters["wakeups"] += 1
        if not self.ready(pair):
            self.pause(pair, RING)  # nowhere to put frames: the host resumes it
            return
        self.counters["serves"] += 1
        self.loop.defer((*self._key, pair), self.device.backend_ready, pair)

    def rx_watch(self, pair: int, on: bool) -> None:
        """The device's hook: ``False`` when the pair's RX ring ran dry, ``True`` when buffers
        came."""
        if on:
            self.resume(pair, DEVICE)
        else:
            self.pause(pair, DEVICE)

    def pause(self, pair: int, why: str) -> None:
        """Stop watching ``pair``'s backend fd for reason ``why``."""
        fd = self._fd(pair)
        if fd is None:
            return
        reasons = self.paused[pair]
        if not reasons:
            self.loop.remove_reader(fd)
            self.counters["pauses"] += 1
        reasons.add(why)

    def resume(self, pair: int, why: str) -> None:
        """Reason ``why`` is gone; the fd is watched again once no reason is left."""
        fd = self._fd(pair)
        if fd is None:
            return
        reasons = self.paused[pair]
        if why not in reasons:
            return
        reasons.discard(why)
        if not reasons:
            self.loop.add_reader(fd, self._on_readable, pair)
            self.counters["resumes"] += 1

    def waiting(self, why: str) -> bool:
        """Is some pair's fd unwatched for reason ``why``?"""
        return any(why in reasons for reasons in self.paused)

    def resume_all(self, why: str) -> None:
        for pair in range(len(self.backends)):
            self.resume(pair, why)

    def kicked(self, index: int) -> None:
        """A ring of the device was kicked: an RX kick means the guest posted buffers."""
        if not index % 2:
            self.resume(index // 2, RING)

    def close(self) -> None:
        """Stop watching every backend fd (the backends themselves stay open)."""
        for pair in range(len(self.backends)):
            fd = self._fd(pair)
            if fd is not None and not self.paused[pair]:
                self.loop.remove_reader(fd)
            self.paused[pair] = {"closed"}
