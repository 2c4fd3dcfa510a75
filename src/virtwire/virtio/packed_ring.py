"""Packed virtqueues (virtio 1.2 §2.8): the device half (the driver half is ``packed_driver``).

Theory of operation
-------------------
A packed virtqueue is one ring of ``size`` 16-byte descriptors (``struct pvirtq_desc``: le64 addr,
le32 len, le16 id, le16 flags; §2.8.13) that *both* sides read and write, plus two 4-byte event
suppression structures (``struct pvirtq_event_suppress``: le16 off_wrap, le16 flags; §2.8.14):

======================  ===========  =========  ==========================================
part                    alignment    size       written by / read by
======================  ===========  =========  ==========================================
Descriptor Ring         16           16*size    both
Driver Event Suppr.     4            4          driver / device (used buffer notifications)
Device Event Suppr.     4            4          device / driver (available notifications)
======================  ===========  =========  ==========================================

Ownership of a slot is told by two flag bits and a one-bit *wrap counter* each side keeps, both
starting at 1 (§2.8.1). The driver makes a descriptor available by writing AVAIL (bit 7) equal to
its wrap counter and USED (bit 15) to the inverse; the device marks it used by writing both bits
equal to *its* wrap counter. Each side flips its counter when it moves past the last slot. So the
device tests ``flags & (AVAIL|USED) == (AVAIL if wrap else USED)`` at ``next_avail`` and the driver
tests ``flags & (AVAIL|USED) == (AVAIL|USED if wrap else 0)`` at ``last_used`` (§2.8.2: each side
polls a single location, the next one after what it processed).

Chains (§2.8.6) occupy consecutive slots linked by NEXT, wrapping at the ring's end (the expected
AVAIL/USED pattern flips with the wrap counter there). The buffer id is taken from the *last*
descriptor of the chain. An INDIRECT descriptor (§2.8.7) is alone in its chain and points to a
table of sequential ``pvirtq_desc`` entries, of which only WRITE counts. The device writes *one*
used descriptor per buffer at ``next_used`` and then skips the chain's slot count (``ring_descs``);
the driver, reading the id, skips the slot count it recorded for that id. Both therefore advance
by the same totals even when buffers complete out of order (IN_ORDER is not required here).

Publishing order. The first descriptor of anything is the one the other side polls. The driver
writes every descriptor of a batch (all fields, and the flags of all but the batch's first head)
as buffers are added, and ``publish`` stores the first head's flags last (§2.8.21.1: "defers
updating the descriptor flags for the first descriptor"). The device does the same with used
descriptors (§2.8.9 Multi-buffer requests): ``push`` writes id/len (and flags, except for the
first element since the last ``publish``); ``publish`` stores the first element's flags. The other
side therefore never observes a partial batch. Flag words are written with a single aligned u16
item store (see ``virtwire.memory``: never ``struct.pack_into``); x86 is TSO, so program order is
visibility order.

Notification suppression (§2.8.10, §2.8.14). Flags ENABLE (0) / DISABLE (1) / DESC (2, only with
VIRTIO_F_EVENT_IDX; 3 reserved, treated as ENABLE). With DESC, ``off_wrap`` names one ring
position (bits 0-14 slot, bit 15 wrap counter): notify only if a descriptor at that position was
made available/used since the last decision. Positions are compared on a circle of ``2*size``
(slot + size when the wrap counter is 0), which handles any ring size, not just powers of 2.

Hostile rings. Every guest-supplied descriptor value goes through ``ChainBuilder`` (addresses in
RAM, readable before writable, TTL, indirect rules). This module adds the ring-level checks: a
chain longer than the ring, a chain slot whose flags do not say "available" for the expected wrap
counter, a buffer id >= size, more slots in flight than the ring holds, INDIRECT with NEXT,
nested indirect, empty or oversized indirect tables. Each raises ``QueueError`` naming the slot.
On the driver side the device is equally untrusted: a used id out of range or not in flight, or a
length larger than the buffer's writable part, raises ``QueueError``.

Hot path. After ``validate(mem)`` the queue holds typed views over the ring (descriptor ``i``:
addr ``u64[2i]``, len ``u32[4i+2]``, id ``u16[8i+6]``, flags ``u16[8i+7]``; each event structure
as one u32), so a descriptor costs a few item loads and a flag publish is one aligned u16 store.
As in the split ring, views are rebuilt when a different ``GuestMemory`` object is passed; a host
that remaps regions of the same object calls ``release_views`` (or ``validate``) first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from virtwire.memory import GuestMemory, GuestMemoryError
from virtwire.virtio.chain import ChainBuilder, DescriptorChain, PopBudget
from virtwire.virtio.errors import QueueError
from virtwire.virtio.notify import full_fence, packed_need_event
from virtwire.virtio.queue import RingPositions
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
    pass

if sys.byteorder != "little":  # pragma: no cover - the typed views assume it
    raise ImportError("virtwire's ring views assume a little-endian host")

__all__ = [
    "PackedQueue",
    "PVIRTQ_DESC_ALIGN",
    "PVIRTQ_EVENT_ALIGN",
    "PVIRTQ_EVENT_SIZE",
    "PACKED_MAX_INDIRECT",
    "packed_ring_layout",
    "pack_desc",
    "unpack_desc",
    "event_pos",
    "event_decision",
    "ring_views",
    "release_all",
    "AVAIL_USED",
    "BASE_MASK",
    "NO_VIEWS",
]

FORMAT = "packed"

# §2.8.10.1 Structure Size and Alignment
PVIRTQ_DESC_ALIGN = 16
PVIRTQ_EVENT_ALIGN = 4
PVIRTQ_EVENT_SIZE = 4
# Field offsets inside struct pvirtq_desc (§2.8.13) and struct pvirtq_event_suppress (§2.8.14).
PVIRTQ_DESC_OFF_ADDR = 0
PVIRTQ_DESC_OFF_LEN = 8
PVIRTQ_DESC_OFF_ID = 12
PVIRTQ_DESC_OFF_FLAGS = 14
PVIRTQ_EVENT_OFF_DESC = 0  # off_wrap: bits 0-14 offset, bit 15 wrap counter
PVIRTQ_EVENT_OFF_FLAGS = 2  # bits 0-1 RING_EVENT_FLAGS_*, rest reserved
PVIRTQ_EVENT_WRAP_SHIFT = 15

# An indirect table longer than this is refused (§2.8.5: "If not limited, the maximum number of
# descriptors in a list is the virt queue size"; we allow up to the largest ring size so a small
# ring can still carry Linux's MAX_SKB_FRAGS+2 entries, while a hostile 4 GiB table is not walked).
PACKED_MAX_INDIRECT = VIRTQ_MAX_SIZE

AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
_F_AVAIL = VIRTQ_DESC_F_AVAIL
_F_USED = VIRTQ_DESC_F_USED
_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
BASE_MASK = 0x7FFF


def pack_desc(addr: int, length: int, id_: int, flags: int) -> bytes:
    """The 16 bytes of one ``struct pvirtq_desc`` (tests and tools; the rings use item stores)."""
    return (
        addr.to_bytes(8, "little")
        + length.to_bytes(4, "little")
        + id_.to_bytes(2, "little")
        + flags.to_bytes(2, "little")
    )


def unpack_desc(raw: bytes | memoryview) -> tuple[int, int, int, int]:
    """(addr, len, id, flags) of one 16-byte ``struct pvirtq_desc``."""
    b = bytes(raw)
    return (
        int.from_bytes(b[0:8], "little"),
        int.from_bytes(b[8:12], "little"),
        int.from_bytes(b[12:14], "little"),
        int.from_bytes(b[14:16], "little"),
    )


def packed_ring_layout(size: int) -> tuple[int, int, int, int]:
    """Offsets of (descriptor ring, driver event, device event) and the total bytes of one packed
    ring placed contiguously at a 16-aligned base (§2.8.10.1 alignments 16/4/4)."""
    drv = size * VIRTQ_PACKED_DESC_SIZE
    return 0, drv, drv + PVIRTQ_EVENT_SIZE, drv + 2 * PVIRTQ_EVENT_SIZE


def event_pos(slot: int, wrap: int, size: int) -> int:
    """A ring position on the circle of ``2*size`` (the lap with wrap counter 1 first)."""
    return slot if wrap else slot + size


def event_decision(
    event: int, event_idx: bool, new_idx: int, new_wrap: int, advanced: int, size: int
) -> bool:
    """§2.8.10: notify for ``advanced`` slots published up to (``new_idx``, ``new_wrap``)?

    ``event`` is the peer's event suppression structure read as one le32 (off_wrap low, flags
    high). DISABLE -> no. DESC with EVENT_IDX -> iff ``off_wrap`` lies in the window (a window of
    a whole lap or more crosses every slot: yes). ENABLE, the reserved value 3, or DESC without
    EVENT_IDX (a driver bug) -> yes: a spurious notification is harmless, a lost one hangs.
    """
    flags = event >> 16 & 3
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    if flags != RING_EVENT_FLAGS_DESC or not event_idx:
        return True
    if advanced >= size:
        return True
    return packed_need_event(event & 0xFFFF, new_idx, new_idx - advanced, new_wrap, size)


NO_VIEWS: tuple[memoryview, ...] = ()


def ring_views(
    mem: GuestMemory, desc: int, size: int, driver: int, device: int
) -> tuple[memoryview, ...]:
    """Typed views: descriptor ring as (u16, u32, u64), then each event structure as one u32.

    Descriptor ``i``: addr ``u64[2i]``, len ``u32[4i+2]``, id ``u16[8i+6]``, flags ``u16[8i+7]``.
    An event structure read or written through its u32 view is one aligned 32-bit access
    (off_wrap in the low half, flags in the high half; little-endian host, checked at import).
    """
    try:
        d = mem.view(desc, size * VIRTQ_PACKED_DESC_SIZE)
        drv = mem.view(driver, PVIRTQ_EVENT_SIZE)
        dev = mem.view(device, PVIRTQ_EVENT_SIZE)
    except GuestMemoryError as e:
        raise QueueError(f"packed ring areas not in guest RAM: {e}") from None
    return d.cast("H"), d.cast("I"), d.cast("Q"), drv.cast("I"), dev.cast("I")


def release_all(views: tuple[memoryview, ...]) -> None:
    for v in views:
        v.release()


class PackedQueue:
    """The device's half of a packed virtqueue (virtio 1.2 §2.8); implements ``DeviceQueue``."""

    format = FORMAT

    def __init__(self, size: int = 256, *, event_idx: bool = False, indirect: bool = False) -> None:
        self.max_size = size
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self._mem: GuestMemory | None = None
        self._views = NO_VIEWS
        self.reset()

    # -- configuration ------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the state after device reset (§2.1.2): not ready, counters at 0/wrap 1."""
        self.release_views()
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.next_avail = 0
        self.avail_wrap = 1
        self.next_used = 0
        self.used_wrap = 1
        self.inflight = 0  # ring slots popped and not yet pushed back
        self._staged_first: tuple[int, int] | None = None  # (slot, flags) stored by publish
        self._staged = 0
        self._mark_signalled()

    def _mark_signalled(self) -> None:
        """Notification window starts at the current used position (nothing pending)."""
        self._pub_idx, self._pub_wrap = self.next_used, self.used_wrap
        self._since_signal = 0

    def release_views(self) -> None:
        """Drop the cached ring views (before the memory they point into is unmapped)."""
        release_all(self._views)
        self._views = NO_VIEWS
        self._mem = None

    def _v(self, mem: GuestMemory) -> tuple[memoryview, ...]:
        if mem is not self._mem:
            self.validate(mem)
        return self._views

    @property
    def in_flight(self) -> int:
        """Ring slots popped and not yet pushed."""
        return self.inflight

    def set_addresses(self, desc: int, driver: int, device: int) -> None:
        """Descriptor Ring, Driver Event Suppression, Device Event Suppression (§2.8)."""
        self.release_views()
        self.desc_addr = desc
        self.driver_addr = driver
        self.device_addr = device

    def set_size(self, size: int) -> None:
        """Queue size as the driver programmed it (checked in ``validate``)."""
        self.release_views()
        self.size = size
        self._mark_signalled()

    def validate(self, mem: GuestMemory) -> None:
        """§2.8.10.1: size 1..32768 (any, not only powers of 2), areas aligned and in RAM."""
        n = self.size
        if not isinstance(n, int) or not 1 <= n <= VIRTQ_MAX_SIZE:
            raise QueueError(f"packed queue size {n} outside 1..{VIRTQ_MAX_SIZE}")
        if n > self.max_size:
            raise QueueError(
                f"packed queue size {n} larger than the device's maximum {self.max_size}"
            )
        for name, addr, align, length in (
            ("descriptor ring", self.desc_addr, PVIRTQ_DESC_ALIGN, n * VIRTQ_PACKED_DESC_SIZE),
            ("driver event suppression", self.driver_addr, PVIRTQ_EVENT_ALIGN, PVIRTQ_EVENT_SIZE),
            ("device event suppression", self.device_addr, PVIRTQ_EVENT_ALIGN, PVIRTQ_EVENT_SIZE),
        ):
            if addr % align:
                raise QueueError(f"packed {name} at {addr:#x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise QueueError(f"packed {name} {addr:#x}+{length:#x} is outside guest RAM")
        if self.next_avail >= n or self.next_used >= n:
            raise QueueError(
                f"packed ring base avail {self.next_avail} / used {self.next_used} beyond size {n}"
            )
        self.release_views()
        self._views = ring_views(mem, self.desc_addr, n, self.driver_addr, self.device_addr)
        self._mem = mem

    # -- vhost-user ring base (VHOST_USER_GET/SET_VRING_BASE) ----------------------------------
    def get_base(self) -> int:
        """``next_avail | avail_wrap << 15`` (the low 16 bits of vhost-user's packed base)."""
        return self.next_avail | self.avail_wrap << PVIRTQ_EVENT_WRAP_SHIFT

    def set_base(self, base: int) -> None:
        """Resume at ``base`` (low 16 bits as ``get_base``); the used side resumes there too.

        A restarted backend has nothing in flight (vhost-user stops a ring with GET_VRING_BASE),
        so the used position equals the avail one; ``set_used_base`` overrides it.
        """
        idx, wrap = base & BASE_MASK, base >> PVIRTQ_EVENT_WRAP_SHIFT & 1
        if idx >= self.size:
            raise QueueError(f"packed ring base {idx} is beyond queue size {self.size}")
        self.next_avail, self.avail_wrap = idx, wrap
        self.next_used, self.used_wrap = idx, wrap
        self.inflight = 0
        self._staged_first = None
        self._staged = 0
        self._mark_signalled()

    def get_used_base(self) -> int:
        """``next_used | used_wrap << 15`` (bits 16-31 of QEMU's packed vring base)."""
        return self.next_used | self.used_wrap << PVIRTQ_EVENT_WRAP_SHIFT

    def set_used_base(self, base: int) -> None:
        """Resume the used side at ``base``; slots between it and ``next_avail`` are in flight."""
        idx, wrap = base & BASE_MASK, base >> PVIRTQ_EVENT_WRAP_SHIFT & 1
        n = self.size
        if idx >= n:
            raise QueueError(f"packed used base {idx} is beyond queue size {n}")
        gap = (event_pos(self.next_avail, self.avail_wrap, n) - event_pos(idx, wrap, n)) % (2 * n)
        if gap > n:
            raise QueueError(
                f"packed used base {idx}/wrap {wrap} is more than a ring behind avail "
                f"{self.next_avail}/wrap {self.avail_wrap}"
            )
        self.next_used, self.used_wrap = idx, wrap
        self.inflight = gap
        self._mark_signalled()

    # -- positions for a native burst and for restart (``queue.DeviceQueue``) -----------------
    def positions(self) -> RingPositions:
        return RingPositions(self.next_avail, self.next_used, self.inflight, self._staged,
                             self.avail_wrap, self.used_wrap, self._staged_first)

    def adopt(self, pos: RingPositions) -> None:
        """Take over what a native burst did (slots popped, used elements staged; the first
        staged element's flags are kept back for ``publish``)."""
        self.next_avail, self.avail_wrap = pos.next_avail, pos.avail_wrap
        self.next_used, self.used_wrap = pos.next_used, pos.used_wrap
        self.inflight = pos.in_flight
        self._staged = pos.staged
        self._staged_first = pos.staged_first

    def rewind(self, chains: Sequence[DescriptorChain], mem: GuestMemory | None = None) -> None:
        """Give ``chains`` (the last popped, none used) back: next-avail moves back over their
        descriptors (packed rings count descriptors and may cross a wrap); the used side stays."""
        if not chains:
            return
        used = self.get_used_base()
        idx, wrap = self.next_avail, self.avail_wrap
        idx -= sum(c.ring_descs for c in chains)
        while idx < 0:
            idx += self.size
            wrap ^= 1
        self.set_base(idx | wrap << PVIRTQ_EVENT_WRAP_SHIFT)
        self.set_used_base(used)

    def get_vring_base32(self) -> int:
        """QEMU's 32-bit packed vring base: avail (idx|wrap<<15) | used (idx|wrap<<15) << 16."""
        return self.get_base() | self.get_used_base() << 16

    # -- available side ---------------------------------------------------------------------
    def has_available(self, mem: GuestMemory) -> bool:
        """Is the descriptor at ``next_avail`` available for our wrap counter? (§2.8.1)."""
        flags = self._v(mem)[0][self.next_avail * 8 + 7]
        return flags & AVAIL_USED == (VIRTQ_DESC_F_AVAIL if self.avail_wrap else VIRTQ_DESC_F_USED)

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain or None; ``QueueError`` for a malformed ring."""
        got = self.pop_batch(mem, 1)
        return got[0] if got else None

    def pop_batch(self, mem: GuestMemory, limit: int) -> list[DescriptorChain]:
        """Up to ``limit`` available chains in ring order (§2.8.12; ``ChainBuilder`` checks the
        descriptors). A bad chain after good ones ends the batch early, raised next call."""
        out: list[DescriptorChain] = []
        if not self.ready or limit <= 0:
            return out
        u16, u32, u64 = self._v(mem)[:3]
        size = self.size
        indirect_ok = self.indirect
        slot = self.next_avail
        wrap = self.avail_wrap
        inflight = self.inflight
        append = out.append
        budget = PopBudget()
        try:
            for _ in range(limit):
                if out and budget.spend(out[-1]):  # this call's work budget (chain.py)
                    break
                flags = u16[slot * 8 + 7]
                if flags & AVAIL_USED != (_F_AVAIL if wrap else _F_USED):
                    break  # §2.8.1: not available for our wrap counter
                head_slot = s = slot
                w = wrap
                b = ChainBuilder(mem, head_slot, size, indirect_ok)
                n = 1
                if flags & _F_INDIRECT:
                    self._walk_indirect(mem, b, head_slot, u32[s * 4 + 2], u64[s * 2], flags)
                else:
                    b.add(u64[s * 2], u32[s * 4 + 2], flags)
                    while flags & _F_NEXT:  # §2.8.6: the list continues in the next ring slot
                        if n >= size:
                            raise QueueError(
                                f"packed slot {head_slot}: chain longer than the queue size "
                                f"{size}"
                            )
                        n += 1
                        s += 1
                        if s == size:
                            s = 0
                            w ^= 1
                        flags = u16[s * 8 + 7]
                        if flags & AVAIL_USED != (_F_AVAIL if w else _F_USED):
                            raise QueueError(
                                f"packed slot {head_slot}: chain descriptor at slot {s} is not "
                                f"available (flags {flags:#06x}, wrap counter {w})"
                            )
                        if flags & _F_INDIRECT:
                            # §2.8.19: no INDIRECT inside a NEXT-linked list (ChainBuilder
                            # refuses it with the reason)
                            b.enter_indirect(u64[s * 2], u32[s * 4 + 2], flags)
                        b.add(u64[s * 2], u32[s * 4 + 2], flags)
                buf_id = u16[s * 8 + 6]  # §2.8.6: the id is in the last descriptor of the list
                if buf_id >= size:
                    raise QueueError(
                        f"packed slot {head_slot}: buffer id {buf_id} >= queue size {size}"
                    )
                if inflight + n > size:
                    raise QueueError(
                        f"packed slot {head_slot}: driver made more than {size} descriptors "
                        f"available (in flight {inflight} + {n})"
                    )
                chain = b.finish(n)
                chain.head = buf_id
                append(chain)
                # commit: the chain is accepted
                slot = s + 1
                if slot == size:
                    slot = 0
                    w ^= 1
                wrap = w
                inflight += n
        except (QueueError, GuestMemoryError):
            if not out:
                raise
            # Hand out the good chains; the bad one is met (and raised) again by the next call.
        finally:
            self.next_avail = slot
            self.avail_wrap = wrap
            self.inflight = inflight
        return out

    @staticmethod
    def _walk_indirect(
        mem: GuestMemory, b: ChainBuilder, head_slot: int, length: int, addr: int, flags: int
    ) -> None:
        """§2.8.7: a ring descriptor naming a table of sequential ``pvirtq_desc`` entries."""
        if length > PACKED_MAX_INDIRECT * VIRTQ_PACKED_DESC_SIZE:
            raise QueueError(
                f"packed slot {head_slot}: indirect table of {length} bytes exceeds "
                f"{PACKED_MAX_INDIRECT} descriptors"
            )
        # WRITE on the INDIRECT descriptor itself is reserved and ignored by the device.
        entries = b.enter_indirect(addr, length, flags & ~_F_WRITE)
        t = mem.view(addr, length)
        t16, t32, t64 = t.cast("H"), t.cast("I"), t.cast("Q")
        add = b.add
        check = b.check_table_flags
        for k in range(entries):
            tf = t16[k * 8 + 7]
            check(tf)
            # Only WRITE is valid in a table entry; NEXT and the id are ignored (§2.8.7).
            add(t64[k * 2], t32[k * 4 + 2], tf & _F_WRITE)

    # -- used side ----------------------------------------------------------------------------
    def push(self, mem: GuestMemory, chain: DescriptorChain, written: int) -> None:
        """Write a used descriptor for ``chain`` at ``next_used`` (flags held back if first).

        §2.8.4/§2.8.3: len is what the device wrote, WRITE set when it wrote anything; AVAIL and
        USED both equal the device's wrap counter. ``next_used`` then skips the chain's slots.
        """
        n = chain.ring_descs
        if not 0 <= written <= chain.writable_len:
            raise ValueError(
                f"used length {written} outside 0..{chain.writable_len} for buffer {chain.head}"
            )
        if n > self.inflight:
            raise ValueError(
                f"push of buffer {chain.head} ({n} slots) with {self.inflight} in flight"
            )
        slot = self.next_used
        views = self._v(mem)
        u16 = views[0]
        views[1][slot * 4 + 2] = written
        u16[slot * 8 + 6] = chain.head
        flags = (AVAIL_USED if self.used_wrap else 0) | (VIRTQ_DESC_F_WRITE if written else 0)
        if self._staged_first is None:
            self._staged_first = (slot, flags)
        else:
            u16[slot * 8 + 7] = flags  # the driver polls the first element's slot, not this
        self._staged += 1
        slot += n
        if slot >= self.size:
            slot -= self.size
            self.used_wrap ^= 1
        self.next_used = slot
        self.inflight -= n

    def push_batch(self, mem: GuestMemory, items: Sequence[tuple[DescriptorChain, int]]) -> None:
        """``push`` for many (chain, written) pairs with one ring view."""
        if not items:
            return
        size = self.size
        u16, u32 = self._v(mem)[:2]
        slot, uw, inflight = self.next_used, self.used_wrap, self.inflight
        first = self._staged_first
        for k, (chain, written) in enumerate(items):
            n = chain.ring_descs
            if not 0 <= written <= chain.writable_len or n > inflight:
                self.next_used, self.used_wrap, self.inflight = slot, uw, inflight
                self._staged_first = first
                self._staged += k
                return self.push(mem, chain, written)  # raises the precise ValueError
            u32[slot * 4 + 2] = written
            u16[slot * 8 + 6] = chain.head
            flags = (AVAIL_USED if uw else 0) | (VIRTQ_DESC_F_WRITE if written else 0)
            if first is None:
                first = (slot, flags)
            else:
                u16[slot * 8 + 7] = flags
            slot += n
            if slot >= size:
                slot -= size
                uw ^= 1
            inflight -= n
        self.next_used, self.used_wrap, self.inflight = slot, uw, inflight
        self._staged_first = first
        self._staged += len(items)

    def publish(self, mem: GuestMemory) -> int:
        """Store the first staged used descriptor's flags (last), exposing the whole batch."""
        first = self._staged_first
        if first is None:
            return 0
        slot, flags = first
        # x86 TSO: the element stores in push are visible before this single u16 store.
        self._v(mem)[0][slot * 8 + 7] = flags
        n = self._staged
        self._staged_first = None
        self._staged = 0
        # Slots advanced since the last notification decision (the DESC window).
        size = self.size
        old = event_pos(self._pub_idx, self._pub_wrap, size)
        self._since_signal += (event_pos(self.next_used, self.used_wrap, size) - old) % (2 * size)
        self._pub_idx, self._pub_wrap = self.next_used, self.used_wrap
        return n

    # -- notifications ------------------------------------------------------------------------
    def needs_notification(self, mem: GuestMemory) -> bool:
        """§2.8.10: must the device send a used buffer notification for what it published?

        Reads the Driver Event Suppression structure: DISABLE -> no; DESC with EVENT_IDX -> yes
        iff the position ``off_wrap`` was used since the last decision; otherwise yes. Nothing
        published since the last decision -> no.
        """
        advanced = self._since_signal
        self._since_signal = 0
        if advanced == 0:
            return False
        drv_event = self._v(mem)[3]
        full_fence()  # the used flags store before the event structure load
        return event_decision(
            drv_event[0],  # one load: off_wrap (low half) and flags (high half)
            self.event_idx,
            self._pub_idx,
            self._pub_wrap,
            advanced,
            self.size,
        )

    def enable_notifications(self, mem: GuestMemory) -> bool:
        """Ask for available buffer notifications; True if buffers are already available.

        With EVENT_IDX: DESC at our next avail position (§2.8.10), otherwise ENABLE.
        """
        dev_event = self._v(mem)[4]
        if self.event_idx:
            off_wrap = self.next_avail | self.avail_wrap << PVIRTQ_EVENT_WRAP_SHIFT
            dev_event[0] = off_wrap | RING_EVENT_FLAGS_DESC << 16  # one 32-bit store
        else:
            dev_event[0] = RING_EVENT_FLAGS_ENABLE << 16
        full_fence()  # the event store before re-reading the next descriptor's flags
        return self.has_available(mem)

    def disable_notifications(self, mem: GuestMemory) -> None:
        """RING_EVENT_FLAGS_DISABLE in the Device Event Suppression structure."""
        self._v(mem)[4][0] = RING_EVENT_FLAGS_DISABLE << 16
