"""Packed virtqueue (virtio 1.2 §2.8): driver half <-> device half, hostile rings, batching."""

from __future__ import annotations

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.virtio.errors import DriverError, QueueError
from virtwire.virtio.packed_driver import PackedDriverQueue
from virtwire.virtio.packed_ring import (
    PACKED_MAX_INDIRECT,
    PackedQueue,
    pack_desc,
)
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)

RING = 0x1000
DATA = 0x40000
MEM = 0x80000
A = VIRTQ_DESC_F_AVAIL
U = VIRTQ_DESC_F_USED
N = VIRTQ_DESC_F_NEXT
W = VIRTQ_DESC_F_WRITE
IND = VIRTQ_DESC_F_INDIRECT


def make(size=8, *, event_idx=False, indirect=False, indirect_max=8, start=0x8000):
    mem = BytearrayGuestMemory(MEM)
    drv = PackedDriverQueue(
        size, RING, event_idx=event_idx, indirect=indirect, indirect_max=indirect_max
    )
    drv.start_at(mem, start)
    dev = PackedQueue(size, event_idx=event_idx, indirect=indirect)
    dev.set_addresses(*drv.layout())
    dev.set_base(start)
    dev.validate(mem)
    dev.ready = True
    return mem, drv, dev


def raw(mem, slot, addr, length, id_, flags):
    mem.write(RING + 16 * slot, pack_desc(addr, length, id_, flags))


# -- round trips ---------------------------------------------------------------------------------


def test_round_trip_data_both_ways():
    mem, drv, dev = make(8)
    mem.write(DATA, b"hello ")
    mem.write(DATA + 0x100, b"world")
    drv.add(mem, [(DATA, 6), (DATA + 0x100, 5)], [(DATA + 0x200, 4), (DATA + 0x300, 16)], "t0")
    assert drv.publish(mem) == 1
    chain = dev.pop(mem)
    assert chain is not None
    assert chain.head == 0 and chain.ring_descs == 4 and not chain.indirect
    assert chain.read_all(mem) == b"hello world"
    assert (chain.readable_len, chain.writable_len) == (11, 20)
    n = chain.write(mem, b"0123456789")
    dev.push(mem, chain, n)
    assert dev.publish(mem) == 1
    assert drv.get_used(mem) == ("t0", 10)
    assert mem.read(DATA + 0x200, 4) == b"0123" and mem.read(DATA + 0x300, 6) == b"456789"
    assert drv.get_used(mem) is None and dev.pop(mem) is None
    assert drv.num_free == 8 and dev.in_flight == 0


def test_indirect_round_trip_uses_one_slot():
    mem, drv, dev = make(2, indirect=True, indirect_max=8)
    mem.write(DATA, b"abc")
    drv.add(mem, [(DATA, 3)] * 3, [(DATA + 0x100, 9)] * 4, "i")
    assert drv.num_free == 1
    drv.publish(mem)
    chain = dev.pop(mem)
    assert chain.indirect and chain.ring_descs == 1 and len(chain.segments) == 7
    assert chain.read_all(mem) == b"abc" * 3
    dev.push(mem, chain, 36)
    dev.publish(mem)
    assert drv.get_used(mem) == ("i", 36)


def test_indirect_not_negotiated_on_device_is_refused():
    mem, drv, dev = make(4, indirect=True)
    dev.indirect = False
    drv.add(mem, [(DATA, 3)], [(DATA + 8, 3)], "x")
    drv.publish(mem)
    with pytest.raises(QueueError, match="INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC"):
        dev.pop(mem)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 8, 13, 256])
