"""Issue 14, defect 4: RX buffers in more pieces than one readv takes (IOV_MAX)."""

from __future__ import annotations

import os
import socket

from virtwire.net.rx import IOV_MAX, Receive


class _ReadvBackend:
    """Reads with ``os.readv`` as the TAP backend does (EINVAL beyond IOV_MAX)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def recv(self, bufs: list[memoryview]) -> int:
        try:
            return os.readv(self.fd, bufs)
        except BlockingIOError:
            return 0


def test_more_buffers_than_iov_max_are_filled_not_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        frame = bytes(range(256)) * 6
        a.send(frame)
        store = bytearray(2 * IOV_MAX)
        bufs = [memoryview(store)[i : i + 1] for i in range(2 * IOV_MAX)]
        with_raw = [memoryview(bytearray(1)) for _ in range(IOV_MAX + 1)]
        try:
            os.readv(b.fileno(), with_raw)
        except OSError as e:  # what the old path met (and read as "nothing pending")
            assert e.errno == 22
        a.send(frame)
        n = Receive._recv(_ReadvBackend(b.fileno()), bufs)
        assert n == len(frame)
        assert bytes(store[:n]) == frame
    finally:
        a.close()
        b.close()
