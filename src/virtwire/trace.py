"""Tracing: every step between a guest driver and a virtwire device, as JSON lines.

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
        fh("tx", frame_bytes, qi)

Event schema (version 1)
------------------------
Every event has ``t`` (float seconds on the monotonic clock since the trace started), ``cat`` (a
category below) and ``ev`` (the event name within it). Other fields are decoded values: integers
for addresses, sizes, indices and register values; **hex strings** ("0x...") for 64-bit bit masks
(feature words), so JavaScript readers do not lose bits; names alongside raw values. Data-path
events (categories in ``DATA_PATH``) may be sampled 1-in-N; a sampled event carries ``"sample": N``.
The first line is ``{"cat": "trace", "ev": "start", "version": 1, "wall": <epoch s>, ...}``; the
last is ``{"cat": "trace", "ev": "end", "counts": {"cat.ev": n, ...}}`` with the *true* number of
events per kind (before sampling and category filtering of data-path events).

=========  ===============  ==================================================================
cat        ev               fields
=========  ===============  ==================================================================
trace      start            version, wall, pid, argv, host, categories, sample
trace      end              counts {"cat.ev": n}, dropped
pci        cfg_read         off, size, val, reg ("vendor_id", "cap@0x40.cfg_type", ...)
pci        cfg_write        off, size, val, reg
pci        bar_size         bar, size, kind ("mem32" | "io")       (a sizing probe was answered)
pci        bar_map          bar, addr, size, kind                   (the guest programmed a BAR)
pci        bar_read         bar, off, size, val, reg ("common_cfg.queue_desc", "isr", ...)
pci        bar_write        bar, off, size, val, reg
pci        reset            -
vhost      msg              req (name, "VHOST_USER_SET_FEATURES"), code, size, fds, payload {}
vhost      reply            req, code, payload {}
feature    offer            features (hex), names []                (device -> driver)
feature    ack              features (hex), names [], sel?          (driver -> device)
feature    negotiated       features (hex), names []                (at FEATURES_OK / SET_FEATURES)
status     set              old, new, old_names [], new_names []
status     reset            -
queue      setup            q, size, desc, avail, used, packed (bool)  (addresses are GPAs)
queue      enable           q, enabled (bool)
queue      reset            q
kick       kick             q                                        (driver -> device)
chain      chain            q, head, descs [[addr, len, flags], ...], rlen, wlen, indirect
used       used             q, id, len
used       publish          q, n                                     (one used-index store)
irq        irq              q (or -1 for config), kind ("msix" | "intx" | "call"), vector?, level?
irq        suppressed       q                                        (event idx / NO_INTERRUPT)
config     change           field, val                               (e.g. link status)
ctrl       cmd              class, cmd, class_name, cmd_name, ack
frame      frame            dir ("tx": guest -> network, "rx": network -> guest), len, q, summary,
                            proto (the decoded summary dict of ``virtwire.net.frame``)
host       start|stop       kind ("pci-proxy" | "vhost-user" | ...), detail fields
=========  ===============  ==================================================================

Who speaks (for sequence diagrams) is a function of the event: ``flow(event)`` returns
``(from_lane, to_lane)`` over the lanes ``guest``, ``vmm`` (QEMU), ``device`` (virtwire) and
``net`` (the backend side). Call sites may override it with ``src``/``dst`` fields.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
    "flow",
    "hexmask",
    "read_events",
    "add_trace_arguments",
    "configure_from_args",
    "configure_from_env",
    "child_files",
]

SCHEMA_VERSION = 1

CATEGORIES: tuple[str, ...] = (
    "pci", "vhost", "feature", "status", "queue", "kick", "chain", "used", "irq", "config",
    "ctrl", "frame", "host",
)
# Categories of the per-packet path: subject to ``--trace-sample``.
DATA_PATH: frozenset[str] = frozenset({"kick", "chain", "used", "irq", "frame"})

LANES: tuple[str, ...] = ("guest", "vmm", "device", "net")

# Default (from, to) lanes per category or (category, event).
_FLOW: dict[tuple[str, str] | str, tuple[str, str]] = {
    "pci": ("guest", "device"),
    ("pci", "bar_size"): ("device", "guest"),
    "vhost": ("vmm", "device"),
    ("vhost", "reply"): ("device", "vmm"),
    ("feature", "offer"): ("device", "guest"),
    "feature": ("guest", "device"),
    "status": ("guest", "device"),
    "queue": ("guest", "device"),
    "kick": ("guest", "device"),
    "chain": ("guest", "device"),
    "used": ("device", "guest"),
    "irq": ("device", "guest"),
    "config": ("device", "guest"),
    "ctrl": ("guest", "device"),
    "host": ("device", "device"),
    "trace": ("device", "device"),
}

TRACE: Tracer | None = None
FRAMES: Callable[[str, Any, int], None] | None = None
_PCAP: Any = None  # the active virtwire.pcap.PcapWriter, if any
_EXPORTED = False  # configure_from_args put our settings into os.environ


class TraceError(Exception):
    """A bad trace option or an unreadable trace file."""


def hexmask(value: int) -> str:
    """A bit mask as the schema writes it (hex string)."""
    return f"{value:#x}"


def flow(event: dict[str, Any]) -> tuple[str, str]:
    """(from lane, to lane) of an event, for sequence diagrams."""
    cat = event.get("cat", "")
    if "src" in event and "dst" in event:
        return str(event["src"]), str(event["dst"])
    if cat == "frame":
        return ("device", "net") if event.get("dir") == "tx" else ("net", "device")
    return _FLOW.get((cat, event.get("ev", "")), _FLOW.get(cat, ("device", "device")))


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

    def emit(self, cat: str, ev: str, **fields: Any) -> None:
        """Record one event (thread-safe; dropped silently after ``close``)."""
        key = cat + "." + ev
        with self._lock:
            n = self.counts.get(key, 0) + 1
            self.counts[key] = n
            if self.closed or cat not in self.categories:
                return
            if cat in DATA_PATH and self.sample > 1:
                if (n - 1) % self.sample:
                    return
                fields["sample"] = self.sample
            rec = {"t": round(self._clock() - self._t0, 9), "cat": cat, "ev": ev}
            rec.update(fields)
            self._write(rec)

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


# --- process-wide configuration ---------------------------------------------------------------
def _frame_hook(direction: str, data: Any, q: int = -1) -> None:
    """The ``FRAMES`` hook: trace the decoded frame and/or append it to the pcap."""
    if isinstance(data, (list, tuple)):
        data = b"".join(bytes(d) for d in data)
    tr = TRACE
    if tr is not None and "frame" in tr.categories:
        from virtwire.net.frame import decode

        d = decode(data)
        tr.emit("frame", "frame", dir=direction, len=len(data), q=q, summary=d["summary"],
                proto=d)
    elif tr is not None:
        tr.emit("frame", "frame")  # counted only
    pc = _PCAP
    if pc is not None:
        pc.write(data, outbound=(direction == "tx"))


def start(
    path: str | os.PathLike[str] | None = None,
    categories: Iterable[str] | None = None,
    sample: int = 1,
    pcap: str | os.PathLike[str] | None = None,
    out: IO[str] | None = None,
) -> Tracer | None:
    """Turn tracing (and/or pcap capture) on for this process; returns the tracer.

    Replaces any earlier tracer (closing it). Registered with ``atexit`` so the final counts are
    written even when the process ends without calling ``stop``.
    """
    global TRACE, FRAMES, _PCAP
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
        from virtwire.pcap import PcapError, PcapWriter

        try:
            _PCAP = PcapWriter.open(pcap)
        except PcapError as e:
            if tracer is not None:
                tracer.close()
            raise TraceError(str(e)) from None
    TRACE = tracer
    FRAMES = _frame_hook if (tracer is not None or _PCAP is not None) else None
    atexit.register(stop)
    return tracer


def stop() -> None:
    """Turn tracing and pcap capture off, writing the final lines (and withdraw exported
    settings, so processes started later do not trace)."""
    global TRACE, FRAMES, _PCAP, _EXPORTED
    if _EXPORTED:
        for k in (ENV_TRACE, ENV_PCAP, ENV_CATEGORIES, ENV_SAMPLE):
            os.environ.pop(k, None)
        _EXPORTED = False
    tr, pc = TRACE, _PCAP
    TRACE = None
    FRAMES = None
    _PCAP = None
    if tr is not None:
        tr.close()
    if pc is not None:
        pc.close()


def _parse_categories(text: str | None) -> list[str] | None:
    if not text:
        return None
    cats = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(cats) - set(CATEGORIES))
    if unknown:
        raise TraceError(
            f"unknown trace categories: {', '.join(unknown)} (known: {','.join(CATEGORIES)})"
        )
    return cats


def add_trace_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--trace``, ``--trace-categories``, ``--trace-sample`` and ``--pcap`` to a command."""
    g = parser.add_argument_group("tracing")
    g.add_argument("--trace", metavar="FILE", default=None,
                   help="write every guest/device step as JSON lines (see `virtwire explain`)")
    g.add_argument("--trace-categories", metavar="A,B", default=None,
                   help=f"only these categories (of {','.join(CATEGORIES)})")
    g.add_argument("--trace-sample", metavar="N", type=int, default=1,
                   help="write 1 in N data-path events (kick,chain,used,irq,frame); default 1")
    g.add_argument("--pcap", metavar="FILE", default=None,
                   help="write every frame, both directions, to a pcapng file")


