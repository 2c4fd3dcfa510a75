"""Descriptor chains: the validated unit a device takes from a virtqueue.

Theory of operation
-------------------
Both ring formats (split, virtio 1.2 §2.7; packed, §2.8) hand the device a *chain* of descriptors
naming guest buffers: device-readable ones first, then device-writable ones (§2.7.4.2 / §2.8.6
"Message Framing"). A ring walker reads raw descriptors out of guest memory and feeds each one to a
``ChainBuilder``, which is the single place every guest-supplied descriptor value is checked:

- the buffer ``[addr, addr+len)`` lies inside guest RAM (``GuestMemory.contains``);
- a readable descriptor never follows a writable one (§2.7.4.2);
- the chain is no longer than the queue size (the TTL that also breaks ``next`` loops);
- an INDIRECT descriptor appears only when VIRTIO_F_INDIRECT_DESC was negotiated, never inside an
  indirect table, never with NEXT (split, §2.7.5.3.1) or WRITE set, and its table length is a
  non-zero multiple of 16 (§2.7.5.3 / §2.8.19);
- the total length stays below 2^32 (lengths are le32 in the used ring).

A violation raises ``QueueError`` (a ``DriverError``): the ring's owner marks the device
NEEDS_RESET, counts it and logs the reason. The resulting ``DescriptorChain`` holds plain ints, so
later reads and writes through it cannot go out of bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from virtwire.memory import GuestMemory
from virtwire.virtio.errors import QueueError
from virtwire.virtio.spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["DescriptorChain", "ChainBuilder", "MAX_CHAIN_BYTES", "MAX_CHAIN_SEGMENTS",
           "POP_DESC_BUDGET", "POP_BYTE_BUDGET", "PopBudget"]

MAX_CHAIN_BYTES = (1 << 32) - 1
# Descriptors per chain: min(queue size, this) for direct chains, this for an indirect table,
# as QEMU (VIRTQUEUE_MAX_SIZE); a 32768-entry table cost 60-85 ms per chain (issue 14, defect 3).
MAX_CHAIN_SEGMENTS = 1024
# Work per ``pop_batch`` call: it returns early once the chains taken hold this many
# descriptors or bytes (callers loop with a budget of calls, so a wake-up is bounded).
POP_DESC_BUDGET = 4096
POP_BYTE_BUDGET = 16 << 20


@dataclass(slots=True)
class DescriptorChain:
    """A validated chain: what the device reads (``readable``) and may write (``writable``).

    ``head`` is the id returned in the used element: the head descriptor index (split) or the
    buffer id (packed). ``ring_descs`` is how many ring slots the chain used (packed rings advance
    by it; an indirect chain uses one). ``segments`` holds ``(gpa, length, writable)`` in order.
    """

    head: int
    segments: list[tuple[int, int, bool]] = field(default_factory=list)
    readable_len: int = 0
    writable_len: int = 0
    ring_descs: int = 1
    indirect: bool = False

    def readable(self, mem: GuestMemory) -> Iterator[memoryview]:
        """Zero-copy views of the device-readable buffers, in order."""
        for gpa, n, w in self.segments:
            if not w and n:
                yield mem.view(gpa, n)

    def writable(self, mem: GuestMemory) -> Iterator[memoryview]:
        """Zero-copy views of the device-writable buffers, in order."""
        for gpa, n, w in self.segments:
            if w and n:
                yield mem.view(gpa, n)

    def read_all(self, mem: GuestMemory) -> bytes:
        """The readable part, gathered (one copy; the data path uses ``readable`` instead)."""
        return b"".join(self.readable(mem))

    def write(self, mem: GuestMemory, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable part starting at ``offset``; returns bytes written."""
        src = memoryview(data).cast("B")
        done = 0
        skip = offset
        for view in self.writable(mem):
            if skip >= len(view):
                skip -= len(view)
                continue
            room = len(view) - skip
            n = min(room, len(src) - done)
            view[skip : skip + n] = src[done : done + n]
            done += n
            skip = 0
            if done == len(src):
                break
        return done


class PopBudget:
    """The work one ``pop_batch`` call may do (``POP_DESC_BUDGET``/``POP_BYTE_BUDGET``)."""

    __slots__ = ("descs", "nbytes")

    def __init__(self) -> None:
        self.descs = self.nbytes = 0

    def spend(self, c: DescriptorChain) -> bool:
        """Count chain ``c``; True once the budget is used up (the batch ends there)."""
        self.descs += len(c.segments)
        self.nbytes += c.readable_len + c.writable_len
        return self.descs >= POP_DESC_BUDGET or self.nbytes >= POP_BYTE_BUDGET


