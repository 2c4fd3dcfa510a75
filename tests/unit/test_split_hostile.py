"""Hostile split rings (virtio 1.2 §2.7): every malformation is a QueueError with a clear
message on the ring, and NEEDS_RESET (+ config interrupt, counters) through VirtioDevice."""

import os
import struct

import pytest

from virtwire.memory import BytearrayGuestMemory, MmapGuestMemory
from virtwire.testing import DevicePair, LoopbackDevice
from virtwire.virtio.errors import QueueError
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from virtwire.virtio.split_ring import SplitQueue, split_ring_layout

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
RAM = 0x20000
BASE = 0x1000
BUF = 0x8000


class RawRing:
    """A guest that writes ring bytes by hand (no driver model, no rules)."""

    def __init__(self, size=8, indirect=False, mem=None, base=BASE):
        self.mem = mem or BytearrayGuestMemory(RAM)
        self.size = size
        self.desc, self.avail, self.used = split_ring_layout(size).addresses(base)
        self.idx = 0
        self.q = SplitQueue(size, indirect=indirect)
        self.q.set_addresses(self.desc, self.avail, self.used)
        self.q.validate(self.mem)

    def d(self, i, addr, length, flags=0, nxt=0):
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def table(self, gpa, entries):
        for k, e in enumerate(entries):
            self.mem.write(gpa + 16 * k, struct.pack("<QIHH", *e))

    def offer(self, head, idx=None):
        self.mem.write_u16(self.avail + 4 + 2 * (self.idx % self.size), head)
        self.idx = (self.idx + 1) & 0xFFFF if idx is None else idx
        self.mem.write_u16(self.avail + 2, self.idx)

    def pop(self):
        return self.q.pop(self.mem)


def test_a_good_chain_pops():
    r = RawRing()
    r.d(0, BUF, 10, NEXT, 3)
    r.d(3, BUF + 16, 20, WRITE)
    r.offer(0)
    c = r.pop()
    assert c.head == 0 and c.segments == [(BUF, 10, False), (BUF + 16, 20, True)]
    assert r.pop() is None


@pytest.mark.parametrize(
    "setup,msg",
    [
        # a descriptor loop: 0 -> 1 -> 0 -> ... stops at the TTL (queue size)
        (lambda r: (r.d(0, BUF, 1, NEXT, 1), r.d(1, BUF, 1, NEXT, 0)), "longer than 8"),
        # a chain longer than the queue (all 8 descriptors, then back to 2)
        (
            lambda r: [r.d(i, BUF, 1, NEXT, (i + 1) if i < 7 else 2) for i in range(8)],
            "longer than 8",
        ),
        # readable after writable (§2.7.4.2)
        (lambda r: (r.d(0, BUF, 4, NEXT | WRITE, 1), r.d(1, BUF, 4, 0)), "readable descriptor"),
        # buffer outside guest RAM, and one that straddles its end
        (lambda r: r.d(0, RAM + 0x100, 4), "outside guest RAM"),
        (lambda r: r.d(0, RAM - 2, 4), "outside guest RAM"),
        (lambda r: r.d(0, 2**64 - 8, 0xFFFFFFFF), "outside guest RAM"),
        # next index out of range
        (lambda r: r.d(0, BUF, 4, NEXT, 8), "next 8 >= queue size 8"),
        (lambda r: r.d(0, BUF, 4, NEXT, 0xFFFF), "next 65535 >= queue size 8"),
        # INDIRECT without the feature
        (lambda r: r.d(0, BUF, 32, INDIRECT), "without VIRTIO_F_INDIRECT_DESC"),
    ],
)
def test_malformed_chains_raise_queue_error(setup, msg):
    r = RawRing()
    setup(r)
    r.offer(0)
    with pytest.raises(QueueError, match=msg):
        r.pop()


