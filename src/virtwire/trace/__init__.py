"""Tracing, the emitter: every step between a guest driver and a virtwire device, as JSON lines.

This module imports nothing else of virtwire, so every layer (``virtio``, ``net``, ``pci``, the
hosts) may call it. The rest of tracing is in separate pieces: ``trace.reader`` reads a trace
back (``read_events``, ``flow``), ``trace.pcap`` writes the pcapng capture,
``virtwire.commands.trace_options`` holds the command-line options, and
``virtwire.virtio.traced_queue`` wraps a ring to report chains and used buffers. Names come from
the code that owns them: ``pci.device`` names its registers when it emits a ``pci`` event, and
``virtio.spec`` (features, status) and ``hosts.vhost_user_proto`` (protocol features) register
their bit namers with ``register_names``.

Theory of operation
-------------------
A process that runs a device (``virtwire serve``, the PCI proxy host, ``virtwire vm``) may write a
*trace*: one JSON object per line, each an *event*. ``virtwire explain`` reads traces back and tells
the story (phases, rates, a sequence diagram). Tracing must cost nothing when it is off, so the hook
is a module attribute that is ``None`` unless a trace was configured::

    from virtwire import trace as _trace
    ...
    tr = _trace.TRACE
    if tr is not None:
        tr.emit("kick", "kick", q=qi)

Always read ``_trace.TRACE`` through the module (``from virtwire.trace import TRACE`` would freeze
``None`` at import time). Off, a call site costs one global/attribute load and one ``is`` test.
Frames have their own hook, ``FRAMES``: it is set when the ``frame`` category is traced *or* a pcap
is written (``--pcap``), and call sites hand it the Ethernet frame (after the virtio-net header)::

    fh = _trace.FRAMES
    if fh is not None:
        fh("tx", list(chain.readable(mem)), qi, hdr_len)   # skip the virtio-net header

Event schema (version 1)
------------------------
Every event has ``t`` (float seconds on the monotonic clock since the trace started), ``cat`` (a
category below) and ``ev`` (the event name within it). Other fields are decoded values: integers
for addresses, sizes, indices and register values; **hex strings** ("0x...") for 64-bit bit masks
(feature words), so JavaScript readers do not lose bits; names alongside raw values. Data-path
events (categories in ``DATA_PATH``) may be sampled 1-in-N; a sampled event carries ``"sample": N``.
The first line is ``{"cat": "trace", "ev": "start", "version": 1, "wall": <epoch s>, ...}``; the
last is ``{"cat": "trace", "ev": "end", "counts": {"cat.ev": n, ...}}`` with the *true* number of
events per kind, before sampling and category filtering (chain, used and frame events are counted
only while their category, or a pcap, is on: their hooks are not installed otherwise).

=========  ===============  ==================================================================
cat        ev               fields
=========  ===============  ==================================================================
trace      start            version, wall, pid, argv, host, categories, sample
trace      end              counts {"cat.ev": n}
host       start|stop       kind ("vhost-user" | "pci-proxy"), detail fields (ports, ...)
pci        cfg_read         off, size, val, reg: header fields ("vendor_id|device_id", "bar4",
                            "command", "pci_status") or capability fields
                            ("cap.common_cfg.cfg_type", "cap.notify_cfg.notify_off_multiplier")
pci        cfg_write        off, size, val, reg
pci        bar_size         bar, size, kind ("mem32" | "io")      (an all-ones sizing probe)
pci        bar_map          bar, addr, size, kind                  (the guest placed a BAR)
pci        bar_read         bar, off, size, val, reg ("common_cfg.queue_desc_lo", "isr",
                            "notify.q1", "device_cfg.mac", "legacy.queue_pfn")
pci        bar_write        bar, off, size, val, reg
vhost      msg              req ("VHOST_USER_SET_FEATURES"), code, size, fds, payload {decoded;
                            feature words as {"features": hex, "names": [...]}}
vhost      reply            req, code, payload {}
feature    offer            features (hex), names []               (device -> driver)
feature    ack              features (hex), names []               (driver -> device)
feature    negotiated       features (hex), names []               (accepted at FEATURES_OK)
status     set              old, new, old_names [], new_names []   (a status write; 0 = reset)
status     reset            -                                      (the device was reset)
queue      setup            q, size, desc, avail, used, packed     (ring areas as GPAs)
kick       kick             q                                      (driver -> device)
chain      chain            q, head, descs [[addr, len, flags]], rlen, wlen, indirect
                            (flags rebuilt per virtq_desc: NEXT=1, WRITE=2)
used       used             q, id, len
used       publish          q, n                                   (one used-index store)
irq        irq              q (-1: configuration change), kind ("intx" | "call" | "msix"),
                            level (INTx) or vector (MSI-X)
irq        suppressed       q                (no interrupt: EVENT_IDX / NO_INTERRUPT said so)
config     change           field, val, link?
ctrl       cmd              class, cmd, class_name, cmd_name, ack (0 = OK), data (hex)?
frame      frame            dir ("tx": guest -> network, "rx": network -> guest), len, q,
                            summary, proto (``virtwire.net.frame.decode`` of the frame)
=========  ===============  ==================================================================

Who speaks (for sequence diagrams) is a function of the event: ``trace.reader.flow(event)``
returns ``(from_lane, to_lane)`` over the lanes ``guest``, ``vmm`` (QEMU), ``device`` (virtwire)
and ``net`` (the backend side). Call sites may override it with ``src``/``dst`` fields.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

__all__ = [
    "TRACE",
    "FRAMES",
    "CATEGORIES",
    "DATA_PATH",
    "SCHEMA_VERSION",
    "Tracer",
    "TraceError",
    "start",
    "stop",
    "hexmask",
    "register_names",
    "bit_names",
    "export_env",
    "status_change",
    "features_event",
    "vhost_message",
    "vhost_reply",
    "queue_setup",
]

SCHEMA_VERSION = 1

CATEGORIES: tuple[str, ...] = (
    "pci", "vhost", "feature", "status", "queue", "kick", "chain", "used", "irq", "config",
    "ctrl", "frame", "host", "kvm",
)
# Categories of the per-packet path: subject to ``--trace-sample``.
DATA_PATH: frozenset[str] = frozenset({"kick", "chain", "used", "irq", "frame"})

TRACE: Tracer | None = None
FRAMES: Callable[[str, Any, int], None] | None = None
_PCAP: Any = None  # the active trace.pcap.PcapWriter, if any
_DECODE: Callable[[bytes], dict[str, Any]] | None = None  # the frame decoder ``start`` was given
_EXPORTED: list[str] = []  # environment variables export_env set (withdrawn by stop)
_NAMERS: dict[str, Callable[[int], list[str]]] = {}
_ATEXIT = False  # stop() registered to run at exit


class TraceError(Exception):
    """A bad trace option or an unreadable trace file."""


def hexmask(value: int) -> str:
    """A bit mask as the schema writes it (hex string)."""
    return f"{value:#x}"


def _jsonable(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray, memoryview)):
        return bytes(o).hex()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return repr(o)


class Tracer:
    """Writes events as JSON lines to ``out`` (see module docstring for the schema).

    ``categories``: the categories written (``None``: all). ``sample``: write 1 in ``sample``
    data-path events of each kind (true totals still land in the final ``counts``).
    """

    def __init__(
        self,
        out: IO[str],
        categories: Iterable[str] | None = None,
        sample: int = 1,
        *,
        close_out: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sample < 1:
            raise TraceError(f"trace sample must be >= 1, not {sample}")
        cats = set(CATEGORIES if categories is None else categories)
        unknown = cats - set(CATEGORIES)
        if unknown:
            raise TraceError(
                f"unknown trace categories: {', '.join(sorted(unknown))} "
                f"(known: {','.join(CATEGORIES)})"
            )
        self.categories = frozenset(cats)
        self.sample = sample
        self._out = out
        self._close_out = close_out
        self._clock = clock
        self._t0 = clock()
        self._flushed = self._t0
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.closed = False
        self._write({
            "t": 0.0, "cat": "trace", "ev": "start", "version": SCHEMA_VERSION,
            "wall": time.time(), "pid": os.getpid(), "argv": list(sys.argv),
            "host": socket.gethostname(), "categories": sorted(self.categories),
            "sample": sample,
        })

    def wants(self, cat: str) -> bool:
        """Is ``cat`` written? (call sites may skip building costly fields when not)."""
        return cat in self.categories

    def want(self, cat: str, ev: str) -> bool:
        """Count one event; True if it is to be written (category on, and for the data path
        the 1-in-N sample hit). Hot call sites ask this before building costly fields."""
        key = cat + "." + ev
        with self._lock:
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
            if self.closed or cat not in self.categories:
                return False
            return not (cat in DATA_PATH and self.sample > 1 and (n - 1) % self.sample)

    def write(self, cat: str, ev: str, fields: dict[str, Any]) -> None:
        """Write one event that ``want`` accepted."""
        with self._lock:
            if self.closed:
                return
            now = self._clock()
            rec = {"t": round(now - self._t0, 9), "cat": cat, "ev": ev}
            rec.update(fields)
            if cat in DATA_PATH and self.sample > 1:
                rec["sample"] = self.sample
            self._write(rec)
            # A reader (or a crash) should not wait for a full buffer: flush control-plane
            # events at once and data-path ones at least every half second.
            if cat not in DATA_PATH or now - self._flushed > 0.5:
                self._flushed = now
                self._out.flush()

    def emit(self, cat: str, ev: str, **fields: Any) -> None:
        """Count and (if wanted) record one event (thread-safe; dropped after ``close``)."""
        if self.want(cat, ev):
            self.write(cat, ev, fields)

    def _write(self, rec: dict[str, Any]) -> None:
        self._out.write(json.dumps(rec, separators=(",", ":"), default=_jsonable) + "\n")

    def flush(self) -> None:
        with self._lock:
            if not self.closed:
                self._out.flush()

    def close(self) -> None:
        """Write the ``trace.end`` line with the true counts and close the output."""
        with self._lock:
            if self.closed:
                return
            self._write({"t": round(self._clock() - self._t0, 9), "cat": "trace", "ev": "end",
                         "counts": dict(sorted(self.counts.items()))})
            self.closed = True
            self._out.flush()
            if self._close_out:
                self._out.close()


# --- names ------------------------------------------------------------------------------------
def register_names(kind: str, namer: Callable[[int], list[str]]) -> None:
    """Let the module that owns a bit field name it in events: ``kind`` is "feature", "status"
    or "vhost_protocol"; ``namer(value)`` returns the names of the set bits."""
    _NAMERS[kind] = namer


def bit_names(kind: str, value: int) -> list[str]:
    """Names of the set bits of ``value`` by the namer registered for ``kind`` ([] if none)."""
    namer = _NAMERS.get(kind)
    return namer(value) if namer is not None else []


# --- process-wide configuration ---------------------------------------------------------------
def _frame_hook(direction: str, data: Any, q: int = -1, skip: int = 0,
                length: int | None = None) -> None:
    """The ``FRAMES`` hook: trace the decoded frame and/or append it to the pcap.

    ``data`` is the frame's bytes or a list of memoryviews (a chain's buffers); ``skip`` bytes
    (the virtio-net header) are dropped from its front and at most ``length`` kept. Nothing is
    copied unless the frame is written somewhere.
    """
    tr = TRACE
    want = tr is not None and tr.want("frame", "frame")
    pc = _PCAP
    if not want and pc is None:
        return
    if isinstance(data, (list, tuple)):
        data = b"".join(bytes(d) for d in data)
    if skip or length is not None:
        data = bytes(data[skip:] if length is None else data[skip:skip + length])
    if want:
        d = _DECODE(data) if _DECODE is not None else {"summary": f"{len(data)} bytes"}
        tr.write("frame", "frame", {"dir": direction, "len": len(data), "q": q,  # type: ignore
                                    "summary": d.get("summary", ""), "proto": d})
    if pc is not None:
        pc.write(data, outbound=(direction == "tx"))


def start(
    path: str | os.PathLike[str] | None = None,
    categories: Iterable[str] | None = None,
    sample: int = 1,
    pcap: str | os.PathLike[str] | None = None,
    out: IO[str] | None = None,
    decode: Callable[[bytes], dict[str, Any]] | None = None,
) -> Tracer | None:
    """Turn tracing (and/or pcap capture) on for this process; returns the tracer.

    ``decode(frame)`` gives a ``frame`` event its ``summary`` and ``proto`` fields
    (``virtwire.net.frame.decode``); without it a frame event carries only its length.
    Replaces any earlier tracer (closing it). Registered with ``atexit`` so the final counts are
    written even when the process ends without calling ``stop``.
    """
    global TRACE, FRAMES, _PCAP, _DECODE, _ATEXIT
    stop()
    tracer: Tracer | None = None
    if out is not None:
        tracer = Tracer(out, categories, sample, close_out=False)
    elif path is not None:
        try:
            f = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - closed by Tracer.close
        except OSError as e:
            raise TraceError(f"cannot write trace {path}: {e.strerror}") from None
        try:
            tracer = Tracer(f, categories, sample)
        except TraceError:
            f.close()
            raise
    if pcap is not None:
        from virtwire.trace.pcap import PcapError, PcapWriter

        try:
            _PCAP = PcapWriter.open(pcap)
        except PcapError as e:
            if tracer is not None:
                tracer.close()
            raise TraceError(str(e)) from None
    TRACE = tracer
    _DECODE = decode
    frames_on = tracer is not None and "frame" in tracer.categories
    FRAMES = _frame_hook if (frames_on or _PCAP is not None) else None
    if not _ATEXIT:
        atexit.register(stop)
        _ATEXIT = True
    return tracer


def export_env(values: dict[str, str | None]) -> None:
    """Put trace settings into the environment for child processes (``None`` removes one);
    ``stop`` withdraws them, so processes started later do not trace."""
    for k, v in values.items():
        if v:
            os.environ[k] = v
            if k not in _EXPORTED:
                _EXPORTED.append(k)
        else:
            os.environ.pop(k, None)


def stop() -> None:
    """Turn tracing and pcap capture off, writing the final lines (and withdraw exported
    settings, so processes started later do not trace)."""
    global TRACE, FRAMES, _PCAP, _DECODE
    while _EXPORTED:
        os.environ.pop(_EXPORTED.pop(), None)
    tr, pc = TRACE, _PCAP
    TRACE = None
    FRAMES = None
    _PCAP = None
    _DECODE = None
    if tr is not None:
        tr.close()
    if pc is not None:
        pc.close()


def active() -> bool:
    """Is this process tracing or capturing already?"""
    return TRACE is not None or _PCAP is not None


# --- hook-site helpers -------------------------------------------------------------------------
# Each is called from one line at a hook site, only after the site saw tracing on, so none of this
# runs when tracing is off. They never raise into the caller.

def _plain(v: Any, depth: int = 0) -> Any:
    """A decoded protocol payload as JSON-able data (dataclasses to dicts, bytes to hex)."""
    if depth > 4:
        return repr(v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x, depth + 1) for x in v[:64]]
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v[:256]).hex()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


_VHOST_FEATURE_REQS = {"GET_FEATURES", "SET_FEATURES"}
_VHOST_PROTO_REQS = {"GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"}


def _vhost_payload(name: str, payload: Any) -> Any:
    short = name[len("VHOST_USER_"):] if name.startswith("VHOST_USER_") else name
    if isinstance(payload, int) and not isinstance(payload, bool):
        if short in _VHOST_FEATURE_REQS:
            return {"features": hexmask(payload), "names": bit_names("feature", payload)}
        if short in _VHOST_PROTO_REQS:
            return {"features": hexmask(payload), "names": bit_names("vhost_protocol", payload)}
        return {"value": payload}
    p = _plain(payload)
    return p if isinstance(p, dict) else ({} if p is None else {"value": p})


def vhost_message(name: str, code: int, size: int, fds: int, payload: Any) -> None:
    """A vhost-user request from the front end, decoded (``vhost.msg``)."""
    tr = TRACE
    if tr is None:
        return
    if not name.startswith("VHOST_USER_"):
        name = "VHOST_USER_" + name
    tr.emit("vhost", "msg", req=name, code=code, size=size, fds=fds,
            payload=_vhost_payload(name, payload))


def vhost_reply(name: str, code: int, result: Any) -> None:
    """Our reply to a vhost-user request (``vhost.reply``); GET_FEATURES also logs the offer."""
    tr = TRACE
    if tr is None:
        return
    if not name.startswith("VHOST_USER_"):
        name = "VHOST_USER_" + name
    pl = _vhost_payload(name, result)
    tr.emit("vhost", "reply", req=name, code=code, payload=pl)
    if name == "VHOST_USER_GET_FEATURES" and isinstance(pl, dict) and "names" in pl:
        tr.emit("feature", "offer", features=pl["features"], names=pl["names"])


def status_change(old: int, new: int) -> None:
    """A device status write that took effect (``status.set``); 0 is a reset."""
    tr = TRACE
    if tr is None:
        return
    tr.emit("status", "set", old=old, new=new, old_names=bit_names("status", old),
            new_names=bit_names("status", new))


def features_event(ev: str, features: int, **extra: Any) -> None:
    """``feature.offer`` / ``ack`` / ``negotiated`` with bit names (virtio 1.2 §2.2)."""
    tr = TRACE
    if tr is None:
        return
    tr.emit("feature", ev, features=hexmask(features), names=bit_names("feature", features),
            **extra)


def queue_setup(index: int, ring: Any, packed: bool | None = None) -> None:
    """A ring the device starts using (``queue.setup``): size and its three areas' GPAs."""
    tr = TRACE
    if tr is None:
        return
    if packed is None:
        packed = type(ring).__name__.lower().startswith("packed")
    fields: dict[str, Any] = {"q": index, "size": getattr(ring, "size", None), "packed": packed}
    for k, names in (("desc", ("desc_addr",)), ("avail", ("avail_addr", "driver_addr")),
                     ("used", ("used_addr", "device_addr"))):
        for n in names:
            v = getattr(ring, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                fields[k] = v
                break
    tr.emit("queue", "setup", **fields)
