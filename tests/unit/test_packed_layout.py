"""Byte layout of the packed virtqueue structures against virtio 1.2 §2.8.10.1, §2.8.13, §2.8.14."""

from __future__ import annotations

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.virtio.errors import QueueError
from virtwire.virtio.packed_driver import PackedDriverQueue
from virtwire.virtio.packed_ring import (
    PVIRTQ_DESC_ALIGN,
    PVIRTQ_DESC_OFF_ADDR,
    PVIRTQ_DESC_OFF_FLAGS,
    PVIRTQ_DESC_OFF_ID,
    PVIRTQ_DESC_OFF_LEN,
    PVIRTQ_EVENT_ALIGN,
    PVIRTQ_EVENT_OFF_DESC,
    PVIRTQ_EVENT_OFF_FLAGS,
    PVIRTQ_EVENT_SIZE,
    PackedQueue,
    pack_desc,
    packed_ring_layout,
    unpack_desc,
)
from virtwire.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_PACKED_DESC_SIZE,
)

BASE = 0x1000


def u16(mem, gpa):
    return int.from_bytes(mem.read(gpa, 2), "little")


def u32(mem, gpa):
    return int.from_bytes(mem.read(gpa, 4), "little")


def u64(mem, gpa):
    return int.from_bytes(mem.read(gpa, 8), "little")


def test_spec_constants():
    # §2.8.1 / §2.8.3 / §2.8.6 / §2.8.7 flag bits, §2.8.14 event flags.
    assert VIRTQ_DESC_F_NEXT == 1
    assert VIRTQ_DESC_F_WRITE == 2
    assert VIRTQ_DESC_F_INDIRECT == 4
    assert VIRTQ_DESC_F_AVAIL == 1 << 7
    assert VIRTQ_DESC_F_USED == 1 << 15
    assert (RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC) == (0, 1, 2)


def test_pvirtq_desc_field_offsets():
    """struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; } = 16 bytes."""
    assert VIRTQ_PACKED_DESC_SIZE == 16
    assert (PVIRTQ_DESC_OFF_ADDR, PVIRTQ_DESC_OFF_LEN, PVIRTQ_DESC_OFF_ID) == (0, 8, 12)
    assert PVIRTQ_DESC_OFF_FLAGS == 14
    raw = pack_desc(0x1122334455667788, 0xAABBCCDD, 0x0102, 0x8083)
    assert raw == bytes.fromhex("8877665544332211" "ddccbbaa" "0201" "8380")
    assert unpack_desc(raw) == (0x1122334455667788, 0xAABBCCDD, 0x0102, 0x8083)


def test_pvirtq_event_suppress_layout():
    """struct pvirtq_event_suppress { le16 desc (off:15, wrap:1); le16 flags (2 bits) } = 4."""
    assert PVIRTQ_EVENT_SIZE == 4
    assert (PVIRTQ_EVENT_OFF_DESC, PVIRTQ_EVENT_OFF_FLAGS) == (0, 2)


def test_ring_layout_sizes_and_alignment():
    # §2.8.10.1: descriptor ring 16*size at 16, each event structure 4 bytes at 4.
    for size in (1, 3, 256, 1000, 32768):
        d, drv, dev, total = packed_ring_layout(size)
        assert d == 0 and drv == 16 * size and dev == drv + 4 and total == dev + 4
        assert drv % PVIRTQ_EVENT_ALIGN == 0 and dev % PVIRTQ_EVENT_ALIGN == 0
    assert PVIRTQ_DESC_ALIGN == 16 and PVIRTQ_EVENT_ALIGN == 4
    q = PackedDriverQueue(5, BASE)
    assert q.layout() == (BASE, BASE + 80, BASE + 84)
    assert PackedDriverQueue.ring_bytes(5) == 96  # 88 rounded to 16
    assert PackedDriverQueue.ring_bytes(5, 4) == 96 + 5 * 4 * 16


