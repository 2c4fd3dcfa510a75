"""The virtio core (sans-I/O): rings, descriptor chains, feature and status state machines.

- Rings: ``queue`` (the ``DeviceQueue``/``DriverQueue`` protocols and ``RingPositions``),
  ``split_ring`` (§2.7, both halves), ``packed_ring`` (§2.8 device half) and
  ``packed_driver`` (its driver half); ``chain`` walks descriptor chains, ``notify`` holds the
  event-index arithmetic and fences; ``traced_queue`` wraps a ring while tracing.
- Devices: ``device.VirtioDevice`` (status, features, queue configuration, interrupts; a device
  type such as ``net.device.VirtioNet`` subclasses it), ``counters`` its per-queue counters.
- Drivers: ``driver.VirtioDriver`` (the generic bring-up), ``errors``, ``spec`` (constants and
  names); ``pair`` is the in-process driver/device pair and ``fuzz`` the ring fuzzer.
"""