@pytest.mark.parametrize(
    "entries,flags,length,msg",
    [
        ([(BUF, 4, INDIRECT, 0)], INDIRECT, 16, "nested indirect"),
        ([(BUF, 4, NEXT, 1), (0x100, 16, INDIRECT, 0)], INDIRECT, 32, "nested indirect"),
        ([(BUF, 4, NEXT, 5)], INDIRECT, 16, "indirect next 5 >= table entries 1"),
        ([(BUF, 4, NEXT, 0)], INDIRECT, 16, "longer than 1"),  # loop inside the table
        ([(BUF, 4, WRITE | NEXT, 1), (BUF, 4, 0, 0)], INDIRECT, 32, "readable descriptor"),
        ([(BUF, 4, 0, 0)], INDIRECT | NEXT, 16, "INDIRECT together with NEXT"),
        ([(BUF, 4, 0, 0)], INDIRECT | WRITE, 16, "INDIRECT together with WRITE"),
        ([(BUF, 4, 0, 0)], INDIRECT, 0, "not a non-zero multiple of 16"),
        ([(BUF, 4, 0, 0)], INDIRECT, 24, "not a non-zero multiple of 16"),
        ([(RAM * 2, 4, 0, 0)], INDIRECT, 16, "outside guest RAM"),
    ],
)
def test_malformed_indirect_tables(entries, flags, length, msg):
    r = RawRing(indirect=True)
    table = 0x6000
    r.table(table, entries)
    r.d(0, table, length, flags, 1)
    r.offer(0)
    with pytest.raises(QueueError, match=msg):
        r.pop()


def test_indirect_table_outside_ram():
    r = RawRing(indirect=True)
    r.d(0, RAM - 16, 32, INDIRECT)
    r.offer(0)
    with pytest.raises(QueueError, match="indirect table .* outside guest RAM"):
        r.pop()


def test_indirect_after_direct_descriptors_is_refused():
    r = RawRing(indirect=True)
    r.table(0x6000, [(BUF, 4, 0, 0)])
    r.d(0, BUF, 4, NEXT, 1)
    r.d(1, 0x6000, 16, INDIRECT)
    r.offer(0)
    with pytest.raises(QueueError, match="indirect table after direct"):
        r.pop()


def test_avail_index_jump_and_head_out_of_range():
    r = RawRing()
    r.d(0, BUF, 4)
    r.offer(0, idx=9)  # 9 ahead of 0 on a ring of 8
    with pytest.raises(QueueError, match="avail idx 9 is 9 ahead"):
        r.pop()
    with pytest.raises(QueueError, match="ahead"):
        r.q.pop_batch(r.mem, 64)
    r2 = RawRing()
    r2.offer(8)
    with pytest.raises(QueueError, match="head 8 >= queue size 8"):
        r2.pop()
    r3 = RawRing()
    r3.offer(0xFFFF)
    with pytest.raises(QueueError, match="head 65535"):
        r3.pop()


def test_avail_index_going_backwards_is_a_jump():
    r = RawRing()
    r.d(0, BUF, 4)
    r.offer(0)
    r.pop()
    r.mem.write_u16(r.avail + 2, 0)  # idx back from 1 to 0: 65535 ahead
    with pytest.raises(QueueError, match="65535 ahead"):
        r.pop()


def test_exactly_size_pending_is_fine_across_the_wrap():
    r = RawRing(size=4)
    r.q.set_base(65534)
    for i in range(4):
        r.d(i, BUF + 8 * i, 8)
        r.mem.write_u16(r.avail + 4 + 2 * ((65534 + i) % 4), i)
    r.mem.write_u16(r.avail + 2, (65534 + 4) & 0xFFFF)
    chains = r.q.pop_batch(r.mem, 100)
    assert [c.head for c in chains] == [0, 1, 2, 3]
    assert r.q.next_avail == 2


def test_overflowing_total_length_is_refused():
    # 17 descriptors of 256 MiB each exceed 2^32-1 bytes; RAM is a sparse memfd (no RSS).
    size = 1 << 28
    fd = os.memfd_create("vw-s-overflow")
    try:
        os.ftruncate(fd, size)
        mem = MmapGuestMemory()
        mem.map_fd(fd, 0, size)
        r = RawRing(size=32, mem=mem)
        for i in range(17):
            r.d(i, 0x100000, size - 0x100000, NEXT if i < 16 else 0, i + 1)
        r.offer(0)
        with pytest.raises(QueueError, match="total length exceeds"):
            r.pop()
        r.q.release_views()
        mem.close()
    finally:
        os.close(fd)


def test_hostile_ring_marks_device_needs_reset_and_stays_quiet():
    pair = DevicePair(LoopbackDevice([8]))
    pair.start()
    dev, mem = pair.device, pair.mem
    assert pair.send(0, [b"ok"], [2], "a")
    assert pair.receive(0) == [("a", b"ok")]
    q = pair.driver.queues[0]
    desc, avail, _ = q.layout()
    # The guest now writes a loop and offers it.
    mem.write(desc, struct.pack("<QIHH", 0x20000, 1, NEXT, 0))
    mem.write_u16(avail + 4 + 2 * 1, 0)
    mem.write_u16(avail + 2, 2)
    dev.notify(0)
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "longer than 8" in dev.last_error
    assert dev.counters[0]["errors"] == 1
    assert dev.device_counters["needs_reset"] == 1
    assert pair.interrupts.config_count == 1
    # Further kicks are refused, not processed, and nothing raises.
    dev.notify(0)
    assert dev.counters[0]["errors"] == 1
    # The driver sees NEEDS_RESET; a reset and re-init recovers the device.
    pair.driver.reset()
    assert dev.status == 0
    pair.start()
    assert pair.send(0, [b"again"], [5], "b")
    assert pair.receive(0) == [("b", b"again")]


