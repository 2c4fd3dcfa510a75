"""Split ring byte layout against virtio 1.2 §2.7 (desc 16 B, avail/used rings, event fields)."""

import struct

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.testing import make_ring_pair
from virtwire.virtio.errors import QueueError
from virtwire.virtio.spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from virtwire.virtio.split_ring import (
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    split_ring_layout,
    used_ring_size,
)


def test_area_sizes_match_the_spec_structs():
    # §2.7.5 struct virtq_desc is 16 bytes; §2.7.6 avail: flags, idx, ring[N], used_event;
    # §2.7.8 used: flags, idx, ring[N] of 8-byte virtq_used_elem, avail_event.
    for n in (1, 2, 256, 32768):
        assert desc_table_size(n) == 16 * n
        assert avail_ring_size(n) == 2 + 2 + 2 * n + 2
        assert used_ring_size(n) == 2 + 2 + 8 * n + 2


def test_modern_layout_alignments():
    for n in (1, 2, 4, 8, 256, 1024, 32768):
        lay = split_ring_layout(n)
        assert lay.desc_offset % 16 == 0
        assert lay.avail_offset % 2 == 0 and lay.avail_offset >= lay.desc_size
        assert lay.used_offset % 4 == 0
        assert lay.used_offset >= lay.avail_offset + lay.avail_size
        assert lay.used_offset - (lay.avail_offset + lay.avail_size) < 4
        assert lay.total == lay.used_offset + lay.used_size


def test_legacy_layout_matches_linux_vring_size():
    # Linux include/uapi/linux/virtio_ring.h vring_size(num, 4096): used ring at the next 4096
    # boundary after desc + avail; e.g. num=256 -> used at 8192, 10246 bytes used in all.
    lay = split_ring_layout(256, legacy_align=4096)
    assert (lay.desc_offset, lay.avail_offset, lay.used_offset) == (0, 4096, 8192)
    assert lay.used_offset + lay.used_size == 10246
    assert lay.total == 12288
    lay = split_ring_layout(1024, legacy_align=4096)
    assert lay.used_offset == 16384 + 4096  # desc 16 KiB, avail 2054 B -> next page
    assert lay.addresses(0x100000) == (0x100000, 0x104000, 0x105000)


@pytest.mark.parametrize("n", [0, 3, 100, 65536, 32768 * 2])
def test_layout_refuses_bad_sizes(n):
    with pytest.raises(ValueError):
        split_ring_layout(n)


def test_driver_writes_descriptors_avail_and_events_at_spec_offsets():
    rp = make_ring_pair("split", 8, event_idx=True)
    mem, drv = rp.mem, rp.driver
    desc, avail, used = drv.layout()
    ob, ib = rp.add([b"hello"], [7], "tok")
    # Nothing visible before publish: avail.idx still 0.
    assert struct.unpack_from("<HH", mem.read(avail, 4)) == (0, 0)
    drv.publish(mem)
    d0 = struct.unpack("<QIHH", mem.read(desc, 16))
    head = mem.read_u16(avail + 4)
    assert d0 == (ob[0][0], 5, VIRTQ_DESC_F_NEXT, d0[3])
    d1 = struct.unpack("<QIHH", mem.read(desc + 16 * d0[3], 16))
    assert d1 == (ib[0][0], 7, VIRTQ_DESC_F_WRITE, 0)
    assert head == 0
    assert struct.unpack("<HH", mem.read(avail, 4)) == (0, 1)  # flags, idx
    # The device pops, pushes 7 bytes and publishes: used elem {le32 id, le32 len} at used+4.
    c = rp.device.pop(mem)
    rp.device.push(mem, c, 7)
    assert mem.read_u16(used + 2) == 0  # staged, not visible
    rp.device.publish(mem)
    assert struct.unpack("<HHII", mem.read(used, 12)) == (0, 1, head, 7)
    # avail_event (le16 after used.ring[N]) written by enable_notifications
    rp.device.enable_notifications(mem)
    assert mem.read_u16(used + 4 + 8 * 8) == 1
    # used_event (le16 after avail.ring[N]) written by the driver after get_used
    assert drv.get_used(mem) == ("tok", 7)
    assert mem.read_u16(avail + 4 + 2 * 8) == 1


