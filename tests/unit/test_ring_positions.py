"""The rings' public position API (``DeviceQueue.positions/adopt/rewind``) and ``RxFilter``."""

from __future__ import annotations

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.net.ctrl import RxFilter
from virtwire.virtio.driver import GuestAllocator
from virtwire.virtio.packed_driver import PackedDriverQueue
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.split_ring import SplitDriverQueue, SplitQueue


def _pair(packed: bool) -> tuple[BytearrayGuestMemory, object, object]:
    mem = BytearrayGuestMemory(1 << 20)
    alloc = GuestAllocator(0x10000, (1 << 20) - 0x10000)
    drv: object
    if packed:
        drv = PackedDriverQueue.allocate(alloc, 8)
        dev = PackedQueue(8)
    else:
        drv = SplitDriverQueue.allocate(alloc, 8)
        dev = SplitQueue(8)
    drv.setup(mem)
    dev.set_addresses(*drv.layout())
    dev.ready = True
    dev.validate(mem)
    return mem, drv, dev


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_rewind_offers_popped_chains_again(packed: bool) -> None:
    mem, drv, dev = _pair(packed)
    for i in range(3):
        drv.add(mem, [], [(0x2000 + 0x100 * i, 0x100)], i + 1)
    drv.publish(mem)
    before = dev.positions()
    chains = dev.pop_batch(mem, 8)
    assert len(chains) == 3 and dev.in_flight == 3
    dev.rewind(chains, mem)
    assert dev.positions() == before
    again = dev.pop_batch(mem, 8)
    assert [c.head for c in again] == [c.head for c in chains]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_adopt_takes_positions_and_staged_elements(packed: bool) -> None:
    mem, drv, dev = _pair(packed)
    drv.add(mem, [], [(0x2000, 0x100)], "a")
    drv.publish(mem)
    c = dev.pop(mem)
    dev.push(mem, c, 10)
    pos = dev.positions()
    assert pos.staged == 1 and pos.in_flight == 0
    fresh = PackedQueue(8) if packed else SplitQueue(8)
    fresh.set_addresses(*drv.layout())
    fresh.ready = True
    fresh.adopt(pos)
    assert fresh.positions() == pos
    assert fresh.publish(mem) == 1  # the adopted staged element becomes visible
    assert drv.get_used(mem) == ("a", 10)


def test_rx_filter_accepts_by_mode_table_and_vlan() -> None:
    mac = b"\x02\x00\x00\x00\x00\x01"
    f = RxFilter(mac)
    f.set_features(ctrl_rx=True, ctrl_vlan=True)
    other = b"\x02\x00\x00\x00\x00\x09"
    frame = other + mac + b"\x08\x00"
    assert f.active and f.accept(frame)  # promiscuous at first (§5.1.6.5.1)
    f.set_mode("promisc", False)
    assert not f.accept(frame) and f.accept(mac + other + b"\x08\x00")
    f.set_tables([other], [])
    assert f.accept(frame)
    tagged = other + mac + b"\x81\x00\x00\x05\x08\x00"
    assert not f.accept(tagged)
    f.vlans.add(5)
    assert f.accept(tagged)
    c1 = f.c_form()
    assert f.c_form() is c1  # kept until something changes
    f.changed()
    assert f.c_form() is not c1 and f.c_form().n_uc == 1
