"""Split virtqueues (virtio 1.2 §2.7): the device half and the driver half.

Theory of operation
-------------------
A split virtqueue is three areas in guest memory (§2.7, "Split Virtqueues"):

================  =====  ==========================================================
area              align  layout (all little-endian)
================  =====  ==========================================================
descriptor table  16     ``size`` x {le64 addr, le32 len, le16 flags, le16 next}
available ring    2      le16 flags, le16 idx, le16 ring[size], le16 used_event
used ring         4      le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event
================  =====  ==========================================================

The driver writes descriptors and heads into ``avail.ring`` and then moves ``avail.idx``; the
device pops chains from ``next_avail`` up to ``avail.idx``, writes ``{id, len}`` elements into
``used.ring`` and then moves ``used.idx``. Indices are free-running 16-bit counters; the slot is
``idx & (size - 1)`` (size is a power of two). The legacy interface (§2.7.2 "Legacy Interfaces")
puts all three in one contiguous area with the used ring on the next 4096-byte boundary:
``split_ring_layout(size, legacy_align=4096)``.

Hot path. After ``validate(mem)`` the queue holds typed memoryviews (``H``/``I``/``Q``) over its
three areas, so reading a descriptor is four item loads and publishing ``used.idx`` is one aligned
16-bit item store (never ``struct.pack_into``, see ``memory.py``). Views are rebuilt when a
different ``GuestMemory`` object is passed; a host that remaps regions of the same object must call
``validate`` again (or ``release_views``). Everything *read* from the ring is hostile and checked on
every read: the avail index distance (at most ``size``), each head (``< size``), each ``next``
(``< size`` or ``< table entries``), and every descriptor value (in ``ChainBuilder``).

Batching and notifications. ``pop_batch`` reads ``avail.idx`` once; ``push`` only stages used
elements; ``publish`` makes the whole batch visible with one ``used.idx`` store;
``needs_notification`` then applies §2.7.7 once for everything published since the previous
decision (``vring_need_event(used_event, new, old)`` with EVENT_IDX, else the avail ring's
NO_INTERRUPT flag). The driver half mirrors this: ``add`` stages, ``publish`` stores ``avail.idx``
once, ``kick_needed`` decides over the batch (avail_event or the used ring's NO_NOTIFY flag).

Memory order: x86 is TSO, so the ring entries written before an index store are visible before
it. The store-then-load points (publish index, then read the peer's event index; re-enable
notifications, then re-check the index) take a ``full_fence()`` (see ``notify.py``).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from virtwire.memory import GuestMemory, GuestMemoryError
from virtwire.virtio.chain import ChainBuilder, DescriptorChain, PopBudget
from virtwire.virtio.errors import QueueError
from virtwire.virtio.notify import full_fence, vring_need_event
from virtwire.virtio.queue import QueueFull, RingPositions
from virtwire.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)

__all__ = [
    "SPLIT_MAX_SIZE",
    "DESC_ALIGN",
    "AVAIL_ALIGN",
    "USED_ALIGN",
    "SplitLayout",
    "split_ring_layout",
    "desc_table_size",
    "avail_ring_size",
    "used_ring_size",
    "SplitQueue",
    "SplitDriverQueue",
    "TableAllocator",
]

if sys.byteorder != "little":  # pragma: no cover - the typed views below assume it
    raise ImportError("virtwire's ring views assume a little-endian host")

SPLIT_MAX_SIZE = 32768  # §2.7: "Queue Size ... maximum is 32768"; a power of 2
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
LEGACY_ALIGN = 4096  # §2.7.2 legacy: used ring starts on the next 4096-byte boundary

_DESC = struct.Struct("<QIHH")  # §2.7.5 struct virtq_desc


def desc_table_size(size: int) -> int:
    """§2.7.5: 16 bytes per descriptor."""
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """§2.7.6: flags, idx, ring[size], used_event (each le16)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """§2.7.8: flags, idx (le16), ring[size] of {le32 id, le32 len}, avail_event (le16)."""
    return 6 + 8 * size


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass(frozen=True)
class SplitLayout:
    """Offsets (from the ring's base) and sizes of the three areas of one split ring."""

    size: int
    desc_offset: int
    desc_size: int
    avail_offset: int
    avail_size: int
    used_offset: int
    used_size: int
    total: int

    def addresses(self, base: int) -> tuple[int, int, int]:
        """(desc, avail, used) guest addresses for a ring placed at ``base``."""
        return base + self.desc_offset, base + self.avail_offset, base + self.used_offset


