"""The driver side's generic device initialization (virtio 1.2 §3.1.1), transport-agnostic.

Theory of operation
-------------------
Every virtio driver brings a device up the same way (§3.1.1 "Driver Requirements: Device
Initialization"): reset; ACKNOWLEDGE; DRIVER; read the device features and write the subset it
understands; set FEATURES_OK and *re-read* the status to check the device accepted them; set up
the virtqueues; DRIVER_OK. A legacy (pre-1.0) device has no FEATURES_OK step and only 32 feature
bits (§3.1.2). ``VirtioDriver`` performs these steps over a small ``DriverTransport`` protocol
(virtio-pci modern or legacy registers over qtest, or an in-process ``VirtioDevice`` in tests) and
builds ring-format-agnostic driver queues with ``make_driver_queue``.

The device is untrusted here as the guest is on the device side: a status that does not read
back as written, a missing VERSION_1 on a modern device, FEATURES_OK refused, a queue of size 0,
NEEDS_RESET: each raises ``DeviceFault`` (the device's fault) with the reason, after writing
FAILED when the spec asks the driver to (§3.1.1 step 6 / §2.1.1).

``GuestAllocator`` is a first-fit allocator over one guest-physical range, for the driver's
rings, indirect tables and buffers (the driver owns that memory); ``net.driver`` uses it too
(as ``DmaAllocator``), and runs this same sequence through its ``TransportAdapter``.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from virtwire.memory import GuestMemory
from virtwire.virtio.errors import DriverError
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_BAD_FEATURE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_PCI_VRING_ALIGN,
    feature_names,
)
from virtwire.virtio.split_ring import SPLIT_MAX_SIZE, SplitDriverQueue

__all__ = [
    "DeviceFault",
    "AllocatorError",
    "GuestAllocator",
    "DriverTransport",
    "VirtioDriver",
    "make_driver_queue",
    "RING_FORMATS",
]

log = logging.getLogger(__name__)

RING_FORMATS = ("split", "packed")


class DeviceFault(DriverError):
    """The *device* broke the spec (seen from the driver side): refused features, bad status,
    impossible queue sizes, hostile used rings. Subclasses ``DriverError`` so the same "peer
    fault, never our bug" handling applies on both sides."""


class AllocatorError(MemoryError):
    """Out of driver memory (a sizing problem of the caller, not a peer fault). A
    ``MemoryError``, as the net driver's callers have always caught it."""


class GuestAllocator:
    """First-fit allocator over ``[base, base+size)`` of guest-physical memory, with coalescing
    frees: the one allocator for the driver's rings, indirect tables and packet buffers.
    ``alloc(n, align)`` returns the lowest ``align``-aligned address with ``n`` free bytes;
    ``free(gpa)`` releases it. Implements ``split_ring.TableAllocator``.

    The free list is two parallel sorted lists (starts, ends) updated in place, so the common
    cases (carve from the front of a block, free next to a free block) move no list items;
    that keeps per-packet alloc/free cheap for the net driver's buffers.
    """

    def __init__(self, base: int, size: int) -> None:
        if base < 0 or size <= 0:
            raise ValueError("allocator needs a non-negative base and a positive size")
        self.base, self.size, self.limit = base, size, base + size
        self._starts: list[int] = [base]  # free blocks [start, end), sorted, never adjacent
        self._ends: list[int] = [base + size]
        self._used: dict[int, int] = {}  # gpa -> end of its block

    def alloc(self, n: int, align: int = 16) -> int:
        if n <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation {n} bytes aligned {align}")
        starts, ends = self._starts, self._ends
        mask = align - 1
        k = 0
        for s, e in zip(starts, ends):
            if e - s >= n:
                a = (s + mask) & ~mask
                end = a + n
                if end <= e:
                    if a == s:
                        if end == e:
                            del starts[k], ends[k]
                        else:
                            starts[k] = end
                    else:
                        ends[k] = a  # the alignment gap stays free
                        if end < e:
                            starts.insert(k + 1, end)
                            ends.insert(k + 1, e)
                    self._used[a] = end
                    return a
            k += 1
        raise AllocatorError(
            f"no {n} bytes (aligned {align}) left in {self.base:#x}+{self.size:#x}"
        )

    def free(self, gpa: int) -> None:
        end = self._used.pop(gpa, None)
        if end is None:
            raise ValueError(f"free of unallocated {gpa:#x}")
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(starts, gpa)
        join_next = i < len(starts) and starts[i] == end
        if i and ends[i - 1] == gpa:
            if join_next:
                ends[i - 1] = ends[i]
                del starts[i], ends[i]
            else:
                ends[i - 1] = end
        elif join_next:
            starts[i] = gpa
        else:
            starts.insert(i, gpa)
            ends.insert(i, end)

    @property
    def bytes_free(self) -> int:
        return sum(self._ends) - sum(self._starts)

    @property
    def allocations(self) -> int:
        return len(self._used)