def test_chains_cross_the_ring_end_and_wrap_counters_flip(size):
    mem, drv, dev = make(size)
    flips = 0
    last_wrap = drv.avail_wrap
    for r in range(4 * size + 3):
        nseg = 1 + r % min(size, 3)
        drv.add(mem, [(DATA + r, 1)] * (nseg - 1), [(DATA + 0x1000, 8)], r)
        drv.publish(mem)
        chain = dev.pop(mem)
        assert chain is not None and chain.ring_descs == nseg
        dev.push(mem, chain, r % 9)
        dev.publish(mem)
        assert drv.get_used(mem) == (r, r % 9)
        if drv.avail_wrap != last_wrap:
            flips += 1
            last_wrap = drv.avail_wrap
        assert (drv.next_avail, drv.avail_wrap) == (dev.next_avail, dev.avail_wrap)
        assert (drv.last_used, drv.used_wrap) == (dev.next_used, dev.used_wrap)
    assert flips >= 2


def test_out_of_order_completion():
    mem, drv, dev = make(4)
    for t in range(3):
        drv.add(mem, [], [(DATA + 64 * t, 64)], t)
    drv.add(mem, [(DATA, 1)], [], 3)
    drv.publish(mem)
    chains = dev.pop_batch(mem, 10)
    assert [c.head for c in chains] == [0, 1, 2, 3]
    assert dev.pop(mem) is None  # ring full: slot 0 holds an old-lap descriptor
    order = [2, 0, 3, 1]
    for i in order:
        dev.push(mem, chains[i], 5 if i != 3 else 0)
    dev.publish(mem)
    got = [drv.get_used(mem) for _ in range(4)]
    assert got == [(2, 5), (0, 5), (3, 0), (1, 5)]
    # Reused ids in a new lap: the next round still works.
    drv.add(mem, [], [(DATA, 4)], "again")
    drv.publish(mem)
    c = dev.pop(mem)
    assert c.head in range(4)
    dev.push(mem, c, 4)
    dev.publish(mem)
    assert drv.get_used(mem) == ("again", 4)


def test_queue_full_and_bad_adds():
    mem, drv, dev = make(3)
    drv.add(mem, [(DATA, 1)], [(DATA, 1)], "a")
    with pytest.raises(QueueFull):
        drv.add(mem, [(DATA, 1)], [(DATA, 1)], "b")
    drv.add(mem, [(DATA, 1)], [], "c")
    assert drv.num_free == 0
    with pytest.raises(ValueError):
        drv.add(mem, [], [], "d")
    with pytest.raises(ValueError):
        PackedDriverQueue(3, RING).add(mem, [(DATA, 1)] * 4, [], "e")


def test_used_len_zero_without_write_flag():
    """§2.8.4: len of a used descriptor without WRITE is reserved and ignored by the driver."""
    mem, drv, dev = make(4)
    drv.add(mem, [], [(DATA, 16)], "r")
    drv.publish(mem)
    dev.pop(mem)
    raw(mem, 0, 0, 12, 0, A | U)  # a device that reports len but no WRITE
    assert drv.get_used(mem) == ("r", 0)


# -- batched publish ordering --------------------------------------------------------------------


def test_driver_batch_invisible_until_first_head_flags():
    mem, drv, dev = make(8)
    before = mem.read(RING, 16 * 8)
    drv.add(mem, [(DATA, 1)], [(DATA, 2)], "a")
    drv.add(mem, [(DATA, 3)], [], "b")
    drv.add(mem, [], [(DATA, 4), (DATA, 5)], "c")
    assert not dev.has_available(mem) and dev.pop(mem) is None
    staged = mem.read(RING, 16 * 8)
    assert staged != before
    drv.publish(mem)
    after = mem.read(RING, 16 * 8)
    # publish changed exactly the first head's flags (bytes 14..15 of slot 0)
    diff = [i for i in range(len(after)) if after[i] != staged[i]]
    assert diff and all(14 <= i <= 15 for i in diff)
    assert [c.head for c in dev.pop_batch(mem, 8)] == [0, 1, 2]


def test_second_batch_also_held_back_by_its_first_head():
    mem, drv, dev = make(8)
    drv.add(mem, [(DATA, 1)], [], "a")
    drv.publish(mem)
    assert dev.pop(mem).head == 0
    drv.add(mem, [(DATA, 1)], [], "b")
    drv.add(mem, [(DATA, 1)], [], "c")
    assert dev.pop(mem) is None
    drv.publish(mem)
    assert [c.head for c in dev.pop_batch(mem, 8)] == [1, 2]


