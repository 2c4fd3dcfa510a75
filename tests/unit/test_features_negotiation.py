"""Feature negotiation (virtio 1.2 §2.2, §3.1.1 steps 4-6) on both sides."""

import pytest

from virtwire.testing import DevicePair, LoopbackDevice
from virtwire.virtio.driver import DeviceFault
from virtwire.virtio.errors import FeatureError
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_DRIVER as DRV,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    bit,
)
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_FEATURES_OK as FOK,
)


class NeedsBoth(LoopbackDevice):
    """A device whose bit 5 requires bit 0 (like §5.1.3.1's dependencies)."""

    def device_features(self):
        return bit(0, 5)

    def validate_features(self, features):
        if features >> 5 & 1 and not features & 1:
            raise FeatureError("bit 5 requires bit 0")


def test_offered_features_follow_options_and_mode():
    d = LoopbackDevice([8])
    assert d.offered_features == bit(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)
    d = LoopbackDevice([8], event_idx=False, indirect=False, packed=True)
    assert d.offered_features == bit(VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED)
    d.legacy = True
    assert d.offered_features == 0  # legacy: low 32 bits, no VERSION_1 / RING_PACKED


def _to_driver(dev):
    dev.write_status(ACK)
    dev.write_status(ACK | DRV)


def test_features_ok_refused_for_unoffered_bits_stays_clear():
    dev = LoopbackDevice([8])
    _to_driver(dev)
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1, 40))
    assert not dev.write_status(ACK | DRV | FOK)
    assert not dev.status & FOK  # §3.1.1 step 6: the driver's re-read sees it clear
    assert "not offered" in dev.last_error
    assert dev.device_counters["feature_errors"] == 1


def test_modern_driver_must_accept_version_1():
    dev = LoopbackDevice([8])
    _to_driver(dev)
    dev.set_driver_features(bit(VIRTIO_F_EVENT_IDX))
    assert not dev.write_status(ACK | DRV | FOK)
    assert "VERSION_1" in dev.last_error


def test_device_specific_dependency_hook():
    dev = NeedsBoth([8])
    _to_driver(dev)
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1, 5))
    assert not dev.write_status(ACK | DRV | FOK)
    assert "requires bit 0" in dev.last_error
    dev.set_driver_features(bit(VIRTIO_F_VERSION_1, 5, 0))
    assert dev.write_status(ACK | DRV | FOK)
    assert dev.has_feature(5) and dev.has_feature(0)


def test_feature_change_after_features_ok_is_refused():
    dev = LoopbackDevice([8])
    _to_driver(dev)
    f = bit(VIRTIO_F_VERSION_1)
    assert dev.set_driver_features(f)
    assert dev.write_status(ACK | DRV | FOK)
    assert not dev.set_driver_features(f | bit(VIRTIO_F_EVENT_IDX))
    assert dev.driver_features == f and dev.negotiated == f
    assert dev.set_driver_features(f)  # writing the same value again is harmless


def test_driver_negotiates_the_intersection_and_ring_format():
    pair = DevicePair(LoopbackDevice([8], packed=True))
    feats = pair.start(wanted=bit(VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, 60))
    assert feats == bit(VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED)
    assert pair.driver.ring_format == "packed"
    assert pair.device.negotiated == feats


def test_driver_fails_on_a_device_refusing_features():
    pair = DevicePair(NeedsBoth([8]))
    with pytest.raises(DeviceFault, match="FEATURES_OK clear"):
        pair.start(wanted=bit(5))  # the driver offers 5 without 0
    assert pair.device.status & VIRTIO_CONFIG_S_FAILED


def test_driver_fails_on_a_modern_device_without_version_1():
    class Old(LoopbackDevice):
        @property
        def offered_features(self):
            return bit(VIRTIO_F_EVENT_IDX)

    pair = DevicePair(Old([8]))
    with pytest.raises(DeviceFault, match="VERSION_1"):
        pair.start()


def test_legacy_features_are_32_bit_and_in_force_without_features_ok():
    pair = DevicePair(LoopbackDevice([8]), legacy=True)
    feats = pair.start()
    assert feats == bit(VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC)
    assert pair.device.negotiated == feats
    assert pair.send(0, [b"abc"], [3], 1)  # the first buffer always kicks
    assert pair.receive(0) == [(1, b"abc")]
