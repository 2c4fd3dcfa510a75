"""The device side of vhost-user serving: what the back end asks of a device, and the adapter
that hosts a ``virtio.device.VirtioDevice`` (e.g. ``net.device.VirtioNet``) behind it.

``HostedDevice`` is the narrow interface ``vhost_user.VhostUserBackend`` drives: the back end
owns the queue objects and the eventfds, the device processes queues when asked
(``queue_kicked``) and asks for an interrupt through the ``notify`` callback it was given.
``VirtioDeviceHost`` implements it for a ``VirtioDevice`` (walking its status machine, since
vhost-user has none). ``Refused`` is a request refused as the front end's fault.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from virtwire.virtio import spec

log = logging.getLogger(__name__)

__all__ = ["HostedDevice", "Refused", "RingInterrupts", "VirtioDeviceHost", "build_rarp"]


class Refused(Exception):
    """A request we refuse (the front end's fault); the message is the log line's reason."""


class HostedDevice(Protocol):
    """What the back end needs from the virtio device it hosts.

    Queue ``i``'s object (``SplitQueue``/``PackedQueue``) is owned by the back end and handed over
    in ``queue_started``; ``notify()`` asks for the ring's interrupt. Guest faults raised while
    processing are ``DriverError``s; the device is expected to count and log them itself.
    """

    @property
    def device_features(self) -> int: ...

    @property
    def num_queues(self) -> int:
        """How many rings the device has (virtio-net: 2 x queue pairs, no control queue here)."""

    def config_bytes(self) -> bytes:
        """The device configuration space (virtio 1.2 §5.1.4 for net)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG; raise ``Refused``/``DriverError`` for read-only fields."""

    def set_features(self, features: int) -> int | None:
        """SET_FEATURES (the driver's acked bits, VHOST_USER_F_PROTOCOL_FEATURES removed);
        returns the bits the device took on when it drops some (e.g. QEMU-owned ones)."""

    def queue_started(self, index: int, queue: Any, mem: Any, notify: Callable[[], None]) -> None:
        ...

    def queue_stopped(self, index: int) -> None: ...

    def queue_enabled(self, index: int, enabled: bool) -> None: ...

    def queue_kicked(self, index: int) -> None:
        """Process ring ``index`` (drain it: batch, one publish, at most one ``notify``). It
        may come for a ring stopped after its kick was read: ignored then."""

    def memory_changed(self, mem: Any) -> None: ...

    def send_rarp(self, mac: bytes) -> None: ...

    def set_mtu(self, mtu: int) -> None: ...

    def reset(self) -> None: ...

def build_rarp(mac: bytes) -> bytes:
    """A RARP "request reverse" frame announcing ``mac`` (RFC 903), as QEMU's announce sends."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    body = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x03" + mac + b"\x00" * 4 + mac
            + b"\x00" * 4)
    return (eth + body).ljust(60, b"\x00")



class RingInterrupts:
    """``InterruptSink`` for a hosted ``VirtioDevice``: queue interrupts go to the ring's call
    eventfd; config interrupts have no vhost-user path without BACKEND_REQ (logged)."""

    def __init__(self) -> None:
        self.notify: dict[int, Callable[[], None]] = {}
        self.config_count = 0

    def queue(self, index: int) -> None:
        fn = self.notify.get(index)
        if fn is not None:
            fn()

    def config(self) -> None:
        self.config_count += 1
        log.debug("config interrupt dropped (no back-end channel)")


_CTRL_VQ_DEPENDENTS = spec.bit(*(f for f, deps in spec.NET_FEATURE_REQUIRES.items()
                                  if spec.VIRTIO_NET_F_CTRL_VQ in deps))


class VirtioDeviceHost:
    """Hosts a ``virtio.device.VirtioDevice`` (e.g. ``net.device.VirtioNet``) behind vhost-user.

    vhost-user has no status register, so this walks the device through §3.1.1 itself:
    SET_FEATURES -> ACKNOWLEDGE, DRIVER, features, FEATURES_OK; memory -> DRIVER_OK. Rings arrive
    one at a time (SET_VRING_KICK), so each started ring object is placed straight into
    ``device.queues[i]``. ``num_rings`` excludes rings QEMU keeps for itself (net's control queue).
    Device-specific hooks are optional methods on the device: ``queue_enabled(i, on)``,
    ``send_rarp(mac)``, ``set_mtu(mtu)``.
    """

    def __init__(self, device: Any, num_rings: int | None = None) -> None:
        self.dev = device
        self._num = num_rings if num_rings is not None else device.num_queues
        self.irq = RingInterrupts()
        self.on_ring_error: Callable[[int], None] | None = None
        self.on_kicked: Callable[[int], None] | None = None  # after each ring service

    @property
    def device_features(self) -> int:
        return int(self.dev.offered_features)

    @property
    def num_queues(self) -> int:
        return self._num

    def config_bytes(self) -> bytes:
        return bytes(self.dev.config)

    def write_config(self, offset: int, data: bytes) -> None:
        cfg = self.dev.config
        if offset + len(data) > len(cfg) or not self.dev.config_write_hook(offset, data):
            raise Refused(f"config write {len(data)}@{offset:#x} is read-only or out of range")

    def set_features(self, features: int) -> int:
        from virtwire.virtio import spec as s

        d = self.dev
        if not features >> s.VIRTIO_NET_F_CTRL_VQ & 1 and getattr(d, "device_id", 0) == 1:
            # QEMU keeps the control queue (and everything built on it) for itself, yet it
            # forwards GUEST_ANNOUNCE in SET_FEATURES: drop what depends on CTRL_VQ here.
            features &= ~_CTRL_VQ_DEPENDENTS
        if d.status & s.VIRTIO_CONFIG_S_FEATURES_OK and d.negotiated == features:
            return features  # repeated SET_FEATURES (QEMU re-sends on start): nothing changes
        d.reset()
        d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE | s.VIRTIO_CONFIG_S_DRIVER)
        d.set_driver_features(features)
        ok = d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE | s.VIRTIO_CONFIG_S_DRIVER
                            | s.VIRTIO_CONFIG_S_FEATURES_OK)
        if not ok or not d.status & s.VIRTIO_CONFIG_S_FEATURES_OK:
            raise Refused(f"device refused features: {d.last_error}")
        return features

    def _ensure_driver_ok(self, mem: Any) -> None:
        from virtwire.virtio import spec as s

        d = self.dev
        d.attach(mem, self.irq)
        if d.status & s.VIRTIO_CONFIG_S_FEATURES_OK and not d.status & s.VIRTIO_CONFIG_S_DRIVER_OK:
            d.write_status(d.status | s.VIRTIO_CONFIG_S_DRIVER_OK)

    def queue_started(self, index: int, queue: Any, mem: Any, notify: Callable[[], None]) -> None:
        self._ensure_driver_ok(mem)
        self.irq.notify[index] = notify
        self.dev.queues[index] = queue
        hook = getattr(self.dev, "queue_started", None)
        if hook is not None:
            hook(index)

    def queue_stopped(self, index: int) -> None:
        hook = getattr(self.dev, "queue_stopped", None)
        if hook is not None:
            hook(index)
        if index < len(self.dev.queues):
            self.dev.queues[index] = None
        self.irq.notify.pop(index, None)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        hook = getattr(self.dev, "queue_enabled", None)
        if hook is not None:
            hook(index, enabled)

    def queue_kicked(self, index: int) -> None:
        from virtwire.virtio import spec as s

        d = self.dev
        if d.queues[index] is None:
            return  # the ring stopped after the kick was read
        was = d.status & s.VIRTIO_CONFIG_S_NEEDS_RESET
        d.notify(index)
        if d.status & s.VIRTIO_CONFIG_S_NEEDS_RESET and not was and self.on_ring_error:
            self.on_ring_error(index)
        if self.on_kicked is not None:
            self.on_kicked(index)

    def memory_changed(self, mem: Any) -> None:
        self.dev.attach(mem, self.irq)
        for q in self.dev.queues:  # views are rebuilt against the new mapping on next use
            if q is not None:
                q.release_views()

    def check_memory(self, mem: Any) -> None:
        """Raise if a buffer the device holds would not lie in ``mem`` (changes nothing)."""
        check = getattr(self.dev, "check_memory", None)
        if check is not None:
            check(mem)

    def send_rarp(self, mac: bytes) -> None:
        hook = getattr(self.dev, "send_rarp", None)
        if hook is None:
            raise Refused("device cannot send frames")
        hook(mac)

    def set_mtu(self, mtu: int) -> None:
        hook = getattr(self.dev, "set_mtu", None)
        if hook is not None:
            hook(mtu)

    def reset(self) -> None:
        self.dev.reset()
        self.irq.notify.clear()