class ChainBuilder:
    """Accumulates descriptors of one chain, checking each as it enters (see module docstring)."""

    __slots__ = ("chain", "mem", "max_descs", "indirect_ok", "_count", "_seen_write", "_in_table")

    def __init__(self, mem: GuestMemory, head: int, max_descs: int, indirect_ok: bool) -> None:
        self.chain = DescriptorChain(head=head)
        self.mem = mem
        self.max_descs = min(max_descs, MAX_CHAIN_SEGMENTS)
        self.indirect_ok = indirect_ok
        self._count = 0
        self._seen_write = False
        self._in_table = False

    def add(self, addr: int, length: int, flags: int) -> None:
        """Add one data descriptor (not an INDIRECT one)."""
        self._count += 1
        if self._count > self.max_descs:
            raise QueueError(
                f"chain at head {self.chain.head} longer than {self.max_descs} descriptors "
                "(loop or overlong chain)"
            )
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if writable:
            self._seen_write = True
        elif self._seen_write:
            raise QueueError(f"chain at head {self.chain.head}: readable descriptor after writable")
        if length and not self.mem.contains(addr, length):
            raise QueueError(
                f"chain at head {self.chain.head}: buffer {addr:#x}+{length:#x} outside guest RAM"
            )
        c = self.chain
        if writable:
            c.writable_len += length
        else:
            c.readable_len += length
        if c.readable_len + c.writable_len > MAX_CHAIN_BYTES:
            raise QueueError(f"chain at head {self.chain.head}: total length exceeds 2^32-1")
        c.segments.append((addr, length, writable))

    def enter_indirect(self, addr: int, length: int, flags: int, table_entry_size: int = 16) -> int:
        """Validate an INDIRECT descriptor; returns the number of entries in its table.

        After this the caller walks the table and calls ``add`` for each entry. The TTL becomes
        the table size (an indirect table may hold more entries than the ring has slots).
        """
        if not self.indirect_ok:
            raise QueueError(
                f"chain at head {self.chain.head}: INDIRECT descriptor without "
                "VIRTIO_F_INDIRECT_DESC"
            )
        if self._in_table:
            raise QueueError(f"chain at head {self.chain.head}: nested indirect descriptor")
        if self._count:
            # §2.7.5.3.1: a driver MUST NOT set both INDIRECT and NEXT; a chain that mixes direct
            # descriptors and an indirect table is refused (Linux never builds one).
            raise QueueError(
                f"chain at head {self.chain.head}: indirect table after direct descriptors"
            )
        if flags & VIRTQ_DESC_F_NEXT:
            raise QueueError(f"chain at head {self.chain.head}: INDIRECT together with NEXT")
        if flags & VIRTQ_DESC_F_WRITE:
            raise QueueError(f"chain at head {self.chain.head}: INDIRECT together with WRITE")
        if length == 0 or length % table_entry_size:
            raise QueueError(
                f"chain at head {self.chain.head}: indirect table length {length} is not a "
                f"non-zero multiple of {table_entry_size}"
            )
        if not self.mem.contains(addr, length):
            raise QueueError(
                f"chain at head {self.chain.head}: indirect table {addr:#x}+{length:#x} "
                "outside guest RAM"
            )
        entries = length // table_entry_size
        if entries > MAX_CHAIN_SEGMENTS:
            # Not capped by the queue size: Linux fills tables longer than a tiny queue, and
            # QEMU accepts up to VIRTQUEUE_MAX_SIZE entries in one.
            raise QueueError(
                f"chain at head {self.chain.head}: indirect table of {entries} descriptors "
                f"exceeds {MAX_CHAIN_SEGMENTS}"
            )
        self._in_table = True
        self.chain.indirect = True
        self.max_descs = entries
        self._count = 0
        return entries

    def check_table_flags(self, flags: int) -> None:
        """Inside an indirect table: INDIRECT is refused (no nesting)."""
        if flags & VIRTQ_DESC_F_INDIRECT:
            raise QueueError(f"chain at head {self.chain.head}: nested indirect descriptor")

    def finish(self, ring_descs: int) -> DescriptorChain:
        if not self.chain.segments:
            raise QueueError(f"chain at head {self.chain.head} has no descriptors")
        self.chain.ring_descs = ring_descs
        return self.chain