def test_device_used_batch_invisible_until_first_element_flags():
    mem, drv, dev = make(8)
    for t in range(4):
        drv.add(mem, [], [(DATA + 16 * t, 16)], t)
    drv.publish(mem)
    chains = dev.pop_batch(mem, 8)
    for c in reversed(chains):
        dev.push(mem, c, 1)
    staged = mem.read(RING, 16 * 8)
    assert drv.get_used(mem) is None and not drv.has_used(mem)
    assert dev.publish(mem) == 4
    after = mem.read(RING, 16 * 8)
    diff = [i for i in range(len(after)) if after[i] != staged[i]]
    assert diff and all(14 <= i <= 15 for i in diff)
    assert [drv.get_used(mem)[0] for _ in range(4)] == [3, 2, 1, 0]


def test_push_batch_matches_push():
    mem, drv, dev = make(16)
    for t in range(5):
        drv.add(mem, [(DATA, 1)], [(DATA + 32 * t, 32)], t)
    drv.publish(mem)
    chains = dev.pop_batch(mem, 8)
    dev.push_batch(mem, [(c, 3) for c in chains])
    assert drv.get_used(mem) is None
    assert dev.publish(mem) == 5
    assert [drv.get_used(mem) for _ in range(5)] == [(t, 3) for t in range(5)]
    with pytest.raises(ValueError):
        dev.push_batch(mem, [(chains[0], 1)])  # nothing in flight any more


def test_push_rejects_our_own_bugs():
    mem, drv, dev = make(4)
    drv.add(mem, [(DATA, 1)], [(DATA, 8)], "a")
    drv.publish(mem)
    c = dev.pop(mem)
    with pytest.raises(ValueError, match="used length"):
        dev.push(mem, c, 9)
    dev.push(mem, c, 8)
    with pytest.raises(ValueError, match="in flight"):
        dev.push(mem, c, 8)


# -- hostile rings (device side) -----------------------------------------------------------------


def hostile(size=4, *, indirect=True):
    mem = BytearrayGuestMemory(MEM)
    dev = PackedQueue(size, indirect=indirect)
    dev.set_addresses(RING, RING + 16 * size, RING + 16 * size + 4)
    dev.validate(mem)
    dev.ready = True
    return mem, dev


def expect_error(mem, dev, match):
    with pytest.raises(QueueError, match=match) as e:
        dev.pop(mem)
    assert isinstance(e.value, DriverError)


def test_hostile_chain_longer_than_ring():
    mem, dev = hostile(4)
    for s in range(4):
        raw(mem, s, DATA, 8, 0, A | N)
    expect_error(mem, dev, "chain longer than the queue size 4")


def test_hostile_mid_chain_descriptor_not_available():
    mem, dev = hostile(4)
    raw(mem, 0, DATA, 8, 0, A | N)
    raw(mem, 1, DATA, 8, 0, A | U)  # used pattern, not available
    expect_error(mem, dev, "slot 1 is not available")


def test_hostile_chain_crossing_end_with_stale_wrap():
    mem, dev = hostile(4)
    dev.set_base(3 | 1 << 15)  # device at slot 3, wrap 1
    raw(mem, 3, DATA, 8, 0, A | N)
    raw(mem, 0, DATA, 8, 0, A)  # should carry wrap 0's pattern (USED set, AVAIL clear)
    expect_error(mem, dev, "slot 0 is not available .*wrap counter 0")
    mem2, dev2 = hostile(4)
    dev2.set_base(3 | 1 << 15)
    raw(mem2, 3, DATA, 8, 0, A | N)
    raw(mem2, 0, DATA, 8, 2, U)  # the correct pattern after the wrap
    c = dev2.pop(mem2)
    assert c.head == 2 and c.ring_descs == 2 and (dev2.next_avail, dev2.avail_wrap) == (1, 0)


