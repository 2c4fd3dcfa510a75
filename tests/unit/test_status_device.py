"""VirtioDevice beyond the status table: config space (§2.5), activation, counters, the driver's
distrust of a misbehaving device (§3.1.1)."""

import pytest

from virtwire.memory import BytearrayGuestMemory
from virtwire.testing import DevicePair, LocalTransport, LoopbackDevice, RecordingInterrupt
from virtwire.virtio.driver import DeviceFault
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
    VIRTIO_CONFIG_S_FEATURES_OK as FOK,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_NEEDS_RESET as NR,
)
from virtwire.virtio.spec import VIRTIO_F_VERSION_1, bit


class ConfigDevice(LoopbackDevice):
    """8 bytes of config; bytes 4..7 writable by the driver."""

    def build_config(self):
        return bytes(range(1, 9))

    def config_write_hook(self, offset, data):
        if offset >= 4:
            self.config[offset : offset + len(data)] = data
            return True
        return False


def test_config_reads_writes_and_generation():
    dev = ConfigDevice([8])
    irq = RecordingInterrupt()
    dev.attach(BytearrayGuestMemory(0x1000), irq)
    assert dev.config_read(0, 4) == 0x04030201
    assert dev.config_read(6, 2) == 0x0807
    assert dev.config_read(7, 2) == 0  # straddles the end: reads as 0
    assert dev.config_read(0, 3) == 0  # bad width
    assert not dev.config_write(0, 1, 0xFF)  # read-only part
    assert dev.config_write(4, 4, 0xAABBCCDD)
    assert dev.config_read(4, 4) == 0xAABBCCDD
    g = dev.config_generation
    dev.config_changed()  # before DRIVER_OK: generation moves, no interrupt
    assert dev.config_generation == g + 1 and irq.config_count == 0
    for s in (ACK, ACK | DRV):
        dev.write_status(s)
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1))
    dev.write_status(ACK | DRV | FOK)
    dev.write_status(ACK | DRV | FOK | DOK)
    dev.config_changed(bytes(8))
    assert irq.config_count == 1 and dev.config_read(0, 8) == 0


def test_activation_of_a_bad_ring_sets_needs_reset():
    pair = DevicePair(LoopbackDevice([8]))
    d = pair.driver
    d.negotiate(0)
    assert pair.device.set_queue_addresses(0, 0x1008, 0x2000, 0x3000)  # misaligned desc table
    assert pair.device.set_queue_ready(0)
    d.transport.write_status(ACK | DRV | FOK | DOK)
    assert pair.device.status & NR
    assert "16-byte aligned" in pair.device.last_error


def test_notify_of_unknown_or_disabled_queue_is_refused_quietly():
    pair = DevicePair(LoopbackDevice([8, 8]))
    pair.driver.negotiate(0)
    pair.driver.setup_queue(0)
    pair.driver.driver_ok()
    before = pair.device.device_counters["refused_writes"]
    pair.device.notify(1)  # never enabled
    pair.device.notify(7)  # does not exist
    pair.device.notify(-1)
    assert pair.device.device_counters["refused_writes"] == before + 3
    assert not pair.device.status & NR


def test_stats_are_json_ready():
    import json

    pair = DevicePair(LoopbackDevice([8]))
    pair.start()
    pair.send(0, [b"a"], [1], 0)
    s = json.loads(json.dumps(pair.device.stats()))
    assert s["queues"][0]["chains"] == 1 and s["status"].endswith("FEATURES_OK")


class StuckStatus(LocalTransport):
    def read_status(self):
        return ACK  # never reads 0 after reset


class DropsDriverOk(LocalTransport):
    def write_status(self, value):
        super().write_status(value & ~DOK)


def test_driver_detects_a_device_that_does_not_reset():
    dev = LoopbackDevice([8])
    dev.attach(BytearrayGuestMemory(0x100000))
    pair = DevicePair(dev)
    pair.driver.transport = StuckStatus(dev)
    with pytest.raises(DeviceFault, match="after reset"):
        pair.driver.negotiate(0)


def test_driver_detects_driver_ok_not_sticking_and_needs_reset():
    pair = DevicePair(LoopbackDevice([8]))
    pair.driver.transport = DropsDriverOk(pair.device)
    with pytest.raises(DeviceFault, match="DRIVER_OK did not stick"):
        pair.start()
    pair = DevicePair(LoopbackDevice([8]))
    pair.driver.negotiate(0)
    pair.device.needs_reset("test")
    with pytest.raises(DeviceFault, match="NEEDS_RESET"):
        pair.driver.driver_ok()


def test_driver_refuses_queue_that_does_not_exist_and_rounds_split_sizes():
    pair = DevicePair(LoopbackDevice([8, 100]))
    pair.driver.negotiate(0)
    with pytest.raises(DeviceFault, match="does not exist"):
        pair.driver.setup_queue(2)
    q = pair.driver.setup_queue(1)
    assert q.size == 64  # largest power of 2 <= 100 for a split ring
    assert pair.device.queue_config[1].size == 64
