"""The driver's virtio transports over PCI: modern (capabilities) and legacy (I/O BAR 0).

Theory of operation
-------------------
The qtest VM runs no BIOS; ``pci.bus`` is its firmware (enumeration, BAR assignment, capability
walk, INTx routing) and this module drives a function found there.
``ModernPciTransport`` maps the common/notify/ISR/device structures (virtio 1.2 §4.1.4.3-7);
``LegacyPciTransport`` drives the transitional device's I/O BAR 0 (§4.1.4.8: 32-bit features,
page-frame queue address, 4096-byte ring alignment). Both expose the same ``VirtioTransport``
methods, so ``net.driver`` never knows which one it has. ``probe_pci_transport`` does it all for
the first virtio-net function on bus 0.

Every value read from the device (capability offsets and lengths, queue sizes) is checked before
use; a bad one raises ``PciError`` with the reason.
"""

from __future__ import annotations

import logging
import time

from virtwire.pci.bus import (
    IO_BASE,
    MMIO_BASE,
    MSIX_DATA_BASE,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    Bar,
    BarAllocator,
    BusAccess,
    ConfigAccess,
    Mech1ConfigAccess,
    PciError,
    PciFunction,
    VirtioCap,
    assign_bars,
    enumerate_bus,
    find_virtio_net,
    route_intx,
    walk_capabilities,
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
    "ModernPciTransport",
    "LegacyPciTransport",
    "MMIO_BASE",
    "IO_BASE",
    "MSIX_DATA_BASE",
    "PCI_MSIX_FLAGS_ENABLE",
    "probe_pci_transport",
]

log = logging.getLogger(__name__)



class _Region:
    """A window [base, base+length) in I/O or memory space, with bounds-checked accessors."""

    def __init__(self, io: BusAccess, base: int, length: int, port_io: bool, name: str) -> None:
        self.bus, self.base, self.length, self.port_io, self.name = io, base, length, port_io, name

    def _check(self, off: int, width: int) -> int:
        if off < 0 or off + width > self.length:
            raise PciError(f"{self.name}: access {off:#x}/{width} outside {self.length:#x}")
        return self.base + off

    def read(self, off: int, width: int) -> int:
        a = self._check(off, width)
        b = self.bus
        if self.port_io:
            return {1: b.inb, 2: b.inw, 4: b.inl}[width](a)
        return {1: b.readb, 2: b.readw, 4: b.readl}[width](a)

    def write(self, off: int, width: int, value: int) -> None:
        a = self._check(off, width)
        b = self.bus
        if self.port_io:
            {1: b.outb, 2: b.outw, 4: b.outl}[width](a, value)
        else:
            {1: b.writeb, 2: b.writew, 4: b.writel}[width](a, value)


