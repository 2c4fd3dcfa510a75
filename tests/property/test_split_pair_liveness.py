"""Liveness through the whole stack (VirtioDriver -> LocalTransport -> VirtioDevice): with
notification suppression on, no kick and no interrupt is ever lost (virtio 1.2 §2.7.7/§2.7.10).

Parametrized on the ring format (the packed ring's owner adds "packed" to ``FORMATS``)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.testing import DevicePair, LoopbackDevice
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    bit,
)

FORMATS = ["split", "packed"]

step = st.one_of(
    st.tuples(st.just("send"), st.integers(1, 12)),
    st.tuples(st.just("receive"), st.just(0)),
)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([2, 4, 8, 16]),  # a 2-segment buffer must fit without indirect
    event_idx=st.booleans(),
    indirect=st.booleans(),
    script=st.lists(step, min_size=1, max_size=30),
)
def test_no_lost_kicks_or_interrupts(fmt, size, event_idx, indirect, script):
    dev = LoopbackDevice([size], packed=fmt == "packed", event_idx=event_idx, indirect=indirect)
    pair = DevicePair(dev)
    wanted = bit(VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)
    if fmt == "packed":
        wanted |= bit(VIRTIO_F_RING_PACKED)
    pair.start(wanted)
    q = pair.driver.queues[0]
    sent = got = 0
    for op, n in script:
        if op == "send":
            for _ in range(n):
                try:
                    pair.send(0, [b"p%d" % sent], [8], sent)
                except QueueFull:
                    break
                sent += 1
            # No lost kick: the device has consumed everything the driver published.
            assert dev.counters[0]["chains"] == sent
            # No lost interrupt: used buffers the driver has not collected were signalled.
            if got < sent:
                assert pair.interrupts.queue_counts[0] >= 1
        else:
            out = pair.receive(0)
            assert [t for t, _ in out] == list(range(got, got + len(out)))
            assert all(data == b"p%d" % t for t, data in out)
            got += len(out)
            assert got == sent
            pair.interrupts.queue_counts.clear()
            q.enable_callbacks(pair.mem)
    assert not dev.status & 0x40
