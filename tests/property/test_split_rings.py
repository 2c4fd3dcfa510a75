"""Property tests: random scatter-gather lists driver -> device -> used across index wrap-around,
and notification suppression decisions equal to the spec's formula (virtio 1.2 §2.7.7/§2.7.10).

The round-trip properties are parametrized on the ring format: ``FORMATS`` below (the packed
ring's owner adds "packed", with its size and start strategies in ``SIZES``/``START``).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.testing import make_ring_pair
from virtwire.virtio.notify import vring_need_event
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY

FORMATS = ["split", "packed"]

# Queue sizes 1..32768: split rings need a power of 2, so sample every power; the small ones
# most often (the interesting wrap behaviour), the largest still covered.
SIZES = {
    "split": st.sampled_from([1 << k for k in range(16)]),
    "packed": st.one_of(st.integers(1, 300), st.sampled_from([32767, 32768, 1000, 4096])),
}


def START(fmt, size):  # noqa: N802 - a table of strategies, like SIZES
    if fmt == "split":
        near_wrap = st.integers(0, min(2 * size, 300)).map(lambda k: (0xFFFF - k) & 0xFFFF)
        return st.one_of(st.just(0), near_wrap, st.integers(0, 0xFFFF))
    return st.tuples(st.integers(0, size - 1), st.integers(0, 1)).map(lambda t: t[0] | t[1] << 15)


SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

segment = st.binary(min_size=0, max_size=48)
buffer = st.tuples(st.lists(segment, max_size=3), st.lists(st.integers(0, 64), max_size=3)).filter(
    lambda b: b[0] or b[1]
)


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_random_sg_lists_round_trip(fmt, data):
    size = data.draw(SIZES[fmt], label="size")
    start = data.draw(START(fmt, size), label="start")
    event_idx = data.draw(st.booleans(), label="event_idx")
    indirect = data.draw(st.booleans(), label="indirect")
    rounds = data.draw(st.lists(st.lists(buffer, min_size=1, max_size=12), min_size=1,
                                max_size=6), label="rounds")
    rp = make_ring_pair(fmt, size, event_idx=event_idx, indirect=indirect, start=start)
    mem = rp.mem
    expected = {}
    token = 0
    returned = 0
    for batch in rounds:
        for out, in_lens in batch:
            try:
                ob, ib = rp.add(out, in_lens, token)
            except QueueFull:
                break
            except ValueError:  # more segments than a small ring without indirect can hold
                assert len(out) + len(in_lens) > size
                continue
            data_in = b"".join(out)
            cap = sum(in_lens)
            expected[token] = (data_in[:cap], ob, ib)
            token += 1
        rp.driver.publish(mem)
        limit = data.draw(st.integers(1, 2 * size + 1), label="device batch")
        while chains := rp.device.pop_batch(mem, limit):
            for c in chains:
                assert c.writable_len >= 0 and c.readable_len >= 0
                n = c.write(mem, c.read_all(mem))
                rp.device.push(mem, c, n)
            rp.device.publish(mem)
        for tok, length in rp.collect():
            want, ob, ib = expected.pop(tok)
            assert length == len(want)
            got = b"".join(mem.read(g, n) for g, n in ib)[:length]
            assert got == want
            rp.free_buffers(ob + ib)
            returned += 1
    assert not expected  # every buffer came back
    assert returned == token
    assert rp.driver.num_free == size


# --- notification suppression (split), device side: §2.7.7 ---------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 8)),
        st.tuples(st.just("serve"), st.integers(1, 8)),
        st.tuples(st.just("used_event"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("used_event_rel"), st.integers(-4, 12)),
        st.tuples(st.just("no_interrupt"), st.booleans()),
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(
    size=st.sampled_from([1, 2, 4, 8, 16, 256]),
    start=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    script=ops,
)
def test_used_notification_matches_the_spec_formula(size, start, event_idx, script):
    rp = make_ring_pair("split", size, event_idx=event_idx, start=start)
    mem, dev = rp.mem, rp.device
    _, avail, _ = rp.driver.layout()
    used_event_at = avail + 4 + 2 * size
    old = start  # used idx at the previous decision
    for op, arg in script:
        if op == "add":
            for _ in range(arg):
                try:
                    rp.add([], [1], 0)
                except QueueFull:
                    break
            rp.driver.publish(mem)
        elif op == "used_event":
            mem.write_u16(used_event_at, arg)
        elif op == "used_event_rel":
            mem.write_u16(used_event_at, (dev.next_used + arg) & 0xFFFF)
        elif op == "no_interrupt":
            mem.write_u16(avail, VIRTQ_AVAIL_F_NO_INTERRUPT if arg else 0)
        else:
            for c in dev.pop_batch(mem, arg):
                dev.push(mem, c, 0)
            dev.publish(mem)
            new = mem.read_u16(rp.driver.layout()[2] + 2)
            assert new == dev.next_used
            if event_idx:
                want = vring_need_event(mem.read_u16(used_event_at), new, old)
            else:
                want = new != old and not mem.read_u16(avail) & VIRTQ_AVAIL_F_NO_INTERRUPT
            assert dev.needs_notification(mem) == want
            old = new
            # the driver consumes, but must not move used_event behind our back here
            ue = mem.read_u16(used_event_at)
            rp.collect()
            mem.write_u16(used_event_at, ue)


# --- notification suppression (split), driver side: §2.7.10 --------------------------------

kick_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 6)),
        st.tuples(st.just("avail_event"), st.integers(0, 0xFFFF)),
        st.tuples(st.just("avail_event_rel"), st.integers(-4, 10)),
        st.tuples(st.just("no_notify"), st.booleans()),
        st.tuples(st.just("drain"), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(
    size=st.sampled_from([1, 2, 8, 64]),
    start=st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    script=kick_ops,
)
def test_kick_decision_matches_the_spec_formula(size, start, event_idx, script):
    rp = make_ring_pair("split", size, event_idx=event_idx, start=start)
    mem, drv = rp.mem, rp.driver
    _, avail, used = drv.layout()
    avail_event_at = used + 4 + 8 * size
    old = start  # avail idx at the previous kick decision
    for op, arg in script:
        if op == "avail_event":
            mem.write_u16(avail_event_at, arg)
        elif op == "avail_event_rel":
            mem.write_u16(avail_event_at, (mem.read_u16(avail + 2) + arg) & 0xFFFF)
        elif op == "no_notify":
            mem.write_u16(used, VIRTQ_USED_F_NO_NOTIFY if arg else 0)
        elif op == "drain":
            ae, fl = mem.read_u16(avail_event_at), mem.read_u16(used)
            rp.serve()
            rp.collect()
            mem.write_u16(avail_event_at, ae)
            mem.write_u16(used, fl)
        else:
            for _ in range(arg):
                try:
                    rp.add([b"y"], [], 0)
                except QueueFull:
                    break
            drv.publish(mem)
            new = mem.read_u16(avail + 2)
            if event_idx:
                want = vring_need_event(mem.read_u16(avail_event_at), new, old)
            else:
                want = new != old and not mem.read_u16(used) & VIRTQ_USED_F_NO_NOTIFY
            assert drv.kick_needed(mem) == want
            old = new


@SETTINGS
@given(event_idx=st.booleans(), start=st.integers(0, 0xFFFF), n=st.integers(1, 8))
def test_enable_notifications_reports_buffers_that_raced_in(event_idx, start, n):
    rp = make_ring_pair("split", 8, event_idx=event_idx, start=start)
    mem, dev = rp.mem, rp.device
    dev.disable_notifications(mem)
    assert dev.enable_notifications(mem) is False
    dev.disable_notifications(mem)
    for _ in range(n):
        rp.add([b"z"], [], 0)
    rp.driver.publish(mem)  # the driver saw notifications disabled: maybe no kick
    assert dev.enable_notifications(mem) is True  # the device must re-poll
    if event_idx:  # avail_event = the next index the device will read
        assert mem.read_u16(rp.driver.layout()[2] + 4 + 8 * 8) == dev.next_avail
    assert len(rp.serve()) == n


@given(event=st.integers(0, 0xFFFF), old=st.integers(0, 0xFFFF), step=st.integers(0, 0xFFFF))
def test_vring_need_event_is_the_crossing_test(event, old, step):
    new = (old + step) & 0xFFFF
    # event crossed iff event is one of old, old+1, ..., new-1 (mod 2^16)
    crossed = step > 0 and ((event - old) & 0xFFFF) < step
    assert vring_need_event(event, new, old) == crossed
