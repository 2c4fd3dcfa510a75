"""The driver's view of the PCI bus: enumeration, BAR assignment, capability walk, INTx routing.

Theory of operation
-------------------
The qtest VM runs no BIOS, so this module is the firmware as well as the driver:

1. **Enumeration** (PCI Local Bus 3.0 §3.2.2.3.2, configuration mechanism 1): write
   ``0x80000000 | bus<<16 | dev<<11 | fn<<8 | reg&0xFC`` to port 0xCF8, then access 0xCFC+(reg&3).
   Vendor 0xFFFF means no function; header type bit 7 means more functions in the slot.
2. **BAR sizing and assignment**: with decoding disabled in the command register, write all ones to
   each BAR, read back, restore; the size is the two's complement of the writable address bits. A
   memory BAR with type 0b10 is 64-bit and consumes the next BAR slot as its upper half. We place
   memory BARs naturally aligned from ``MMIO_BASE`` (0xE0000000, inside i440fx's 32-bit PCI hole; a
   64-bit BAR gets a below-4G address with upper half 0) and I/O BARs from ``IO_BASE`` (0xC000).
3. **Enable**: command register memory + I/O space + bus master (the device DMAs into our RAM).
4. **INTx routing**: on i440fx the PIIX3 (00:01.0) routes PIRQA-D through registers 0x60-0x63 to
   ISA IRQs; QEMU's i440fx maps slot/pin to PIRQ as ``(slot - 1 + pin - 1) & 3``. We route
   PIRQA-D to 10, 10, 11, 11 (as SeaBIOS does), write the Interrupt Line register, and
   intercept the IOAPIC's inputs over qtest so an ``IRQ raise N`` line is the device's interrupt.
5. **Capability walk** (virtio 1.2 §4.1.4): from the pointer at 0x34 (when status bit 4 is set)
   follow ``cap_next``; the walk is bounded (48 steps, offsets in 0x40..0xFC, dword aligned) because
   the list comes from the device. Vendor capabilities (0x09) carry ``cfg_type``, ``bar``,
   ``offset``, ``length``; the notify capability adds ``notify_off_multiplier``.

The virtio transports over a function found here are in ``pci.driver``.

Every value read from the device (BAR sizes, capability offsets and lengths, queue sizes) is
checked before use; a bad one raises ``PciError`` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from virtwire.pci.config_space import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_CAP_ID_VNDR,
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_HEADER_TYPE,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_REVISION_ID,
    PCI_ROM_ADDRESS,
    PCI_STATUS,
    PCI_STATUS_CAP_LIST,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
)
from virtwire.virtio import spec

__all__ = [
    "PciError",
    "ConfigAccess",
    "BusAccess",
    "Mech1ConfigAccess",
    "Bar",
    "VirtioCap",
    "PciFunction",
    "BarAllocator",
    "enumerate_bus",
    "find_virtio_net",
    "assign_bars",
    "walk_capabilities",
    "route_intx",
    "size_bars",
    "MMIO_BASE",
    "IO_BASE",
    "MSIX_DATA_BASE",
    "PCI_CAP_ID_MSIX",
    "PCI_MSIX_FLAGS",
    "PCI_MSIX_FLAGS_ENABLE",
    "PCI_MSIX_FLAGS_MASKALL",
]

log = logging.getLogger(__name__)

PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x6
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4

PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000

MSIX_DATA_BASE = 0x5A00  # MSI-X message data = base + vector (see enable_msix)

PIIX3_PIRQRC = 0x60  # PIRQA..D route control, 00:01.0
PIRQ_IRQS = (10, 10, 11, 11)

MMIO_BASE = 0xE0000000
MMIO_LIMIT = 0xFEC00000  # IOAPIC above
IO_BASE = 0xC000
IO_LIMIT = 0x10000

MAX_CAPS = 48


class PciError(Exception):
    """A PCI function is missing or misbehaves (bad BAR, capability list or register value)."""


class ConfigAccess(Protocol):
    """PCI configuration space access for one host bridge."""

    def cfg_read(self, bus: int, dev: int, fn: int, off: int, width: int) -> int: ...
    def cfg_write(self, bus: int, dev: int, fn: int, off: int, width: int, value: int) -> None: ...


class BusAccess(Protocol):
    """Port I/O and MMIO, as a qtest client provides them."""

    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def inl(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...
    def outw(self, port: int, value: int) -> None: ...
    def outl(self, port: int, value: int) -> None: ...
    def readb(self, addr: int) -> int: ...
    def readw(self, addr: int) -> int: ...
    def readl(self, addr: int) -> int: ...
    def writeb(self, addr: int, value: int) -> None: ...
    def writew(self, addr: int, value: int) -> None: ...
    def writel(self, addr: int, value: int) -> None: ...


class Mech1ConfigAccess:
    """Configuration mechanism 1 over ports 0xCF8 (address) / 0xCFC (data)."""

    CONFIG_ADDRESS = 0xCF8
    CONFIG_DATA = 0xCFC

    def __init__(self, io: BusAccess) -> None:
        self.io = io

    def _select(self, bus: int, dev: int, fn: int, off: int) -> int:
        if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8 and 0 <= off < 256):
            raise PciError(f"bad config address {bus:02x}:{dev:02x}.{fn} +{off:#x}")
        self.io.outl(self.CONFIG_ADDRESS,
                     0x80000000 | bus << 16 | dev << 11 | fn << 8 | (off & 0xFC))
        return self.CONFIG_DATA + (off & 3)

    def cfg_read(self, bus: int, dev: int, fn: int, off: int, width: int) -> int:
        if off & (width - 1):
            raise PciError(f"unaligned config read {off:#x}/{width}")
        port = self._select(bus, dev, fn, off)
        return {1: self.io.inb, 2: self.io.inw, 4: self.io.inl}[width](port)

    def cfg_write(self, bus: int, dev: int, fn: int, off: int, width: int, value: int) -> None:
        if off & (width - 1):
            raise PciError(f"unaligned config write {off:#x}/{width}")
        port = self._select(bus, dev, fn, off)
        {1: self.io.outb, 2: self.io.outw, 4: self.io.outl}[width](port, value)


@dataclass
class Bar:
    """One decoded Base Address Register."""

    index: int
    io: bool
    is64: bool
    prefetch: bool
    size: int
    address: int = 0


@dataclass
class VirtioCap:
    """A virtio vendor capability (virtio 1.2 §4.1.4 struct virtio_pci_cap)."""

    cap_offset: int
    cfg_type: int
    bar: int
    id: int
    offset: int
    length: int
    notify_off_multiplier: int = 0


@dataclass
class PciFunction:
    """One enumerated function and everything the driver learned about it."""

    cfg: ConfigAccess
    bus: int
    dev: int
    fn: int
    vendor_id: int
    device_id: int
    revision: int
    class_code: int
    header_type: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    bars: dict[int, Bar] = field(default_factory=dict)
    caps: list[tuple[int, int]] = field(default_factory=list)  # (offset, cap id)
    virtio_caps: list[VirtioCap] = field(default_factory=list)
    msix_cap: int = 0
    interrupt_pin: int = 0
    irq: int = -1

    @property
    def bdf(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn}"

    def read(self, off: int, width: int) -> int:
        return self.cfg.cfg_read(self.bus, self.dev, self.fn, off, width)

    def write(self, off: int, width: int, value: int) -> None:
        self.cfg.cfg_write(self.bus, self.dev, self.fn, off, width, value)

    def virtio_cap(self, cfg_type: int) -> VirtioCap | None:
        """The first capability of ``cfg_type`` (§4.1.4: the driver uses the first it can)."""
        for c in self.virtio_caps:
            if c.cfg_type == cfg_type:
                return c
        return None

    @property
    def is_virtio_net(self) -> bool:
        if self.vendor_id != spec.VIRTIO_PCI_VENDOR_ID:
            return False
        if self.device_id == spec.VIRTIO_PCI_DEVICE_ID_NET_MODERN:
            return True
        # §4.1.2.1: transitional devices 0x1000-0x103F carry the device type in subsystem id.
        return (self.device_id == spec.VIRTIO_PCI_DEVICE_ID_NET_TRANSITIONAL
                and self.subsystem_id == spec.VIRTIO_ID_NET)

    @property
    def transitional(self) -> bool:
        return 0x1000 <= self.device_id <= 0x103F


def enumerate_bus(cfg: ConfigAccess, bus: int = 0) -> list[PciFunction]:
    """Every function present on ``bus`` (header fields only; BARs not touched)."""
    found: list[PciFunction] = []
    for dev in range(32):
        for fn in range(8):
            ids = cfg.cfg_read(bus, dev, fn, PCI_VENDOR_ID, 4)
            vendor = ids & 0xFFFF
            if vendor in (0xFFFF, 0x0000):
                if fn == 0:
                    break
                continue
            htype = cfg.cfg_read(bus, dev, fn, PCI_HEADER_TYPE, 1)
            rev_class = cfg.cfg_read(bus, dev, fn, PCI_REVISION_ID, 4)
            f = PciFunction(cfg=cfg, bus=bus, dev=dev, fn=fn, vendor_id=vendor,
                            device_id=ids >> 16, revision=rev_class & 0xFF,
                            class_code=rev_class >> 8, header_type=htype)
            if htype & 0x7F == 0:
                sub = cfg.cfg_read(bus, dev, fn, PCI_SUBSYSTEM_VENDOR_ID, 4)
                f.subsystem_vendor_id, f.subsystem_id = sub & 0xFFFF, sub >> 16
                f.interrupt_pin = cfg.cfg_read(bus, dev, fn, PCI_INTERRUPT_PIN, 1)
            found.append(f)
            if fn == 0 and not htype & 0x80:
                break  # single-function device
    return found


def find_virtio_net(cfg: ConfigAccess, bus: int = 0) -> list[PciFunction]:
    """The virtio-net functions on ``bus`` (§4.1.2 PCI Device Discovery)."""
    return [f for f in enumerate_bus(cfg, bus) if f.is_virtio_net]


class BarAllocator:
    """Hands out naturally aligned addresses from the MMIO and I/O windows."""

    def __init__(self, mmio_base: int = MMIO_BASE, io_base: int = IO_BASE) -> None:
        self.mmio_next = mmio_base
        self.io_next = io_base

    def alloc(self, bar: Bar) -> int:
        size = bar.size
        if bar.io:
            addr = (self.io_next + size - 1) & ~(size - 1)
            if addr + size > IO_LIMIT:
                raise PciError(f"I/O window exhausted for BAR{bar.index} ({size:#x})")
            self.io_next = addr + size
        else:
            size = max(size, 4096)  # keep page granularity between functions
            addr = (self.mmio_next + size - 1) & ~(size - 1)
            if addr + size > MMIO_LIMIT:
                raise PciError(f"MMIO window exhausted for BAR{bar.index} ({size:#x})")
            self.mmio_next = addr + size
        return addr


def size_bars(f: PciFunction) -> None:
    f.bars.clear()
    i = 0
    while i < 6:
        off = PCI_BASE_ADDRESS_0 + 4 * i
        orig = f.read(off, 4)
        f.write(off, 4, 0xFFFFFFFF)
        probe = f.read(off, 4)
        f.write(off, 4, orig)
        if probe in (0, 0xFFFFFFFF) and orig == 0:
            i += 1
            continue
        if orig & PCI_BASE_ADDRESS_SPACE_IO:
            mask = probe & 0xFFFFFFFC & 0xFFFF
            size = (~mask & 0xFFFF) + 1 if mask else 0
            if size:
                f.bars[i] = Bar(i, io=True, is64=False, prefetch=False, size=size)
            i += 1
            continue
        is64 = (orig & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64
        mask = probe & 0xFFFFFFF0
        if is64:
            if i == 5:
                raise PciError(f"{f.bdf}: 64-bit BAR5 has no upper half")
            hoff = off + 4
            horig = f.read(hoff, 4)
            f.write(hoff, 4, 0xFFFFFFFF)
            hprobe = f.read(hoff, 4)
            f.write(hoff, 4, horig)
            mask |= hprobe << 32
            size = ((~mask) & 0xFFFFFFFFFFFFFFFF) + 1 if mask else 0
        else:
            size = ((~mask) & 0xFFFFFFFF) + 1 if mask else 0
        if size:
            if size & (size - 1) or size > 1 << 32:
                raise PciError(f"{f.bdf}: BAR{i} size {size:#x} is not a sane power of two")
            f.bars[i] = Bar(i, io=False, is64=is64,
                            prefetch=bool(orig & PCI_BASE_ADDRESS_MEM_PREFETCH), size=size)
        i += 2 if is64 else 1


def assign_bars(f: PciFunction, alloc: BarAllocator, enable: bool = True) -> None:
    """Size every BAR, give it an address and (``enable``) turn on decoding and bus mastering."""
    cmd = f.read(PCI_COMMAND, 2)
    f.write(PCI_COMMAND, 2, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER))
    size_bars(f)
    for bar in f.bars.values():
        bar.address = alloc.alloc(bar)
        off = PCI_BASE_ADDRESS_0 + 4 * bar.index
        f.write(off, 4, bar.address & 0xFFFFFFFF)
        if bar.is64:
            f.write(off + 4, 4, bar.address >> 32)
        log.debug("%s BAR%d %s %#x+%#x", f.bdf, bar.index, "io" if bar.io else "mem",
                  bar.address, bar.size)
    f.write(PCI_ROM_ADDRESS, 4, 0)  # expansion ROM stays disabled
    if enable:
        new = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if any(b.io for b in f.bars.values()):
            new |= PCI_COMMAND_IO
        f.write(PCI_COMMAND, 2, new & ~PCI_COMMAND_INTX_DISABLE)


def walk_capabilities(f: PciFunction) -> None:
    """Fill ``f.caps``, ``f.virtio_caps`` and ``f.msix_cap`` (bounded walk, module docstring)."""
    f.caps.clear()
    f.virtio_caps.clear()
    f.msix_cap = 0
    if not f.read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
        return
    ptr = f.read(PCI_CAPABILITY_LIST, 1) & 0xFC
    seen: set[int] = set()
    while ptr:
        if ptr < 0x40 or ptr in seen or len(seen) >= MAX_CAPS:
            raise PciError(f"{f.bdf}: capability list broken at {ptr:#x}")
        seen.add(ptr)
        cap_id = f.read(ptr, 1)
        nxt = f.read(ptr + 1, 1) & 0xFC
        f.caps.append((ptr, cap_id))
        if cap_id == PCI_CAP_ID_MSIX:
            f.msix_cap = ptr
        elif cap_id == PCI_CAP_ID_VNDR and f.vendor_id == spec.VIRTIO_PCI_VENDOR_ID:
            cap_len = f.read(ptr + 2, 1)
            if cap_len >= 16 and ptr + cap_len <= 0x100:
                vc = VirtioCap(cap_offset=ptr, cfg_type=f.read(ptr + 3, 1),
                               bar=f.read(ptr + 4, 1), id=f.read(ptr + 5, 1),
                               offset=f.read(ptr + 8, 4), length=f.read(ptr + 12, 4))
                if vc.cfg_type == spec.VIRTIO_PCI_CAP_NOTIFY_CFG and cap_len >= 20:
                    vc.notify_off_multiplier = f.read(ptr + 16, 4)
                f.virtio_caps.append(vc)
            else:
                log.warning("%s: virtio capability at %#x has bad length %d", f.bdf, ptr, cap_len)
        ptr = nxt


def route_intx(f: PciFunction, cfg: ConfigAccess) -> int:
    """Route the function's INTx pin through PIIX3 to an ISA IRQ (module docstring, step 4).

    Returns the IRQ (= IOAPIC input) or -1 when the function has no interrupt pin.
    """
    if not 1 <= f.interrupt_pin <= 4:
        f.irq = -1
        return -1
    for i, irq in enumerate(PIRQ_IRQS):
        cfg.cfg_write(0, 1, 0, PIIX3_PIRQRC + i, 1, irq)
    pirq = (f.dev - 1 + f.interrupt_pin - 1) & 3  # i440fx: slot 1 INTA is PIRQA
    f.irq = PIRQ_IRQS[pirq]
    f.write(PCI_INTERRUPT_LINE, 1, f.irq)
    return f.irq
