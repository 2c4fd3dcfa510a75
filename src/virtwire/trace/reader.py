"""Reading a trace back: the events of a file, and who speaks in each (for sequence diagrams).

The schema is in the emitter's docstring (``virtwire.trace``). ``read_events`` yields a file's
events in order; ``flow(event)`` returns ``(from_lane, to_lane)`` over ``LANES``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from virtwire.trace import TraceError

__all__ = ["LANES", "flow", "read_events"]

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


def flow(event: dict[str, Any]) -> tuple[str, str]:
    """(from lane, to lane) of an event, for sequence diagrams."""
    cat = event.get("cat", "")
    if "src" in event and "dst" in event:
        return str(event["src"]), str(event["dst"])
    if cat == "frame":
        return ("device", "net") if event.get("dir") == "tx" else ("net", "device")
    return _FLOW.get((cat, event.get("ev", "")), _FLOW.get(cat, ("device", "device")))


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
