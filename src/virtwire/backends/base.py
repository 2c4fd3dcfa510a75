"""The ``NetBackend`` protocol: where a virtio-net device's frames go and come from.

Theory of operation
-------------------
A backend is the far end of one queue pair of a ``VirtioNet`` device (kvmtool's ``{rx, tx}``
table, Firecracker's tap): the device hands it *batches* of TX frames and asks it for RX frames
only when the guest has posted receive buffers. A frame is an iovec list (``list[memoryview]``):
zero-copy views of guest buffers on TX, guest writable buffers on RX. Whether a frame carries a
``virtio_net_hdr`` prefix is the backend's ``vnet_hdr`` attribute; its size (10 or 12) is set
by ``configure`` once the guest's features are known, together with the offloads the guest can
receive (GUEST_CSUM/TSO4/TSO6/ECN/UFO -> e.g. TUNSETOFFLOAD).

``host_offloads`` says which TX offloads the backend accepts in a frame (a mask of
VIRTIO_NET_F_CSUM / HOST_TSO4 / HOST_TSO6 / HOST_ECN / HOST_UFO bits): the device offers a HOST_*
feature only when its backend takes it, and finishes partial checksums in software for a
backend without CSUM.

Readiness: ``fileno()`` is an fd the event loop watches for RX frames (the TAP fd, or an eventfd
the in-process backends write when a frame is queued); ``None`` means the backend never has RX.

Back-pressure: ``send`` returns how many frames of the batch it took; the device keeps the rest
(their chains stay un-used) and retries on the next kick or on the backend's next wake-up
(``VirtioNet.backend_ready``).

Optional: ``native_tx_fd()`` (TAP: its fd; null: -1) lets the device's C fast path write
frames itself; ``drain_wakeup()`` is called before each RX pass (in-process backends clear their
eventfd there).
``recv`` copies or reads *one* frame into the given buffers and returns its length (header
included when ``vnet_hdr``), or 0 when nothing is pending. ``pending_len`` is the length of the
next frame when the backend knows it (in-process backends) and ``None`` when it cannot tell
(TAP: the device then prepares buffers for the largest frame).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from virtwire.virtio.spec import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
)

__all__ = ["NetBackend", "BackendError", "BackendBase", "Frame", "guest_offloads", "readv_frame"]

Frame = Sequence[memoryview]


class BackendError(Exception):
    """A backend could not be created or configured (our side, not the guest's)."""


@runtime_checkable
class NetBackend(Protocol):
    """What ``VirtioNet`` needs from the far end of a queue pair (see module docstring)."""

    name: str
    vnet_hdr: bool
    host_offloads: int

    def fileno(self) -> int | None: ...

    def configure(self, features: int, hdr_len: int) -> None:
        """The negotiated feature word and the virtio-net header size (10 or 12)."""

    def send(self, frames: Sequence[Frame]) -> int:
        """Transmit a batch; returns how many leading frames were taken (the rest: retry)."""

    def recv(self, bufs: Sequence[memoryview]) -> int:
        """Receive one frame into ``bufs``; its length, or 0 when nothing is pending."""

    def pending_len(self) -> int | None:
        """The next RX frame's length (0: none) when known; None when unknown."""

    def set_enabled(self, enabled: bool) -> None:
        """The queue pair was enabled/disabled (MQ VQ_PAIRS_SET, vhost-user VRING_ENABLE)."""

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def readv_frame(fd: int, bufs: Sequence[memoryview], counters: dict[str, int], name: str,
                log: logging.Logger) -> int:
    """``readv`` one frame (header first) from a one-read-one-frame fd (a TAP, a datagram
    socket) straight into ``bufs``, counted in ``rx_frames``/``rx_bytes``; 0 when none is
    pending, or when the read failed (counted in ``rx_errors``, logged)."""
    try:
        n = os.readv(fd, bufs)
    except BlockingIOError:
        return 0
    except OSError as e:
        counters["rx_errors"] += 1
        log.warning("%s: read failed: %s", name, e.strerror)
        return 0
    counters["rx_frames"] += 1
    counters["rx_bytes"] += n
    return n


def guest_offloads(features: int) -> dict[str, bool]:
    """What the guest can receive: the GUEST_* offloads of a negotiated feature word."""
    return {
        "csum": bool(features >> VIRTIO_NET_F_GUEST_CSUM & 1),
        "tso4": bool(features >> VIRTIO_NET_F_GUEST_TSO4 & 1),
        "tso6": bool(features >> VIRTIO_NET_F_GUEST_TSO6 & 1),
        "ecn": bool(features >> VIRTIO_NET_F_GUEST_ECN & 1),
        "ufo": bool(features >> VIRTIO_NET_F_GUEST_UFO & 1),
    }


class BackendBase:
    """Shared plumbing for in-process backends: counters, a wake-up eventfd, a callback."""

    vnet_hdr = False
    host_offloads = 0

    def __init__(self, name: str) -> None:
        self.name = name
        self.features = 0
        self.hdr_len = 12
        self.enabled = True
        self.counters: dict[str, int] = {"tx_frames": 0, "tx_bytes": 0, "rx_frames": 0,
                                         "rx_bytes": 0, "drops": 0}
        self._efd: int | None = None
        self.on_readable: Callable[[], None] | None = None

    # readiness -----------------------------------------------------------------------------
    def fileno(self) -> int | None:
        """An eventfd written whenever an RX frame is queued (created on first use)."""
        if self._efd is None:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self._efd

    def drain_wakeup(self) -> None:
        if self._efd is not None:
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass

    def wake(self) -> None:
        """Signal that an RX frame is pending (eventfd and/or in-process callback)."""
        if self._efd is not None:
            try:
                os.eventfd_write(self._efd, 1)
            except BlockingIOError:
                pass
        if self.on_readable is not None:
            self.on_readable()

    # defaults ------------------------------------------------------------------------------
    def configure(self, features: int, hdr_len: int) -> None:
        self.features = features
        self.hdr_len = hdr_len

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def pending_len(self) -> int | None:
        return 0

    def recv(self, bufs: Sequence[memoryview]) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def close(self) -> None:
        if self._efd is not None:
            os.close(self._efd)
            self._efd = None
