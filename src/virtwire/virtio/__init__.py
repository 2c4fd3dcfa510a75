"""The virtio core, sans-I/O: spec constants and names (``spec``), the rings (``split_ring``,
``packed_ring``, ``chain``; ``traced_queue`` wraps one while tracing), the device and driver
state machines (``device``, ``driver``), the in-process driver/device pair (``pair``) and the
ring fuzzer (``fuzz``)."""
