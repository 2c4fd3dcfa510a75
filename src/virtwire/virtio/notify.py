"""Notification suppression arithmetic shared by both halves of both ring formats.

Theory of operation
-------------------
virtio 1.2 §2.7.7 / §2.7.10 (split, VIRTIO_F_EVENT_IDX): each side publishes the ring index at
which it next wants to be told (``used_event`` in the avail ring, ``avail_event`` in the used
ring). The other side, after moving its own index from ``old`` to ``new`` in one batch, notifies
iff the event index lies in the half-open window ``[old, new)`` -- i.e. iff the index the peer asked
about was *crossed* by this batch. In 16-bit modular arithmetic that is Linux's

    (u16)(new - event - 1) < (u16)(new - old)

(``vring_need_event`` in include/uapi/linux/virtio_ring.h; the spec gives it in §2.7.10.1).

Packed rings (§2.8.10) carry the same idea in an ``off_wrap`` field: bits 0-14 a ring offset,
bit 15 the wrap counter it refers to; ``packed_need_event`` unfolds it onto the same formula.

Memory order: between publishing an index and reading the peer's event index a *full* barrier is
required (a store-load order, which x86's TSO does not give for free). CPython offers no fence, but
acquiring and releasing a ``threading.Lock`` executes a locked read-modify-write on the lock word,
which is a full barrier on x86 (and a acquire/release pair elsewhere). ``full_fence()`` does that.
"""

from __future__ import annotations

import threading

__all__ = [
    "vring_need_event",
    "u16_diff",
    "packed_need_event",
    "full_fence",
]

_FENCE_LOCK = threading.Lock()


def u16_diff(a: int, b: int) -> int:
    """``(a - b) mod 2^16``: how far 16-bit ring index ``a`` is ahead of ``b``."""
    return (a - b) & 0xFFFF


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """virtio 1.2 §2.7.10.1: True iff moving from ``old_idx`` to ``new_idx`` crossed ``event_idx``.

    All three are 16-bit ring indices (free-running, wrapping at 2^16).
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


def packed_need_event(
    off_wrap: int, new_idx: int, old_idx: int, wrap_counter: int, size: int
) -> bool:
    """virtio 1.2 §2.8.10: the packed ring's ``off_wrap`` version of ``vring_need_event``.

    ``new_idx`` is the ring offset after the batch and ``old_idx = new_idx - added`` (it may be
    negative: the batch started on the previous lap); ``wrap_counter`` is the side's wrap counter
    at ``new_idx``. An event offset whose wrap bit differs from ``wrap_counter`` lies one lap back.
    """
    event = off_wrap & 0x7FFF
    if (off_wrap >> 15) != wrap_counter:
        event -= size
    return vring_need_event(event & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF)


def full_fence() -> None:
    """A full (store-load) memory barrier; see module docstring, "Memory order"."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()
