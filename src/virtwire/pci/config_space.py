"""PCI configuration space of one type-0 function: header, BARs with sizing, capability list.

Theory of operation
-------------------
A conventional PCI function exposes 256 bytes of configuration space (PCI Local Bus 3.0 §6.1).
The first 64 bytes are the type-0 header; capabilities (§6.7) live above it, chained from the
Capabilities Pointer at 0x34 when the Status register's Capabilities List bit is set.

``PciConfigSpace`` keeps the 256 bytes in a ``bytearray`` plus a per-byte *write mask*: a write
changes only the masked bits, so read-only fields (ids, class, status, capability bodies) cannot be
changed by the guest. Three areas have their own semantics and are handled before the mask:

- **BARs** (0x10-0x24, §6.2.5.1): a BAR of size ``2**n`` keeps only the address bits above ``n``;
  the low bits read back as the type flags (bit 0 = I/O space; bits 1-2 = 32-bit memory; bit 3 =
  prefetchable). So writing all-ones and reading back gives ``~(size - 1) | flags``: the sizing
  probe firmware, QEMU's proxy (hw/remote/proxy.c ``probe_pci_info``) and Linux all use. An
  unimplemented BAR reads as zero whatever is written. Only 32-bit BARs exist here (the proxy
  probes 32-bit BARs only).
- **Expansion ROM BAR** (0x30): not implemented, reads zero.
- **Hooked ranges**: a device registers read/write hooks on a byte range (the virtio PCI
  configuration access capability's data window, virtio 1.2 §4.1.4.9), which turn a config access
  into a BAR access.

Every access is checked here (offset, width): an access outside 256 bytes or of a width other than
1, 2 or 4 logs one warning and reads as zero / is ignored. Values are little-endian.

Listeners (``on_write``) learn of every accepted write after it is applied; the transport uses them
to follow BAR programming, the Command register and the Interrupt Line the firmware assigns.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "PCI_CONFIG_SPACE_SIZE",
    "BarKind",
    "Bar",
    "PciConfigSpace",
    "PciConfigError",
]

log = logging.getLogger(__name__)

PCI_CONFIG_SPACE_SIZE = 256

# PCI Local Bus 3.0 §6.1 type-0 header offsets (names as in Linux's include/uapi/linux/pci_regs.h)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BIST = 0x0F
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_5 = 0x24
PCI_CARDBUS_CIS = 0x28
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_MIN_GNT = 0x3E
PCI_MAX_LAT = 0x3F
PCI_STD_HEADER_SIZEOF = 0x40
PCI_NUM_BARS = 6

PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_32 = 0x00
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

PCI_CAP_ID_VNDR = 0x09  # vendor-specific (virtio's capabilities)
PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1

_COMMAND_WRITABLE = (
    PCI_COMMAND_IO
    | PCI_COMMAND_MEMORY
    | PCI_COMMAND_MASTER
    | PCI_COMMAND_PARITY
    | PCI_COMMAND_SERR
    | PCI_COMMAND_INTX_DISABLE
)

ReadHook = Callable[[int, int], int]  # (offset, width) -> value
WriteHook = Callable[[int, int, int], None]  # (offset, width, value)


class PciConfigError(Exception):
    """A VMM-side misuse (overlapping BARs, capability list overflow): our bug, not the guest's."""


class BarKind(enum.Enum):
    """What a BAR decodes (§6.2.5.1)."""

    MEM32 = "mem32"
    IO = "io"


