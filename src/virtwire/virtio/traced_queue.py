"""A ring wrapper that reports ``chain``, ``used`` and ``used.publish`` trace events.

Hosts wrap a device's ring only while tracing is on (``wrap_queue``), so an untraced data path
never pays for the indirection. The wrapper delegates everything else to the ring it wraps.
"""

from __future__ import annotations

from typing import Any

from virtwire import trace

__all__ = ["TracedQueue", "wrap_queue"]


def _chain_event(tr: trace.Tracer, q: int, c: Any) -> None:
    """Write the ``chain`` event ``tr.want`` accepted (descriptor flags rebuilt: NEXT on all but
    the last, WRITE on device-writable buffers)."""
    segs = getattr(c, "segments", ())
    n = len(segs)
    descs = [[gpa, ln, (2 if w else 0) | (1 if i + 1 < n else 0)]
             for i, (gpa, ln, w) in enumerate(segs[:64])]
    tr.write("chain", "chain", {"q": q, "head": getattr(c, "head", None), "descs": descs,
                                "rlen": getattr(c, "readable_len", 0),
                                "wlen": getattr(c, "writable_len", 0),
                                "indirect": bool(getattr(c, "indirect", False))})


class TracedQueue:
    """A device queue that reports ``chain``, ``used`` and ``used.publish`` events, delegating
    everything to the ring it wraps. Hosts wrap a ring only while tracing is on
    (``wrap_queue``), so an untraced data path never pays for the indirection."""

    __slots__ = ("_vw_ring", "_vw_index")

    def __init__(self, ring: Any, index: int) -> None:
        object.__setattr__(self, "_vw_ring", ring)
        object.__setattr__(self, "_vw_index", index)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_vw_ring"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._vw_ring, name, value)

    @property
    def traced_ring(self) -> Any:
        return self._vw_ring

    def pop(self, mem: Any) -> Any:
        c = self._vw_ring.pop(mem)
        tr = trace.TRACE
        if c is not None and tr is not None and tr.want("chain", "chain"):
            _chain_event(tr, self._vw_index, c)
        return c

    def pop_batch(self, mem: Any, limit: int) -> Any:
        cs = self._vw_ring.pop_batch(mem, limit)
        tr = trace.TRACE
        if tr is not None:
            for c in cs:
                if tr.want("chain", "chain"):
                    _chain_event(tr, self._vw_index, c)
        return cs

    def push(self, mem: Any, chain: Any, written: int) -> Any:
        r = self._vw_ring.push(mem, chain, written)
        tr = trace.TRACE
        if tr is not None and tr.want("used", "used"):
            tr.write("used", "used", {"q": self._vw_index, "id": getattr(chain, "head", None),
                                      "len": written})
        return r

    def publish(self, mem: Any) -> Any:
        n = self._vw_ring.publish(mem)
        tr = trace.TRACE
        if tr is not None and n:
            tr.emit("used", "publish", q=self._vw_index, n=n)
        return n


def wrap_queue(ring: Any, index: int) -> Any:
    """``ring`` wrapped in a ``TracedQueue`` when tracing is on (else ``ring`` itself), after
    emitting its ``queue.setup``. Call where a host installs a ring for the device."""
    tr = trace.TRACE
    if tr is None or ring is None or isinstance(ring, TracedQueue):
        return ring
    trace.queue_setup(index, ring)
    if not tr.categories & {"chain", "used"}:
        return ring  # nothing per buffer is traced: no indirection either
    return TracedQueue(ring, index)
