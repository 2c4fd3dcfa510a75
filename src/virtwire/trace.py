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
    "ctrl", "frame", "host", "kvm",
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
    "kvm": ("guest", "vmm"),
    "trace": ("device", "device"),
}

TRACE: Tracer | None = None
FRAMES: Callable[[str, Any, int], None] | None = None
_PCAP: Any = None  # the active virtwire.pcap.PcapWriter, if any
_EXPORTED = False  # configure_from_args put our settings into os.environ
_ATEXIT = False  # stop() registered to run at exit


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
        from virtwire.net.frame import decode

        d = decode(data)
        tr.write("frame", "frame", {"dir": direction, "len": len(data), "q": q,  # type: ignore
                                    "summary": d["summary"], "proto": d})
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
    frames_on = tracer is not None and "frame" in tracer.categories
    FRAMES = _frame_hook if (frames_on or _PCAP is not None) else None
    global _ATEXIT
    if not _ATEXIT:
        atexit.register(stop)
        _ATEXIT = True
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


# --- hook-site helpers -------------------------------------------------------------------------
# Each is called from one line at a hook site, only after the site saw tracing on, so none of this
# runs when tracing is off. They decode with names (spec, PCI, vhost-user) and never raise into the
# caller: a failure to decode is an event field ("error"), not an exception.

_PCI_HEADER: tuple[tuple[int, int, str], ...] = (
    (0x00, 2, "vendor_id"), (0x02, 2, "device_id"), (0x04, 2, "command"), (0x06, 2, "pci_status"),
    (0x08, 1, "revision_id"), (0x09, 1, "prog_if"), (0x0A, 2, "class"),
    (0x0C, 1, "cache_line_size"), (0x0D, 1, "latency_timer"), (0x0E, 1, "header_type"),
    (0x0F, 1, "bist"), (0x10, 4, "bar0"), (0x14, 4, "bar1"), (0x18, 4, "bar2"), (0x1C, 4, "bar3"),
    (0x20, 4, "bar4"), (0x24, 4, "bar5"), (0x28, 4, "cardbus_cis"),
    (0x2C, 2, "subsystem_vendor_id"), (0x2E, 2, "subsystem_id"), (0x30, 4, "rom_address"),
    (0x34, 1, "cap_ptr"), (0x3C, 1, "interrupt_line"), (0x3D, 1, "interrupt_pin"),
    (0x3E, 1, "min_gnt"), (0x3F, 1, "max_lat"),
)
# virtio 1.2 §4.1.4: struct virtio_pci_cap (+ notify_off_multiplier / pci_cfg_data at 16)
_VIRTIO_CAP_FIELDS: tuple[tuple[int, str], ...] = (
    (0, "cap_vndr"), (1, "cap_next"), (2, "cap_len"), (3, "cfg_type"), (4, "bar"), (5, "id"),
    (6, "padding"), (8, "offset"), (12, "length"), (16, "extra"),
)
_CFG_TYPE_NAMES = {1: "common_cfg", 2: "notify_cfg", 3: "isr_cfg", 4: "device_cfg",
                   5: "pci_cfg", 8: "shared_memory_cfg", 9: "vendor_cfg"}
_CAP_ID_NAMES = {0x01: "pm", 0x05: "msi", 0x09: "vendor", 0x10: "pcie", 0x11: "msix"}
# virtio 1.2 §5.1.4 struct virtio_net_config
_NET_CONFIG: tuple[tuple[int, str], ...] = (
    (0, "mac"), (6, "status"), (8, "max_virtqueue_pairs"), (10, "mtu"), (12, "speed"),
    (16, "duplex"), (17, "rss_max_key_size"), (18, "rss_max_indirection_table_length"),
    (20, "supported_hash_types"),
)


def _field(table: Iterable[tuple[int, str]], off: int) -> str:
    best = None
    for start, name in table:
        if start <= off:
            best = (start, name)
    if best is None:
        return f"+{off:#x}"
    return best[1] if best[0] == off else f"{best[1]}+{off - best[0]}"


def pci_config_name(dev: Any, off: int, width: int = 1) -> str:
    """Name of config-space offset ``off`` of a ``VirtioPciDevice`` ("vendor_id",
    "cap.common_cfg.bar", "cap.msix+2", ...); a wide access over several header fields names
    them all ("revision_id|prog_if|class")."""
    if off < 0x40:
        hit = [name if start >= off else f"{name}+{off - start}"
               for start, size, name in _PCI_HEADER
               if start < off + max(width, 1) and off < start + size]
        return "|".join(hit) if hit else f"header+{off:#x}"
    pci = getattr(dev, "pci", None)
    try:
        caps = sorted(pci.capabilities) if pci is not None else []
    except Exception:  # noqa: BLE001 - naming must never fail the access
        caps = []
    for i, at in enumerate(caps):
        end = caps[i + 1] if i + 1 < len(caps) else 0x100
        if at <= off < end:
            cid = pci.get(at, 1)
            if cid == 0x09:
                cap = "cap." + _CFG_TYPE_NAMES.get(pci.get(at + 3, 1), f"vendor{at:#x}")
                fld = _field(_VIRTIO_CAP_FIELDS, off - at)
                if fld.startswith("extra"):
                    kind = cap.split(".", 1)[1]
                    fld = fld.replace("extra", {"notify_cfg": "notify_off_multiplier",
                                                "pci_cfg": "pci_cfg_data"}.get(kind, "extra"))
                return f"{cap}.{fld}"
            name = _CAP_ID_NAMES.get(cid, f"cap{cid:#x}")
            return f"cap.{name}" + (f"+{off - at}" if off != at else "")
    return f"config+{off:#x}"