@dataclass
class Bar:
    """One implemented 32-bit BAR: ``size`` is a power of two; ``base`` is what is programmed."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False
    base: int = 0

    @property
    def flags(self) -> int:
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        return PCI_BASE_ADDRESS_MEM_TYPE_32 | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable
                                               else 0)

    @property
    def is_memory(self) -> bool:
        return self.kind is BarKind.MEM32

    def contains(self, addr: int, width: int) -> bool:
        """Is ``[addr, addr+width)`` inside this BAR as currently programmed?"""
        return self.base != 0 and self.base <= addr and addr + width <= self.base + self.size


class PciConfigSpace:
    """256 bytes of type-0 configuration space (see module docstring)."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision_id: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 1,
    ) -> None:
        self._data = bytearray(PCI_CONFIG_SPACE_SIZE)
        self._wmask = bytearray(PCI_CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self._caps: list[int] = []  # offsets of capabilities, in list order
        self._cap_end = PCI_STD_HEADER_SIZEOF
        self._read_hooks: list[tuple[int, int, ReadHook]] = []
        self._write_hooks: list[tuple[int, int, WriteHook]] = []
        self.on_write: list[WriteHook] = []
        self.refused = 0  # bad accesses seen (counted, logged)

        self._put(PCI_VENDOR_ID, 2, vendor_id)
        self._put(PCI_DEVICE_ID, 2, device_id)
        self._put(PCI_REVISION_ID, 1, revision_id)
        self._put(PCI_CLASS_PROG, 3, class_code)  # prog-if, subclass, base class
        self._put(PCI_HEADER_TYPE, 1, 0)  # type 0, single function
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(PCI_INTERRUPT_PIN, 1, interrupt_pin)  # 1 = INTA#
        self._set_wmask(PCI_COMMAND, 2, _COMMAND_WRITABLE)
        self._set_wmask(PCI_CACHE_LINE_SIZE, 1, 0xFF)
        self._set_wmask(PCI_LATENCY_TIMER, 1, 0xFF)
        self._set_wmask(PCI_INTERRUPT_LINE, 1, 0xFF)

    # -- construction (the VMM's side) -------------------------------------------------------
    def _put(self, off: int, width: int, value: int) -> None:
        self._data[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")

    def _set_wmask(self, off: int, width: int, mask: int) -> None:
        self._wmask[off : off + width] = mask.to_bytes(width, "little")

    def add_bar(self, index: int, size: int, kind: BarKind, prefetchable: bool = False) -> Bar:
        """Implement BAR ``index`` (0-5) of ``size`` bytes (a power of two; I/O >= 4, mem >= 16)."""
        if not 0 <= index < PCI_NUM_BARS or index in self.bars:
            raise PciConfigError(f"BAR {index} is not free")
        least = 4 if kind is BarKind.IO else 16
        if size < least or size & (size - 1) or size > 1 << 31:
            raise PciConfigError(f"BAR {index} size {size:#x} is not a power of two >= {least}")
        bar = Bar(index, size, kind, prefetchable)
        self.bars[index] = bar
        self._put(PCI_BASE_ADDRESS_0 + 4 * index, 4, bar.flags)
        return bar

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` follows the id and next bytes); returns its offset.

        ``writable`` is a per-byte write mask for ``body`` (default: read-only).
        """
        length = 2 + len(body)
        off = self._cap_end
        if off + length > PCI_CONFIG_SPACE_SIZE:
            raise PciConfigError(f"capability of {length} bytes does not fit at {off:#x}")
        self._data[off] = cap_id
        self._data[off + 1] = 0
        self._data[off + 2 : off + length] = body
        if writable is not None:
            if len(writable) != len(body):
                raise PciConfigError("capability write mask length differs from its body")
            self._wmask[off + 2 : off + length] = writable
        if self._caps:
            self._data[self._caps[-1] + PCI_CAP_LIST_NEXT] = off
        else:
            self._data[PCI_CAPABILITY_LIST] = off
            self._put(PCI_STATUS, 2, self.get(PCI_STATUS, 2) | PCI_STATUS_CAP_LIST)
        self._caps.append(off)
        self._cap_end = (off + length + 3) & ~3
        return off

    def add_read_hook(self, start: int, end: int, fn: ReadHook) -> None:
        """Reads wholly inside ``[start, end)`` are answered by ``fn(offset, width)``."""
        self._read_hooks.append((start, end, fn))

    def add_write_hook(self, start: int, end: int, fn: WriteHook) -> None:
        """Writes wholly inside ``[start, end)`` go to ``fn(offset, width, value)`` (not stored)."""
        self._write_hooks.append((start, end, fn))

    @property
    def capabilities(self) -> tuple[int, ...]:
        return tuple(self._caps)

    # -- raw access for the VMM (no hooks, no masks) -----------------------------------------
    def get(self, off: int, width: int) -> int:
        return int.from_bytes(self._data[off : off + width], "little")

    def set(self, off: int, width: int, value: int) -> None:
        """Store bypassing the write mask (device-side updates of capability fields)."""
        self._put(off, width, value)

    @property
    def command(self) -> int:
        return self.get(PCI_COMMAND, 2)

    @property
    def interrupt_line(self) -> int:
        return self._data[PCI_INTERRUPT_LINE]

    def set_interrupt_status(self, asserted: bool) -> None:
        """Reflect the INTx level in Status bit 3 (§6.2.3)."""
        st = self.get(PCI_STATUS, 2)
        self._put(PCI_STATUS, 2, st | PCI_STATUS_INTERRUPT if asserted
                  else st & ~PCI_STATUS_INTERRUPT)

    def bar_at(self, addr: int, width: int, memory: bool) -> tuple[Bar, int] | None:
        """Decode an absolute address to ``(bar, offset in bar)``; None if no BAR claims it.

        Decoding follows the programmed bases only; the Command register's enables are QEMU's
        concern (it only forwards accesses to regions it has mapped).
        """
        for bar in self.bars.values():
            if bar.is_memory == memory and bar.contains(addr, width):
                return bar, addr - bar.base
        return None

    # -- the guest's side -------------------------------------------------------------------
    def _bad(self, what: str, off: int, width: int) -> bool:
        if width not in (1, 2, 4) or off < 0 or off + width > PCI_CONFIG_SPACE_SIZE:
            self.refused += 1
            log.warning("config %s at %#x width %d refused: outside 256 bytes or bad width",
                        what, off, width)
            return True
        return False

    def read(self, off: int, width: int) -> int:
        """A configuration read by the guest (width 1, 2 or 4)."""
        if self._bad("read", off, width):
            return 0
        for start, end, fn in self._read_hooks:
            if start <= off and off + width <= end:
                return fn(off, width) & ((1 << (8 * width)) - 1)
        return self.get(off, width)

    def write(self, off: int, width: int, value: int) -> None:
        """A configuration write by the guest: masked, BAR semantics, hooks, then listeners."""
        if self._bad("write", off, width):
            return
        value &= (1 << (8 * width)) - 1
        for start, end, fn in self._write_hooks:
            if start <= off and off + width <= end:
                fn(off, width, value)
                return
        end = off + width
        if off < PCI_BASE_ADDRESS_5 + 4 and end > PCI_BASE_ADDRESS_0:
            self._write_bars(off, width, value)
        data = value.to_bytes(width, "little")
        for i in range(width):
            o = off + i
            if PCI_BASE_ADDRESS_0 <= o < PCI_BASE_ADDRESS_5 + 4:
                continue  # done by _write_bars
            m = self._wmask[o]
            if m:
                self._data[o] = (self._data[o] & ~m) | (data[i] & m)
        for fn in self.on_write:
            fn(off, width, value)

    def _write_bars(self, off: int, width: int, value: int) -> None:
        """Merge a (possibly partial) write into each BAR dword it touches (§6.2.5.1 sizing)."""
        data = value.to_bytes(width, "little")
        for idx in range(PCI_NUM_BARS):
            reg = PCI_BASE_ADDRESS_0 + 4 * idx
            lo, hi = max(off, reg), min(off + width, reg + 4)
            if lo >= hi:
                continue
            bar = self.bars.get(idx)
            if bar is None:
                continue  # unimplemented BAR: hardwired to zero
            raw = bytearray(self._data[reg : reg + 4])
            raw[lo - reg : hi - reg] = data[lo - off : hi - off]
            addr = int.from_bytes(raw, "little") & ~(bar.size - 1) & 0xFFFFFFFF
            if bar.kind is BarKind.IO:
                addr &= 0xFFFFFFFC
            else:
                addr &= 0xFFFFFFF0
            # An all-ones probe leaves ~(size-1): not a base. Bases count once programmed for real.
            bar.base = addr if addr != (~(bar.size - 1) & 0xFFFFFFFF & (
                0xFFFFFFFC if bar.kind is BarKind.IO else 0xFFFFFFF0)) else 0
            self._put(reg, 4, addr | bar.flags)