def split_ring_layout(size: int, legacy_align: int | None = None) -> SplitLayout:
    """One contiguous placement of a split ring of ``size`` entries.

    With ``legacy_align`` (4096 for the legacy PCI interface, §2.7.2 and §4.1.4.8: the driver
    writes one page frame number) the used ring starts on the next ``legacy_align`` boundary after
    the avail ring and the total is rounded up to it, as Linux's ``vring_size``. Without it, areas
    follow each other at their own alignments (16/2/4).
    """
    if size < 1 or size > SPLIT_MAX_SIZE or size & (size - 1):
        raise ValueError(f"split queue size {size} is not a power of 2 in 1..{SPLIT_MAX_SIZE}")
    d = desc_table_size(size)
    a_off = _align_up(d, AVAIL_ALIGN)
    a = avail_ring_size(size)
    u_off = _align_up(a_off + a, legacy_align or USED_ALIGN)
    u = used_ring_size(size)
    total = u_off + u
    if legacy_align:
        total = _align_up(total, legacy_align)
    return SplitLayout(size, 0, d, a_off, a, u_off, u, total)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1 or size > SPLIT_MAX_SIZE or size & (size - 1):
        raise QueueError(f"split queue size {size} is not a power of 2 in 1..{SPLIT_MAX_SIZE}")


def _ring_views(
    mem: GuestMemory, size: int, desc: int, avail: int, used: int
) -> tuple[memoryview, ...]:
    """Typed views over the three areas after checking alignment and bounds (§2.7 table)."""
    _check_size(size)
    for name, addr, align, n in (
        ("descriptor table", desc, DESC_ALIGN, desc_table_size(size)),
        ("available ring", avail, AVAIL_ALIGN, avail_ring_size(size)),
        ("used ring", used, USED_ALIGN, used_ring_size(size)),
    ):
        if addr & (align - 1):
            raise QueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
        if not mem.contains(addr, n):
            raise QueueError(f"{name} {addr:#x}+{n:#x} is outside guest RAM")
    try:
        d = mem.view(desc, desc_table_size(size))
        a = mem.view(avail, avail_ring_size(size))
        u = mem.view(used, used_ring_size(size))
    except GuestMemoryError as e:  # contains() said yes; a racing remap said no
        raise QueueError(f"ring areas not mappable: {e}") from None
    return (
        d.cast("Q"),
        d.cast("I"),
        d.cast("H"),
        a.cast("H"),
        u[: 4 + 8 * size].cast("I"),
        u.cast("H"),
    )


# ---------------------------------------------------------------------------------------------
# Device half
# ---------------------------------------------------------------------------------------------


