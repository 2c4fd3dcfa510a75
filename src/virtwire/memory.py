"""Guest memory: the one interface every ring access goes through.

Theory of operation
-------------------
The virtio core never owns memory. Each ring access receives a ``GuestMemory`` (vm-memory's rule:
access only; creating and mapping memory belongs to whoever hosts the device). A guest memory is a
set of non-overlapping regions, each a contiguous run of guest-physical addresses backed by a
writable buffer (an ``mmap`` of a memfd shared with QEMU, or a ``bytearray`` in tests).

Every address and length here comes from the guest and is hostile until checked. All checks are
done in ``_locate``: an access must lie entirely inside one region, otherwise ``GuestMemoryError``
is raised. Callers in the core turn that into NEEDS_RESET or a refused chain.

Memory order: indices that another process reads concurrently (``used.idx``, ``avail.idx``, packed
descriptor flags) are stored with a single aligned item store on a typed memoryview (one machine
store), never with ``struct.pack_into`` (CPython zeroes the target before writing, and the other
side can observe the zero). x86 is TSO, so stores become visible in program order; on other hosts
the C helpers add explicit fences.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NewType, Protocol, runtime_checkable

GuestAddress = NewType("GuestAddress", int)

__all__ = [
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "RegionMemory",
    "BytearrayGuestMemory",
    "MmapGuestMemory",
    "MemoryGuard",
    "shrink_sealed",
]


class GuestMemoryError(Exception):
    """An access outside guest RAM (the guest's fault: a bad address or length)."""


@runtime_checkable
class GuestMemory(Protocol):
    """Access-only view of guest RAM (see module docstring)."""

    def read(self, gpa: int, n: int) -> bytes: ...
    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...
    def view(self, gpa: int, n: int) -> memoryview: ...
    def read_u16(self, gpa: int) -> int: ...
    def read_u32(self, gpa: int) -> int: ...
    def read_u64(self, gpa: int) -> int: ...
    def write_u16(self, gpa: int, value: int) -> None: ...
    def write_u32(self, gpa: int, value: int) -> None: ...
    def write_u64(self, gpa: int, value: int) -> None: ...
    def contains(self, gpa: int, n: int) -> bool: ...


@dataclass
class MemoryRegion:
    """One contiguous run of guest-physical memory backed by ``buf``.

    ``userspace_addr`` is the front end's virtual address of the region's start (vhost-user sends
    ring addresses in that space); ``0`` when not applicable.
    """

    gpa: int
    size: int
    buf: memoryview
    userspace_addr: int = 0
    fd: int = -1
    mmap_offset: int = 0
    _owner: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or len(self.buf) < self.size:
            raise ValueError(f"region buffer of {len(self.buf)} bytes cannot hold {self.size}")
        if self.gpa < 0 or self.gpa + self.size > 1 << 64:
            raise ValueError(f"region at {self.gpa:#x}+{self.size:#x} outside 64-bit space")
        self.buf = self.buf[: self.size].cast("B")
        # Typed views for single-store index publishes (module docstring, "Memory order").
        self.u16 = self.buf[: self.size & ~1].cast("H")
        self.u32 = self.buf[: self.size & ~3].cast("I")
        self.u64 = self.buf[: self.size & ~7].cast("Q")

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def release(self) -> None:
        for v in (self.u16, self.u32, self.u64, self.buf):
            v.release()


class RegionMemory:
    """A ``GuestMemory`` over a sorted list of non-overlapping ``MemoryRegion``s."""

    def __init__(self, regions: list[MemoryRegion] | None = None) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._derived: dict[str, Any] = {}
        for r in regions or []:
            self.add_region(r)

    def derived(self, key: str, make: Callable[[RegionMemory], Any]) -> Any:
        """An object computed from the region set, made once and kept until the set changes.

        For objects that export the regions' buffers (the native data path's host-address
        table): ``add_region``/``remove_region`` drop them first, calling their ``release()``,
        so no export outlives its region and ``unmap`` can close the mapping.
        """
        v = self._derived.get(key)
        if v is None:
            v = self._derived[key] = make(self)
        return v

    def _drop_derived(self) -> None:
        derived, self._derived = self._derived, {}
        for v in derived.values():
            release = getattr(v, "release", None)
            if release is not None:
                release()

    # -- region management (the host's side, not the core's) -------------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def add_region(self, region: MemoryRegion) -> None:
        self._drop_derived()
        i = bisect.bisect_left(self._starts, region.gpa)
        if i > 0 and self._regions[i - 1].end > region.gpa:
            raise GuestMemoryError(f"region {region.gpa:#x} overlaps {self._regions[i - 1].gpa:#x}")
        if i < len(self._regions) and region.end > self._regions[i].gpa:
            raise GuestMemoryError(f"region {region.gpa:#x} overlaps {self._regions[i].gpa:#x}")
        self._regions.insert(i, region)
        self._starts.insert(i, region.gpa)

    def remove_region(self, gpa: int) -> MemoryRegion:
        self._drop_derived()
        i = bisect.bisect_left(self._starts, gpa)
        if i >= len(self._starts) or self._starts[i] != gpa:
            raise GuestMemoryError(f"no region at {gpa:#x}")
        del self._starts[i]
        return self._regions.pop(i)

    def uva_to_gpa(self, uva: int, n: int = 1) -> int:
        """Translate a front end's virtual address (vhost-user ring addresses) to a GPA."""
        for r in self._regions:
            off = uva - r.userspace_addr
            if r.userspace_addr and 0 <= off and off + n <= r.size:
                return r.gpa + off
        raise GuestMemoryError(f"user address {uva:#x}+{n:#x} is in no region")

    # -- bounds checks -----------------------------------------------------------------------
    def _locate(self, gpa: int, n: int) -> tuple[MemoryRegion, int]:
        if n < 0 or gpa < 0:
            raise GuestMemoryError(f"bad access {gpa:#x}+{n:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            off = gpa - r.gpa
            if off + n <= r.size:
                return r, off
        raise GuestMemoryError(f"guest address {gpa:#x}+{n:#x} is outside guest RAM")

    def contains(self, gpa: int, n: int) -> bool:
        try:
            self._locate(gpa, n)
        except GuestMemoryError:
            return False
        return True

    # -- access ------------------------------------------------------------------------------
    def view(self, gpa: int, n: int) -> memoryview:
        r, off = self._locate(gpa, n)
        return r.buf[off : off + n]

    def read(self, gpa: int, n: int) -> bytes:
        r, off = self._locate(gpa, n)
        return bytes(r.buf[off : off + n])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        r, off = self._locate(gpa, n)
        r.buf[off : off + n] = data

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        r, off = self._locate(gpa, n)
        r.buf[off : off + n] = bytes([byte]) * n

    def read_u16(self, gpa: int) -> int:
        r, off = self._locate(gpa, 2)
        if off & 1 == 0:
            return r.u16[off >> 1]
        return int.from_bytes(r.buf[off : off + 2], "little")

    def read_u32(self, gpa: int) -> int:
        r, off = self._locate(gpa, 4)
        if off & 3 == 0:
            return r.u32[off >> 2]
        return int.from_bytes(r.buf[off : off + 4], "little")

    def read_u64(self, gpa: int) -> int:
        r, off = self._locate(gpa, 8)
        if off & 7 == 0:
            return r.u64[off >> 3]
        return int.from_bytes(r.buf[off : off + 8], "little")

    def write_u16(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 2)
        if off & 1 == 0:
            r.u16[off >> 1] = value & 0xFFFF  # single aligned store
        else:
            r.buf[off : off + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def write_u32(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 4)
        if off & 3 == 0:
            r.u32[off >> 2] = value & 0xFFFFFFFF
        else:
            r.buf[off : off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def write_u64(self, gpa: int, value: int) -> None:
        r, off = self._locate(gpa, 8)
        if off & 7 == 0:
            r.u64[off >> 3] = value & 0xFFFFFFFFFFFFFFFF
        else:
            r.buf[off : off + 8] = (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")


class MemoryGuard(Protocol):
    """Makes a shrunk mapping harmless (``net.native.SigbusGuard``): a SIGBUS in a guarded range
    maps a zero page over the fault and counts it instead of killing the process."""

    def add(self, addr: int, length: int, align: int) -> int | None: ...
    def faults(self, slot: int) -> int: ...
    def remove(self, slot: int) -> None: ...


def shrink_sealed(fd: int) -> bool:
    """True when ``fd``'s file cannot shrink any more: sealed with ``F_SEAL_SHRINK`` already
    (QEMU's memfd backend seals), or sealable and sealed now by us."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # a file system without seals (a disk file, hugetlbfs on old kernels)
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:
        return False  # created without MFD_ALLOW_SEALING (DPDK's --no-huge memory)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True


class BytearrayGuestMemory(RegionMemory):
    """Guest RAM held in ``bytearray``s, for tests and the in-process driver/device pair."""

    def __init__(self, size: int = 0, base: int = 0, regions: list[tuple[int, int]] | None = None):
        super().__init__()
        spans = list(regions or [])
        if size:
            spans.insert(0, (base, size))
        for gpa, n in spans:
            ba = bytearray(n)
            self.add_region(MemoryRegion(gpa=gpa, size=n, buf=memoryview(ba), _owner=ba))


class MmapGuestMemory(RegionMemory):
    """Guest RAM mapped from file descriptors (memfds shared with QEMU or a vhost-user peer).

    ``untrusted=True`` (a peer's memory: vhost-user, the PCI proxy) only takes a regular file
    (memfds are) covering the region, that cannot shrink under us (``shrink_sealed``) or whose
    mapping ``guard`` protects (issue 14, defect 1: a truncated memfd raised SIGBUS and killed
    the process); ``faulted()`` tells whether a guarded mapping was hit since.

    # SAFETY: the mmap objects are kept alive by their regions; ``close()`` releases every view
    # before unmapping, so no memoryview outlives its mapping.
    """

    def __init__(self, *, untrusted: bool = False, guard: MemoryGuard | None = None) -> None:
        super().__init__()
        self._maps: dict[int, mmap.mmap] = {}
        self.untrusted = untrusted
        self.guard = guard
        self._guarded: dict[int, int] = {}  # gpa -> guard slot

    def faulted(self) -> bool:
        """A guarded mapping was accessed beyond its file's end (the peer shrank it)."""
        return self.guard is not None and any(self.guard.faults(s) for s in
                                              self._guarded.values())

    def _check_fd(self, fd: int, gpa: int, size: int, mmap_offset: int) -> tuple[bool, int]:
        """(sealed, page alignment) of a region's fd, or ``GuestMemoryError``."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise GuestMemoryError(f"cannot stat region fd {fd}: {e}") from None
        if self.untrusted and not stat.S_ISREG(st.st_mode):
            raise GuestMemoryError(f"region {gpa:#x}: fd is not a memfd or regular file")
        if (self.untrusted or st.st_size) and mmap_offset + size > st.st_size:
            raise GuestMemoryError(f"region {gpa:#x}: offset {mmap_offset:#x}+{size:#x} beyond "
                                   f"its file ({st.st_size:#x})")
        sealed = not self.untrusted or shrink_sealed(fd)
        if not sealed and self.guard is None:
            raise GuestMemoryError(f"region {gpa:#x}: its file can shrink (no F_SEAL_SHRINK, "
                                   "cannot be sealed) and no SIGBUS guard is available")
        align = st.st_blksize if st.st_blksize & (st.st_blksize - 1) == 0 else mmap.PAGESIZE
        return sealed, max(align, mmap.PAGESIZE)

    def _guard(self, m: mmap.mmap, gpa: int, align: int) -> None:
        assert self.guard is not None
        anchor = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(anchor)
        del anchor  # the export ends here; ``unmap`` must be able to close the mapping
        slot = self.guard.add(addr, len(m), align)
        if slot is None:
            raise GuestMemoryError(f"region {gpa:#x}: no free SIGBUS guard slot")
        self._guarded[gpa] = slot

    def map_fd(
        self, fd: int, gpa: int, size: int, mmap_offset: int = 0, userspace_addr: int = 0
    ) -> MemoryRegion:
        if size <= 0:
            raise GuestMemoryError(f"region size {size:#x} is not positive")
        if mmap_offset < 0:
            raise GuestMemoryError(f"mmap offset {mmap_offset:#x} is negative")
        sealed, align = self._check_fd(fd, gpa, size, mmap_offset)
        # mmap needs a page-aligned offset: map from the page below and slice.
        page = mmap.ALLOCATIONGRANULARITY
        base = mmap_offset - (mmap_offset % page)
        try:
            m = mmap.mmap(fd, size + (mmap_offset - base), mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map region {gpa:#x}+{size:#x}: {e}") from None
        if not sealed:
            try:
                self._guard(m, gpa, align)
            except GuestMemoryError:
                m.close()
                raise
        view = memoryview(m)[mmap_offset - base :]
        region = MemoryRegion(gpa=gpa, size=size, buf=view, userspace_addr=userspace_addr,
                              fd=fd, mmap_offset=mmap_offset, _owner=m)
        try:
            self.add_region(region)
        except GuestMemoryError:
            self._unguard(gpa)
            region.release()
            view.release()
            m.close()
            raise
        self._maps[gpa] = m
        return region

    def _unguard(self, gpa: int) -> None:
        slot = self._guarded.pop(gpa, None)
        if slot is not None and self.guard is not None:
            self.guard.remove(slot)

    def unmap(self, gpa: int) -> None:
        region = self.remove_region(gpa)
        self._unguard(gpa)
        region.release()
        m = self._maps.pop(gpa, None)
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # a view still exported somewhere; the mapping goes with the last one

    def close(self) -> None:
        for r in list(self._regions):
            self.unmap(r.gpa)