ENV_TRACE = "VIRTWIRE_TRACE"
ENV_PCAP = "VIRTWIRE_PCAP"
ENV_CATEGORIES = "VIRTWIRE_TRACE_CATEGORIES"
ENV_SAMPLE = "VIRTWIRE_TRACE_SAMPLE"


def configure_from_args(args: argparse.Namespace, export: bool = True) -> Tracer | None:
    """Start tracing as the options of ``add_trace_arguments`` ask (no-op when none given).

    With ``export`` the settings also go into the environment (``VIRTWIRE_TRACE`` ...), so
    virtwire processes this one starts (a ``serve`` sidecar, a PCI proxy remote) trace too, each
    to ``FILE.<command>.<pid>`` beside ours (``configure_from_env``); ``virtwire explain FILE``
    merges those files. Raises ``virtwire.errors.CliError`` for a bad option value.
    """
    from virtwire.errors import CliError

    path = getattr(args, "trace", None)
    pcap = getattr(args, "pcap", None)
    if path is None and pcap is None:
        return configure_from_env(getattr(args, "command", None) or "virtwire")
    sample = getattr(args, "trace_sample", 1)
    sample = 1 if sample is None else sample
    cat_text = getattr(args, "trace_categories", None)
    try:
        cats = _parse_categories(cat_text)
        if sample < 1:
            raise TraceError(f"--trace-sample must be >= 1, not {sample}")
        tr = start(path, cats, sample, pcap=pcap)
    except TraceError as e:
        raise CliError(str(e)) from None
    if export:
        global _EXPORTED
        _EXPORTED = True
        for k, v in ((ENV_TRACE, path), (ENV_PCAP, pcap), (ENV_CATEGORIES, cat_text),
                     (ENV_SAMPLE, str(sample) if sample != 1 else None)):
            if v:
                os.environ[k] = os.fspath(v)
            else:
                os.environ.pop(k, None)
    return tr