def pci_config_access(dev: Any, off: int, width: int, value: int, write: bool) -> None:
    """A guest config-space access: ``pci.cfg_read``/``cfg_write``, plus ``pci.bar_size`` or
    ``pci.bar_map`` when a write sized or placed a BAR (PCI Local Bus 3.0 §6.2.5.1)."""
    tr = TRACE
    if tr is None:
        return
    reg = pci_config_name(dev, off, width)
    tr.emit("pci", "cfg_write" if write else "cfg_read", off=off, size=width, val=value, reg=reg)
    if not write or not 0x10 <= off < 0x28 or width != 4:
        return
    bar = getattr(getattr(dev, "pci", None), "bars", {}).get((off - 0x10) // 4)
    if bar is None:
        return
    kind = getattr(getattr(bar, "kind", None), "value", str(getattr(bar, "kind", "?")))
    if value & 0xFFFFFFF0 == 0xFFFFFFF0:
        tr.emit("pci", "bar_size", bar=bar.index, size=bar.size, kind=kind)
    elif getattr(bar, "base", 0):
        tr.emit("pci", "bar_map", bar=bar.index, addr=bar.base, size=bar.size, kind=kind)


def pci_bar_name(dev: Any, bar: int, off: int) -> str:
    """Name of offset ``off`` in BAR ``bar`` of a ``VirtioPciDevice`` ("common_cfg.queue_desc_lo",
    "notify.q1", "isr", "device_cfg.mac+2", "legacy.queue_pfn")."""
    from virtwire.pci import device as pd

    if bar == pd.MODERN_BAR:
        block, rel = off & ~(pd.BLOCK_SIZE - 1), off & (pd.BLOCK_SIZE - 1)
        if block == pd.COMMON_OFFSET:
            reg = getattr(dev, "_common", {}).get(rel)
            return f"common_cfg.{reg.name}" if reg is not None else f"common_cfg+{rel:#x}"
        if block == pd.ISR_OFFSET:
            return "isr" if rel == 0 else f"isr+{rel:#x}"
        if block == pd.DEVICE_OFFSET:
            return "device_cfg." + _field(_NET_CONFIG, rel)
        if block == pd.NOTIFY_OFFSET:
            q, r = divmod(rel, pd.NOTIFY_OFF_MULTIPLIER)
            return f"notify.q{q}" + (f"+{r}" if r else "")
        return f"bar{bar}+{off:#x}"
    if bar == pd.LEGACY_BAR and getattr(dev, "legacy_bar", None) is not None:
        reg = getattr(dev, "_legacy", {}).get(off)
        if reg is not None:
            return f"legacy.{reg.name}"
        cfg = off - (24 if getattr(dev, "msix", False) else 20)
        return "legacy.device_cfg." + _field(_NET_CONFIG, cfg) if cfg >= 0 else f"legacy+{off}"
    return f"bar{bar}+{off:#x}"


def pci_bar_access(dev: Any, addr: int, width: int, value: int, memory: bool,
                   write: bool) -> None:
    """A guest BAR access (absolute address, as the PCI proxy sends it): ``pci.bar_read`` /
    ``bar_write`` with the register's name; a device-feature read also yields ``feature.offer``."""
    tr = TRACE
    if tr is None:
        return
    pci = getattr(dev, "pci", None)
    hit = pci.bar_at(addr, width, memory) if pci is not None else None
    if hit is None:
        tr.emit("pci", "bar_write" if write else "bar_read", addr=addr, size=width, val=value,
                reg="unmapped")
        return
    bar, off = hit[0].index, hit[1]
    reg = pci_bar_name(dev, bar, off)
    tr.emit("pci", "bar_write" if write else "bar_read", bar=bar, off=off, size=width,
            val=value, reg=reg)
    if not write and (reg == "common_cfg.device_feature" and getattr(dev, "dfselect", 0) == 0
                      or reg == "legacy.HOST_FEATURES"):
        d = getattr(dev, "device", None)
        feats = int(getattr(d, "offered_features", 0))
        from virtwire.virtio.spec import feature_names

        tr.emit("feature", "offer", features=hexmask(feats), names=feature_names(feats))


_CTRL_NAMES: dict[int, tuple[str, dict[int, str]]] = {
    0: ("RX", {0: "PROMISC", 1: "ALLMULTI", 2: "ALLUNI", 3: "NOMULTI", 4: "NOUNI", 5: "NOBCAST"}),
    1: ("MAC", {0: "TABLE_SET", 1: "ADDR_SET"}),
    2: ("VLAN", {0: "ADD", 1: "DEL"}),
    3: ("ANNOUNCE", {0: "ACK"}),
    4: ("MQ", {0: "VQ_PAIRS_SET", 1: "RSS_CONFIG", 2: "HASH_CONFIG"}),
    5: ("GUEST_OFFLOADS", {0: "SET"}),
}


def ctrl_command(cls: int, cmd: int, ack: int, data: bytes | bytearray | memoryview = b"") -> None:
    """A virtio-net control-queue command and its ack (virtio 1.2 §5.1.6.5)."""
    tr = TRACE
    if tr is None:
        return
    cname, cmds = _CTRL_NAMES.get(cls, (f"class{cls}", {}))
    tr.emit("ctrl", "cmd", **{"class": cls}, cmd=cmd, class_name=cname,
            cmd_name=cmds.get(cmd, f"cmd{cmd}"), ack=ack, data=bytes(data[:64]).hex())


def pci_bar_written(dev: Any, addr: int, width: int, value: int, memory: bool) -> None:
    """After a guest BAR write took effect: the feature word it completed (``feature.ack``), or
    the features FEATURES_OK accepted (``feature.negotiated``; legacy: at DRIVER_OK)."""
    tr = TRACE
    if tr is None:
        return
    pci = getattr(dev, "pci", None)
    hit = pci.bar_at(addr, width, memory) if pci is not None else None
    if hit is None:
        return
    reg = pci_bar_name(dev, hit[0].index, hit[1])
    d = getattr(dev, "device", None)
    if d is None:
        return
    from virtwire.virtio import spec

    if reg in ("common_cfg.driver_feature", "legacy.GUEST_FEATURES"):
        sel = getattr(dev, "gfselect", 0) if reg.startswith("common") else 0
        features_event("ack", int(getattr(d, "driver_features", 0)), sel=sel)
    elif reg in ("common_cfg.device_status", "legacy.STATUS"):
        fok, dok = spec.VIRTIO_CONFIG_S_FEATURES_OK, spec.VIRTIO_CONFIG_S_DRIVER_OK
        legacy = reg.startswith("legacy")
        status = int(getattr(d, "status", 0))
        if (not legacy and value & fok and not value & dok and status & fok) or (
                legacy and value & dok and status & dok):
            features_event("negotiated", int(getattr(d, "negotiated", 0)))


def _plain(v: Any, depth: int = 0) -> Any:
    """A decoded protocol payload as JSON-able data (dataclasses to dicts, bytes to hex)."""
    import dataclasses

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
            from virtwire.virtio.spec import feature_names

            return {"features": hexmask(payload), "names": feature_names(payload)}
        if short in _VHOST_PROTO_REQS:
            try:
                from virtwire.hosts.vhost_user_proto import protocol_feature_names

                names = protocol_feature_names(payload)
            except ImportError:
                names = []
            return {"features": hexmask(payload), "names": names}
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
    from virtwire.virtio.spec import STATUS_NAMES

    tr.emit("status", "set", old=old, new=new,
            old_names=[n for b, n in STATUS_NAMES.items() if old & b],
            new_names=[n for b, n in STATUS_NAMES.items() if new & b])


def features_event(ev: str, features: int, **extra: Any) -> None:
    """``feature.offer`` / ``ack`` / ``negotiated`` with bit names (virtio 1.2 §2.2)."""
    tr = TRACE
    if tr is None:
        return
    from virtwire.virtio.spec import feature_names

    tr.emit("feature", ev, features=hexmask(features), names=feature_names(features), **extra)


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


def _chain_event(tr: Tracer, q: int, c: Any) -> None:
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
        tr = TRACE
        if c is not None and tr is not None and tr.want("chain", "chain"):
            _chain_event(tr, self._vw_index, c)
        return c

    def pop_batch(self, mem: Any, limit: int) -> Any:
        cs = self._vw_ring.pop_batch(mem, limit)
        tr = TRACE
        if tr is not None:
            for c in cs:
                if tr.want("chain", "chain"):
                    _chain_event(tr, self._vw_index, c)
        return cs

    def push(self, mem: Any, chain: Any, written: int) -> Any:
        r = self._vw_ring.push(mem, chain, written)
        tr = TRACE
        if tr is not None and tr.want("used", "used"):
            tr.write("used", "used", {"q": self._vw_index, "id": getattr(chain, "head", None),
                                      "len": written})
        return r

    def publish(self, mem: Any) -> Any:
        n = self._vw_ring.publish(mem)
        tr = TRACE
        if tr is not None and n:
            tr.emit("used", "publish", q=self._vw_index, n=n)
        return n


def wrap_queue(ring: Any, index: int) -> Any:
    """``ring`` wrapped in a ``TracedQueue`` when tracing is on (else ``ring`` itself), after
    emitting its ``queue.setup``. Call where a host installs a ring for the device."""
    tr = TRACE
    if tr is None or ring is None or isinstance(ring, TracedQueue):
        return ring
    queue_setup(index, ring)
    if not tr.categories & {"chain", "used"}:
        return ring  # nothing per buffer is traced: no indirection either
    return TracedQueue(ring, index)


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
