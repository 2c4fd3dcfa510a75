"""Property tests for the packed virtqueue (virtio 1.2 §2.8), both halves.

- Random scatter-gather buffers through driver -> device -> used, out-of-order completion, any
  queue size 1..32768 (powers of 2 or not), starting at any ring position and wrap counter so
  runs cross the ring's end and flip the wrap counters.
- Notification suppression (§2.8.10, §2.8.14): the device's ``needs_notification`` and the
  driver's ``kick_needed`` against a brute-force reference that lists every ring position
  (slot, wrap counter) the side moved over since its last decision.
- Random ring bytes: the device and the driver raise nothing but ``QueueError``.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtwire.memory import BytearrayGuestMemory
from virtwire.virtio.errors import QueueError
from virtwire.virtio.packed_driver import PackedDriverQueue
from virtwire.virtio.packed_ring import PackedQueue
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
SEG = 64  # bytes reserved per segment
MAX_SEGS = 6
SLOT_BYTES = SEG * MAX_SEGS
POOL = 96  # buffer regions (bounds buffers in flight per example)

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

sizes = st.one_of(
    st.integers(1, 9),
    st.integers(10, 300),
    st.integers(1, 32768),
    st.sampled_from([32768, 32767, 32766, 256, 255, 1024, 1000]),
)


def positions_from(slot: int, wrap: int, count: int, size: int) -> list[tuple[int, int]]:
    """The ``count`` ring positions starting at (slot, wrap), slot by slot (§2.8.1)."""
    out = []
    for _ in range(count):
        out.append((slot, wrap))
        slot += 1
        if slot == size:
            slot, wrap = 0, wrap ^ 1
    return out


def distance(a: tuple[int, int], b: tuple[int, int], size: int) -> int:
    """Slots from position a forward to position b."""
    pa = a[0] + (0 if a[1] else size)
    pb = b[0] + (0 if b[1] else size)
    return (pb - pa) % (2 * size)


def make(size, start_idx, start_wrap, *, event_idx=False, indirect=False, imax=4):
    data = RING + PackedDriverQueue.ring_bytes(size, imax if indirect else 0)
    data = (data + 0xFFF) & ~0xFFF
    mem = BytearrayGuestMemory(data + POOL * SLOT_BYTES)
    drv = PackedDriverQueue(
        size, RING, event_idx=event_idx, indirect=indirect, indirect_max=imax if indirect else 0
    )
    base = start_idx | start_wrap << 15
    drv.start_at(mem, base)
    dev = PackedQueue(size, event_idx=event_idx, indirect=indirect)
    dev.set_addresses(*drv.layout())
    dev.set_base(base)
    dev.validate(mem)
    dev.ready = True
    return mem, drv, dev, data


def start_strategy(size: int):
    near_end = st.integers(max(0, size - 40), size - 1)
    return st.tuples(st.one_of(st.integers(0, size - 1), near_end), st.integers(0, 1))


# -- round trips ---------------------------------------------------------------------------------


@SETTINGS
@given(
    size=sizes,
    data=st.data(),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_random_sg_lists(size, data, event_idx, indirect, seed):
    start_idx, start_wrap = data.draw(start_strategy(size))
    mem, drv, dev, pool = make(size, start_idx, start_wrap, event_idx=event_idx, indirect=indirect)
    rng = random.Random(seed)
    free_regions = list(range(POOL))
    expect: dict[int, tuple[int, bytes, list[tuple[int, int]]]] = {}  # token -> region, out, ins
    token = 0
    laps_before = (drv.avail_wrap, drv.next_avail)
    for _round in range(rng.randint(1, 12)):
        # Driver: a random number of random buffers, one publish.
        for _ in range(rng.randint(0, 8)):
            if not free_regions:
                break
            nout = rng.randint(0, 3)
            nin = rng.randint(0 if nout else 1, 3)
            segs = nout + nin
            if segs > size and not (indirect and 1 < segs <= 4):
                continue  # would need more slots than the ring has (indirect_max is 4)
            region = free_regions.pop()
            base = pool + region * SLOT_BYTES
            outs, ins, payload = [], [], b""
            for k in range(segs):
                ln = rng.randint(0, SEG)
                if k < nout:
                    chunk = rng.randbytes(ln)
                    mem.write(base + k * SEG, chunk)
                    outs.append((base + k * SEG, ln))
                    payload += chunk
                else:
                    mem.write(base + k * SEG, bytes(ln))
                    ins.append((base + k * SEG, ln))
            try:
                drv.add(mem, outs, ins, token)
            except QueueFull:
                free_regions.append(region)
                break
            expect[token] = (region, payload, ins)
            token += 1
        # Batched publish (§2.8.21.1): nothing of the batch is visible before the head flags.
        assert dev.pop_batch(mem, 1 << 16) == [] and not dev.has_available(mem)
        drv.publish(mem)
        # Device: pop everything, complete a random subset in random order, publish.
        chains = dev.pop_batch(mem, 1 << 16)
        rng.shuffle(chains)
        done = chains[: rng.randint(0, len(chains))]
        held = chains[len(done) :]
        for c in done:
            tok = drv._token[c.head]  # the test peeks which buffer this id carries
            _, payload, ins = expect[tok]
            assert c.read_all(mem) == payload
            assert c.writable_len == sum(n for _, n in ins)
            written = rng.randint(0, c.writable_len)
            c.write(mem, bytes([tok & 0xFF]) * written)
            dev.push(mem, c, written)
            expect[tok] = expect[tok] + (written,)
        assert drv.get_used(mem) is None  # §2.8.9: the batch appears only when published
        dev.publish(mem)
        for c in held:  # complete the rest in a second batch
            tok = drv._token[c.head]
            dev.push(mem, c, 0)
            expect[tok] = expect[tok] + (0,)
        dev.publish(mem)
        # Driver: collect every used buffer and check length and data.
        while (u := drv.get_used(mem)) is not None:
            tok, ln = u
            region, _, ins, written = expect.pop(tok)
            assert ln == written
            got = b"".join(mem.read(a, n) for a, n in ins)[:ln]
            assert got == bytes([tok & 0xFF]) * ln
            free_regions.append(region)
        assert not expect
        assert drv.num_free == size and dev.in_flight == 0
        assert (drv.next_avail, drv.avail_wrap) == (dev.next_avail, dev.avail_wrap)
        assert (drv.last_used, drv.used_wrap) == (dev.next_used, dev.used_wrap)
    if drv.avail_wrap != laps_before[0]:
        event("crossed the ring end")
    event(f"size {'< 64' if size < 64 else '< 4096' if size < 4096 else '>= 4096'}")


@settings(max_examples=8, deadline=None)
@given(size=st.sampled_from([1, 2, 3, 5, 6, 7, 100, 255]), indirect=st.booleans())
def test_wrap_counters_over_many_rounds(size, indirect):
    """Many laps from a fresh ring: the wrap counters flip once per lap on both sides."""
    mem, drv, dev, pool = make(size, 0, 1, indirect=indirect)
    laps = 0
    prev = drv.avail_wrap
    for r in range(12 * size + 7):
        nseg = 1 + r % min(3, size if not indirect else 3)
        drv.add(mem, [(pool, 1)] * (nseg - 1), [(pool + SEG, 4)], r)
        drv.publish(mem)
        (c,) = dev.pop_batch(mem, 4)
        dev.push(mem, c, 4)
        dev.publish(mem)
        assert drv.get_used(mem) == (r, 4)
        if drv.avail_wrap != prev:
            laps += 1
            prev = drv.avail_wrap
        assert dev.used_wrap == drv.used_wrap == dev.avail_wrap == drv.avail_wrap
    assert laps >= (4 if indirect else 8)


# -- notification suppression -----------------------------------------------------------------


def event_strategy(size: int, passed: list[tuple[int, int]]):
    """(flags, off_wrap) for an event suppression structure: often a position at or just beyond
    either edge of the window moved over, or inside it."""
    pos = st.tuples(st.integers(0, size - 1), st.integers(0, 1))
    if passed:
        edges = [passed[0], passed[-1]]
        (s0, w0), (s1, w1) = passed[0], passed[-1]
        edges.append(((s0 - 1) % size, w0 ^ (s0 == 0)))  # just before the window
        edges.append(((s1 + 1) % size, w1 ^ (s1 == size - 1)))  # the next position
        edges += [(s, w ^ 1) for s, w in edges]  # same slots, other lap
        pos = st.one_of(pos, st.sampled_from(edges), st.sampled_from(passed))
    off_wrap = st.one_of(
        pos.map(lambda p: p[0] | p[1] << 15),
        st.integers(0, 0xFFFF),  # includes hostile offsets >= size
    )
    return st.tuples(st.integers(0, 3), off_wrap)


def reference(flags, off_wrap, event_idx, passed, size):
    """§2.8.10: None means "either answer is allowed" (a spurious notification is harmless).

    Nothing moved -> no. DISABLE -> no. DESC with EVENT_IDX -> yes iff (off, wrap) is one of
    the positions moved over (a window of a whole lap or more may always notify; an offset
    beyond the ring names no slot and may be answered either way). ENABLE, the reserved value
    and DESC without EVENT_IDX -> yes.
    """
    if not passed:
        return False
    if flags == RING_EVENT_FLAGS_DISABLE:
        return False
    if flags != RING_EVENT_FLAGS_DESC or not event_idx:
        return True
    off, wrap = off_wrap & 0x7FFF, off_wrap >> 15
    if off >= size:
        return None
    if (off, wrap) in passed:
        return True
    return None if len(passed) >= size else False


def write_event(mem, addr, flags, off_wrap):
    mem.write(addr, off_wrap.to_bytes(2, "little") + flags.to_bytes(2, "little"))


@SETTINGS
@given(size=sizes, data=st.data(), event_idx=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_needs_notification_matches_spec(size, data, event_idx, seed):
    start_idx, start_wrap = data.draw(start_strategy(size))
    mem, drv, dev, pool = make(size, start_idx, start_wrap, event_idx=event_idx)
    rng = random.Random(seed)
    passed: list[tuple[int, int]] = []
    for _step in range(data.draw(st.integers(1, 14))):
        for _ in range(rng.randint(0, 4)):
            nseg = rng.randint(1, min(3, size))
            try:
                drv.add(mem, [(pool, 1)] * (nseg - 1), [(pool, 8)], _step)
            except QueueFull:
                break
        drv.publish(mem)
        chains = dev.pop_batch(mem, 1 << 16)
        rng.shuffle(chains)
        while chains:  # one or more publishes, each of a random group
            k = rng.randint(1, len(chains))
            group, chains = chains[:k], chains[k:]
            before = (dev.next_used, dev.used_wrap)
            for c in group:
                dev.push(mem, c, 0)
            dev.publish(mem)
            moved = distance(before, (dev.next_used, dev.used_wrap), size)
            passed += positions_from(*before, moved, size)
        while drv.get_used(mem) is not None:
            pass
        if data.draw(st.booleans()):
            flags, off_wrap = data.draw(event_strategy(size, passed))
            write_event(mem, drv.driver_addr, flags, off_wrap)
            got = dev.needs_notification(mem)
            want = reference(flags, off_wrap, event_idx, passed, size)
            assert want is None or got == want, (flags, hex(off_wrap), passed[:8], len(passed))
            event(f"device decision {want}")
            passed = []


@SETTINGS
@given(size=sizes, data=st.data(), event_idx=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_kick_needed_matches_spec(size, data, event_idx, seed):
    start_idx, start_wrap = data.draw(start_strategy(size))
    mem, drv, dev, pool = make(size, start_idx, start_wrap, event_idx=event_idx)
    rng = random.Random(seed)
    passed: list[tuple[int, int]] = []
    for _step in range(data.draw(st.integers(1, 14))):
        before = (drv.next_avail, drv.avail_wrap)
        for _ in range(rng.randint(0, 4)):
            nseg = rng.randint(1, min(3, size))
            try:
                drv.add(mem, [(pool, 1)] * (nseg - 1), [(pool, 8)], _step)
            except QueueFull:
                break
        drv.publish(mem)
        moved = distance(before, (drv.next_avail, drv.avail_wrap), size)
        passed += positions_from(*before, moved, size)
        if data.draw(st.booleans()):
            flags, off_wrap = data.draw(event_strategy(size, passed))
            write_event(mem, drv.device_addr, flags, off_wrap)
            got = drv.kick_needed(mem)
            want = reference(flags, off_wrap, event_idx, passed, size)
            assert want is None or got == want, (flags, hex(off_wrap), passed[:8], len(passed))
            event(f"driver decision {want}")
            passed = []
        # The device drains and returns everything so the ring keeps moving.
        for c in dev.pop_batch(mem, 1 << 16):
            dev.push(mem, c, 0)
        dev.publish(mem)
        while drv.get_used(mem) is not None:
            pass


@SETTINGS
@given(size=st.integers(1, 64), data=st.data(), event_idx=st.booleans())
def test_enable_notifications_asks_for_the_next_descriptor(size, data, event_idx):
    """The device's DESC request (next_avail, avail_wrap) makes the very next publish kick."""
    start_idx, start_wrap = data.draw(start_strategy(size))
    mem, drv, dev, pool = make(size, start_idx, start_wrap, event_idx=event_idx)
    dev.disable_notifications(mem)
    drv.add(mem, [(pool, 1)], [], 0)
    drv.publish(mem)
    assert drv.kick_needed(mem) is False
    dev.pop(mem)
    assert dev.enable_notifications(mem) is False
    if size > 1:
        drv.add(mem, [(pool, 1)], [], 1)
        drv.publish(mem)
        assert drv.kick_needed(mem) is True