def test_hostile_buffer_id_out_of_range():
    mem, dev = hostile(4)
    raw(mem, 0, DATA, 8, 4, A)
    expect_error(mem, dev, "buffer id 4 >= queue size 4")


def test_hostile_address_outside_ram():
    mem, dev = hostile(4)
    raw(mem, 0, MEM - 4, 8, 0, A)
    expect_error(mem, dev, "outside guest RAM")
    mem, dev = hostile(4)
    raw(mem, 0, (1 << 64) - 4, 8, 0, A)
    expect_error(mem, dev, "outside guest RAM")


def test_hostile_readable_after_writable():
    mem, dev = hostile(4)
    raw(mem, 0, DATA, 8, 0, A | N | W)
    raw(mem, 1, DATA, 8, 0, A)
    expect_error(mem, dev, "readable descriptor after writable")


def test_hostile_nested_indirect():
    mem, dev = hostile(4)
    table = DATA + 0x1000
    mem.write(table, pack_desc(DATA, 8, 0, 0) + pack_desc(table, 16, 0, IND))
    raw(mem, 0, table, 32, 0, A | IND)
    expect_error(mem, dev, "nested indirect")


@pytest.mark.parametrize("length", [0, 8, 24])
def test_hostile_indirect_table_length(length):
    mem, dev = hostile(4)
    raw(mem, 0, DATA, length, 0, A | IND)
    expect_error(mem, dev, "indirect table length")


def test_hostile_indirect_table_too_long():
    mem, dev = hostile(4)
    raw(mem, 0, DATA, 16 * (PACKED_MAX_INDIRECT + 1), 0, A | IND)
    expect_error(mem, dev, "exceeds")


def test_hostile_indirect_table_outside_ram():
    mem, dev = hostile(4)
    raw(mem, 0, MEM - 16, 32, 0, A | IND)
    expect_error(mem, dev, "indirect table .* outside guest RAM")


def test_hostile_indirect_with_next():
    mem, dev = hostile(4)
    mem.write(DATA, pack_desc(DATA, 8, 0, 0))
    raw(mem, 0, DATA, 16, 0, A | IND | N)
    expect_error(mem, dev, "INDIRECT together with NEXT")


def test_hostile_indirect_after_direct_descriptors():
    mem, dev = hostile(4)
    mem.write(DATA + 0x100, pack_desc(DATA, 8, 0, 0))
    raw(mem, 0, DATA, 8, 0, A | N)
    raw(mem, 1, DATA + 0x100, 16, 0, A | IND)
    expect_error(mem, dev, "indirect table after direct descriptors")


def test_indirect_write_flag_and_table_reserved_bits_ignored():
    """§2.8.7: WRITE on the INDIRECT descriptor and NEXT/id inside the table are ignored."""
    mem, dev = hostile(4)
    table = DATA + 0x100
    mem.write(table, pack_desc(DATA, 8, 77, N) + pack_desc(DATA + 8, 8, 99, W | N))
    raw(mem, 0, table, 32, 3, A | IND | W)
    c = dev.pop(mem)
    assert c.head == 3 and c.segments == [(DATA, 8, False), (DATA + 8, 8, True)]


def test_hostile_overfilled_ring():
    """A driver that re-exposes a slot the device has not returned yet: > size in flight."""
    mem, dev = hostile(2)
    raw(mem, 0, DATA, 8, 0, A)
    raw(mem, 1, DATA, 8, 1, A)
    assert dev.pop(mem).head == 0 and dev.pop(mem).head == 1
    raw(mem, 0, DATA, 8, 0, U)  # wrap-0 pattern on slot 0 while both are still in flight
    expect_error(mem, dev, "more than 2 descriptors available")


def test_zero_ring_and_stale_patterns_are_not_available():
    mem, dev = hostile(4)
    assert dev.pop(mem) is None  # zero-initialized ring: nothing available
    raw(mem, 0, DATA, 8, 0, A | U)  # used pattern
    assert dev.pop(mem) is None
    raw(mem, 0, DATA, 8, 0, U)  # available for wrap 0 only
    assert dev.pop(mem) is None
    dev.ready = False
    raw(mem, 0, DATA, 8, 0, A)
    assert dev.pop(mem) is None and dev.pop_batch(mem, 4) == []


