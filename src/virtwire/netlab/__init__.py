"""The programmable wire: impairments, rate limiters, VLANs and overlays for ``virtwire serve``.

- ``bucket``: Firecracker-style token buckets (bandwidth + ops, size / refill time / one-time
  burst) and the rate limiter made of them;
- ``impair``: one direction's impairments (``tc netem`` names: loss, Gilbert-Elliott loss,
  delay + jitter, reorder, duplicate, corrupt, limit), seeded, driven by a clock;
- ``keys``: the ``--port`` / ``virtwire ctl`` key table (``tx.loss=1%``, ``rx.rate=100mbit``,
  ``vlan=``, ``trunk=``...), parsed and range-checked;
- ``vlan``: 802.1Q tag helpers;
- ``overlay``: a switch uplink joined to other hosts through the kernel's VXLAN device;
- ``wire``: how ``virtwire serve`` applies all of the above to a port (start and run time);
- ``control``: the ``port/set`` request on the serve control socket.

The wrapper backend that applies impairments and limiters to any backend is
``virtwire.backends.shape.ShapedBackend``.
"""
