"""The virtio-net driver's view of a device: the transport it talks through, feature selection
(§5.1.3.1), what it asks for (``NetDriverConfig``) and what it hands back (``RxFrame``).

``VirtioTransport`` is implemented by modern virtio-pci and the legacy I/O BAR over qtest
(``pci.driver``) and by the vhost-user front end (``drive.vhost_user_frontend``);
``TransportAdapter`` presents it to the generic ``virtio.driver.VirtioDriver``. A device that
breaks the spec raises ``DeviceFault``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from virtwire.virtio import spec
from virtwire.virtio.driver import DeviceFault, GuestAllocator
from virtwire.virtio.spec import bit

__all__ = [
    "VirtioTransport",
    "TransportAdapter",
    "DmaAllocator",
    "NetDriverConfig",
    "RxFrame",
    "RxBuf",
    "QueueState",
    "DeviceFault",
    "resolve_features",
    "DEFAULT_NET_FEATURES",
    "DMA_GRANULE",
]


class VirtioTransport(Protocol):
    """How a virtio driver reaches its device (virtio 1.2 §4: PCI, and vhost-user's equivalent)."""

    legacy: bool

    def reset(self) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def device_features(self) -> int: ...
    def set_driver_features(self, features: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def queue_ring_align(self) -> int: ...
    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None: ...
    def notify(self, index: int) -> None: ...
    def read_config(self, off: int, n: int) -> bytes: ...
    def config_generation(self) -> int: ...
    def read_isr(self) -> int: ...


class TransportAdapter:
    """``virtio.driver.DriverTransport`` over a ``VirtioTransport``, so ``VirtioDriver`` runs
    the §3.1.1 sequence on every net transport (virtio-pci modern/legacy, vhost-user).

    Writing status 0 is a reset (§2.4): it goes to the transport's ``reset``, which also waits
    for status 0 and drops the transport's per-queue state (notify offsets, MSI-X vectors,
    vhost-user rings). ``VirtioTransport.setup_queue`` programs size, addresses and enable in
    one call, so size and addresses are held until ``enable_queue``; a legacy device's size is
    its own (§4.1.4.8: read-only), read back from ``queue_max_size``.
    """

    def __init__(self, t: VirtioTransport) -> None:
        self.t = t
        self.legacy = bool(getattr(t, "legacy", False))
        self._size: dict[int, int] = {}
        self._addr: dict[int, tuple[int, int, int]] = {}

    def read_status(self) -> int:
        return self.t.get_status()

    def write_status(self, value: int) -> None:
        if value == 0:
            self.t.reset()
        else:
            self.t.set_status(value)

    def read_device_features(self) -> int:
        return self.t.device_features()

    def write_driver_features(self, features: int) -> None:
        self.t.set_driver_features(features)

    def num_queues(self) -> int:
        return self.t.num_queues()

    def queue_max_size(self, index: int) -> int:
        return self.t.queue_max_size(index)

    def set_queue_size(self, index: int, size: int) -> None:
        self._size[index] = size

    def set_queue_addresses(self, index: int, desc: int, driver: int, device: int) -> None:
        self._addr[index] = (desc, driver, device)

    def enable_queue(self, index: int) -> None:
        size = self._size.pop(index, None)
        if size is None:
            size = self.t.queue_max_size(index)
        self.t.setup_queue(index, size, *self._addr.pop(index))

    def notify(self, index: int) -> None:
        self.t.notify(index)


# ------------------------------------------------------------------------------------------------
# DMA memory
# ------------------------------------------------------------------------------------------------

# The driver's memory comes from the one driver-side allocator (first fit, coalescing frees).
DmaAllocator = GuestAllocator

DMA_GRANULE = 64  # packet buffers are whole cache lines: no odd gaps fragment the free list


# ------------------------------------------------------------------------------------------------
# Feature selection (§5.1.3.1)
# ------------------------------------------------------------------------------------------------

DEFAULT_NET_FEATURES = bit(
    spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_MTU,
    spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_TSO6,
    spec.VIRTIO_NET_F_GUEST_ECN, spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6,
    spec.VIRTIO_NET_F_HOST_ECN, spec.VIRTIO_NET_F_MRG_RXBUF, spec.VIRTIO_NET_F_STATUS,
    spec.VIRTIO_NET_F_CTRL_VQ, spec.VIRTIO_NET_F_CTRL_RX, spec.VIRTIO_NET_F_CTRL_VLAN,
    spec.VIRTIO_NET_F_CTRL_RX_EXTRA, spec.VIRTIO_NET_F_GUEST_ANNOUNCE,
    spec.VIRTIO_NET_F_CTRL_MAC_ADDR, spec.VIRTIO_NET_F_MQ,
    spec.VIRTIO_F_ANY_LAYOUT, spec.VIRTIO_F_INDIRECT_DESC, spec.VIRTIO_F_EVENT_IDX,
    spec.VIRTIO_F_VERSION_1, spec.VIRTIO_F_RING_PACKED, spec.VIRTIO_F_RING_RESET,
)


def resolve_features(offered: int, wanted: int, legacy: bool = False) -> int:
    """The subset of ``offered & wanted`` that satisfies §5.1.3.1 (drop bits whose
    dependencies are missing, repeatedly), without bits a legacy interface cannot carry."""
    f = offered & wanted
    if legacy:
        f &= 0xFFFFFFFF
        f &= ~bit(spec.VIRTIO_F_BAD_FEATURE)
    changed = True
    while changed:
        changed = False
        for feat, reqs in spec.NET_FEATURE_REQUIRES.items():
            if f >> feat & 1 and any(not f >> r & 1 for r in reqs):
                f &= ~bit(feat)
                changed = True
        for feat, anyof in spec.NET_FEATURE_REQUIRES_ANY.items():
            if f >> feat & 1 and not any(f >> r & 1 for r in anyof):
                f &= ~bit(feat)
                changed = True
    return f


# ------------------------------------------------------------------------------------------------
# virtio_net_hdr (§5.1.6)
# ------------------------------------------------------------------------------------------------


@dataclass
class RxFrame:
    """One received frame: the header fields the device wrote and the frame bytes."""

    data: bytes
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1
    queue: int = 0


@dataclass
class NetDriverConfig:
    """What the driver asks for (features are intersected with the device's offer)."""

    features: int = DEFAULT_NET_FEATURES
    queue_size: int = 256  # capped by the device's maximum; legacy uses the device's size
    packed: bool = False  # use VIRTIO_F_RING_PACKED when offered
    mrg_buf_len: int = 2048
    rx_fill: int | None = None  # buffers to post per receive queue (default: as many as fit)
    interrupts: bool = False
    pairs: int = 1  # queue pairs to bring up (MQ)
    ctrl_timeout: float = 2.0
    stall_kick_after: float = 0.05  # re-notify a queue whose buffers sit unconsumed this long
    rx_layout: str | None = None  # force "mergeable" | "big" | "small" (default: as Linux picks)


@dataclass
class RxBuf:
    """One posted receive buffer."""

    segs: tuple[tuple[int, int], ...]  # (gpa, len) writable segments; segs[0] starts with hdr
    capacity: int


@dataclass
class QueueState:
    """One of the driver's queues and its bookkeeping."""

    index: int
    q: Any  # SplitDriverQueue | PackedDriverQueue
    size: int
    kicks: int = 0
    posted: int = 0
    last_progress: float = 0.0
