"""virtio-pci device registers, driven by virtwire's own PCI driver over an in-process bus.

The driver half (``pci.driver``: enumeration, BAR assignment, capability walk, modern and legacy
transports; ``virtio.driver``: §3.1.1 initialization) talks to ``pci.device.VirtioPciDevice``
through ``FakeBus``, which plays the host bridge: configuration mechanism 1 at 0xCF8/0xCFC for
slot 3, and absolute BAR addresses decoded by the device itself, as QEMU's proxy forwards them.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.memory import BytearrayGuestMemory
from virtwire.net.driver import TransportAdapter
from virtwire.pci import driver as pdrv
from virtwire.pci.device import (
    COMMON_OFFSET,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MODERN_BAR,
    NOTIFY_OFF_MULTIPLIER,
    NOTIFY_OFFSET,
    VirtioPciDevice,
)
from virtwire.virtio import spec
from virtwire.virtio.driver import GuestAllocator, VirtioDriver
from virtwire.virtio.pair import LoopbackDevice

SLOT = 3


class NetLikeDevice(LoopbackDevice):
    """A loopback device that calls itself virtio-net (id 1) and has an 8-byte config."""

    device_id = spec.VIRTIO_ID_NET

    def build_config(self) -> bytes:
        return bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0])  # mac, status LINK_UP


class Line:
    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set_level(self, level: bool) -> None:
        self.level = level
        self.changes.append(level)


class FakeBus:
    """``pci.driver.BusAccess`` in process: config mechanism 1 plus BAR decode."""

    def __init__(self, dev: VirtioPciDevice) -> None:
        self.dev = dev
        self.addr = 0
        self.accesses = 0

    def _cfg(self) -> tuple[bool, int]:
        a = self.addr
        ok = bool(a & 0x80000000) and (a >> 16) & 0xFF == 0 and (a >> 11) & 0x1F == SLOT \
            and (a >> 8) & 7 == 0
        return ok, a & 0xFC

    def _in(self, port: int, width: int) -> int:
        self.accesses += 1
        if port == 0xCF8 and width == 4:
            return self.addr
        if 0xCFC <= port <= 0xCFF:
            ok, reg = self._cfg()
            return self.dev.config_read(reg + port - 0xCFC, width) if ok else (1 << 8 * width) - 1
        v = self.dev.bar_read(port, width, memory=False)
        return (1 << 8 * width) - 1 if v is None else v

    def _out(self, port: int, width: int, value: int) -> None:
        self.accesses += 1
        if port == 0xCF8 and width == 4:
            self.addr = value
        elif 0xCFC <= port <= 0xCFF:
            ok, reg = self._cfg()
            if ok:
                self.dev.config_write(reg + port - 0xCFC, width, value)
        else:
            self.dev.bar_write(port, width, value, memory=False)

    def _read(self, addr: int, width: int) -> int:
        self.accesses += 1
        v = self.dev.bar_read(addr, width, memory=True)
        return (1 << 8 * width) - 1 if v is None else v

    def _write(self, addr: int, width: int, value: int) -> None:
        self.accesses += 1
        self.dev.bar_write(addr, width, value, memory=True)

    def inb(self, p): return self._in(p, 1)  # noqa: E704
    def inw(self, p): return self._in(p, 2)  # noqa: E704
    def inl(self, p): return self._in(p, 4)  # noqa: E704
    def outb(self, p, v): self._out(p, 1, v)  # noqa: E704
    def outw(self, p, v): self._out(p, 2, v)  # noqa: E704
    def outl(self, p, v): self._out(p, 4, v)  # noqa: E704
    def readb(self, a): return self._read(a, 1)  # noqa: E704
    def readw(self, a): return self._read(a, 2)  # noqa: E704
    def readl(self, a): return self._read(a, 4)  # noqa: E704
    def writeb(self, a, v): self._write(a, 1, v)  # noqa: E704
    def writew(self, a, v): self._write(a, 2, v)  # noqa: E704
    def writel(self, a, v): self._write(a, 4, v)  # noqa: E704


def probe(pci: VirtioPciDevice, legacy: bool = False):
    bus = FakeBus(pci)
    return bus, pdrv.probe_pci_transport(bus, legacy=legacy)


@pytest.mark.parametrize("transitional", [False, True])
def test_the_driver_finds_our_identity(transitional):
    pci = VirtioPciDevice(NetLikeDevice((8, 8)), transitional=transitional)
    (f,) = pdrv.find_virtio_net(pdrv.Mech1ConfigAccess(FakeBus(pci)))
    assert f.vendor_id == 0x1AF4
    assert f.device_id == (0x1000 if transitional else 0x1041)
    assert f.revision == (0 if transitional else 1)
    assert f.class_code == 0x020000
    assert f.subsystem_vendor_id == 0x1AF4
    assert f.subsystem_id == (1 if transitional else 0x1100)
    assert f.interrupt_pin == 1


@pytest.mark.parametrize("transitional", [False, True])
def test_bars_and_capabilities_as_the_driver_sees_them(transitional):
    pci = VirtioPciDevice(NetLikeDevice((8, 8)), transitional=transitional)
    bus, t = probe(pci)
    f = t.fn
    assert set(f.bars) == ({0, MODERN_BAR} if transitional else {MODERN_BAR})
    mb = f.bars[MODERN_BAR]
    assert not mb.io and not mb.is64 and mb.size == 0x4000 and mb.address
    assert pci.modern_bar.base == mb.address
    if transitional:
        assert f.bars[0].io and f.bars[0].size == 32 and pci.legacy_bar.base == f.bars[0].address
    caps = {c.cfg_type: c for c in f.virtio_caps}
    assert [c.cfg_type for c in f.virtio_caps] == [1, 2, 3, 4, 5]
    assert (caps[1].bar, caps[1].offset, caps[1].length) == (MODERN_BAR, COMMON_OFFSET, 60)
    assert (caps[2].offset, caps[2].length) == (NOTIFY_OFFSET, 2 * NOTIFY_OFF_MULTIPLIER)
    assert caps[2].notify_off_multiplier == NOTIFY_OFF_MULTIPLIER
    assert (caps[3].offset, caps[3].length) == (ISR_OFFSET, 1)
    assert (caps[4].offset, caps[4].length) == (DEVICE_OFFSET, 8)
    assert t.num_queues() == 2
    assert t.read_config(0, 6) == bytes([0x52, 0x54, 0, 0x12, 0x34, 0x56])


def run_loopback(pci: VirtioPciDevice, t, line: Line) -> None:
    dev = pci.device
    mem = BytearrayGuestMemory(0x100000)
    pci.set_memory(mem)
    drv = VirtioDriver(TransportAdapter(t), mem, GuestAllocator(0x10000, 0xF0000))
    feats = drv.initialize(1 << spec.VIRTIO_F_INDIRECT_DESC, 2)
    assert dev.status & spec.VIRTIO_CONFIG_S_DRIVER_OK
    assert bool(feats >> spec.VIRTIO_F_VERSION_1 & 1) == (not t.legacy)
    assert dev.legacy == t.legacy
    q = drv.queues[1]
    out = drv.allocator.alloc(64)
    inb = drv.allocator.alloc(64)
    mem.write(out, b"ping through virtio-pci")
    q.add(mem, [(out, 23)], [(inb, 64)], token="t1")
    assert drv.kick(1)
    pci.flush()
    assert line.level is True and t.fn.read(0x06, 2) & 0x08  # INTx and Status.Interrupt
    assert t.read_isr() == spec.VIRTIO_PCI_ISR_QUEUE
    assert line.level is False and not t.fn.read(0x06, 2) & 0x08
    assert t.read_isr() == 0
    assert q.get_used(mem) == ("t1", 23)
    assert mem.read(inb, 23) == b"ping through virtio-pci"


def test_modern_loopback_through_the_registers():
    dev = NetLikeDevice((8, 8))
    line = Line()
    pci = VirtioPciDevice(dev, intx=line)
    _, t = probe(pci)
    run_loopback(pci, t, line)


def test_transitional_device_serves_a_legacy_driver_then_a_modern_one():
    dev = NetLikeDevice((8, 8))
    line = Line()
    pci = VirtioPciDevice(dev, transitional=True, intx=line)
    _, t = probe(pci, legacy=True)
    run_loopback(pci, t, line)
    assert dev.legacy
    _, t2 = probe(pci, legacy=False)
    run_loopback(pci, t2, line)
    assert not dev.legacy


def test_deferred_notifications_run_at_flush():
    dev = NetLikeDevice((8, 8))
    line = Line()
    pci = VirtioPciDevice(dev, intx=line, defer_notify=True)
    _, t = probe(pci)
    mem = BytearrayGuestMemory(0x100000)
    pci.set_memory(mem)
    drv = VirtioDriver(TransportAdapter(t), mem, GuestAllocator(0x10000, 0xF0000))
    drv.initialize(0, 2)
    q = drv.queues[0]
    buf = drv.allocator.alloc(16)
    q.add(mem, [(buf, 4)], [(buf + 8, 4)], token=1)
    drv.kick(0)
    t.notify(0)  # a second kick before the flush is coalesced
    assert pci.pending == [0] and dev.served[0] == 0
    pci.flush()
    assert dev.served[0] == 1 and pci.pending == []


def test_isr_read_lowers_the_line_and_intx_disable_masks_it():
    dev = NetLikeDevice((8, 8))
    line = Line()
    pci = VirtioPciDevice(dev, intx=line)
    _, t = probe(pci)
    cmd = t.fn.read(0x04, 2)
    t.fn.write(0x04, 2, cmd | 0x400)  # INTx Disable
    pci.queue(0)
    assert line.level is False and pci.isr == 1
    t.fn.write(0x04, 2, cmd)
    assert line.level is True
    pci.config()
    assert t.read_isr() == spec.VIRTIO_PCI_ISR_QUEUE | spec.VIRTIO_PCI_ISR_CONFIG
    assert line.changes == [True, False]


def common(pci: VirtioPciDevice, off: int, width: int, value: int | None = None):
    addr = pci.modern_bar.base + COMMON_OFFSET + off
    if value is None:
        return pci.bar_read(addr, width, memory=True)
    return pci.bar_write(addr, width, value, memory=True)


def test_register_decode_rules(caplog):
    dev = NetLikeDevice((8, 8))
    pci = VirtioPciDevice(dev)
    probe(pci)
    C = spec
    assert common(pci, C.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert common(pci, C.VIRTIO_PCI_COMMON_NUMQ, 4) == 0  # wrong width reads zero
    assert "2-byte field" in caplog.text
    assert common(pci, 0x3E, 2) == 0  # unknown offset
    assert "unknown offset 0x3e" in caplog.text
    common(pci, C.VIRTIO_PCI_COMMON_NUMQ, 2, 7)  # read-only
    assert common(pci, C.VIRTIO_PCI_COMMON_NUMQ, 2) == 2
    assert "read-only" in caplog.text
    common(pci, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 5)  # a queue that does not exist
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    common(pci, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 1)
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 8
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_NOFF, 2) == 1
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_MSIX, 2) == C.VIRTIO_MSI_NO_VECTOR
    common(pci, C.VIRTIO_PCI_COMMON_DFSELECT, 4, 1)
    assert common(pci, C.VIRTIO_PCI_COMMON_DF, 4) & 1  # VERSION_1 is bit 32
    common(pci, C.VIRTIO_PCI_COMMON_DFSELECT, 4, 0xFFFFFFFF)
    assert common(pci, C.VIRTIO_PCI_COMMON_DF, 4) == 0
    # Notify reads, ISR writes and out-of-structure accesses are refused and read zero.
    base = pci.modern_bar.base
    assert pci.bar_read(base + NOTIFY_OFFSET, 2, True) == 0
    assert pci.bar_write(base + ISR_OFFSET, 1, 1, True)
    assert pci.bar_read(base + ISR_OFFSET + 1, 1, True) == 0
    assert pci.bar_read(base + DEVICE_OFFSET + 7, 2, True) == 0
    assert pci.bar_write(base + NOTIFY_OFFSET + 2 * NOTIFY_OFF_MULTIPLIER, 2, 2, True)
    assert pci.bar_read(base + 0x4000, 4, True) is None  # beyond the BAR: the host refuses
    assert pci.counters["bad_accesses"] >= 8


def test_queue_registers_reach_the_device_and_are_frozen_once_enabled():
    dev = NetLikeDevice((8, 8))
    pci = VirtioPciDevice(dev)
    probe(pci)
    C = spec
    common(pci, C.VIRTIO_PCI_COMMON_STATUS, 1, 1 | 2)
    common(pci, C.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    common(pci, C.VIRTIO_PCI_COMMON_Q_SIZE, 2, 4)
    common(pci, C.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x2000)
    common(pci, C.VIRTIO_PCI_COMMON_Q_DESCHI, 4, 0x1)
    common(pci, C.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, 0x3000)
    common(pci, C.VIRTIO_PCI_COMMON_Q_USEDLO, 4, 0x4000)
    q = dev.queue_config[0]
    assert (q.size, q.desc, q.driver, q.device) == (4, 0x1_0000_2000, 0x3000, 0x4000)
    assert common(pci, C.VIRTIO_PCI_COMMON_Q_DESCHI, 4) == 1
    common(pci, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    assert q.ready and common(pci, C.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1
    common(pci, C.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x8000)  # refused: queue enabled
    assert q.desc == 0x1_0000_2000
    common(pci, C.VIRTIO_PCI_COMMON_STATUS, 1, 0)  # reset
    assert not q.ready and pci.queue_select == 0 and dev.status == 0


def test_pci_cfg_access_capability_reaches_the_bar():
    dev = NetLikeDevice((8, 8))
    pci = VirtioPciDevice(dev)
    _, t = probe(pci)
    cap = next(c for c in t.fn.virtio_caps if c.cfg_type == spec.VIRTIO_PCI_CAP_PCI_CFG)
    p = cap.cap_offset
    assert t.fn.read(p + 16, 4) == 0  # window not set up: a config dump reads zero, quietly
    assert pci.counters["bad_accesses"] == 0
    t.fn.write(p + 4, 1, MODERN_BAR)
    t.fn.write(p + 8, 4, COMMON_OFFSET + spec.VIRTIO_PCI_COMMON_NUMQ)
    t.fn.write(p + 12, 4, 2)
    assert t.fn.read(p + 16, 4) & 0xFFFF == 2  # num_queues through config space
    t.fn.write(p + 8, 4, COMMON_OFFSET + spec.VIRTIO_PCI_COMMON_STATUS)
    t.fn.write(p + 12, 4, 1)
    t.fn.write(p + 16, 4, 1)  # ACKNOWLEDGE
    assert dev.status == 1
    t.fn.write(p + 8, 4, 0x3FFF)
    t.fn.write(p + 12, 4, 4)  # misaligned, outside: refused
    assert t.fn.read(p + 16, 4) == 0
    assert pci.counters["bad_accesses"] == 1


def test_function_reset_clears_bars_and_device():
    dev = NetLikeDevice((8, 8))
    line = Line()
    pci = VirtioPciDevice(dev, intx=line)
    _, t = probe(pci)
    common(pci, spec.VIRTIO_PCI_COMMON_STATUS, 1, 1)
    pci.queue(0)
    assert line.level
    pci.reset()
    assert dev.status == 0 and not line.level and pci.modern_bar.base == 0
    assert pci.config_read(0x04, 2) == 0


# -- hostile register traffic ----------------------------------------------------------------

_access = st.tuples(
    st.sampled_from(["cfg", "mem", "io"]),
    st.one_of(st.integers(0, 0x4100), st.integers(0, 2**64 - 1)),
    st.sampled_from([0, 1, 2, 3, 4, 8]),
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(_access, max_size=60))
def test_random_register_traffic_never_raises(transitional, accesses):
    dev = NetLikeDevice((8, 8))
    pci = VirtioPciDevice(dev, transitional=transitional, intx=Line())
    pci.set_memory(BytearrayGuestMemory(0x10000))
    probe(pci)  # BARs assigned, so absolute addresses decode
    mbase = pci.modern_bar.base
    ibase = pci.legacy_bar.base if pci.legacy_bar else 0xC000
    for space, off, width, value in accesses:
        if space == "cfg":
            if value is None:
                pci.config_read(off & 0xFF, width)
            else:
                pci.config_write(off & 0xFF, width, value & 0xFFFFFFFF)
            continue
        addr = (mbase if space == "mem" else ibase) + off
        if value is None:
            v = pci.bar_read(addr, width, memory=space == "mem")
            assert v is None or 0 <= v < 1 << 64
        else:
            pci.bar_write(addr, width, value, memory=space == "mem")
        pci.flush()
    assert 0 <= pci.isr <= 3
