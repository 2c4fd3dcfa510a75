"""The two halves of a virtqueue, as interfaces both ring formats implement.

Theory of operation
-------------------
A virtqueue (virtio 1.2 §2.6) is shared between a driver, which makes buffers *available*, and a
device, which marks them *used*. ``SplitQueue``/``PackedQueue`` (device side) and
``SplitDriverQueue``/``PackedDriverQueue`` (driver side) hold only state; every ring access takes
the ``GuestMemory`` as an argument, and nothing here kicks, interrupts or touches a fd. Callers act
on the facts the queue returns (``needs_notification``, ``kick_needed``).

The data path is batch-shaped: a device pops every available chain, pushes each used element
(staged, not yet visible), then ``publish``es once (one used-index store for split rings; for
packed rings the head descriptor's flags are written last) and asks ``needs_notification`` once.

Ring state survives a vhost-user backend restart through ``get_base``/``set_base`` (the
VHOST_USER_GET/SET_VRING_BASE value: split, the next avail index; packed, bit 15 the avail wrap
counter and bits 0-14 the next avail slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from virtwire.memory import GuestMemory
from virtwire.virtio.chain import DescriptorChain

__all__ = ["DeviceQueue", "DriverQueue", "QueueFull", "RingPositions"]


class QueueFull(Exception):
    """Driver side: not enough free descriptors for the buffer (back-pressure, not an error)."""


@dataclass(slots=True)
class RingPositions:
    """A device queue's positions, as a native burst reads and then hands back (``adopt``).

    ``in_flight``: popped and not yet used (split: chains; packed: ring slots). ``staged``:
    used elements written but not yet published. ``staged_first`` (packed only): the
    ``(slot, flags)`` of the first staged element, whose flags ``publish`` stores last. A split
    ring's wrap counters are always 1.
    """

    next_avail: int
    next_used: int
    in_flight: int
    staged: int
    avail_wrap: int = 1
    used_wrap: int = 1
    staged_first: tuple[int, int] | None = None


class DeviceQueue(Protocol):
    """The device's half of a virtqueue (§2.7 split, §2.8 packed)."""

    size: int
    ready: bool
    event_idx: bool  # VIRTIO_F_EVENT_IDX negotiated
    indirect: bool  # VIRTIO_F_INDIRECT_DESC negotiated

    def set_addresses(self, desc: int, driver: int, device: int) -> None:
        """Descriptor area, driver area (avail ring / driver event), device area (used / event)."""

    def validate(self, mem: GuestMemory) -> None:
        """Check size and ring areas against guest RAM and alignment; raises ``QueueError``."""

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None. Raises ``QueueError`` for a malformed ring."""

    def pop_batch(self, mem: GuestMemory, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` available chains (one read of the avail index)."""

    def push(self, mem: GuestMemory, chain: DescriptorChain, written: int) -> None:
        """Stage a used element for ``chain`` with ``written`` bytes written (not yet visible)."""

    def publish(self, mem: GuestMemory) -> int:
        """Make staged used elements visible to the driver; returns how many were published."""

    def needs_notification(self, mem: GuestMemory) -> bool:
        """After ``publish``: must the device interrupt the driver? (§2.7.7 / §2.8.10)."""

    def enable_notifications(self, mem: GuestMemory) -> bool:
        """Ask the driver to kick again; True if buffers became available meanwhile (re-poll)."""

    def disable_notifications(self, mem: GuestMemory) -> None:
        """Tell the driver kicks are not needed (NO_NOTIFY / avail_event / DISABLE)."""

    def has_available(self, mem: GuestMemory) -> bool: ...

    def get_base(self) -> int: ...

    def set_base(self, base: int) -> None: ...

    def reset(self) -> None: ...

    def positions(self) -> RingPositions:
        """The device-side positions (for a native burst that works on the ring itself)."""

    def adopt(self, pos: RingPositions) -> None:
        """Take over positions a native burst advanced (chains it popped, used elements it
        staged or published); the next ``publish`` exposes what it staged."""

    def rewind(self, chains: Sequence[DescriptorChain], mem: GuestMemory | None) -> None:
        """Give popped, unused ``chains`` back (a stopped ring offers them again)."""


class DriverQueue(Protocol):
    """The driver's half of a virtqueue: what a guest's virtio_ring.c does."""

    size: int
    event_idx: bool
    indirect: bool

    @property
    def num_free(self) -> int: ...

    def layout(self) -> tuple[int, int, int]:
        """(desc, driver area, device area) guest addresses, to program into the device."""

    def add(
        self,
        mem: GuestMemory,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: Any,
    ) -> None:
        """Expose device-readable ``out`` then device-writable ``in_`` (gpa, len) buffers.

        Staged: visible to the device only after ``publish``. Raises ``QueueFull``.
        """

    def publish(self, mem: GuestMemory) -> int:
        """Make staged buffers available (one avail-index store / flag flips)."""

    def kick_needed(self, mem: GuestMemory) -> bool:
        """After ``publish``: does the device want a notification? (vring_need_event)."""

    def get_used(self, mem: GuestMemory) -> tuple[Any, int] | None:
        """The next used buffer's (token, written length), or None."""

    def enable_callbacks(self, mem: GuestMemory) -> bool:
        """Ask for used-buffer notifications; True if used buffers are already pending."""

    def disable_callbacks(self, mem: GuestMemory) -> None: ...