def test_driver_writes_available_descriptors_at_spec_offsets():
    mem = BytearrayGuestMemory(0x10000)
    q = PackedDriverQueue(4, BASE)
    q.clear(mem)
    q.add(mem, [(0x2000, 10)], [(0x3000, 20), (0x4000, 30)], "tok")
    q.publish(mem)
    # Three slots, id 0 everywhere, AVAIL=1/USED=0 (wrap counter 1), NEXT on all but the last.
    expect = [
        (0x2000, 10, VIRTQ_DESC_F_NEXT),
        (0x3000, 20, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
        (0x4000, 30, VIRTQ_DESC_F_WRITE),
    ]
    for i, (addr, ln, fl) in enumerate(expect):
        at = BASE + 16 * i
        assert u64(mem, at + 0) == addr
        assert u32(mem, at + 8) == ln
        assert u16(mem, at + 12) == 0
        assert u16(mem, at + 14) == fl | VIRTQ_DESC_F_AVAIL
    assert mem.read(BASE + 48, 16) == bytes(16)


def test_device_writes_used_descriptor_at_spec_offsets():
    mem = BytearrayGuestMemory(0x10000)
    drv = PackedDriverQueue(4, BASE)
    drv.clear(mem)
    dev = PackedQueue(4)
    dev.set_addresses(*drv.layout())
    dev.validate(mem)
    dev.ready = True
    drv.add(mem, [(0x2000, 10)], [(0x3000, 20)], "a")
    drv.publish(mem)
    chain = dev.pop(mem)
    assert chain is not None and chain.ring_descs == 2
    dev.push(mem, chain, 7)
    dev.publish(mem)
    # One used descriptor at slot 0: id, len, AVAIL=USED=1 (wrap 1) and WRITE (len > 0).
    assert u32(mem, BASE + 8) == 7
    assert u16(mem, BASE + 12) == 0
    assert u16(mem, BASE + 14) == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE
    # The second slot of the chain is skipped, not written.
    assert u16(mem, BASE + 16 + 14) == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_WRITE
    assert drv.get_used(mem) == ("a", 7)


def test_indirect_table_layout():
    mem = BytearrayGuestMemory(0x10000)
    q = PackedDriverQueue(4, BASE, indirect=True, indirect_max=4)
    q.clear(mem)
    q.add(mem, [(0x2000, 10)], [(0x3000, 20)], "t")
    q.publish(mem)
    table = u64(mem, BASE)
    assert table == q.indirect_addr and table % 16 == 0
    assert u32(mem, BASE + 8) == 32  # two 16-byte entries
    assert u16(mem, BASE + 14) == VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_AVAIL
    assert unpack_desc(mem.read(table, 16)) == (0x2000, 10, 0, 0)
    assert unpack_desc(mem.read(table + 16, 16)) == (0x3000, 20, 0, VIRTQ_DESC_F_WRITE)


def test_event_suppression_structures_written_at_spec_offsets():
    mem = BytearrayGuestMemory(0x10000)
    drv = PackedDriverQueue(8, BASE, event_idx=True)
    drv.clear(mem)
    dev = PackedQueue(8, event_idx=True)
    dev.set_addresses(*drv.layout())
    dev.validate(mem)
    dev.ready = True
    drv.disable_callbacks(mem)
    assert u16(mem, drv.driver_addr + 2) == RING_EVENT_FLAGS_DISABLE
    drv.enable_callbacks(mem)
    # off_wrap = last_used 0 | used wrap 1 << 15, flags = DESC
    assert u16(mem, drv.driver_addr) == 0x8000
    assert u16(mem, drv.driver_addr + 2) == RING_EVENT_FLAGS_DESC
    dev.disable_notifications(mem)
    assert u16(mem, drv.device_addr + 2) == RING_EVENT_FLAGS_DISABLE
    dev.enable_notifications(mem)
    assert u16(mem, drv.device_addr) == 0x8000
    assert u16(mem, drv.device_addr + 2) == RING_EVENT_FLAGS_DESC
    plain = PackedDriverQueue(8, BASE)
    plain.enable_callbacks(mem)
    assert u16(mem, plain.driver_addr + 2) == RING_EVENT_FLAGS_ENABLE


def _dev(size, desc, drv, dev_addr, mem):
    q = PackedQueue(size)
    q.set_addresses(desc, drv, dev_addr)
    q.validate(mem)
    return q


def test_validate_alignment_16_4_4():
    mem = BytearrayGuestMemory(0x10000)
    _dev(4, 0x1000, 0x2004, 0x2008, mem)  # 4-byte aligned event structures are enough
    with pytest.raises(QueueError, match="descriptor ring .* 16-byte aligned"):
        _dev(4, 0x1008, 0x2000, 0x2004, mem)
    with pytest.raises(QueueError, match="driver event .* 4-byte aligned"):
        _dev(4, 0x1000, 0x2002, 0x2004, mem)
    with pytest.raises(QueueError, match="device event .* 4-byte aligned"):
        _dev(4, 0x1000, 0x2000, 0x2006, mem)


def test_validate_areas_inside_ram_exact_sizes():
    mem = BytearrayGuestMemory(0x10000)
    end = 0x10000
    _dev(4, end - 64, 0x100, end - 4, mem)  # ring and event struct end exactly at RAM's end
    with pytest.raises(QueueError, match="descriptor ring .* outside guest RAM"):
        _dev(5, end - 64, 0x100, 0x104, mem)
    with pytest.raises(QueueError, match="driver event .* outside guest RAM"):
        _dev(4, 0x100, end, 0x200, mem)
    with pytest.raises(QueueError, match="device event .* outside guest RAM"):
        _dev(4, 0x100, 0x200, end, mem)


@pytest.mark.parametrize("size", [0, 32769, -1])
def test_validate_size_range(size):
    mem = BytearrayGuestMemory(0x100000)
    q = PackedQueue(32768)
    q.size = size
    q.set_addresses(0x1000, 0x200, 0x204)
    with pytest.raises(QueueError, match="size"):
        q.validate(mem)


@pytest.mark.parametrize("size", [1, 3, 5, 100, 255, 1000])
def test_sizes_need_not_be_powers_of_two(size):
    mem = BytearrayGuestMemory(0x10000)
    _dev(size, 0x1000, 0x200, 0x204, mem)


def test_size_larger_than_device_maximum_refused():
    mem = BytearrayGuestMemory(0x10000)
    q = PackedQueue(8)
    q.set_size(16)
    q.set_addresses(0x1000, 0x200, 0x204)
    with pytest.raises(QueueError, match="maximum"):
        q.validate(mem)