class SplitQueue:
    """The device's half of a split virtqueue (implements ``queue.DeviceQueue``), §2.7.

    State only: size, ready, the three area addresses, ``next_avail``/``next_used`` and the
    negotiated EVENT_IDX / INDIRECT_DESC flags. ``max_size`` bounds what the driver may set.
    """

    def __init__(
        self,
        size: int = 256,
        *,
        max_size: int = SPLIT_MAX_SIZE,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        self.max_size = max_size
        self.size = size
        self.ready = False
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0
        self.next_used = 0
        self._staged = 0
        self._in_flight = 0
        self._signalled_used = 0  # used idx at the last notification decision
        self._mem: GuestMemory | None = None
        self._views: tuple[memoryview, ...] = ()

    # -- configuration -----------------------------------------------------------------------
    def set_addresses(self, desc: int, driver: int, device: int) -> None:
        self.desc_addr, self.avail_addr, self.used_addr = desc, driver, device
        self.release_views()

    def validate(self, mem: GuestMemory) -> None:
        """§2.7: size a power of 2 <= ``max_size``; areas aligned 16/2/4 and inside guest RAM."""
        if self.size > self.max_size:
            raise QueueError(f"queue size {self.size} exceeds the device maximum {self.max_size}")
        self.release_views()
        self._views = _ring_views(mem, self.size, self.desc_addr, self.avail_addr, self.used_addr)
        self._mem = mem

    def release_views(self) -> None:
        """Drop the cached ring views (before the memory they point into is unmapped)."""
        for v in self._views:
            v.release()
        self._views = ()
        self._mem = None

    def _v(self, mem: GuestMemory) -> tuple[memoryview, ...]:
        if mem is not self._mem:
            self.validate(mem)
        return self._views

    def reset(self) -> None:
        """§2.7: back to the state after device reset (not ready, indices 0, no addresses)."""
        self.release_views()
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.next_avail = self.next_used = 0
        self._staged = self._in_flight = 0
        self._signalled_used = 0  # used idx at the last notification decision

    def get_base(self) -> int:
        """VHOST_USER_GET_VRING_BASE: the next avail index the device will read."""
        return self.next_avail

    def set_base(self, base: int) -> None:
        """VHOST_USER_SET_VRING_BASE: resume at avail index ``base`` (used index follows)."""
        base &= 0xFFFF
        self.next_avail = self.next_used = base
        self._staged = self._in_flight = 0
        self._signalled_used = base

    # -- available ring ----------------------------------------------------------------------
    def _avail_pending(self, avail_h: memoryview) -> int:
        idx = avail_h[1]
        n = (idx - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(
                f"avail idx {idx} is {n} ahead of the device's {self.next_avail} "
                f"(more than the queue size {self.size})"
            )
        return n

    def has_available(self, mem: GuestMemory) -> bool:
        return self._v(mem)[3][1] != self.next_avail

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        chains = self.pop_batch(mem, 1)
        return chains[0] if chains else None

    def pop_batch(self, mem: GuestMemory, limit: int) -> list[DescriptorChain]:
        """§2.7.13 (device side): up to ``limit`` chains, one read of ``avail.idx``.

        Each head and ``next`` is checked against the queue size here, each descriptor value in
        ``ChainBuilder``. ``next_avail`` advances only past chains that were accepted: a bad
        chain after good ones ends the batch early, and the next call raises on it."""
        views = self._v(mem)
        dq, di, dh, avail_h = views[0], views[1], views[2], views[3]
        n = min(self._avail_pending(avail_h), limit)
        out: list[DescriptorChain] = []
        if n <= 0:
            return out
        size = self.size
        mask = size - 1
        indirect_ok = self.indirect
        append = out.append
        start = self.next_avail
        budget = PopBudget()
        try:
            for k in range(n):
                head = avail_h[2 + ((start + k) & mask)]
                if head >= size:
                    raise QueueError(
                        f"avail ring entry {(start + k) & 0xFFFF}: head {head} >= queue size "
                        f"{size}"
                    )
                b = ChainBuilder(mem, head, size, indirect_ok)
                add = b.add
                i = head
                while True:
                    flags = dh[(i << 3) + 6]
                    if flags & VIRTQ_DESC_F_INDIRECT:
                        self._walk_indirect(mem, b, dq[i << 1], di[(i << 2) + 2], flags)
                        break
                    add(dq[i << 1], di[(i << 2) + 2], flags)
                    if not flags & VIRTQ_DESC_F_NEXT:
                        break
                    i = dh[(i << 3) + 7]
                    if i >= size:
                        raise QueueError(f"chain at head {head}: next {i} >= queue size {size}")
                c = b.finish(1)
                append(c)
                if budget.spend(c):  # this call's work budget (chain.py): the caller goes on
                    break
        except (QueueError, GuestMemoryError):
            if not out:
                raise
            # Hand out the good chains; the bad one is met (and raised) again by the next call.
        finally:
            self.next_avail = (start + len(out)) & 0xFFFF
            self._in_flight += len(out)
        return out

    @staticmethod
    def _walk_indirect(
        mem: GuestMemory, b: ChainBuilder, addr: int, length: int, flags: int
    ) -> None:
        """§2.7.5.3: walk an indirect table (entries chained by ``next`` within the table)."""
        entries = b.enter_indirect(addr, length, flags)  # at most 1024 (chain.py) bounds the walk
        table = mem.view(addr, length)
        unpack = _DESC.unpack_from
        j = 0
        while True:
            a, n, f, nx = unpack(table, 16 * j)
            b.check_table_flags(f)
            b.add(a, n, f)
            if not f & VIRTQ_DESC_F_NEXT:
                return
            if nx >= entries:
                raise QueueError(
                    f"chain at head {b.chain.head}: indirect next {nx} >= table entries {entries}"
                )
            j = nx

    # -- used ring ---------------------------------------------------------------------------
    def push(self, mem: GuestMemory, chain: DescriptorChain, written: int) -> None:
        """Stage used element {chain.head, written} (§2.7.8); visible after ``publish``."""
        if written < 0 or written > chain.writable_len:
            raise ValueError(
                f"used length {written} outside 0..{chain.writable_len} for head {chain.head}"
            )
        if self._in_flight <= 0:
            raise ValueError("push without a popped chain in flight")
        used_i = self._v(mem)[4]
        slot = (self.next_used + self._staged) & (self.size - 1)
        used_i[1 + 2 * slot] = chain.head
        used_i[2 + 2 * slot] = written
        self._staged += 1
        self._in_flight -= 1

    def push_batch(self, mem: GuestMemory, items: Sequence[tuple[DescriptorChain, int]]) -> None:
        """``push`` for each ``(chain, written)``, with the checks and views hoisted."""
        if len(items) > self._in_flight:
            raise ValueError(f"push of {len(items)} chains, {self._in_flight} in flight")
        used_i = self._v(mem)[4]
        mask = self.size - 1
        slot = self.next_used + self._staged
        for chain, written in items:
            if written < 0 or written > chain.writable_len:
                raise ValueError(
                    f"used length {written} outside 0..{chain.writable_len} for head {chain.head}"
                )
            k = 1 + 2 * (slot & mask)
            used_i[k] = chain.head
            used_i[k + 1] = written
            slot += 1
            self._staged += 1
            self._in_flight -= 1

    def push_id(self, mem: GuestMemory, head: int, written: int) -> None:
        """Stage a used element by head id (for hosts that keep only the id of a chain)."""
        if not 0 <= head < self.size or self._in_flight <= 0:
            raise ValueError(f"push of head {head} not in flight")
        used_i = self._v(mem)[4]
        slot = (self.next_used + self._staged) & (self.size - 1)
        used_i[1 + 2 * slot] = head
        used_i[2 + 2 * slot] = written & 0xFFFFFFFF
        self._staged += 1
        self._in_flight -= 1

    def publish(self, mem: GuestMemory) -> int:
        """One ``used.idx`` store (single aligned 16-bit item store) for all staged elements."""
        n = self._staged
        if n:
            used_h = self._v(mem)[5]
            # x86 TSO: the element stores above become visible before this index store.
            self.next_used = (self.next_used + n) & 0xFFFF
            used_h[1] = self.next_used
            self._staged = 0
        return n

    def needs_notification(self, mem: GuestMemory) -> bool:
        """§2.7.7 Used Buffer Notification Suppression, over everything published since the last
        decision: with EVENT_IDX, ``vring_need_event(used_event, new, old)``; otherwise notify
        unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT."""
        new = self.next_used
        old = self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        avail_h = self._v(mem)[3]
        full_fence()  # used.idx store before the used_event / flags load
        if self.event_idx:
            return vring_need_event(avail_h[2 + self.size], new, old)
        return not avail_h[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notifications(self, mem: GuestMemory) -> bool:
        """Ask for kicks again (§2.7.10): avail_event = next_avail with EVENT_IDX, else clear
        NO_NOTIFY. Returns True when buffers arrived meanwhile (the caller must re-poll; this is
        the race between the driver's last check and our re-enable)."""
        views = self._v(mem)
        used_h = views[5]
        if self.event_idx:
            used_h[2 + 4 * self.size] = self.next_avail
        else:
            used_h[0] = used_h[0] & ~VIRTQ_USED_F_NO_NOTIFY
        full_fence()  # the event store before re-reading avail.idx
        return views[3][1] != self.next_avail

    def disable_notifications(self, mem: GuestMemory) -> None:
        """Tell the driver not to kick: NO_NOTIFY without EVENT_IDX; with EVENT_IDX, leaving
        avail_event behind ``avail.idx`` already suppresses further kicks (§2.7.10)."""
        if not self.event_idx:
            used_h = self._v(mem)[5]
            used_h[0] = used_h[0] | VIRTQ_USED_F_NO_NOTIFY

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return self._in_flight

    # -- positions for a native burst and for restart (``queue.DeviceQueue``) -----------------
    def positions(self) -> RingPositions:
        return RingPositions(self.next_avail, self.next_used, self._in_flight, self._staged)

    def adopt(self, pos: RingPositions) -> None:
        """Take over what a native burst did (chains popped; used elements staged or published)."""
        self.next_avail = pos.next_avail & 0xFFFF
        self.next_used = pos.next_used & 0xFFFF
        self._in_flight = pos.in_flight
        self._staged = pos.staged

    def rewind(self, chains: Sequence[DescriptorChain], mem: GuestMemory | None) -> None:
        """Give ``chains`` (popped, none used) back: next-avail moves back over them when they
        are the last ones popped, in order (checked against the avail entries); otherwise they
        are returned used with length 0 (§2.7.8: a device may return a buffer unwritten)."""
        if not chains:
            return
        n = len(chains)
        start = (self.next_avail - n) & 0xFFFF
        contiguous = (start - self.next_used) & 0xFFFF == 0
        if contiguous and mem is not None:
            try:
                for k, c in enumerate(chains):
                    slot = (start + k) & (self.size - 1)
                    if mem.read_u16(self.avail_addr + 4 + 2 * slot) != c.head:
                        contiguous = False
                        break
            except Exception:  # noqa: BLE001 - memory already gone: give back by count
                pass
        if contiguous:
            self.set_base(start)
            return
        for c in chains:
            self.push(mem, c, 0)  # type: ignore[arg-type]
        self.publish(mem)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Driver half
# ---------------------------------------------------------------------------------------------


class TableAllocator(Protocol):
    """Guest memory for indirect descriptor tables (the driver's own allocator)."""

    def alloc(self, n: int, align: int = 16) -> int: ...

    def free(self, gpa: int) -> None: ...


def _write_table(tv: memoryview, out: Sequence[tuple[int, int]],
                 in_: Sequence[tuple[int, int]]) -> int:
    """Fill an indirect table (chained in order); the device-writable bytes in it."""
    total = len(out) + len(in_)
    pack = _DESC.pack_into
    inlen = 0
    k = 0
    for segs, f in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
        for a, n in segs:
            k += 1
            if k < total:
                pack(tv, 16 * k - 16, a, n, f | VIRTQ_DESC_F_NEXT, k)
            else:
                pack(tv, 16 * k - 16, a, n, f, 0)
            if f:
                inlen += n
    return inlen


class SplitDriverQueue:
    """The driver's half of a split virtqueue (implements ``queue.DriverQueue``), as a guest's
    virtio_ring.c does it (§2.7.13 "Supplying Buffers to The Device", §2.7.14 "Receiving Used
    Buffers From The Device").

    The free list and per-chain bookkeeping are shadow state in Python (never read back from
    guest memory, which the device could scribble on). Everything read from the used ring is
    checked: an id that is not in flight or a length above what the chain offered raises
    ``QueueError`` (a hostile device).
    """

    def __init__(
        self,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        allocator: TableAllocator | None = None,
    ) -> None:
        _check_size(size)
        if indirect and allocator is None:
            raise ValueError("indirect descriptors need an allocator for the tables")
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.event_idx = event_idx
        self.indirect = indirect
        self.allocator = allocator
        self._free: list[int] = list(range(size - 1, -1, -1))  # a stack of free descriptors
        self._token: list[Any] = [None] * size
        self._descs: list[tuple[int, ...]] = [()] * size
        self._inlen: list[int] = [0] * size
        self._table: list[int] = [0] * size
        self._avail_idx = 0  # shadow of avail.idx incl. staged
        self._published = 0  # avail.idx as last stored
        self._kick_old = 0  # avail.idx at the last kick decision
        self._last_used = 0
        self._bufs = 0  # buffers (chains) in flight, staged or published
        self._cb_disabled = False
        self._mem: GuestMemory | None = None
        self._views: tuple[memoryview, ...] = ()

    @classmethod
    def allocate(
        cls,
        allocator: TableAllocator,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        legacy_align: int | None = None,
    ) -> SplitDriverQueue:
        """Place the ring in memory from ``allocator`` (contiguously, one ``split_ring_layout``)."""
        lay = split_ring_layout(size, legacy_align)
        base = allocator.alloc(lay.total, legacy_align or 16)
        d, a, u = lay.addresses(base)
        return cls(size, d, a, u, event_idx=event_idx, indirect=indirect, allocator=allocator)

    def layout(self) -> tuple[int, int, int]:
        return self.desc_addr, self.avail_addr, self.used_addr

    def _v(self, mem: GuestMemory) -> tuple[memoryview, ...]:
        if mem is not self._mem:
            for v in self._views:
                v.release()
            self._views = _ring_views(
                mem, self.size, self.desc_addr, self.avail_addr, self.used_addr
            )
            self._mem = mem
        return self._views

    def setup(self, mem: GuestMemory, start: int = 0) -> None:
        """Zero the rings and start both indices at ``start`` (a fresh ring starts at 0; tests
        start near 65535 to cross the wrap; the device side then needs ``set_base(start)``)."""
        views = self._v(mem)
        mem.write(self.avail_addr, bytes(avail_ring_size(self.size)))
        mem.write(self.used_addr, bytes(used_ring_size(self.size)))
        mem.write(self.desc_addr, bytes(desc_table_size(self.size)))
        start &= 0xFFFF
        self.detach_unused()
        self._free = list(range(self.size - 1, -1, -1))
        self._cb_disabled = False
        self._avail_idx = self._published = self._kick_old = self._last_used = start
        avail_h, used_h = views[3], views[5]
        avail_h[1] = start
        avail_h[2 + self.size] = start  # used_event
        used_h[1] = start
        used_h[2 + 4 * self.size] = start  # avail_event

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Buffers added and not yet returned by ``get_used``."""
        return self._bufs

    def add(
        self,
        mem: GuestMemory,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: Any,
    ) -> None:
        """§2.7.13: place ``out`` (device-readable) then ``in_`` (device-writable) buffers.

        Uses one indirect descriptor when INDIRECT_DESC is negotiated and there is more than one
        segment (as Linux does), else one descriptor per segment. Raises ``QueueFull`` when
        descriptors are short now, ``ValueError`` when the buffer can never fit the ring.
        """
        total = len(out) + len(in_)
        if total == 0:
            raise ValueError("a buffer needs at least one segment")
        if token is None:
            raise ValueError("token must not be None")
        views = self._v(mem)
        dq, di, dh, avail_h = views[0], views[1], views[2], views[3]
        free = self._free
        inlen = 0
        if self.indirect and total > 1 and self.allocator is not None:
            if not free:
                raise QueueFull("no free descriptor")
            table = self.allocator.alloc(16 * total, 16)
            inlen = _write_table(mem.view(table, 16 * total), out, in_)
            head = free.pop()
            dq[2 * head] = table
            di[4 * head + 2] = 16 * total
            dh[8 * head + 6] = VIRTQ_DESC_F_INDIRECT
            dh[8 * head + 7] = 0
            self._descs[head] = (head,)
            self._table[head] = table
        else:
            if total > self.size:
                raise ValueError(f"{total} segments never fit a split ring of {self.size}")
            if len(free) < total:
                raise QueueFull(f"{total} descriptors needed, {len(free)} free")
            if total == 1:  # the common case: one descriptor
                head = free.pop()
                a, n = out[0] if out else in_[0]
                dq[2 * head] = a
                di[4 * head + 2] = n
                dh[8 * head + 6] = 0 if out else VIRTQ_DESC_F_WRITE
                dh[8 * head + 7] = 0
                inlen = 0 if out else n
                self._descs[head] = (head,)
            else:
                ids = free[-total:]
                del free[-total:]
                ids.reverse()
                k = 0
                for segs, f in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
                    for a, n in segs:
                        d = ids[k]
                        k += 1
                        dq[2 * d] = a
                        di[4 * d + 2] = n
                        if k < total:
                            dh[8 * d + 6] = f | VIRTQ_DESC_F_NEXT
                            dh[8 * d + 7] = ids[k]
                        else:
                            dh[8 * d + 6] = f
                            dh[8 * d + 7] = 0
                        if f:
                            inlen += n
                head = ids[0]
                self._descs[head] = tuple(ids)
            self._table[head] = 0
        self._token[head] = token
        self._inlen[head] = inlen
        self._bufs += 1
        avail_h[2 + (self._avail_idx & (self.size - 1))] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def publish(self, mem: GuestMemory) -> int:
        """One ``avail.idx`` store for everything added since the last publish."""
        n = (self._avail_idx - self._published) & 0xFFFF
        if n:
            self._v(mem)[3][1] = self._avail_idx
            self._published = self._avail_idx
        return n

    def kick_needed(self, mem: GuestMemory) -> bool:
        """§2.7.10 (driver side): over everything published since the last decision, with
        EVENT_IDX ``vring_need_event(avail_event, new, old)``, else unless NO_NOTIFY is set."""
        new, old = self._published, self._kick_old
        self._kick_old = new
        if new == old:
            return False
        used_h = self._v(mem)[5]
        full_fence()  # avail.idx store before the avail_event / flags load
        if self.event_idx:
            return vring_need_event(used_h[2 + 4 * self.size], new, old)
        return not used_h[0] & VIRTQ_USED_F_NO_NOTIFY

    def has_used(self, mem: GuestMemory) -> bool:
        return self._v(mem)[5][1] != self._last_used

    def get_used(self, mem: GuestMemory) -> tuple[Any, int] | None:
        """§2.7.14: the next used element as (token, len); the device is checked, not trusted."""
        views = self._v(mem)
        used_h, used_i = views[5], views[4]
        idx = used_h[1]
        pending = (idx - self._last_used) & 0xFFFF
        if not pending:
            return None
        if pending > self._bufs:
            raise QueueError(
                f"used idx {idx} is {pending} ahead of {self._last_used}, but only "
                f"{self._bufs} buffers are in flight"
            )
        slot = self._last_used & (self.size - 1)
        head, length = used_i[1 + 2 * slot], used_i[2 + 2 * slot]
        if head >= self.size or self._token[head] is None:
            raise QueueError(f"used element {self._last_used}: id {head} is not in flight")
        if length > self._inlen[head]:
            raise QueueError(
                f"used element {self._last_used}: len {length} > {self._inlen[head]} writable"
            )
        token = self._token[head]
        self._detach(head)
        self._last_used = (self._last_used + 1) & 0xFFFF
        if self.event_idx and not self._cb_disabled:
            views[3][2 + self.size] = self._last_used  # used_event: interrupt on the next one
        return token, length

    def _detach(self, head: int) -> None:
        self._token[head] = None
        self._bufs -= 1
        self._free.extend(reversed(self._descs[head]))
        self._descs[head] = ()
        if self._table[head]:
            assert self.allocator is not None
            self.allocator.free(self._table[head])
            self._table[head] = 0

    def detach_unused(self) -> list[Any]:
        """After a device reset: reclaim every buffer still in flight (as Linux's
        ``virtqueue_detach_unused_buf``); returns their tokens."""
        tokens = []
        for h in range(self.size):
            if self._token[h] is not None:
                tokens.append(self._token[h])
                self._detach(h)
        return tokens

    def enable_callbacks(self, mem: GuestMemory) -> bool:
        """Ask for used-buffer notifications (§2.7.7 driver side); True if some are pending."""
        views = self._v(mem)
        self._cb_disabled = False
        if self.event_idx:
            views[3][2 + self.size] = self._last_used
        else:
            views[3][0] = views[3][0] & ~VIRTQ_AVAIL_F_NO_INTERRUPT
        full_fence()
        return views[5][1] != self._last_used

    def disable_callbacks(self, mem: GuestMemory) -> None:
        """Suppress used-buffer notifications: NO_INTERRUPT without EVENT_IDX; with EVENT_IDX,
        ``used_event`` simply stops advancing (as Linux's virtqueue_disable_cb_split)."""
        self._cb_disabled = True
        if not self.event_idx:
            views = self._v(mem)
            views[3][0] = views[3][0] | VIRTQ_AVAIL_F_NO_INTERRUPT

    def release_views(self) -> None:
        for v in self._views:
            v.release()
        self._views = ()
        self._mem = None
