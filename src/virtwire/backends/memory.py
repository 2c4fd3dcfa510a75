"""In-memory backend for tests: records TX frames, injects RX frames, with fault hooks.

``sent`` holds every transmitted frame as ``bytes`` (with the virtio header when ``vnet_hdr``);
``inject(frame)`` queues an RX frame for the device. Hooks, all optional:

- ``drop``: a predicate on a TX frame; True drops it (counted, as a lossy link would);
- ``stall``: while True, ``send`` takes nothing (back-pressure: the device must keep the chains
  and retry, losing nothing); ``unstall()`` clears it and wakes the device;
- ``reorder``: RX frames are delivered in reverse order of each injected batch;
- ``tx_limit``: take at most this many frames per ``send`` call (partial batches);
- ``keep``: remember only about the last ``keep`` TX frames (``serve`` sets it: a guest must not
  grow the process without bound -- issue 14, defect 10).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from virtwire.backends.base import BackendBase, Frame
from virtwire.net.header import VirtioNetHdr, scatter
from virtwire.virtio.spec import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    bit,
)

__all__ = ["MemoryBackend"]


class MemoryBackend(BackendBase):
    """See module docstring. ``vnet_hdr``/``offloads`` choose which device paths a test takes."""

    def __init__(
        self,
        name: str = "memory",
        *,
        vnet_hdr: bool = False,
        offloads: bool = False,
        drop: Callable[[bytes], bool] | None = None,
        reorder: bool = False,
        tx_limit: int | None = None,
        keep: int | None = None,
    ) -> None:
        super().__init__(name)
        self.vnet_hdr = vnet_hdr
        self.host_offloads = (bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
                                  VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN)
                              if offloads else 0)
        self.sent: list[bytes] = []
        self.rx: deque[bytes] = deque()
        self.drop = drop
        self.stall = False
        self.reorder = reorder
        self.tx_limit = tx_limit
        self.keep = keep
        self.sends = 0

    # TX ------------------------------------------------------------------------------------
    def send(self, frames: Sequence[Frame]) -> int:
        self.sends += 1
        if self.stall:
            return 0
        n = len(frames) if self.tx_limit is None else min(len(frames), self.tx_limit)
        c = self.counters
        for f in frames[:n]:
            data = b"".join(bytes(v) for v in f)
            if self.drop is not None and self.drop(data):
                c["drops"] += 1
                continue
            self.sent.append(data)
            c["tx_frames"] += 1
            c["tx_bytes"] += len(data)
        if self.keep is not None and len(self.sent) > 2 * self.keep:
            del self.sent[: len(self.sent) - self.keep]
        return n

    def stats(self) -> dict[str, int]:
        return {**self.counters, "kept": len(self.sent)}

    def unstall(self) -> None:
        self.stall = False
        self.wake()

    def frames(self) -> list[bytes]:
        """The sent frames without their virtio header."""
        if not self.vnet_hdr:
            return list(self.sent)
        return [f[self.hdr_len:] for f in self.sent]

    def headers(self) -> list[VirtioNetHdr]:
        return [VirtioNetHdr.unpack(f, self.hdr_len) for f in self.sent]

    # RX ------------------------------------------------------------------------------------
    def inject(self, frame: bytes, hdr: VirtioNetHdr | None = None) -> None:
        """Queue an RX frame (Ethernet bytes; with ``vnet_hdr`` a header is prepended)."""
        if self.vnet_hdr:
            frame = (hdr or VirtioNetHdr()).pack(self.hdr_len) + frame
        self.rx.append(frame)
        self.wake()

    def inject_many(self, frames: Sequence[bytes]) -> None:
        items = list(frames)
        if self.reorder:
            items.reverse()
        for f in items:
            if self.vnet_hdr:
                f = VirtioNetHdr().pack(self.hdr_len) + f
            self.rx.append(f)
        self.wake()

    def pending_len(self) -> int | None:
        return len(self.rx[0]) if self.rx else 0

    def recv(self, bufs: Sequence[memoryview]) -> int:
        if not self.rx:
            return 0
        f = self.rx.popleft()
        n = scatter(bufs, f)
        self.counters["rx_frames"] += 1
        self.counters["rx_bytes"] += n
        return n
