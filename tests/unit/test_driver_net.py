"""The virtio-net driver model against a scripted device (the device-side split ring), no QEMU.

The fake transport records what the driver does (status writes, features, queue programming,
notifications); the test plays the device with ``SplitQueue`` on the same memory, including a
hostile one (bad num_buffers, over-long used length, refused FEATURES_OK).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.memory import BytearrayGuestMemory
from virtwire.net.driver import (
    DeviceFault,
    DmaAllocator,
    NetDriverConfig,
    VirtioNetDriver,
    resolve_features,
)
from virtwire.net.header import VirtioNetHdr
from virtwire.virtio import spec
from virtwire.virtio.spec import bit
from virtwire.virtio.split_ring import SplitQueue

MAC = bytes.fromhex("020000000042")


class FakeTransport:
    def __init__(self, offered: int, legacy: bool = False, refuse_features_ok: bool = False):
        self.offered = offered
        self.legacy = legacy
        self.refuse = refuse_features_ok
        self.status = 0
        self.features = 0
        self.queues: dict[int, tuple[int, int, int, int]] = {}
        self.notified: list[int] = []
        self.status_writes: list[int] = []

    def reset(self) -> None:
        self.status = 0
        self.queues.clear()

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        self.status_writes.append(status)
        if self.refuse and status & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            status &= ~spec.VIRTIO_CONFIG_S_FEATURES_OK
        self.status = status

    def device_features(self) -> int:
        return self.offered

    def set_driver_features(self, features: int) -> None:
        self.features = features

    def num_queues(self) -> int:
        return 3

    def queue_max_size(self, index: int) -> int:
        return 64 if index < 3 else 0

    def queue_ring_align(self) -> int:
        return spec.VIRTIO_PCI_VRING_ALIGN if self.legacy else 0

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        self.queues[index] = (size, desc, driver, device)

    def notify(self, index: int) -> None:
        self.notified.append(index)

    def read_config(self, off: int, n: int) -> bytes:
        cfg = MAC + spec.VIRTIO_NET_S_LINK_UP.to_bytes(2, "little") + (1).to_bytes(2, "little")
        cfg += (9000).to_bytes(2, "little")
        return cfg.ljust(off + n, b"\0")[off : off + n]

    def config_generation(self) -> int:
        return 0

    def read_isr(self) -> int:
        return 0


BASE = bit(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS,
           spec.VIRTIO_NET_F_MRG_RXBUF, spec.VIRTIO_F_EVENT_IDX)


def bring_up(offered: int = BASE, **kw) -> tuple[VirtioNetDriver, FakeTransport,
                                                  BytearrayGuestMemory]:
    t = FakeTransport(offered, legacy=kw.pop("legacy", False))
    mem = BytearrayGuestMemory(8 << 20)
    drv = VirtioNetDriver(t, mem, DmaAllocator(0x1000, (8 << 20) - 0x1000),
                          NetDriverConfig(**kw)).probe()
    return drv, t, mem


def device_queue(t: FakeTransport, mem: BytearrayGuestMemory, index: int,
                 event_idx: bool = True) -> SplitQueue:
    size, d, a, u = t.queues[index]
    q = SplitQueue(size, event_idx=event_idx)
    q.set_addresses(d, a, u)
    q.ready = True
    q.validate(mem)
    return q


def test_resolve_features_obeys_5_1_3_1() -> None:
    offered = bit(spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_HOST_ECN,
                  spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_NET_F_CTRL_RX, spec.VIRTIO_F_VERSION_1,
                  spec.VIRTIO_F_BAD_FEATURE, spec.VIRTIO_F_RING_PACKED)
    got = resolve_features(offered, ~0)
    # GUEST_TSO4 needs GUEST_CSUM; HOST_ECN needs HOST_TSO4/6; CTRL_RX needs CTRL_VQ
    assert got == bit(spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_F_VERSION_1,
                      spec.VIRTIO_F_BAD_FEATURE, spec.VIRTIO_F_RING_PACKED)
    legacy = resolve_features(offered, ~0, legacy=True)
    assert legacy == bit(spec.VIRTIO_NET_F_CSUM)  # no bits >= 32, never BAD_FEATURE


def test_dma_allocator_reuses_and_aligns() -> None:
    a = DmaAllocator(0x1000, 0x10000)
    x = a.alloc(100)
    a.free(x)
    assert a.alloc(120) == x  # same size class
    y = a.alloc(10, 4096)
    assert y % 4096 == 0
    with pytest.raises(ValueError):
        a.free(y + 1)
    with pytest.raises(MemoryError):
        a.alloc(0x20000)


def test_bring_up_sequence_and_config() -> None:
    drv, t, _ = bring_up()
    assert t.status_writes[:3] == [
        spec.VIRTIO_CONFIG_S_ACKNOWLEDGE,
        spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER,
        spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
        | spec.VIRTIO_CONFIG_S_FEATURES_OK,
    ]
    assert t.status & spec.VIRTIO_CONFIG_S_DRIVER_OK
    assert t.features == BASE and drv.mac == MAC and drv.link_up
    assert set(t.queues) == {0, 1}  # no CTRL_VQ offered
    assert drv.rx_layout == "mergeable" and drv.hdr_len == 12
    assert drv.rxqs[0].posted == 64


def test_features_ok_refused_is_a_device_fault() -> None:
    t = FakeTransport(BASE, refuse_features_ok=True)
    mem = BytearrayGuestMemory(1 << 20)
    drv = VirtioNetDriver(t, mem, DmaAllocator(0x1000, 0xF0000))
    with pytest.raises(DeviceFault, match="FEATURES_OK"):
        drv.probe()
    assert t.status & spec.VIRTIO_CONFIG_S_FAILED


class NeedsResetAfter(FakeTransport):
    """Sets NEEDS_RESET once the driver writes status bit ``bit``."""

    def __init__(self, bit_: int, **kw) -> None:
        super().__init__(BASE, **kw)
        self.bit = bit_

    def set_status(self, status: int) -> None:
        if status & self.bit:
            status |= spec.VIRTIO_CONFIG_S_NEEDS_RESET
        super().set_status(status)


@pytest.mark.parametrize("bit_", [spec.VIRTIO_CONFIG_S_DRIVER, spec.VIRTIO_CONFIG_S_DRIVER_OK])
def test_needs_reset_during_bring_up_fails_the_device(bit_: int) -> None:
    """§3.1.1 via ``VirtioDriver``: NEEDS_RESET at any step is a fault, and FAILED is written."""
    t = NeedsResetAfter(bit_)
    drv = VirtioNetDriver(t, BytearrayGuestMemory(1 << 20), DmaAllocator(0x1000, 0xF0000))
    with pytest.raises(DeviceFault, match="NEEDS_RESET"):
        drv.probe()
    assert t.status_writes[-1] & spec.VIRTIO_CONFIG_S_FAILED


def test_driver_ok_that_does_not_stick_fails_the_device() -> None:
    class DropsDriverOk(FakeTransport):
        def set_status(self, status: int) -> None:
            super().set_status(status & ~spec.VIRTIO_CONFIG_S_DRIVER_OK)

    t = DropsDriverOk(BASE)
    drv = VirtioNetDriver(t, BytearrayGuestMemory(1 << 20), DmaAllocator(0x1000, 0xF0000))
    with pytest.raises(DeviceFault, match="DRIVER_OK did not stick"):
        drv.probe()
    assert t.status & spec.VIRTIO_CONFIG_S_FAILED


def test_legacy_queue_size_must_be_a_power_of_two() -> None:
    class Odd(FakeTransport):
        def queue_max_size(self, index: int) -> int:
            return 100 if index < 3 else 0

    t = Odd(bit(spec.VIRTIO_NET_F_MAC), legacy=True)
    drv = VirtioNetDriver(t, BytearrayGuestMemory(1 << 20), DmaAllocator(0x1000, 0xF0000))
    with pytest.raises(DeviceFault, match="not a power of 2"):
        drv.probe()
    assert t.status & spec.VIRTIO_CONFIG_S_FAILED and not t.queues


def test_modern_device_must_be_driven_with_version_1() -> None:
    t = FakeTransport(BASE)
    drv = VirtioNetDriver(t, BytearrayGuestMemory(1 << 20), DmaAllocator(0x1000, 0xF0000),
                          NetDriverConfig(features=BASE & ~bit(spec.VIRTIO_F_VERSION_1)))
    with pytest.raises(DeviceFault, match="VERSION_1"):
        drv.probe()
    assert t.status & spec.VIRTIO_CONFIG_S_FAILED and drv.offered == BASE


def test_tx_kicks_follow_avail_event_and_rx_reassembles_mergeable() -> None:
    drv, t, mem = bring_up()
    txd = device_queue(t, mem, 1)
    t.notified.clear()
    assert drv.send([b"\xaa" * 100, b"\xbb" * 60]) == 2
    assert t.notified == [1]  # fresh ring: avail_event 0 -> kick
    txd.disable_notifications(mem)  # avail_event stays behind: no kick wanted
    chains = txd.pop_batch(mem, 8)
    assert [c.read_all(mem)[12:] for c in chains] == [b"\xaa" * 100, b"\xbb" * 60]
    for c in chains:
        txd.push(mem, c, 0)
    txd.publish(mem)
    drv.send([b"\xcc" * 70])
    assert t.notified == [1]  # suppressed
    assert drv.stats.kicks_suppressed >= 1
    # receive: one 3000-byte frame over two mergeable buffers (num_buffers = 2)
    rxd = device_queue(t, mem, 0)
    frame = bytes(range(256)) * 11 + b"x" * 184
    c1, c2 = rxd.pop_batch(mem, 2)
    hdr = VirtioNetHdr(num_buffers=2).pack(12)
    first = hdr + frame[: c1.writable_len - 12]
    c1.write(mem, first)
    rest = frame[c1.writable_len - 12 :]
    c2.write(mem, rest)
    rxd.push(mem, c1, len(first))
    rxd.push(mem, c2, len(rest))
    rxd.publish(mem)
    got = drv.receive()
    assert [f.data for f in got] == [frame] and got[0].num_buffers == 2


@pytest.mark.parametrize("evil", ["num_buffers0", "too_long", "short"])
def test_hostile_rx_used_elements_raise_device_fault(evil: str) -> None:
    drv, t, mem = bring_up()
    rxd = device_queue(t, mem, 0)
    (c,) = rxd.pop_batch(mem, 1)
    nb = 0 if evil == "num_buffers0" else 1
    c.write(mem, VirtioNetHdr(num_buffers=nb).pack(12) + b"z" * 50)
    n = {"num_buffers0": 62, "too_long": c.writable_len + 1, "short": 4}[evil]
    rxd.push_id(mem, c.head, n)
    rxd.publish(mem)
    with pytest.raises(DeviceFault):
        drv.receive()


def test_legacy_without_any_layout_uses_split_header() -> None:
    offered = bit(spec.VIRTIO_NET_F_MAC)
    drv, t, mem = bring_up(offered, legacy=True)
    assert drv.hdr_len == 10 and drv.rx_layout == "small"
    size, d, a, u = t.queues[1]
    assert d % 4096 == 0 and u % 4096 == 0 and a == d + 16 * size  # legacy vring layout
    txd = device_queue(t, mem, 1, event_idx=False)
    drv.send([b"\x11" * 80])
    (c,) = txd.pop_batch(mem, 1)
    assert [n for _, n, _ in c.segments] == [10, 80]  # header and data in separate buffers
    rxd = device_queue(t, mem, 0, event_idx=False)
    (r,) = rxd.pop_batch(mem, 1)
    assert [n for _, n, _ in r.segments] == [10, 1518]


# -- the device is hostile: any used-ring contents give frames or DeviceFault -------------------
FEATS = BASE & ~bit(spec.VIRTIO_NET_F_STATUS)

used_elem = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    elems=st.lists(used_elem, min_size=1, max_size=8),
    idx_jump=st.integers(0, 0xFFFF),
    hdr=st.binary(min_size=12, max_size=12),
    mrg=st.booleans(),
    queue=st.sampled_from([0, 1]),
)
def test_any_used_ring_gives_frames_or_device_fault(elems, idx_jump, hdr, mrg, queue) -> None:
    feats = FEATS if mrg else FEATS & ~bit(spec.VIRTIO_NET_F_MRG_RXBUF)
    t = FakeTransport(feats)
    mem = BytearrayGuestMemory(4 << 20)
    drv = VirtioNetDriver(t, mem, DmaAllocator(0x1000, (4 << 20) - 0x1000),
                          NetDriverConfig(rx_fill=8)).probe()
    drv.send([b"\x01" * 64] * 4)
    size, desc, avail, used = t.queues[queue]
    # the device "wrote" headers into every posted RX buffer
    for i in range(size):
        addr = mem.read_u64(desc + 16 * i)
        if addr and mem.contains(addr, 12):
            mem.write(addr, hdr)
    for k, (eid, ln) in enumerate(elems):
        slot = k % size
        mem.write_u32(used + 4 + 8 * slot, eid)
        mem.write_u32(used + 8 + 8 * slot, ln)
    mem.write_u16(used + 2, idx_jump)
    limit = drv.rxqs[0].q.size * drv._rx_geometry()[0] * 64
    try:
        if queue == 0:
            for f in drv.receive():
                assert len(f.data) <= limit
        else:
            drv.reap_tx()
    except DeviceFault:
        pass