class _PciTransportBase:
    """What modern and legacy share: the function, its IRQ, and interrupt waiting over qtest."""

    legacy = False

    def __init__(self, fn: PciFunction, io: BusAccess) -> None:
        self.fn = fn
        self.io = io
        self.interrupts = 0

    @property
    def name(self) -> str:
        return f"{'legacy' if self.legacy else 'modern'} virtio-pci {self.fn.bdf}"

    def wait_interrupt(self, timeout: float) -> int:
        """Wait for INTx, then read (and so acknowledge) the ISR; returns the ISR bits."""
        waiter = getattr(self.io, "wait_irq", None)
        if waiter is None or self.fn.irq < 0:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                isr = self.read_isr()
                if isr:
                    return isr
                time.sleep(0.0005)
            return 0
        if not waiter(self.fn.irq, timeout):
            return 0
        self.interrupts += 1
        return self.read_isr()

    def read_isr(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


class ModernPciTransport(_PciTransportBase):
    """virtio 1.2 §4.1.4 modern register blocks: common, notify, ISR, device config."""

    def __init__(self, fn: PciFunction, io: BusAccess) -> None:
        super().__init__(fn, io)
        need = {
            spec.VIRTIO_PCI_CAP_COMMON_CFG: ("common", spec.VIRTIO_PCI_COMMON_CFG_SIZE - 4),
            spec.VIRTIO_PCI_CAP_NOTIFY_CFG: ("notify", 2),
            spec.VIRTIO_PCI_CAP_ISR_CFG: ("isr", 1),
            spec.VIRTIO_PCI_CAP_DEVICE_CFG: ("device", 0),
        }
        self.regions: dict[str, _Region] = {}
        for cfg_type, (label, min_len) in need.items():
            cap = fn.virtio_cap(cfg_type)
            if cap is None:
                if cfg_type == spec.VIRTIO_PCI_CAP_DEVICE_CFG:
                    continue
                raise PciError(f"{fn.bdf}: no virtio {label} capability")
            bar = fn.bars.get(cap.bar)
            if bar is None:
                raise PciError(f"{fn.bdf}: {label} capability names unassigned BAR{cap.bar}")
            if cap.length < min_len or cap.offset + cap.length > bar.size:
                raise PciError(f"{fn.bdf}: {label} structure {cap.offset:#x}+{cap.length:#x} "
                               f"does not fit BAR{cap.bar} ({bar.size:#x})")
            self.regions[label] = _Region(io, bar.address + cap.offset, cap.length, bar.io,
                                          f"{fn.bdf} {label}")
            if cfg_type == spec.VIRTIO_PCI_CAP_NOTIFY_CFG:
                self.notify_multiplier = cap.notify_off_multiplier
        self.common = self.regions["common"]
        self.notify_region = self.regions["notify"]
        self.isr = self.regions["isr"]
        self.devcfg = self.regions.get("device")
        self._notify_off: dict[int, int] = {}
        self.msix_mailbox = 0  # guest address MSI-X messages land at (0: MSI-X off, INTx)
        self.msix_table_size = 0
        self.queue_vectors: dict[int, int] = {}  # queue index -> vector the device accepted
        self.config_vector = spec.VIRTIO_MSI_NO_VECTOR

    # -- MSI-X (§4.1.4.3 msix_config / queue_msix_vector, §4.1.5.1.2) ---------------------------
    def enable_msix(self, mailbox: int) -> int:
        """Turn MSI-X on with every table entry pointing into guest RAM at ``mailbox``.

        Vector ``v``'s message is the u32 ``MSIX_DATA_BASE + v`` written to ``mailbox + 4*v``:
        with no APIC address, the device's MSI write is a plain DMA write into our shared RAM,
        so a delivered interrupt is visible as that value (``msix_fired``). Vector 0 is the
        configuration vector, vector 1 + q the one for queue q. Returns the table size.
        """
        f = self.fn
        if not f.msix_cap:
            raise PciError(f"{f.bdf}: no MSI-X capability")
        ctrl = f.read(f.msix_cap + PCI_MSIX_FLAGS, 2)
        n = (ctrl & 0x7FF) + 1
        tbl = f.read(f.msix_cap + 4, 4)
        bar = f.bars.get(tbl & 7)
        off = tbl & ~7
        if bar is None or bar.io or off + 16 * n > bar.size:
            raise PciError(f"{f.bdf}: MSI-X table {off:#x}+{16 * n:#x} not inside BAR{tbl & 7}")
        for v in range(n):
            e = bar.address + off + 16 * v
            addr = mailbox + 4 * v
            self.io.writel(e, addr & 0xFFFFFFFF)
            self.io.writel(e + 4, addr >> 32)
            self.io.writel(e + 8, MSIX_DATA_BASE + v)
            self.io.writel(e + 12, 0)  # unmasked
        f.write(f.msix_cap + PCI_MSIX_FLAGS, 2,
                (ctrl | PCI_MSIX_FLAGS_ENABLE) & ~PCI_MSIX_FLAGS_MASKALL)
        self.msix_mailbox = mailbox
        self.msix_table_size = n
        return n

    def disable_msix(self) -> None:
        """Back to INTx (MSI-X Enable cleared; the device drops its vector mappings)."""
        f = self.fn
        if f.msix_cap:
            ctrl = f.read(f.msix_cap + PCI_MSIX_FLAGS, 2)
            f.write(f.msix_cap + PCI_MSIX_FLAGS, 2, ctrl & ~PCI_MSIX_FLAGS_ENABLE)
        self.msix_mailbox = 0
        self.msix_table_size = 0

    def msix_fired(self, mem: object, vector: int, clear: bool = True) -> bool:
        """Did vector ``vector``'s message land in the mailbox (and clear it)?"""
        addr = self.msix_mailbox + 4 * vector
        val = mem.read_u32(addr)  # type: ignore[attr-defined]
        if val == MSIX_DATA_BASE + vector:
            if clear:
                mem.write_u32(addr, 0)  # type: ignore[attr-defined]
            return True
        return False

    def _vector_for_config(self) -> None:
        if self.msix_mailbox:
            self.common.write(spec.VIRTIO_PCI_COMMON_MSIX, 2, 0)
            self.config_vector = self.common.read(spec.VIRTIO_PCI_COMMON_MSIX, 2)

    # -- status and features (§4.1.4.3) -------------------------------------------------------
    def reset(self, timeout: float = 1.0) -> None:
        """Write 0 and wait until the device reads back 0 (§4.1.4.3.2)."""
        self.common.write(spec.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        deadline = time.monotonic() + timeout
        while self.common.read(spec.VIRTIO_PCI_COMMON_STATUS, 1) != 0:
            if time.monotonic() > deadline:
                raise PciError(f"{self.name}: device status did not return to 0 after reset")
            time.sleep(0.001)
        self._notify_off.clear()
        self.queue_vectors.clear()
        self._vector_for_config()

    def get_status(self) -> int:
        return self.common.read(spec.VIRTIO_PCI_COMMON_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.common.write(spec.VIRTIO_PCI_COMMON_STATUS, 1, status)

    def device_features(self) -> int:
        feats = 0
        for sel in (0, 1):
            self.common.write(spec.VIRTIO_PCI_COMMON_DFSELECT, 4, sel)
            feats |= self.common.read(spec.VIRTIO_PCI_COMMON_DF, 4) << (32 * sel)
        return feats

    def set_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common.write(spec.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            self.common.write(spec.VIRTIO_PCI_COMMON_GF, 4, features >> (32 * sel))

    def driver_features(self) -> int:
        feats = 0
        for sel in (0, 1):
            self.common.write(spec.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            feats |= self.common.read(spec.VIRTIO_PCI_COMMON_GF, 4) << (32 * sel)
        return feats

    def num_queues(self) -> int:
        return self.common.read(spec.VIRTIO_PCI_COMMON_NUMQ, 2)

    def config_generation(self) -> int:
        return self.common.read(spec.VIRTIO_PCI_COMMON_CFGGENERATION, 1)

    # -- queues (§4.1.5.1.3 Virtqueue Configuration) -------------------------------------------
    def queue_max_size(self, index: int) -> int:
        self.common.write(spec.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        return self.common.read(spec.VIRTIO_PCI_COMMON_Q_SIZE, 2)

    def queue_enabled(self, index: int) -> bool:
        self.common.write(spec.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        return bool(self.common.read(spec.VIRTIO_PCI_COMMON_Q_ENABLE, 2))

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        c = self.common
        c.write(spec.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        c.write(spec.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
        if self.msix_mailbox and 1 + index < self.msix_table_size:
            # §4.1.5.1.2: write the vector, read it back: NO_VECTOR means the device refused
            c.write(spec.VIRTIO_PCI_COMMON_Q_MSIX, 2, 1 + index)
            self.queue_vectors[index] = c.read(spec.VIRTIO_PCI_COMMON_Q_MSIX, 2)
        else:
            c.write(spec.VIRTIO_PCI_COMMON_Q_MSIX, 2, spec.VIRTIO_MSI_NO_VECTOR)
        for lo, val in ((spec.VIRTIO_PCI_COMMON_Q_DESCLO, desc),
                        (spec.VIRTIO_PCI_COMMON_Q_AVAILLO, driver),
                        (spec.VIRTIO_PCI_COMMON_Q_USEDLO, device)):
            c.write(lo, 4, val & 0xFFFFFFFF)
            c.write(lo + 4, 4, val >> 32)
        noff = c.read(spec.VIRTIO_PCI_COMMON_Q_NOFF, 2)
        off = noff * self.notify_multiplier
        if off + 2 > self.notify_region.length:
            raise PciError(f"{self.name}: queue {index} notify offset {off:#x} outside the "
                           f"notify structure ({self.notify_region.length:#x})")
        self._notify_off[index] = off
        c.write(spec.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)

    def queue_ring_align(self) -> int:
        return 0  # modern: the driver chooses each area (§2.7 alignment only)

    def reset_queue(self, index: int, timeout: float = 1.0) -> bool:
        """§4.1.4.3.2 (VIRTIO_F_RING_RESET): write 1 to queue_reset, then wait until it reads 0
        (reset done; the polarity settled by oasis-tcs/virtio-spec#139, as Linux waits); True
        when it did and queue_enable then reads 0 (the queue is disabled)."""
        c = self.common
        c.write(spec.VIRTIO_PCI_COMMON_Q_SELECT, 2, index)
        c.write(spec.VIRTIO_PCI_COMMON_Q_RESET, 2, 1)
        deadline = time.monotonic() + timeout
        while c.read(spec.VIRTIO_PCI_COMMON_Q_RESET, 2) != 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        self._notify_off.pop(index, None)
        return c.read(spec.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0

    def notify(self, index: int) -> None:
        """Queue notification: write the queue index at its notify address (§4.1.4.4)."""
        off = self._notify_off.get(index)
        if off is None:
            raise PciError(f"{self.name}: queue {index} is not set up")
        self.notify_region.write(off, 2, index)

    def read_isr(self) -> int:
        return self.isr.read(0, 1)

    # -- device configuration (§4.1.4.6) --------------------------------------------------------
    def read_config(self, off: int, n: int) -> bytes:
        if self.devcfg is None:
            raise PciError(f"{self.name}: no device configuration structure")
        out = bytearray()
        i = 0
        while i < n:
            if n - i >= 4 and (off + i) % 4 == 0:
                out += self.devcfg.read(off + i, 4).to_bytes(4, "little")
                i += 4
            elif n - i >= 2 and (off + i) % 2 == 0:
                out += self.devcfg.read(off + i, 2).to_bytes(2, "little")
                i += 2
            else:
                out += bytes([self.devcfg.read(off + i, 1)])
                i += 1
        return bytes(out)

    def write_config(self, off: int, data: bytes) -> None:
        if self.devcfg is None:
            raise PciError(f"{self.name}: no device configuration structure")
        for i, b in enumerate(data):
            self.devcfg.write(off + i, 1, b)

    def config_size(self) -> int:
        return self.devcfg.length if self.devcfg else 0


class LegacyPciTransport(_PciTransportBase):
    """The transitional device's legacy I/O BAR 0 (virtio 1.2 §4.1.4.8)."""

    legacy = True

    def __init__(self, fn: PciFunction, io: BusAccess) -> None:
        super().__init__(fn, io)
        bar = fn.bars.get(0)
        if bar is None or not bar.io or bar.size < spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX:
            raise PciError(f"{fn.bdf}: no legacy I/O BAR0")
        self.regs = _Region(io, bar.address, bar.size, True, f"{fn.bdf} legacy")
        # §4.1.4.8: device config follows the MSI-X vector registers only while MSI-X is on.
        msix_on = bool(fn.msix_cap and fn.read(fn.msix_cap + PCI_MSIX_FLAGS, 2)
                       & PCI_MSIX_FLAGS_ENABLE)
        self.cfg_off = (spec.VIRTIO_PCI_CONFIG_OFF_MSIX if msix_on
                        else spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX)

    def reset(self, timeout: float = 1.0) -> None:
        self.regs.write(spec.VIRTIO_PCI_STATUS, 1, 0)
        deadline = time.monotonic() + timeout
        while self.regs.read(spec.VIRTIO_PCI_STATUS, 1) != 0:
            if time.monotonic() > deadline:
                raise PciError(f"{self.name}: status did not return to 0 after reset")
            time.sleep(0.001)

    def get_status(self) -> int:
        return self.regs.read(spec.VIRTIO_PCI_STATUS, 1)

    def set_status(self, status: int) -> None:
        self.regs.write(spec.VIRTIO_PCI_STATUS, 1, status)

    def device_features(self) -> int:
        return self.regs.read(spec.VIRTIO_PCI_HOST_FEATURES, 4)

    def set_driver_features(self, features: int) -> None:
        if features >> 32:
            raise PciError(f"{self.name}: legacy interface has only 32 feature bits")
        self.regs.write(spec.VIRTIO_PCI_GUEST_FEATURES, 4, features)

    def driver_features(self) -> int:
        return self.regs.read(spec.VIRTIO_PCI_GUEST_FEATURES, 4)

    def num_queues(self) -> int:
        n = 0
        while n < 64 and self.queue_max_size(n):
            n += 1
        return n

    def config_generation(self) -> int:
        return 0  # legacy has none (§4.1.4.8): callers re-read until stable

    def queue_max_size(self, index: int) -> int:
        self.regs.write(spec.VIRTIO_PCI_QUEUE_SEL, 2, index)
        return self.regs.read(spec.VIRTIO_PCI_QUEUE_NUM, 2)

    def queue_enabled(self, index: int) -> bool:
        self.regs.write(spec.VIRTIO_PCI_QUEUE_SEL, 2, index)
        return bool(self.regs.read(spec.VIRTIO_PCI_QUEUE_PFN, 4))

    def queue_ring_align(self) -> int:
        return spec.VIRTIO_PCI_VRING_ALIGN

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        """Legacy: size is fixed by the device; the ring is one block at a page frame."""
        self.regs.write(spec.VIRTIO_PCI_QUEUE_SEL, 2, index)
        qmax = self.regs.read(spec.VIRTIO_PCI_QUEUE_NUM, 2)
        if size != qmax:
            raise PciError(f"{self.name}: legacy queue {index} size is fixed at {qmax}, not {size}")
        if desc % spec.VIRTIO_PCI_VRING_ALIGN:
            raise PciError(f"{self.name}: legacy ring {desc:#x} is not page aligned")
        if driver != desc + 16 * size:
            raise PciError(f"{self.name}: legacy avail ring must follow the descriptor table")
        align = spec.VIRTIO_PCI_VRING_ALIGN
        want_used = (driver + 6 + 2 * size + align - 1) & ~(align - 1)
        if device != want_used:
            raise PciError(f"{self.name}: legacy used ring must be at {want_used:#x}")
        pfn = desc >> spec.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if pfn >> 32:
            raise PciError(f"{self.name}: legacy ring above 16 TiB")
        self.regs.write(spec.VIRTIO_PCI_QUEUE_PFN, 4, pfn)

    def notify(self, index: int) -> None:
        self.regs.write(spec.VIRTIO_PCI_QUEUE_NOTIFY, 2, index)

    def read_isr(self) -> int:
        return self.regs.read(spec.VIRTIO_PCI_ISR, 1)

    def read_config(self, off: int, n: int) -> bytes:
        # Legacy config is guest-endian (little on x86); byte reads are always allowed.
        return bytes(self.regs.read(self.cfg_off + off + i, 1) for i in range(n))

    def write_config(self, off: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.regs.write(self.cfg_off + off + i, 1, b)

    def config_size(self) -> int:
        return self.regs.length - self.cfg_off


def probe_pci_transport(
    io: BusAccess, legacy: bool = False, index: int = 0, alloc: BarAllocator | None = None
) -> ModernPciTransport | LegacyPciTransport:
    """Enumerate bus 0, set up the ``index``th virtio-net function and return its transport.

    ``legacy`` picks the I/O BAR interface of a transitional device (§4.1.4.8).
    """
    cfg = Mech1ConfigAccess(io)
    nets = find_virtio_net(cfg)
    if legacy:
        nets = [f for f in nets if f.transitional]
    if index >= len(nets):
        raise PciError(f"no {'transitional ' if legacy else ''}virtio-net function #{index} "
                       f"on bus 0 (found {len(nets)})")
    f = nets[index]
    alloc = alloc or BarAllocator()
    # Functions are assigned in bus order so addresses never overlap between probes.
    for other in enumerate_bus(cfg):
        if other.header_type & 0x7F == 0 and other.vendor_id == spec.VIRTIO_PCI_VENDOR_ID:
            target = other.bdf == f.bdf
            assign_bars(f if target else other, alloc, enable=target)
    walk_capabilities(f)
    route_intx(f, cfg)
    intercept = getattr(io, "irq_intercept_in", None)
    if intercept is not None and f.irq >= 0:
        intercept("ioapic")  # the client intercepts once
    return LegacyPciTransport(f, io) if legacy else ModernPciTransport(f, io)
