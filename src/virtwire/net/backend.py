"""The ``NetBackend`` protocol: where a virtio-net device's frames go and come from.

Theory of operation
-------------------
A backend is the far end of one queue pair of a ``VirtioNet`` device (kvmtool's
``net_dev_operations``, Firecracker's tap): the device hands it *batches* of TX frames and asks
it for RX frames only when the guest has posted receive buffers. It is defined here, by the code
that uses it; ``virtwire.backends`` holds implementations (tap, switch, null, memory). A frame
is an iovec list (``list[memoryview]``): zero-copy views of guest buffers on TX, guest writable
buffers on RX. Whether a frame carries a ``virtio_net_hdr`` prefix is the backend's ``vnet_hdr``
attribute; its size (10 or 12) is set by ``configure`` once the guest's features are known,
together with the offloads the guest can receive (GUEST_CSUM/TSO4/TSO6/ECN/UFO ->
e.g. TUNSETOFFLOAD).

``host_offloads`` says which TX offloads the backend accepts in a frame (a mask of
VIRTIO_NET_F_CSUM / HOST_TSO4 / HOST_TSO6 / HOST_ECN / HOST_UFO bits): the device offers a HOST_*
feature only when its backend takes it, and finishes partial checksums in software for a
backend without CSUM.

Readiness: ``fileno()`` is an fd an event loop watches for RX frames (the TAP fd, or an eventfd
the in-process backends write when a frame is queued); ``None`` means the backend never has RX.
``drain_wakeup()`` is called before each RX pass (in-process backends clear their eventfd
there). ``hosts.pump.BackendPump`` does the watching for every host.

Back-pressure: ``send`` returns how many frames of the batch it took; the device keeps the rest
(their chains stay un-used) and retries on the next kick or on the backend's next wake-up
(``VirtioNet.backend_ready``).

``native_fd()``: the fd the device's C fast path reads and writes frames on itself (one read or
write = one frame with its header: a TAP), -1 for a backend that discards (null), None when it
does not apply. What the C path moved is then reported back with ``count_native`` so the
backend's own ``counters`` stay right.
``recv`` copies or reads *one* frame into the given buffers and returns its length (header
included when ``vnet_hdr``), or 0 when nothing is pending. ``pending_len`` is the length of the
next frame when the backend knows it (in-process backends) and ``None`` when it cannot tell
(TAP: the device then prepares buffers for the largest frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["NetBackend", "Frame"]

Frame = Sequence[memoryview]


@runtime_checkable
class NetBackend(Protocol):
    """What ``VirtioNet`` needs from the far end of a queue pair (see module docstring)."""

    name: str
    vnet_hdr: bool
    host_offloads: int
    counters: dict[str, int]

    def fileno(self) -> int | None: ...

    def drain_wakeup(self) -> None:
        """Clear the readiness signal before an RX pass (an eventfd; nothing for a TAP)."""

    def native_fd(self) -> int | None:
        """The fd the C fast path may use (-1: discard), or None."""

    def count_native(self, *, tx_frames: int = 0, tx_bytes: int = 0, tx_errors: int = 0,
                     rx_frames: int = 0, rx_bytes: int = 0, rx_errors: int = 0) -> None:
        """Count frames the C fast path moved on ``native_fd()`` in the backend's counters."""

    def configure(self, features: int, hdr_len: int) -> None:
        """The negotiated feature word and the virtio-net header size (10 or 12)."""

    def send(self, frames: Sequence[Frame]) -> int:
        """Transmit a batch; returns how many leading frames were taken (the rest: retry)."""

    def recv(self, bufs: Sequence[memoryview]) -> int:
        """Receive one frame into ``bufs``; its length, or 0 when nothing is pending."""

    def pending_len(self) -> int | None:
        """The next RX frame's length (0: none) when known; None when unknown."""

    def set_enabled(self, enabled: bool) -> None:
        """The queue pair was enabled/disabled (MQ VQ_PAIRS_SET, vhost-user VRING_ENABLE)."""

    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def count_into(counters: dict[str, int], *, tx_frames: int = 0, tx_bytes: int = 0,
               tx_errors: int = 0, rx_frames: int = 0, rx_bytes: int = 0,
               rx_errors: int = 0) -> None:
    """``count_native`` for a backend whose counters are a dict (tx_/rx_ frames, bytes, and
    errors only when there were any)."""
    if tx_frames or tx_bytes:
        counters["tx_frames"] = counters.get("tx_frames", 0) + tx_frames
        counters["tx_bytes"] = counters.get("tx_bytes", 0) + tx_bytes
    if rx_frames or rx_bytes:
        counters["rx_frames"] = counters.get("rx_frames", 0) + rx_frames
        counters["rx_bytes"] = counters.get("rx_bytes", 0) + rx_bytes
    if tx_errors:
        counters["tx_errors"] = counters.get("tx_errors", 0) + tx_errors
    if rx_errors:
        counters["rx_errors"] = counters.get("rx_errors", 0) + rx_errors


__all__ += ["count_into"]
