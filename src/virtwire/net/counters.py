"""The virtio-net device's per-queue counters, one typed record per direction.

``TxCounters`` and ``RxCounters`` extend ``virtio.counters.QueueCounters`` with what each data
path counts; ``frames``, ``bytes`` and ``drops`` are on every queue (the control queue's stay
0). A drop counts once in ``drops`` and once under its reason (``tx_drop_<reason>``,
``rx_drop_<reason>``); ``drop`` does both and returns the reason's count (for rate-limited
logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from virtwire.virtio.counters import QueueCounters

__all__ = ["NetQueueCounters", "TxCounters", "RxCounters"]


@dataclass(slots=True)
class NetQueueCounters(QueueCounters):
    ALWAYS: ClassVar[frozenset[str]] = QueueCounters.ALWAYS | {"frames", "bytes", "drops"}
    frames: int = 0
    bytes: int = 0
    drops: int = 0

    def drop(self, key: str) -> int:
        """Count a drop under ``key`` (e.g. ``rx_drop_truncated``) and in ``drops``."""
        n: int = getattr(self, key) + 1
        setattr(self, key, n)
        self.drops += 1
        return n


@dataclass(slots=True)
class TxCounters(NetQueueCounters):
    """A transmit queue (§5.1.6.2)."""

    tx_native: int = 0  # chains the C fast path consumed
    tx_gso: int = 0
    tx_sw_csum: int = 0  # partial checksums finished in software
    tx_backpressure: int = 0  # batches the backend did not take whole
    tx_drop_no_backend: int = 0
    tx_drop_short_header: int = 0
    tx_drop_runt: int = 0
    tx_drop_oversize: int = 0
    tx_drop_csum_not_negotiated: int = 0
    tx_drop_bad_csum_offset: int = 0
    tx_drop_bad_gso_type: int = 0
    tx_drop_gso_not_negotiated: int = 0
    tx_drop_ecn_not_negotiated: int = 0
    tx_drop_gso_without_csum: int = 0
    tx_drop_bad_gso_size: int = 0


@dataclass(slots=True)
class RxCounters(NetQueueCounters):
    """A receive queue (§5.1.6.3-4)."""

    rx_native: int = 0  # frames the C fast path delivered
    rx_gso: int = 0
    rx_overflow: int = 0  # frames longer than the read window (tail copied from the overflow)
    rx_held: int = 0  # frames read aside until the guest gave enough buffers
    rx_filtered: int = 0
    rx_wait_buffers: int = 0  # rounds that ended waiting for buffers
    rx_bad_chain: int = 0  # chains too small for the header, returned unused
    rx_drop_truncated: int = 0
    rx_drop_short: int = 0
    rx_drop_too_big: int = 0