# -- random ring contents --------------------------------------------------------------------


flag_bits = st.sampled_from(
    [
        VIRTQ_DESC_F_AVAIL,
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_WRITE,
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_INDIRECT,
        VIRTQ_DESC_F_USED,
        VIRTQ_DESC_F_USED | VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED,
        0,
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 16),
    data=st.data(),
    indirect=st.booleans(),
    event_idx=st.booleans(),
)
def test_device_on_random_ring_raises_only_queue_error(size, data, indirect, event_idx):
    mem_size = 0x4000
    mem = BytearrayGuestMemory(mem_size)
    dev = PackedQueue(size, indirect=indirect, event_idx=event_idx)
    dev.set_addresses(RING, RING + 16 * size, RING + 16 * size + 4)
    dev.validate(mem)
    dev.ready = True
    start_idx, start_wrap = data.draw(start_strategy(size))
    dev.set_base(start_idx | start_wrap << 15)
    addr = st.one_of(
        st.integers(0, mem_size + 64), st.integers(0, 2**64 - 1), st.just(RING + 0x800)
    )
    length = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1), st.sampled_from([16, 32]))
    flags = st.one_of(flag_bits, st.integers(0, 0xFFFF))
    desc = st.tuples(addr, length, st.integers(0, 0xFFFF), flags)
    for s, (a, n, i, f) in enumerate(data.draw(st.lists(desc, min_size=size, max_size=size))):
        mem.write(RING + 16 * s, a.to_bytes(8, "little") + n.to_bytes(4, "little")
                  + i.to_bytes(2, "little") + f.to_bytes(2, "little"))
    # an indirect table's worth of random entries at RING + 0x800
    mem.write(RING + 0x800, data.draw(st.binary(min_size=64, max_size=64)))
    mem.write(RING + 16 * size, data.draw(st.binary(min_size=8, max_size=8)))
    for _ in range(3):
        try:
            chains = dev.pop_batch(mem, size + 1)
        except QueueError:
            return
        assert dev.in_flight <= size
        for c in chains:
            assert c.head < size
            for gpa, n, _w in c.segments:
                assert mem.contains(gpa, n) or n == 0
            dev.push(mem, c, c.writable_len)
        dev.publish(mem)
        dev.needs_notification(mem)
        dev.enable_notifications(mem)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 16), data=st.data())
