"""A TAP stand-in for tests and benchmarks: one end of a datagram socketpair.

It behaves like ``backends.tap.TapBackend`` with a virtio_net_hdr (one ``readv`` = one frame,
header first; ``pending_len`` unknown; a non-blocking fd), so the device's native paths
(``native_fd``) and its pure-Python paths can be compared without root or a TAP. The test
or benchmark writes frames (header included) to ``peer`` and reads what the guest sent there.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from virtwire.backends.base import BackendBase, readv_frame

__all__ = ["DgramBackend"]

log = logging.getLogger(__name__)


class DgramBackend(BackendBase):
    """TAP-shaped backend over ``socketpair(AF_UNIX, SOCK_DGRAM)``; frames carry the header."""

    vnet_hdr = True

    def __init__(self, name: str = "dgram", bufsize: int = 4 << 20) -> None:
        super().__init__(name)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sk in (self.sock, self.peer):
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.counters["rx_errors"] = 0

    def fileno(self) -> int | None:
        return self.fd

    def native_fd(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def pending_len(self) -> int | None:
        return None

    def send(self, frames: Sequence[Any]) -> int:
        n = 0
        for iov in frames:
            try:
                w = os.writev(self.fd, iov)
            except BlockingIOError:
                break
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += w
            n += 1
        return n

    def recv(self, bufs: Sequence[memoryview]) -> int:
        """``readv`` one frame into ``bufs`` (as TapBackend.recv); 0 when none pending."""
        return readv_frame(self.fd, bufs, self.counters, self.name, log)

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            self.sock.close()
            self.peer.close()
            self.fd = -1