def configure_from_env(command: str = "virtwire") -> Tracer | None:
    """In a child virtwire process: trace if a parent exported ``VIRTWIRE_TRACE``/``_PCAP``.

    The child writes ``<parent file>.<command>.<pid>`` (JSON lines / pcapng). A no-op when this
    process already traces or nothing was exported; a bad exported value is ignored (logged).
    """
    if TRACE is not None or _PCAP is not None:
        return TRACE
    path, pcap = os.environ.get(ENV_TRACE), os.environ.get(ENV_PCAP)
    if not path and not pcap:
        return None
    suffix = f".{command}.{os.getpid()}"
    try:
        sample = int(os.environ.get(ENV_SAMPLE, "1") or 1)
        cats = _parse_categories(os.environ.get(ENV_CATEGORIES))
        return start(path + suffix if path else None, cats, sample,
                     pcap=pcap + suffix if pcap else None)
    except (TraceError, ValueError) as e:
        import logging

        logging.getLogger(__name__).warning("inherited trace settings ignored: %s", e)
        return None


def child_files(path: str | os.PathLike[str]) -> list[str]:
    """Traces that child processes wrote beside ``path`` (``path.<command>.<pid>``), sorted."""
    import glob

    p = os.fspath(path)
    return sorted(f for f in glob.glob(glob.escape(p) + ".*.*")
                  if f.rsplit(".", 1)[-1].isdigit())


# --- reading ----------------------------------------------------------------------------------
def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The events of a trace file, in file order; a torn last line (a killed writer) is skipped.

    Raises ``TraceError`` for a missing file or a line that is not a JSON object.
    """
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    with f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                return  # torn final line
            raise TraceError(f"{path}:{i}: not a JSON line") from None
        if not isinstance(ev, dict) or "cat" not in ev or "ev" not in ev:
            raise TraceError(f"{path}:{i}: not a trace event (needs cat and ev)")
        yield ev
