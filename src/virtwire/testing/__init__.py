"""virtwire.testing: the test kit shipped inside the package (trio style).

What only tests use: a libvirtd of their own (``libvirtd``), ``virtwire serve`` as a child
process (``serve_process``), bulk transfers through a guest (``transfer``). For convenience it
re-exports the in-process driver/device pair, which is product code (``virtio.pair``: the
``bench`` and ``fuzz`` commands run on it).
"""

from virtwire.virtio.driver import GuestAllocator
from virtwire.virtio.pair import (
    DevicePair,
    LocalTransport,
    LoopbackDevice,
    RecordingInterrupt,
    RingPair,
    make_device_queue,
    make_ring_pair,
)

__all__ = [
    "DevicePair",
    "GuestAllocator",
    "LocalTransport",
    "LoopbackDevice",
    "RecordingInterrupt",
    "RingPair",
    "make_device_queue",
    "make_ring_pair",
]
