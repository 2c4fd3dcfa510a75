"""The driver's half of a packed virtqueue (virtio 1.2 §2.8), as a guest's virtio_ring.c keeps it.

The ring layout, descriptor packing and event-suppression decisions it shares with the device's
half are in ``packed_ring``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from virtwire.memory import GuestMemory
from virtwire.virtio.errors import QueueError
from virtwire.virtio.notify import full_fence
from virtwire.virtio.packed_ring import (
    AVAIL_USED,
    BASE_MASK,
    FORMAT,
    NO_VIEWS,
    PACKED_MAX_INDIRECT,
    PVIRTQ_DESC_ALIGN,
    PVIRTQ_EVENT_SIZE,
    PVIRTQ_EVENT_WRAP_SHIFT,
    event_decision,
    event_pos,
    packed_ring_layout,
    release_all,
    ring_views,
)
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_PACKED_DESC_SIZE,
)

if TYPE_CHECKING:
    from virtwire.virtio.split_ring import TableAllocator

__all__ = ["PackedDriverQueue"]


class PackedDriverQueue:
    """The driver's half of a packed virtqueue (implements ``queue.DriverQueue``), as a guest's
    virtio_ring.c does it for packed rings (§2.8.21 "Supplying Buffers to The Device", §2.8.22
    "Receiving Used Buffers From The Device").

    The rings live at ``base`` (16-aligned): descriptor ring, driver event structure, device event
    structure (``packed_ring_layout``); with ``indirect`` and ``indirect_max`` > 0 one table of
    ``indirect_max`` entries per buffer id follows, so adding a buffer never allocates.
    ``ring_bytes`` gives the total to reserve. Free ids and per-buffer bookkeeping are shadow
    state in Python, never read back from guest memory; everything read from a used descriptor is
    checked (a hostile device gets ``QueueError``).
    """

    format = FORMAT

    def __init__(
        self,
        size: int,
        base: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_max: int = 0,
    ) -> None:
        if not isinstance(size, int) or not 1 <= size <= VIRTQ_MAX_SIZE:
            raise ValueError(f"packed queue size {size} outside 1..{VIRTQ_MAX_SIZE}")
        if base % PVIRTQ_DESC_ALIGN:
            raise ValueError(f"packed ring base {base:#x} is not 16-byte aligned")
        if indirect_max < 0 or indirect_max > PACKED_MAX_INDIRECT:
            raise ValueError(f"indirect_max {indirect_max} outside 0..{PACKED_MAX_INDIRECT}")
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect and indirect_max > 0
        self.indirect_max = indirect_max if self.indirect else 0
        d, drv, dev, total = packed_ring_layout(size)
        self.desc_addr, self.driver_addr, self.device_addr = base + d, base + drv, base + dev
        self.indirect_addr = base + ((total + 15) & ~15)
        self.end = base + self.ring_bytes(size, self.indirect_max)
        self._mem: GuestMemory | None = None
        self._views = NO_VIEWS
        self._reset_state(0, 1)

    @staticmethod
    def ring_bytes(size: int, indirect_max: int = 0) -> int:
        """Bytes from ``base`` a queue of ``size`` uses (rings, then the indirect tables)."""
        total = packed_ring_layout(size)[3]
        return ((total + 15) & ~15) + size * indirect_max * VIRTQ_PACKED_DESC_SIZE

    @classmethod
    def allocate(
        cls,
        allocator: TableAllocator,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        indirect_max: int = 64,
    ) -> PackedDriverQueue:
        """Place the ring (and its indirect tables) in memory from ``allocator``."""
        imax = indirect_max if indirect else 0
        base = allocator.alloc(cls.ring_bytes(size, imax), PVIRTQ_DESC_ALIGN)
        return cls(size, base, event_idx=event_idx, indirect=indirect, indirect_max=imax)

    def _reset_state(self, idx: int, wrap: int) -> None:
        n = self.size
        self.next_avail = idx
        self.avail_wrap = wrap
        self.last_used = idx
        self.used_wrap = wrap
        self._num_free = n
        self._free_ids = list(range(n - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._token: list[Any] = [None] * n
        self._slots = [0] * n  # ring slots each in-flight id occupies
        self._inlen = [0] * n  # writable bytes each in-flight id offered
        self._staged_head: tuple[int, int] | None = None  # (slot, flags) stored by publish
        self._staged = 0
        self._pub_idx, self._pub_wrap = idx, wrap
        self._since_kick = 0

    def clear(self, mem: GuestMemory) -> None:
        """A fresh ring: zeroed (§2.8.13 "The descriptor ring is zero-initialized"), slot 0,
        both wrap counters 1 (§2.8.1), nothing in flight."""
        self.start_at(mem, 1 << PVIRTQ_EVENT_WRAP_SHIFT)

    def setup(self, mem: GuestMemory, start: int = 1 << PVIRTQ_EVENT_WRAP_SHIFT) -> None:
        """``start_at`` under the split ring's name (``start`` = ``idx | wrap << 15``)."""
        self.start_at(mem, start)

    def start_at(self, mem: GuestMemory, base: int) -> None:
        """Start an empty ring at ``base`` = ``idx | wrap << 15`` (0x8000: a fresh ring).

        Any other start behaves as if every earlier slot had been made available and used: slots
        before ``idx`` carry this lap's used flags, the rest the previous lap's (§2.8.1). Tests
        and tools reach any wrap state this way; the device then needs ``set_base(base)``.
        """
        idx, wrap = base & BASE_MASK, base >> PVIRTQ_EVENT_WRAP_SHIFT & 1
        if idx >= self.size:
            raise ValueError(f"start slot {idx} beyond queue size {self.size}")
        mem.write(self.desc_addr, bytes(self.size * VIRTQ_PACKED_DESC_SIZE))
        mem.write(self.driver_addr, bytes(PVIRTQ_EVENT_SIZE))
        mem.write(self.device_addr, bytes(PVIRTQ_EVENT_SIZE))
        if (idx, wrap) != (0, 1):
            u16 = self._v(mem)[0]
            this_lap = AVAIL_USED if wrap else 0
            prev_lap = 0 if wrap else AVAIL_USED
            for s in range(self.size):
                u16[s * 8 + 7] = this_lap if s < idx else prev_lap
        self._reset_state(idx, wrap)

    def layout(self) -> tuple[int, int, int]:
        """(descriptor ring, driver event suppression, device event suppression)."""
        return self.desc_addr, self.driver_addr, self.device_addr

    def _v(self, mem: GuestMemory) -> tuple[memoryview, ...]:
        if mem is not self._mem:
            release_all(self._views)
            self._views = ring_views(
                mem, self.desc_addr, self.size, self.driver_addr, self.device_addr
            )
            self._mem = mem
        return self._views

    def release_views(self) -> None:
        """Drop the cached ring views (before the memory they point into is unmapped)."""
        release_all(self._views)
        self._views = NO_VIEWS
        self._mem = None

    @property
    def num_free(self) -> int:
        """Free ring slots."""
        return self._num_free

    @property
    def in_flight(self) -> int:
        """Buffers made available (or staged) and not yet returned."""
        return self.size - len(self._free_ids)

    # -- making buffers available (§2.8.21) ---------------------------------------------------
    def _write_table(self, mem: GuestMemory, buf_id: int, out: Sequence[tuple[int, int]],
                     in_: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """Fill buffer ``buf_id``'s indirect table; its address and length in bytes."""
        nbytes = (len(out) + len(in_)) * VIRTQ_PACKED_DESC_SIZE
        table = self.indirect_addr + buf_id * self.indirect_max * VIRTQ_PACKED_DESC_SIZE
        t = mem.view(table, nbytes)
        t16, t32, t64 = t.cast("H"), t.cast("I"), t.cast("Q")
        k = 0
        for elems, wflag in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
            for addr, ln in elems:
                t64[k * 2] = addr
                t32[k * 4 + 2] = ln
                t16[k * 8 + 6] = 0  # reserved in a table (§2.8.7)
                t16[k * 8 + 7] = wflag  # WRITE is the only valid flag there
                k += 1
        return table, nbytes

    def add(
        self,
        mem: GuestMemory,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: Any,
    ) -> None:
        """§2.8.21.1: place ``out`` (device-readable) then ``in_`` (device-writable) buffers.

        One INDIRECT descriptor when INDIRECT_DESC is negotiated and there is more than one
        element (as Linux does) and at most ``indirect_max``, else one ring slot per element.
        Every field and flag except the batch's first head flags is written now; ``publish``
        writes that one. ``QueueFull`` when the ring has too few free slots.
        """
        total = len(out) + len(in_)
        if total == 0:
            raise ValueError("a buffer needs at least one element")
        if token is None:
            raise ValueError("token must not be None")
        size = self.size
        use_indirect = self.indirect and 1 < total <= self.indirect_max
        need = 1 if use_indirect else total
        if need > size:
            raise ValueError(f"{total} elements never fit a packed ring of {size} slots")
        if need > self._num_free:
            raise QueueFull(f"{need} descriptors needed, {self._num_free} free")
        capacity = 0
        for _, ln in in_:
            capacity += ln
        slot = self.next_avail
        wrap = self.avail_wrap
        u16, u32, u64 = self._v(mem)[:3]
        buf_id = self._free_ids.pop()
        head_slot = slot
        if use_indirect:
            table, nbytes = self._write_table(mem, buf_id, out, in_)
            u64[slot * 2] = table
            u32[slot * 4 + 2] = nbytes
            u16[slot * 8 + 6] = buf_id
            head_flags = VIRTQ_DESC_F_INDIRECT | (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1
        else:
            head_flags = 0
            k = 0
            for elems, wflag in ((out, 0), (in_, VIRTQ_DESC_F_WRITE)):
                for addr, ln in elems:
                    k += 1
                    f = wflag | (VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED)
                    if k < total:
                        f |= VIRTQ_DESC_F_NEXT
                    u64[slot * 2] = addr
                    u32[slot * 4 + 2] = ln
                    u16[slot * 8 + 6] = buf_id  # §2.8.6 needs it in the last; Linux writes all
                    if k == 1:
                        head_flags = f
                    else:
                        u16[slot * 8 + 7] = f  # behind the head: unseen until the head is
                    slot += 1
                    if slot == size:
                        slot = 0
                        wrap ^= 1
        if self._staged_head is None:
            self._staged_head = (head_slot, head_flags)
        else:
            u16[head_slot * 8 + 7] = head_flags  # behind the batch's first head
        self._staged += 1
        self._token[buf_id] = token
        self._slots[buf_id] = need
        self._inlen[buf_id] = capacity
        self._num_free -= need
        self.next_avail = slot
        self.avail_wrap = wrap

    def publish(self, mem: GuestMemory) -> int:
        """Store the batch's first head flags last: the device now sees every staged buffer."""
        staged = self._staged_head
        if staged is None:
            return 0
        slot, flags = staged
        # x86 TSO: every descriptor store in add is visible before this single u16 store.
        self._v(mem)[0][slot * 8 + 7] = flags
        n = self._staged
        self._staged_head = None
        self._staged = 0
        size = self.size
        old = event_pos(self._pub_idx, self._pub_wrap, size)
        new = event_pos(self.next_avail, self.avail_wrap, size)
        self._since_kick += (new - old) % (2 * size)
        self._pub_idx, self._pub_wrap = self.next_avail, self.avail_wrap
        return n

    def kick_needed(self, mem: GuestMemory) -> bool:
        """§2.8.10 / §2.8.21.2: must the driver notify the device about what it published?

        Device Event Suppression: DISABLE -> no; DESC with EVENT_IDX -> iff the position
        ``off_wrap`` was made available since the last decision; otherwise (ENABLE, reserved 3,
        or DESC without EVENT_IDX) -> yes. Nothing published since the last decision -> no.
        """
        advanced = self._since_kick
        self._since_kick = 0
        if advanced == 0:
            return False
        dev_event = self._v(mem)[4]
        full_fence()  # the flags store before the event structure load
        return event_decision(
            dev_event[0],
            self.event_idx,
            self._pub_idx,
            self._pub_wrap,
            advanced,
            self.size,
        )

    # -- collecting used buffers (§2.8.22) -----------------------------------------------------
    def has_used(self, mem: GuestMemory) -> bool:
        """Is the descriptor at ``last_used`` used for our wrap counter? (§2.8.1)."""
        flags = self._v(mem)[0][self.last_used * 8 + 7]
        return flags & AVAIL_USED == (AVAIL_USED if self.used_wrap else 0)

    def get_used(self, mem: GuestMemory) -> tuple[Any, int] | None:
        """The next used buffer's (token, written length), or None. The device is untrusted."""
        size = self.size
        slot = self.last_used
        views = self._v(mem)
        u16 = views[0]
        flags = u16[slot * 8 + 7]
        if flags & AVAIL_USED != (AVAIL_USED if self.used_wrap else 0):
            return None
        buf_id = u16[slot * 8 + 6]
        # §2.8.4: len is reserved (ignored by drivers) in a used descriptor without WRITE.
        length = views[1][slot * 4 + 2] if flags & VIRTQ_DESC_F_WRITE else 0
        if buf_id >= size:
            raise QueueError(f"used descriptor at slot {slot}: id {buf_id} >= queue size {size}")
        token = self._token[buf_id]
        if token is None:
            raise QueueError(f"used descriptor at slot {slot}: id {buf_id} is not in flight")
        if length > self._inlen[buf_id]:
            raise QueueError(
                f"used descriptor at slot {slot}: len {length} > {self._inlen[buf_id]} writable "
                f"for id {buf_id}"
            )
        nslots = self._slots[buf_id]
        self._token[buf_id] = None
        self._free_ids.append(buf_id)
        self._num_free += nslots
        slot += nslots  # §2.8.6: skip the slots this buffer's list occupied
        if slot >= size:
            slot -= size
            self.used_wrap ^= 1
        self.last_used = slot
        return token, length

    def enable_callbacks(self, mem: GuestMemory) -> bool:
        """Ask for used buffer notifications; True if used buffers are already pending.

        With EVENT_IDX: DESC at the next used position, otherwise ENABLE (off_wrap and flags in
        one 32-bit store).
        """
        drv_event = self._v(mem)[3]
        if self.event_idx:
            off_wrap = self.last_used | self.used_wrap << PVIRTQ_EVENT_WRAP_SHIFT
            drv_event[0] = off_wrap | RING_EVENT_FLAGS_DESC << 16  # one 32-bit store
        else:
            drv_event[0] = RING_EVENT_FLAGS_ENABLE << 16
        full_fence()  # the event store before re-reading the used flags
        return self.has_used(mem)

    def disable_callbacks(self, mem: GuestMemory) -> None:
        """RING_EVENT_FLAGS_DISABLE in the Driver Event Suppression structure."""
        self._v(mem)[3][0] = RING_EVENT_FLAGS_DISABLE << 16
