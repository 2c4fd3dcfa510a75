"""The C helper's source (``vwnet.c``: the virtio-net TX and RX fast paths).

Its ctypes binding -- structures, building and loading, the calls -- is ``virtwire.net.native``.
``dgram.DgramBackend`` is a TAP-shaped backend over a datagram socketpair, so the native and
pure-Python paths can be compared without root.
"""