def make_driver_queue(
    fmt: str,
    mem: GuestMemory,
    allocator: GuestAllocator,
    size: int,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    legacy: bool = False,
    start: int | None = None,
) -> Any:
    """A driver-side queue of ring format ``fmt`` ("split" or "packed"), placed in ``allocator``
    memory and initialized (zeroed; split rings start at index ``start`` (default 0), packed
    rings at ``start`` as ``idx | wrap << 15`` (default 0x8000, slot 0 wrap 1)).
    ``legacy`` places a split ring in the 4096-aligned legacy layout (§2.7.2)."""
    if fmt == "split":
        q = SplitDriverQueue.allocate(
            allocator,
            size,
            event_idx=event_idx,
            indirect=indirect,
            legacy_align=VIRTIO_PCI_VRING_ALIGN if legacy else None,
        )
        q.setup(mem, start or 0)
        return q
    if fmt == "packed":
        from virtwire.virtio.packed_driver import PackedDriverQueue

        pq = PackedDriverQueue.allocate(allocator, size, event_idx=event_idx, indirect=indirect)
        if start is None:
            pq.setup(mem)
        else:
            pq.setup(mem, start)
        return pq
    raise ValueError(f"unknown ring format {fmt!r} (expected one of {RING_FORMATS})")


class DriverTransport(Protocol):
    """What a driver needs from a transport (virtio-pci modern/legacy, or in-process).

    Queue methods take the queue index; a register-based transport selects it first.
    ``queue_max_size`` returns 0 for a queue that does not exist.
    """

    legacy: bool

    def read_status(self) -> int: ...
    def write_status(self, value: int) -> None: ...
    def read_device_features(self) -> int: ...
    def write_driver_features(self, features: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def set_queue_size(self, index: int, size: int) -> None: ...
    def set_queue_addresses(self, index: int, desc: int, driver: int, device: int) -> None: ...
    def enable_queue(self, index: int) -> None: ...
    def notify(self, index: int) -> None: ...


@dataclass
class VirtioDriver:
    """§3.1.1 over a ``DriverTransport``; holds the negotiated features and driver queues."""

    transport: DriverTransport
    mem: GuestMemory
    allocator: GuestAllocator
    features: int = 0
    device_features: int = 0
    queues: dict[int, Any] = field(default_factory=dict)
    kicks: dict[int, int] = field(default_factory=dict)

    # -- status helpers ----------------------------------------------------------------------
    def _add_status(self, bits: int) -> int:
        t = self.transport
        want = t.read_status() | bits
        t.write_status(want)
        got = t.read_status()
        if got & VIRTIO_CONFIG_S_NEEDS_RESET:
            self.fail(f"device set NEEDS_RESET during initialization (status {got:#x})")
        return got

    def mark_failed(self) -> None:
        """Write FAILED (§2.1.1: the driver gave up), best effort: a device broken enough to
        make the driver give up may not answer that either."""
        t = self.transport
        try:
            t.write_status(t.read_status() | VIRTIO_CONFIG_S_FAILED)
        except Exception as e:  # noqa: BLE001 - best effort on a broken device
            log.debug("could not write FAILED: %s", e)

    def fail(self, reason: str) -> NoReturn:
        """Write FAILED (``mark_failed``) and raise ``DeviceFault``."""
        self.mark_failed()
        raise DeviceFault(reason)

    def reset(self) -> None:
        """§3.1.1 step 1 (and §4.1.4.3.2: a modern driver reads status until it is 0)."""
        t = self.transport
        t.write_status(0)
        if t.read_status() != 0:
            raise DeviceFault(f"device status reads {t.read_status():#x} after reset, not 0")
        self.queues.clear()
        self.features = 0

    # -- negotiation -------------------------------------------------------------------------
    def negotiate(self, wanted: int, select: Callable[[int], int] | None = None) -> int:
        """Steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (+ re-read check).

        The driver accepts ``offered & wanted`` (plus VERSION_1 on a modern device), or what
        ``select(offered)`` picks (a device type's dependency rules, e.g. §5.1.3.1), always
        within the offer. A legacy interface carries 32 bits and never BAD_FEATURE (§3.1.2);
        a modern device must offer VERSION_1 and the driver must accept it (§6.1)."""
        t = self.transport
        self.reset()
        self._add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self._add_status(VIRTIO_CONFIG_S_DRIVER)
        offered = t.read_device_features()
        if t.legacy:
            offered &= 0xFFFFFFFF
        self.device_features = offered
        if not t.legacy and not offered >> VIRTIO_F_VERSION_1 & 1:
            self.fail("modern device does not offer VIRTIO_F_VERSION_1 (§6.1)")
        if select is not None:
            feats = select(offered) & offered
        else:
            feats = offered & (wanted | (0 if t.legacy else 1 << VIRTIO_F_VERSION_1))
        if t.legacy:
            feats &= ~(1 << VIRTIO_F_BAD_FEATURE)
        elif not feats >> VIRTIO_F_VERSION_1 & 1:
            self.fail("driver would not accept the offered VIRTIO_F_VERSION_1 (§6.1)")
        t.write_driver_features(feats)
        if not t.legacy:
            got = self._add_status(VIRTIO_CONFIG_S_FEATURES_OK)
            if not got & VIRTIO_CONFIG_S_FEATURES_OK:
                self.fail(f"device refused features {feature_names(feats)} (FEATURES_OK clear)")
        self.features = feats
        log.debug("negotiated %s", feature_names(feats))
        return feats

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def ring_format(self) -> str:
        return "packed" if self.has(VIRTIO_F_RING_PACKED) else "split"

    # -- queues ------------------------------------------------------------------------------
    def setup_queue(self, index: int, size: int | None = None) -> Any:
        """Step 7 for one queue: pick the size (<= the device maximum; a power of 2 for split),
        allocate and zero the ring, program it, enable it."""
        t = self.transport
        dmax = t.queue_max_size(index)
        if dmax <= 0:
            raise DeviceFault(f"queue {index} does not exist (max size {dmax})")
        if dmax > SPLIT_MAX_SIZE:
            self.fail(f"queue {index} max size {dmax} exceeds {SPLIT_MAX_SIZE}")
        n = min(size or dmax, dmax)
        fmt = self.ring_format
        if fmt == "split":
            n = 1 << (n.bit_length() - 1)  # largest power of 2 <= n
        if t.legacy:
            n = dmax  # §4.1.4.8 legacy: queue size is read-only
            if n & (n - 1):
                self.fail(f"legacy queue {index} size {n} is not a power of 2")
        q = make_driver_queue(
            fmt,
            self.mem,
            self.allocator,
            n,
            event_idx=self.has(VIRTIO_F_EVENT_IDX),
            indirect=self.has(VIRTIO_F_INDIRECT_DESC),
            legacy=t.legacy,
        )
        if not t.legacy:
            t.set_queue_size(index, n)
        t.set_queue_addresses(index, *q.layout())
        t.enable_queue(index)
        self.queues[index] = q
        self.kicks[index] = 0
        return q

    def driver_ok(self) -> None:
        """Step 8."""
        got = self._add_status(VIRTIO_CONFIG_S_DRIVER_OK)
        if not got & VIRTIO_CONFIG_S_DRIVER_OK:
            self.fail(f"DRIVER_OK did not stick (status {got:#x})")

    def initialize(
        self,
        wanted: int,
        queue_count: int,
        size: int | None = None,
        before_ok: Callable[[VirtioDriver], None] | None = None,
    ) -> int:
        """The whole §3.1.1 sequence for ``queue_count`` queues; returns the features."""
        feats = self.negotiate(wanted)
        for i in range(queue_count):
            self.setup_queue(i, size)
        if before_ok is not None:
            before_ok(self)
        self.driver_ok()
        return feats

    # -- data path ---------------------------------------------------------------------------
    def kick(self, index: int) -> bool:
        """Publish queue ``index`` and notify the device if it asked for it; True if kicked."""
        q = self.queues[index]
        q.publish(self.mem)
        if q.kick_needed(self.mem):
            self.kicks[index] += 1
            self.transport.notify(index)
            return True
        return False
