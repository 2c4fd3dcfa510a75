"""virtwire.testing: the test kit shipped inside the package (trio style).

An in-process driver/device pair over one guest memory, a recording interrupt sink and a small
guest allocator; see ``virtwire.virtio.pair``.
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