@pytest.mark.parametrize(
    "corrupt,msg",
    [
        (lambda m, d, a: m.write_u16(a + 2, 100), "ahead"),
        (lambda m, d, a: m.write_u16(a + 4 + 2, 9), "head 9"),
        (lambda m, d, a: m.write(d, struct.pack("<QIHH", 0x6000, 16, INDIRECT, 0)), "INDIRECT"),
        (lambda m, d, a: m.write(d, struct.pack("<QIHH", 0x20000, 1, NEXT, 0)), "longer than 8"),
        (lambda m, d, a: m.write(d, struct.pack("<QIHH", 0x20000, 1, NEXT, 8)), "next 8"),
        (lambda m, d, a: m.write(d, struct.pack("<QIHH", 8 << 20, 1, 0, 0)), "outside guest RAM"),
        (
            lambda m, d, a: (
                m.write(d, struct.pack("<QIHH", 0x20000, 1, NEXT | WRITE, 1)),
                m.write(d + 16, struct.pack("<QIHH", 0x20000, 1, 0, 0)),
            ),
            "readable descriptor after writable",
        ),
    ],
)
def test_device_turns_each_fault_into_needs_reset(corrupt, msg):
    pair = DevicePair(LoopbackDevice([8], indirect=False))
    pair.start()
    q = pair.driver.queues[0]
    desc, avail, _ = q.layout()
    pair.send(0, [b"x"], [1], 1)
    pair.receive(0)
    pair.mem.write_u16(avail + 4 + 2, 0)
    pair.mem.write_u16(avail + 2, 2)
    corrupt(pair.mem, desc, avail)
    pair.device.notify(0)
    assert pair.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert msg in pair.device.last_error


def test_good_chains_before_a_bad_one_are_served_then_the_bad_one_raises():
    r = RawRing()
    r.d(0, BUF, 4)
    r.d(1, BUF, 4, NEXT, 9)  # next out of range
    r.d(2, BUF, 4)
    for h in (0, 1, 2):
        r.offer(h)
    chains = r.q.pop_batch(r.mem, 10)
    assert [c.head for c in chains] == [0]
    assert r.q.next_avail == 1 and r.q.in_flight == 1
    for _ in range(2):  # stays broken: every later call raises on the same chain
        with pytest.raises(QueueError, match="next 9"):
            r.q.pop_batch(r.mem, 10)
    assert r.q.next_avail == 1


def test_nested_indirect_through_the_device():
    pair = DevicePair(LoopbackDevice([8]))
    pair.start()  # INDIRECT_DESC negotiated
    q = pair.driver.queues[0]
    desc, avail, _ = q.layout()
    table = pair.alloc.alloc(32)
    pair.mem.write(table, struct.pack("<QIHH", table, 16, INDIRECT, 0))
    pair.mem.write(desc, struct.pack("<QIHH", table, 16, INDIRECT, 0))
    pair.mem.write_u16(avail + 4, 0)
    pair.mem.write_u16(avail + 2, 1)
    pair.device.notify(0)
    assert pair.device.status & VIRTIO_CONFIG_S_NEEDS_RESET
    assert "nested indirect" in pair.device.last_error
    assert pair.interrupts.config_count == 1


def test_indirect_table_longer_than_1024_is_refused():
    """Issue 14, defect 3: a 32768-entry table was walked (60-85 ms per chain); QEMU's cap."""
    r = RawRing(indirect=True, mem=BytearrayGuestMemory(1 << 20))
    r.d(0, 0x10000, 16 * 1025, INDIRECT)
    r.offer(0)
    with pytest.raises(QueueError, match="1025 descriptors exceeds 1024"):
        r.pop()
    r2 = RawRing(indirect=True, mem=BytearrayGuestMemory(1 << 20))
    r2.mem.write(0x10000, struct.pack("<QIHH", BUF, 4, 0, 0))
    r2.d(0, 0x10000, 16 * 1024, INDIRECT)  # the largest allowed table
    r2.offer(0)
    assert r2.pop().segments == [(BUF, 4, False)]