def test_set_base_out_of_range_is_a_queue_error():
    _, dev = hostile(4)
    with pytest.raises(QueueError):
        dev.set_base(4)
    with pytest.raises(QueueError):
        dev.set_used_base(5)


# -- hostile device (driver side) ----------------------------------------------------------------


def one_in_flight(size=4):
    mem, drv, dev = make(size)
    drv.add(mem, [(DATA, 4)], [(DATA + 0x100, 10)], "t")
    drv.publish(mem)
    return mem, drv


def test_hostile_used_id_out_of_range():
    mem, drv = one_in_flight()
    raw(mem, 0, 0, 1, 9, A | U | W)
    with pytest.raises(QueueError, match="id 9 >= queue size 4"):
        drv.get_used(mem)


def test_hostile_used_id_not_in_flight():
    mem, drv = one_in_flight()
    raw(mem, 0, 0, 1, 2, A | U | W)
    with pytest.raises(QueueError, match="id 2 is not in flight"):
        drv.get_used(mem)


def test_hostile_used_len_too_large():
    mem, drv = one_in_flight()
    raw(mem, 0, 0, 11, 0, A | U | W)
    with pytest.raises(QueueError, match="len 11 > 10 writable"):
        drv.get_used(mem)


def test_driver_ignores_non_used_patterns():
    mem, drv = one_in_flight()
    for flags in (A, U, U | W):  # avail patterns of either lap: not used
        raw(mem, 0, 0, 1, 0, flags)
        assert drv.get_used(mem) is None


# -- vhost-user ring base ------------------------------------------------------------------------


def test_get_set_base_round_trip_and_resume():
    mem, drv, dev = make(5)
    for t in range(7):
        drv.add(mem, [(DATA, 1)], [], t)
        drv.publish(mem)
        dev.push(mem, dev.pop(mem), 0)
        dev.publish(mem)
        drv.get_used(mem)
    base = dev.get_base()
    assert base == (7 % 5) | 0 << 15  # slot 2, wrap counter flipped once
    assert dev.get_used_base() == base
    assert dev.get_vring_base32() == base | base << 16
    # A restarted backend resumes where the old one stopped.
    fresh = PackedQueue(5)
    fresh.set_addresses(*drv.layout())
    fresh.set_base(base)
    fresh.validate(mem)
    fresh.ready = True
    drv.add(mem, [(DATA, 1)], [(DATA, 3)], "after")
    drv.publish(mem)
    c = fresh.pop(mem)
    fresh.push(mem, c, 3)
    fresh.publish(mem)
    assert drv.get_used(mem) == ("after", 3)


def test_set_used_base_with_buffers_in_flight():
    mem, drv, dev = make(4)
    drv.add(mem, [(DATA, 1)], [], "a")
    drv.add(mem, [(DATA, 1)], [], "b")
    drv.publish(mem)
    a = dev.pop(mem)
    dev.pop(mem)
    avail, used = dev.get_base(), dev.get_used_base()
    assert (avail, used) == (2 | 1 << 15, 0 | 1 << 15)
    back = PackedQueue(4)
    back.set_addresses(*drv.layout())
    back.set_base(avail)
    back.set_used_base(used)
    assert back.in_flight == 2
    back.ready = True
    back.push(mem, a, 0)
    back.publish(mem)
    assert drv.get_used(mem) == ("a", 0)
    with pytest.raises(QueueError, match="more than a ring behind"):
        back.set_used_base(1 | 0 << 15)  # 5 slots behind avail 2/wrap 1 on a ring of 4


def test_reset_returns_to_initial_state():
    mem, drv, dev = make(4)
    drv.add(mem, [(DATA, 1)], [], "a")
    drv.publish(mem)
    dev.pop(mem)
    dev.reset()
    assert not dev.ready and dev.in_flight == 0
    assert (dev.next_avail, dev.avail_wrap, dev.next_used, dev.used_wrap) == (0, 1, 0, 1)
    assert (dev.desc_addr, dev.driver_addr, dev.device_addr) == (0, 0, 0)


