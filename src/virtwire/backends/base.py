"""Shared plumbing for the frame backends (the ``NetBackend`` protocol is ``net/backend.py``).

``BackendBase`` gives an in-process backend its counters, a wake-up eventfd and the defaults;
``readv_frame`` reads one frame from a one-read-one-frame fd (a TAP, a datagram socket).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

from virtwire.net.backend import Frame, NetBackend, count_into
from virtwire.virtio.spec import (
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
)

__all__ = ["NetBackend", "BackendError", "BackendBase", "Frame", "guest_offloads", "readv_frame"]


class BackendError(Exception):
    """A backend could not be created or configured (our side, not the guest's)."""


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

    def native_fd(self) -> int | None:
        """No C fast path unless a subclass says otherwise."""
        return None

    def count_native(self, *, tx_frames: int = 0, tx_bytes: int = 0, tx_errors: int = 0,
                     rx_frames: int = 0, rx_bytes: int = 0, rx_errors: int = 0) -> None:
        count_into(self.counters, tx_frames=tx_frames, tx_bytes=tx_bytes, tx_errors=tx_errors,
                   rx_frames=rx_frames, rx_bytes=rx_bytes, rx_errors=rx_errors)

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
