"""Device status state machine (virtio 1.2 §2.1, §3.1.1) as a table, and its enforcement."""

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.testing import DevicePair, LoopbackDevice, RecordingInterrupt
from virtwire.virtio.device import (
    LEGACY_TRANSITIONS,
    VALID_TRANSITIONS,
    WRITABLE_IN_STATUS,
    check_transition,
    status_str,
)
from virtwire.virtio.errors import StatusError
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_DRIVER as DRV,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_DRIVER_OK as DOK,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_FAILED as FAILED,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_FEATURES_OK as FOK,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_NEEDS_RESET as NR,
)
from virtwire.virtio.spec import VIRTIO_F_VERSION_1

PROGRESS = [0, ACK, ACK | DRV, ACK | DRV | FOK, ACK | DRV | FOK | DOK]


def test_table_is_the_spec_sequence():
    # Each step adds exactly the next bit of §3.1.1; re-writing the same value is allowed.
    for cur, nxt in zip(PROGRESS, PROGRESS[1:]):
        assert VALID_TRANSITIONS[cur] == {cur, nxt}
    assert VALID_TRANSITIONS[PROGRESS[-1]] == {PROGRESS[-1]}
    # Legacy (§3.1.2) may skip FEATURES_OK.
    assert ACK | DRV | DOK in LEGACY_TRANSITIONS[ACK | DRV]
    assert ACK | DRV | DOK not in VALID_TRANSITIONS[ACK | DRV]


@pytest.mark.parametrize("old", PROGRESS)
@pytest.mark.parametrize("new", range(1, 256))
def test_check_transition_agrees_with_the_table(old, new):
    allowed = new & (ACK | DRV | FOK | DOK) in VALID_TRANSITIONS[old]
    allowed = allowed and not new & (NR | 0x30)
    if new & FAILED and new & 0x0F == old and not new & (NR | 0x30):
        allowed = True  # FAILED may be added at any point
    if allowed:
        check_transition(old, new)
    else:
        with pytest.raises(StatusError):
            check_transition(old, new)


def test_needs_reset_is_device_owned_and_failed_sticks():
    with pytest.raises(StatusError, match="may not set NEEDS_RESET"):
        check_transition(ACK, ACK | NR)
    check_transition(ACK | DRV | NR, ACK | DRV | FOK | NR)  # echoed back by a driver: fine
    with pytest.raises(StatusError, match="FAILED"):
        check_transition(ACK | FAILED, ACK | DRV)
    check_transition(ACK | FAILED, 0)  # reset clears everything


def test_status_str():
    assert status_str(0) == "RESET"
    assert status_str(ACK | DRV | FOK | DOK) == "ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK"
    assert status_str(0x10) == "0x10"


def test_writable_table_is_data():
    assert WRITABLE_IN_STATUS["driver_features"][1] & FOK
    assert WRITABLE_IN_STATUS["queue_notify"][0] == DOK


def _device(**kw):
    dev = LoopbackDevice([8, 8], **kw)
    irq = RecordingInterrupt()
    dev.attach(BytearrayGuestMemory(0x10000), irq)
    return dev, irq


def test_refused_status_writes_leave_status_unchanged():
    dev, _ = _device()
    assert not dev.write_status(ACK | DRV)  # skipped ACKNOWLEDGE
    assert dev.status == 0 and dev.device_counters["status_errors"] == 1
    assert dev.write_status(ACK)
    assert dev.write_status(ACK | DRV)
    assert not dev.write_status(ACK)  # clearing a bit
    assert dev.status == ACK | DRV
    assert not dev.write_status(ACK | DRV | DOK)  # modern: FEATURES_OK first
    assert dev.write_status(ACK | DRV | FAILED)
    assert not dev.write_status(ACK | DRV | FOK)
    assert dev.write_status(0) and dev.status == 0


def test_queue_use_before_driver_ok_is_refused():
    pair = DevicePair(LoopbackDevice([8]))
    d = pair.driver
    d.negotiate(0)
    q = d.setup_queue(0)
    q.add(pair.mem, [(0x20000, 1)], [], "t")
    q.publish(pair.mem)
    pair.device.notify(0)  # before DRIVER_OK
    assert pair.device.counters[0]["chains"] == 0
    assert pair.device.device_counters["refused_writes"] >= 1
    d.driver_ok()
    assert pair.device.active


def test_queue_config_refused_after_driver_ok_and_when_enabled():
    pair = DevicePair(LoopbackDevice([8]))
    pair.start()
    dev = pair.device
    assert not dev.set_queue_size(0, 4)
    assert not dev.set_queue_addresses(0, 0, 0, 0)
    assert not dev.set_queue_ready(0, False)
    assert dev.queue_config[0].size == 8


def test_queue_size_bounds():
    dev, _ = _device()
    dev.write_status(ACK)
    assert not dev.set_queue_size(0, 16)  # above max
    assert not dev.set_queue_size(0, 0)
    assert dev.set_queue_size(0, 4)
    assert not dev.set_queue_size(5, 4)  # no such queue


def test_needs_reset_sets_bit_counts_and_raises_config_interrupt():
    pair = DevicePair(LoopbackDevice([8]))
    pair.start()
    dev = pair.device
    dev.needs_reset("backend gone")
    dev.needs_reset("again")  # one interrupt, both counted
    assert dev.status & NR
    assert pair.interrupts.config_count == 1
    assert dev.device_counters["needs_reset"] == 2
    assert not dev.active
    # the driver's read-modify-write echoes NEEDS_RESET back; that is not an error
    assert dev.write_status(dev.read_status() | FAILED)
    assert dev.status & NR and dev.status & FAILED


def test_legacy_driver_may_kick_before_driver_ok_and_is_served_at_activation():
    pair = DevicePair(LoopbackDevice([8]), legacy=True)
    d = pair.driver
    feats = d.negotiate(~0)
    assert not feats >> VIRTIO_F_VERSION_1 & 1
    q = d.setup_queue(0)
    # legacy layout: used ring on a 4096 boundary after desc + avail
    desc, avail, used = q.layout()
    assert used - desc == 4096 and desc % 4096 == 0
    buf = pair.alloc.alloc(8)
    pair.mem.write(buf, b"early")
    q.add(pair.mem, [(buf, 5)], [(buf, 5)], "t")
    q.publish(pair.mem)
    pair.device.notify(0)
    assert q.get_used(pair.mem) is None  # deferred
    d.driver_ok()
    assert q.get_used(pair.mem) == ("t", 5)
    assert pair.device.status == ACK | DRV | DOK


def test_tables_render_as_markdown():
    from virtwire.virtio.device import render_tables

    md = render_tables()
    assert "| ACKNOWLEDGE+DRIVER | ACKNOWLEDGE+DRIVER, ACKNOWLEDGE+DRIVER+FEATURES_OK" in md
    assert "legacy also: ACKNOWLEDGE+DRIVER+DRIVER_OK" in md
    assert all(line.count("|") in (3, 4) for line in md.splitlines() if line)
    assert "| queue_notify | DRIVER_OK |" in md



def test_bad_queue_base_marks_needs_reset_instead_of_raising():
    """A base the ring refuses (a packed slot beyond an 8-entry ring) is the driver's fault."""
    from virtwire.virtio.pair import DevicePair, LoopbackDevice
    from virtwire.virtio.spec import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED

    pair = DevicePair(device=LoopbackDevice(packed=True))
    features = pair.start(size=8)
    assert features >> VIRTIO_F_RING_PACKED & 1
    dev = pair.device
    assert dev.queues[0] is not None
    assert dev.set_queue_base(0, 0x7FFF) is False
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