# -- notification suppression (unit cases; the property tests cover every case) ------------------


def set_event(mem, addr, off_wrap, flags):
    mem.write(addr, off_wrap.to_bytes(2, "little") + flags.to_bytes(2, "little"))


def serve_one(mem, drv, dev, t=0):
    drv.add(mem, [(DATA, 1)], [], t)
    drv.publish(mem)
    dev.push(mem, dev.pop(mem), 0)
    dev.publish(mem)
    assert drv.get_used(mem) == (t, 0)


def test_needs_notification_flags():
    mem, drv, dev = make(8)
    assert not dev.needs_notification(mem)  # nothing published
    serve_one(mem, drv, dev)
    assert dev.needs_notification(mem)  # ENABLE (zero-initialized structure)
    assert not dev.needs_notification(mem)  # nothing new since
    set_event(mem, drv.driver_addr, 0, RING_EVENT_FLAGS_DISABLE)
    serve_one(mem, drv, dev, 1)
    assert not dev.needs_notification(mem)
    set_event(mem, drv.driver_addr, 0x7FFF, RING_EVENT_FLAGS_DESC)  # DESC without EVENT_IDX
    serve_one(mem, drv, dev, 2)
    assert dev.needs_notification(mem)


def test_needs_notification_desc_event_idx():
    mem, drv, dev = make(8, event_idx=True)
    set_event(mem, drv.driver_addr, 2 | 1 << 15, RING_EVENT_FLAGS_DESC)
    serve_one(mem, drv, dev, 0)  # used slot 0
    assert not dev.needs_notification(mem)
    serve_one(mem, drv, dev, 1)  # slot 1
    assert not dev.needs_notification(mem)
    serve_one(mem, drv, dev, 2)  # slot 2: the requested position
    assert dev.needs_notification(mem)
    set_event(mem, drv.driver_addr, 3 | 0 << 15, RING_EVENT_FLAGS_DESC)  # next lap's slot 3
    for t in range(3, 11):  # slots 3..7 (wrap 1), then 0..2 (wrap 0)
        serve_one(mem, drv, dev, t)
        assert not dev.needs_notification(mem)
    serve_one(mem, drv, dev, 11)  # slot 3, wrap 0
    assert dev.needs_notification(mem)


def test_kick_needed_flags_and_desc():
    mem, drv, dev = make(8, event_idx=True)
    assert not drv.kick_needed(mem)
    drv.add(mem, [(DATA, 1)], [], 0)
    drv.publish(mem)
    assert drv.kick_needed(mem)  # ENABLE
    dev.disable_notifications(mem)
    drv.add(mem, [(DATA, 1)], [], 1)
    drv.publish(mem)
    assert not drv.kick_needed(mem)
    dev.pop_batch(mem, 8)
    assert not dev.enable_notifications(mem)  # DESC at next_avail (slot 2), nothing pending
    drv.add(mem, [(DATA, 1)], [], 2)
    drv.publish(mem)
    assert drv.kick_needed(mem)
    drv.add(mem, [(DATA, 1)], [], 3)
    drv.publish(mem)
    assert not drv.kick_needed(mem)  # slot 3 is past the requested one
    assert dev.enable_notifications(mem) is True  # buffers are pending: re-poll


def test_enable_callbacks_reports_pending_used():
    mem, drv, dev = make(4, event_idx=True)
    assert drv.enable_callbacks(mem) is False
    drv.add(mem, [(DATA, 1)], [], "a")
    drv.publish(mem)
    dev.push(mem, dev.pop(mem), 0)
    dev.publish(mem)
    assert drv.enable_callbacks(mem) is True
    drv.get_used(mem)
    assert drv.enable_callbacks(mem) is False


# -- cached ring views -----------------------------------------------------------------------


