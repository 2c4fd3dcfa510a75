"""The in-process driver/device pair, the guest allocator and the driver's distrust of devices."""

import pytest

from virtwire.testing import DevicePair, GuestAllocator, LoopbackDevice, make_ring_pair
from virtwire.virtio.driver import AllocatorError
from virtwire.virtio.errors import QueueError
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, bit

# Ring formats the pair tests run on (the packed ring's owner adds "packed" here).
FORMATS = ["split", "packed"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wanted", [0, bit(VIRTIO_F_EVENT_IDX), bit(VIRTIO_F_INDIRECT_DESC)])
def test_pair_moves_buffers_both_ways(fmt, wanted):
    from virtwire.virtio.spec import VIRTIO_F_RING_PACKED

    dev = LoopbackDevice([16, 16], packed=fmt == "packed")
    pair = DevicePair(dev)
    if fmt == "packed":
        wanted |= bit(VIRTIO_F_RING_PACKED)
    pair.start(wanted)
    assert pair.driver.ring_format == fmt
    for i in range(100):
        qi = i % 2
        pair.send(qi, [b"head-", str(i).encode()], [3, 64], i)
        got = pair.receive(qi)
        assert got == [(i, b"head-" + str(i).encode())]
    assert dev.counters[0]["chains"] == 50 and dev.counters[1]["chains"] == 50
    assert pair.interrupts.queue_counts[0] == dev.counters[0]["interrupts"] > 0
    assert pair.alloc.allocations == 2  # only the two rings remain


def test_event_idx_batches_suppress_kicks_and_interrupts():
    pair = DevicePair(LoopbackDevice([64]))
    pair.start(bit(VIRTIO_F_EVENT_IDX))
    q = pair.driver.queues[0]
    # Stage 10 buffers, publish once: one kick, one interrupt for the batch.
    for i in range(10):
        b = pair.alloc.alloc(8)
        q.add(pair.mem, [(b, 1)], [(b, 1)], ((i, [(b, 8)], [])))
    assert pair.driver.kick(0)
    assert pair.device.counters[0]["kicks"] == 1
    assert pair.device.counters[0]["interrupts"] == 1
    assert len(pair.receive(0)) == 10


def test_ring_pair_queue_full_and_recovery():
    rp = make_ring_pair("split", 4)
    for i in range(4):
        rp.add([b"x"], [], i)
    with pytest.raises(QueueFull):
        rp.add([b"y"], [], 9)
    rp.driver.publish(rp.mem)
    rp.serve()
    assert [t for t, _ in rp.collect()] == [0, 1, 2, 3]
    assert rp.driver.num_free == 4


def test_allocator_first_fit_alignment_and_coalescing():
    a = GuestAllocator(0x1000, 0x1000)
    x = a.alloc(10, 16)
    y = a.alloc(100, 256)
    assert x == 0x1000 and y == 0x1100
    z = a.alloc(0x80, 16)
    assert z == 0x1010  # the gap before y
    with pytest.raises(AllocatorError):
        a.alloc(0x1000)
    for g in (y, x, z):
        a.free(g)
    assert a.bytes_free == 0x1000 and a.alloc(0x1000, 16) == 0x1000


def _pending_pair():
    rp = make_ring_pair("split", 8)
    rp.add([b"abc"], [4], "t")
    rp.driver.publish(rp.mem)
    return rp, rp.driver.layout()[2]


def test_driver_refuses_a_hostile_used_ring():
    rp, used = _pending_pair()
    rp.mem.write_u16(used + 2, 1)
    rp.mem.write_u32(used + 4, 5)  # id 5 was never offered
    with pytest.raises(QueueError, match="id 5 is not in flight"):
        rp.driver.get_used(rp.mem)
    rp, used = _pending_pair()
    rp.mem.write_u16(used + 2, 1)
    rp.mem.write_u32(used + 4, 0)
    rp.mem.write_u32(used + 8, 5)  # 5 > 4 writable bytes
    with pytest.raises(QueueError, match="len 5 > 4"):
        rp.driver.get_used(rp.mem)
    rp, used = _pending_pair()
    rp.mem.write_u16(used + 2, 3)  # 3 used, 1 in flight
    with pytest.raises(QueueError, match="only 1 buffers are in flight"):
        rp.driver.get_used(rp.mem)


def test_detach_unused_reclaims_in_flight_buffers():
    rp = make_ring_pair("split", 8, indirect=True)
    rp.add([b"a", b"b"], [4], "ind")  # one indirect descriptor + a table
    rp.add([b"c"], [], "direct")
    rp.driver.publish(rp.mem)
    tables = rp.alloc.allocations
    assert sorted(rp.driver.detach_unused()) == ["direct", "ind"]
    assert rp.driver.num_free == 8 and rp.driver.in_flight == 0
    assert rp.alloc.allocations == tables - 1  # the indirect table went back