def test_flags_words_are_the_first_le16_of_each_ring():
    rp = make_ring_pair("split", 4)
    mem, (_desc, avail, used) = rp.mem, rp.driver.layout()
    rp.driver.disable_callbacks(mem)
    assert mem.read_u16(avail) == VIRTQ_AVAIL_F_NO_INTERRUPT
    rp.driver.enable_callbacks(mem)
    assert mem.read_u16(avail) == 0
    rp.device.disable_notifications(mem)
    assert mem.read_u16(used) == VIRTQ_USED_F_NO_NOTIFY
    rp.device.enable_notifications(mem)
    assert mem.read_u16(used) == 0


def test_indirect_table_layout():
    rp = make_ring_pair("split", 4, indirect=True)
    mem, (desc, _avail, _used) = rp.mem, rp.driver.layout()
    ob, ib = rp.add([b"ab", b"cd"], [4], 1)
    rp.driver.publish(mem)
    addr, ln, flags, _ = struct.unpack("<QIHH", mem.read(desc, 16))
    assert flags == VIRTQ_DESC_F_INDIRECT and ln == 3 * 16
    t = [struct.unpack_from("<QIHH", mem.read(addr, ln), 16 * k) for k in range(3)]
    assert t[0] == (ob[0][0], 2, VIRTQ_DESC_F_NEXT, 1)
    assert t[1] == (ob[1][0], 2, VIRTQ_DESC_F_NEXT, 2)
    assert t[2] == (ib[0][0], 4, VIRTQ_DESC_F_WRITE, 0)
    c = rp.device.pop(mem)
    assert c.indirect and c.readable_len == 4 and c.writable_len == 4
    assert c.read_all(mem) == b"abcd"


@pytest.mark.parametrize(
    "desc,avail,used,msg",
    [
        (0x1008, 0x2000, 0x3000, "descriptor table address 0x1008 is not 16-byte aligned"),
        (0x1000, 0x2001, 0x3000, "available ring address 0x2001 is not 2-byte aligned"),
        (0x1000, 0x2000, 0x3002, "used ring address 0x3002 is not 4-byte aligned"),
        (0xFFF0, 0x2000, 0x3000, "descriptor table 0xfff0+0x80 is outside guest RAM"),
        (0x1000, 0x2000, 0xFFF0, "used ring 0xfff0+0x46 is outside guest RAM"),
    ],
)
def test_validate_checks_alignment_and_bounds(desc, avail, used, msg):
    mem = BytearrayGuestMemory(0x10000)
    q = SplitQueue(8)
    q.set_addresses(desc, avail, used)
    with pytest.raises(QueueError, match=msg.replace("+", r"\+")):
        q.validate(mem)


@pytest.mark.parametrize("size,msg", [(3, "power of 2"), (0, "power of 2"), (64, "maximum 32")])
def test_validate_checks_size(size, msg):
    mem = BytearrayGuestMemory(0x10000)
    q = SplitQueue(size, max_size=32)
    q.set_addresses(0x1000, 0x4000, 0x5000)
    with pytest.raises(QueueError, match=msg):
        q.validate(mem)


def test_push_batch_equals_pushes():
    a = make_ring_pair("split", 16)
    b = make_ring_pair("split", 16)
    for rp in (a, b):
        for i in range(5):
            rp.add([b"r"], [8], i)
        rp.driver.publish(rp.mem)
    ca = a.device.pop_batch(a.mem, 16)
    cb = b.device.pop_batch(b.mem, 16)
    for c, n in zip(ca, range(5)):
        a.device.push(a.mem, c, n)
    b.device.push_batch(b.mem, list(zip(cb, range(5))))
    a.device.publish(a.mem)
    b.device.publish(b.mem)
    used_a, used_b = a.driver.layout()[2], b.driver.layout()[2]
    assert a.mem.read(used_a, 4 + 8 * 16) == b.mem.read(used_b, 4 + 8 * 16)
    with pytest.raises(ValueError, match="in flight"):
        b.device.push_batch(b.mem, list(zip(cb, range(5))))