def test_driver_on_random_used_ring_raises_only_queue_error(size, data):
    mem, drv, dev, pool = make(size, 0, 1)
    n = data.draw(st.integers(1, size))
    for t in range(n):
        drv.add(mem, [], [(pool, 32)], t)
    drv.publish(mem)
    for s in range(size):
        raw = data.draw(st.binary(min_size=16, max_size=16))
        if data.draw(st.booleans()):
            mem.write(RING + 16 * s, raw)
    seen = set()
    try:
        while (u := drv.get_used(mem)) is not None:
            tok, ln = u
            assert tok not in seen and 0 <= ln <= 32
            seen.add(tok)
    except QueueError:
        pass
    assert drv.num_free <= size


@SETTINGS
@given(size=st.integers(1, 64), data=st.data(), event_idx=st.booleans())
def test_enable_callbacks_asks_for_the_next_used_descriptor(size, data, event_idx):
    """The driver's request (DESC at last_used, or ENABLE) makes the next used publish notify;
    DISABLE silences it (§2.8.10, §2.8.22)."""
    start_idx, start_wrap = data.draw(start_strategy(size))
    mem, drv, dev, pool = make(size, start_idx, start_wrap, event_idx=event_idx)
    for disabled in (True, False, True):
        if disabled:
            drv.disable_callbacks(mem)
        else:
            assert drv.enable_callbacks(mem) is False
        drv.add(mem, [(pool, 1)], [], 0)
        drv.publish(mem)
        (c,) = dev.pop_batch(mem, 4)
        dev.push(mem, c, 0)
        dev.publish(mem)
        assert dev.needs_notification(mem) is (not disabled)
        assert drv.get_used(mem) == (0, 0)
