"""``null`` backend: count and discard every TX frame; never any RX (for measurement)."""

from __future__ import annotations

from collections.abc import Sequence

from virtwire.backends.base import BackendBase, Frame
from virtwire.virtio.spec import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    bit,
)

__all__ = ["NullBackend"]


class NullBackend(BackendBase):
    """Takes everything (any offload: nothing is looked at), delivers nothing."""

    vnet_hdr = True  # keep the header: no strip, no software checksum -> the cheapest path
    host_offloads = bit(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                        VIRTIO_NET_F_HOST_ECN)

    def __init__(self, name: str = "null") -> None:
        super().__init__(name)

    def fileno(self) -> int | None:
        return None

    def native_fd(self) -> int:
        """For the C TX fast path: -1 means count and discard (``NetBackend.native_fd``)."""
        return -1

    def send(self, frames: Sequence[Frame]) -> int:
        c = self.counters
        n = 0
        for f in frames:
            for v in f:
                n += len(v)
        c["tx_frames"] += len(frames)
        c["tx_bytes"] += n
        return len(frames)