def test_views_follow_a_new_guest_memory_object():
    mem, drv, dev = make(4)
    drv.add(mem, [(DATA, 1)], [], "a")
    drv.publish(mem)
    # A host that replaced its memory table hands the queue a new GuestMemory with the same
    # contents: the queue rebuilds its views from the new object (split ring convention).
    mem2 = BytearrayGuestMemory(MEM)
    mem2.write(0, mem.read(0, MEM))
    c = dev.pop(mem2)
    assert c is not None and c.head == 0
    assert dev.pop(mem) is None  # the old object: views rebuilt again, slot 1 is empty there
    dev.release_views()
    assert dev.has_available(mem) is False


def test_views_on_memory_without_the_ring_raise_queue_error():
    mem, drv, dev = make(4)
    small = BytearrayGuestMemory(0x800)  # the ring at 0x1000 is not in it
    with pytest.raises(QueueError, match="outside guest RAM"):
        dev.pop(small)


def test_implements_the_queue_protocols():
    from virtwire.virtio.queue import DeviceQueue, DriverQueue

    def members(proto):
        return {
            m
            for k in proto.__mro__
            if k not in (object,) and k.__name__ != "Protocol" and k.__name__ != "Generic"
            for m in vars(k)
            if not m.startswith("_")
        } | set(getattr(proto, "__annotations__", {}))

    mem, drv, dev = make(4)
    assert members(DeviceQueue) and members(DriverQueue)
    for m in members(DeviceQueue):
        assert hasattr(dev, m), m
    for m in members(DriverQueue):
        assert hasattr(drv, m), m


def test_bad_chain_after_good_ones_ends_the_batch_then_raises():
    mem, dev = hostile(4)
    raw(mem, 0, DATA, 8, 0, A)
    raw(mem, 1, DATA, 8, 1, A)
    raw(mem, 2, DATA, 8, 9, A)  # id out of range
    got = dev.pop_batch(mem, 4)
    assert [c.head for c in got] == [0, 1]
    assert (dev.next_avail, dev.in_flight) == (2, 2)
    with pytest.raises(QueueError, match="buffer id 9"):
        dev.pop_batch(mem, 4)
    assert (dev.next_avail, dev.in_flight) == (2, 2)  # the bad chain was not consumed


def test_indirect_falls_back_to_direct_above_indirect_max():
    mem, drv, dev = make(8, indirect=True, indirect_max=2)
    drv.add(mem, [(DATA, 1)] * 3, [], "direct")  # 3 elements > indirect_max: 3 ring slots
    drv.add(mem, [(DATA, 1)], [(DATA, 2)], "indirect")  # 2 elements: one slot
    assert drv.num_free == 8 - 3 - 1
    drv.publish(mem)
    a, b = dev.pop_batch(mem, 8)
    assert (a.indirect, a.ring_descs, b.indirect, b.ring_descs) == (False, 3, True, 1)


def test_allocate_and_setup():
    from virtwire.virtio.driver import GuestAllocator

    mem = BytearrayGuestMemory(MEM)
    alloc = GuestAllocator(0x1000, MEM - 0x1000)
    q = PackedDriverQueue.allocate(alloc, 6, event_idx=True, indirect=True, indirect_max=4)
    assert q.desc_addr % 16 == 0 and q.end - q.desc_addr == PackedDriverQueue.ring_bytes(6, 4)
    q.setup(mem, 5 | 0 << 15)
    assert (q.next_avail, q.avail_wrap, q.last_used, q.used_wrap) == (5, 0, 5, 0)
    dev = PackedQueue(6, event_idx=True, indirect=True)
    dev.set_addresses(*q.layout())
    dev.set_base(5 | 0 << 15)
    dev.ready = True
    q.add(mem, [(DATA, 1)], [(DATA, 1)], "x")  # indirect: one slot, slot 5
    q.add(mem, [(DATA, 1)], [], "y")  # slot 0 of the next lap (wrap back to 1)
    q.publish(mem)
    assert [c.head for c in dev.pop_batch(mem, 4)] == [0, 1]
    assert (dev.next_avail, dev.avail_wrap) == (1, 1)
