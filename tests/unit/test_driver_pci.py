"""PCI enumeration, BAR sizing/assignment and the capability walk against a fake config space."""

from __future__ import annotations

import struct

import pytest

from virtwire.pci.driver import (
    BarAllocator,
    Mech1ConfigAccess,
    ModernPciTransport,
    PciError,
    assign_bars,
    enumerate_bus,
    find_virtio_net,
    route_intx,
    walk_capabilities,
)
from virtwire.virtio import spec


class FakeFunction:
    def __init__(self, vendor: int, device: int, subsys: int = 0,
                 bars: dict[int, tuple[str, int]] | None = None) -> None:
        self.cfg = bytearray(256)
        struct.pack_into("<HH", self.cfg, 0, vendor, device)
        struct.pack_into("<HH", self.cfg, 0x2C, vendor, subsys)
        self.cfg[0x3D] = 1  # INTA
        self.bars = bars or {}  # index -> (kind, size); kind io|mem32|mem64
        for i, (kind, _) in self.bars.items():
            low = {"io": 1, "mem32": 0, "mem64": 0xC}[kind]
            struct.pack_into("<I", self.cfg, 0x10 + 4 * i, low)

    def add_caps(self, caps: list[bytes]) -> None:
        off = 0x40
        self.cfg[0x34] = off
        self.cfg[6] |= 0x10
        for k, c in enumerate(caps):
            nxt = off + 0x20 if k + 1 < len(caps) else 0
            self.cfg[off : off + len(c)] = c
            self.cfg[off + 1] = nxt
            off = nxt

    def read(self, off: int, width: int) -> int:
        return int.from_bytes(self.cfg[off : off + width], "little")

    def write(self, off: int, width: int, value: int) -> None:
        if 0x10 <= off < 0x28 and width == 4:
            i = (off - 0x10) // 4
            for bi, (kind, size) in self.bars.items():
                if i == bi:
                    low = {"io": 1, "mem32": 0, "mem64": 0xC}[kind]
                    mask = (~(size - 1)) & (0xFFFFFFFC if kind == "io" else 0xFFFFFFF0)
                    value = (value & mask & 0xFFFFFFFF) | low
                    break
                if kind == "mem64" and i == bi + 1:
                    value &= (~(size - 1)) >> 32 & 0xFFFFFFFF
                    break
            else:
                value = 0  # unimplemented BAR reads as zero
        self.cfg[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


class FakeBus:
    """Ports 0xCF8/0xCFC routed to FakeFunctions on bus 0; a small MMIO map for BAR access."""

    def __init__(self, fns: dict[int, FakeFunction]) -> None:
        self.fns = fns
        self.addr = 0
        self.mmio: dict[int, int] = {}

    def _target(self) -> tuple[FakeFunction | None, int]:
        bus, dev, fn = self.addr >> 16 & 0xFF, self.addr >> 11 & 31, self.addr >> 8 & 7
        f = self.fns.get(dev) if (bus == 0 and fn == 0 and self.addr >> 31) else None
        return f, self.addr & 0xFC

    def outl(self, port: int, v: int) -> None:
        if port == 0xCF8:
            self.addr = v
        else:
            self._out(port, 4, v)

    def outw(self, port: int, v: int) -> None:
        self._out(port, 2, v)

    def outb(self, port: int, v: int) -> None:
        self._out(port, 1, v)

    def _out(self, port: int, w: int, v: int) -> None:
        f, reg = self._target()
        if f is not None and 0xCFC <= port < 0xD00:
            f.write(reg + (port - 0xCFC), w, v)

    def _in(self, port: int, w: int) -> int:
        f, reg = self._target()
        if f is None:
            return (1 << (8 * w)) - 1
        return f.read(reg + (port - 0xCFC), w)

    def inl(self, port: int) -> int:
        return self._in(port, 4)

    def inw(self, port: int) -> int:
        return self._in(port, 2)

    def inb(self, port: int) -> int:
        return self._in(port, 1)

    def readb(self, a: int) -> int:
        return self.mmio.get(a, 0) & 0xFF

    def readw(self, a: int) -> int:
        return self.mmio.get(a, 0) & 0xFFFF

    def readl(self, a: int) -> int:
        return self.mmio.get(a, 0)

    def writeb(self, a: int, v: int) -> None:
        self.mmio[a] = v

    def writew(self, a: int, v: int) -> None:
        self.mmio[a] = v

    def writel(self, a: int, v: int) -> None:
        self.mmio[a] = v


def vcap(cfg_type: int, bar: int, off: int, length: int, mult: int | None = None) -> bytes:
    n = 20 if mult is not None else 16
    b = struct.pack("<BBBBBBHII", 0x09, 0, n, cfg_type, bar, 0, 0, off, length)
    return b + (struct.pack("<I", mult) if mult is not None else b"")


def modern_net() -> FakeFunction:
    f = FakeFunction(0x1AF4, 0x1041, subsys=1, bars={1: ("mem32", 4096), 4: ("mem64", 0x4000)})
    f.cfg[0x09:0x0C] = bytes([0, 0, 2])
    f.add_caps([
        vcap(spec.VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x1000),
        vcap(spec.VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000),
        vcap(spec.VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000),
        vcap(spec.VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, mult=4),
        bytes([0x11, 0, 0x02, 0x00, 0x01, 0, 0, 0, 0x01, 0x08, 0, 0]),  # 3 vectors, BAR1
    ])
    return f


def test_enumerate_finds_modern_and_transitional() -> None:
    legacy = FakeFunction(0x1AF4, 0x1000, subsys=1, bars={0: ("io", 32)})
    blk = FakeFunction(0x1AF4, 0x1001, subsys=2)
    bus = FakeBus({0: FakeFunction(0x8086, 0x1237), 3: modern_net(), 4: legacy, 5: blk})
    cfg = Mech1ConfigAccess(bus)
    fns = enumerate_bus(cfg)
    assert [f.dev for f in fns] == [0, 3, 4, 5]
    nets = find_virtio_net(cfg)
    assert [(f.dev, f.transitional) for f in nets] == [(3, False), (4, True)]


def test_bar_sizing_assignment_and_caps() -> None:
    f0 = modern_net()
    bus = FakeBus({0: FakeFunction(0x8086, 0x7000), 2: f0})
    cfg = Mech1ConfigAccess(bus)
    (fn,) = find_virtio_net(cfg)
    assign_bars(fn, BarAllocator())
    assert set(fn.bars) == {1, 4}
    assert fn.bars[1].size == 4096 and not fn.bars[1].is64
    assert fn.bars[4].size == 0x4000 and fn.bars[4].is64
    for b in fn.bars.values():
        assert b.address % b.size == 0 and b.address >= 0xE0000000
    assert f0.read(0x10 + 16, 4) & ~0xF == fn.bars[4].address
    assert f0.read(0x04, 2) & 0x6 == 0x6  # memory + bus master
    walk_capabilities(fn)
    assert fn.msix_cap and len(fn.virtio_caps) == 4
    notify = fn.virtio_cap(spec.VIRTIO_PCI_CAP_NOTIFY_CFG)
    assert notify is not None and notify.notify_off_multiplier == 4
    assert route_intx(fn, cfg) == 10  # slot 2, INTA -> PIRQB -> IRQ 10 (i440fx swizzle)
    t = ModernPciTransport(fn, bus)
    base = fn.bars[4].address
    bus.mmio[base + spec.VIRTIO_PCI_COMMON_Q_NOFF] = 3
    t.setup_queue(1, 256, 0x10000, 0x11000, 0x12000)
    t.notify(1)
    assert bus.mmio[base + 0x3000 + 12] == 1
    assert bus.mmio[base + spec.VIRTIO_PCI_COMMON_Q_DESCLO] == 0x10000


def test_capability_loop_is_refused() -> None:
    f0 = modern_net()
    f0.cfg[0x40 + 1] = 0x40  # points at itself
    bus = FakeBus({1: f0})
    (fn,) = find_virtio_net(Mech1ConfigAccess(bus))
    with pytest.raises(PciError):
        walk_capabilities(fn)


def test_capability_outside_bar_is_refused() -> None:
    f0 = modern_net()
    f0.cfg[0x40 + 12 : 0x40 + 16] = struct.pack("<I", 0x100000)  # common cfg length too big
    bus = FakeBus({1: f0})
    cfg = Mech1ConfigAccess(bus)
    (fn,) = find_virtio_net(cfg)
    assign_bars(fn, BarAllocator())
    walk_capabilities(fn)
    with pytest.raises(PciError):
        ModernPciTransport(fn, bus)


def test_msix_table_points_into_guest_ram() -> None:
    from virtwire.pci.driver import MSIX_DATA_BASE, PCI_MSIX_FLAGS_ENABLE

    f0 = modern_net()
    bus = FakeBus({3: f0})
    cfg = Mech1ConfigAccess(bus)
    (fn,) = find_virtio_net(cfg)
    assign_bars(fn, BarAllocator())
    walk_capabilities(fn)
    t = ModernPciTransport(fn, bus)
    assert t.enable_msix(0x9000) == 3
    tbl = fn.bars[1].address
    for v in range(3):
        assert bus.mmio[tbl + 16 * v] == 0x9000 + 4 * v
        assert bus.mmio[tbl + 16 * v + 8] == MSIX_DATA_BASE + v
        assert bus.mmio[tbl + 16 * v + 12] == 0  # unmasked
    assert f0.read(fn.msix_cap + 2, 2) & PCI_MSIX_FLAGS_ENABLE
    t.disable_msix()
    assert not f0.read(fn.msix_cap + 2, 2) & PCI_MSIX_FLAGS_ENABLE
