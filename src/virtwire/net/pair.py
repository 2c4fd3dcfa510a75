"""``QueuePair``: the data-path state of one virtio-net queue pair (its RX and TX sides).

The RX *stash* holds chains popped for a frame but not yet used (ring order), with their
writable views; the native RX path keeps its own (``cstash``, a ``native.RxStash``), and at
most one of the two holds chains at any time. ``tx_pending`` holds TX frames the backend did
not take yet (back-pressure); ``held`` an RX frame read aside until the guest gives buffers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from virtwire.net.backend import NetBackend
from virtwire.net.native import RxStash
from virtwire.virtio.chain import DescriptorChain

__all__ = ["QueuePair"]


class QueuePair:
    """Per-queue-pair data-path state."""

    __slots__ = ("index", "backend", "rx_backend", "stash", "stash_cap", "tx_pending",
                 "rx_waiting", "enabled", "held", "cstash")

    def __init__(self, index: int, backend: NetBackend | None, rx_backend: bool) -> None:
        self.index = index
        self.backend = backend
        self.rx_backend = rx_backend  # False: shared backend whose RX goes via pair 0
        # RX chains popped but not yet used, with their writable views (ring order).
        self.stash: deque[tuple[DescriptorChain, list[memoryview]]] = deque()
        self.stash_cap = 0
        # TX frames the backend did not take yet: (chain, iovec).
        self.tx_pending: list[tuple[DescriptorChain, list[Any]]] = []
        self.rx_waiting = False
        self.enabled = True
        self.held: bytes | None = None  # a frame read aside, waiting for buffers
        self.cstash: RxStash | None = None  # the native RX path's stash (created on use)

    @property
    def can_receive(self) -> bool:
        """Does this pair take RX frames from its backend (it has one, owns its RX, enabled)?"""
        return self.backend is not None and self.rx_backend and self.enabled

    def clear(self) -> None:
        self.clear_rx()
        self.tx_pending.clear()
        self.held = None

    def clear_rx(self) -> None:
        """Forget the RX stash (chains and views) and the waiting state; ``held`` stays."""
        for _c, views in self.stash:
            for v in views:
                v.release()
        self.stash.clear()
        self.stash_cap = 0
        if self.cstash is not None:
            self.cstash.clear()
        self.rx_waiting = False

    def set_enabled(self, enabled: bool) -> None:
        """Enable/disable the pair (MQ VQ_PAIRS_SET, vhost-user VRING_ENABLE); an RX-owning
        backend is told."""
        self.enabled = enabled
        if self.backend is not None and self.rx_backend:
            self.backend.set_enabled(enabled)
