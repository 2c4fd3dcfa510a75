"""From a trace to a story: phases, negotiated features, queues and rates.

Theory of operation
-------------------
``analyze(events)`` walks the events of one or more traces (``virtwire.trace`` schema v1) once, in
time order, and assigns each to a *phase*. Phases only move forward; a phase starts at the first
event that *triggers* it (the table ``_trigger``), and every later event belongs to it until the
next phase is triggered:

====================  =========================================================================
phase                 triggered by
====================  =========================================================================
discovery             PCI config-space access (not a BAR register), a vhost-user message
bars                  BAR sizing or programming; vhost-user SET_OWNER (QEMU's device set-up)
negotiation           driver feature ack / negotiated features, a driver status write
                      (0, ACKNOWLEDGE, DRIVER, FEATURES_OK); not a reset by the VMM
queues                a queue register write, queue set-up (size and ring addresses);
                      vhost-user SET_MEM_TABLE, SET_VRING_*
first_tx              the first frame the guest sends (or the first chain on a transmit queue)
first_rx              the first frame delivered to the guest (or first used push on an rx queue)
steady                the first data-path event after both first_tx and first_rx
====================  =========================================================================

The first transmit and first receive may happen in either order (a network may speak first);
``in_order`` accepts both. Counts of sampled data-path events are scaled by their ``sample``
field, and the true totals of the ``trace.end`` line win where present.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from virtwire.trace import TraceError
from virtwire.trace.reader import read_events

__all__ = ["PHASES", "PHASE_TITLES", "Phase", "QueueStats", "Analysis", "analyze", "load",
           "queue_role"]

PHASES: tuple[str, ...] = ("discovery", "bars", "negotiation", "queues", "first_tx", "first_rx",
                           "steady")
PHASE_TITLES = {
    "discovery": "Discovery",
    "bars": "BAR set-up",
    "negotiation": "Feature negotiation",
    "queues": "Queue set-up",
    "first_tx": "First transmit",
    "first_rx": "First receive",
    "steady": "Steady state",
}
_VHOST_TITLES = {"discovery": "Discovery (vhost-user handshake)",
                 "bars": "Device set-up (owner, notifiers)",
                 "queues": "Memory table and queue set-up"}
DATA_CATS = frozenset({"kick", "chain", "used", "irq", "frame"})
_BAR_REGS = range(0x10, 0x28)


@dataclass
class Phase:
    id: str
    title: str
    start: float
    end: float = 0.0
    first: int = 0  # index of its first event in Analysis.events
    last: int = 0  # index one past its last event
    facts: list[str] = field(default_factory=list)


@dataclass
class QueueStats:
    q: int
    role: str = "?"
    size: int | None = None
    desc: int | None = None
    avail: int | None = None
    used_addr: int | None = None
    packed: bool = False
    kicks: int = 0
    chains: int = 0
    used: int = 0
    irqs: int = 0
    suppressed: int = 0
    frames: int = 0
    bytes: int = 0
    descs: int = 0
    # event times (seconds) for charts: (t, kind)
    times: list[tuple[float, str, int]] = field(default_factory=list)


@dataclass
class Analysis:
    events: list[dict[str, Any]]
    transport: str
    phases: list[Phase]
    offered: list[str]
    negotiated: list[str]
    negotiated_hex: str | None
    queues: dict[int, QueueStats]
    counts: dict[str, int]
    duration: float
    status_path: list[str]
    frames_tx: int = 0
    frames_rx: int = 0
    bytes_tx: int = 0
    bytes_rx: int = 0
    steady: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def phase(self, pid: str) -> Phase | None:
        for p in self.phases:
            if p.id == pid:
                return p
        return None

    def in_order(self) -> bool:
        """All seven phases present, in the canonical order (first tx/rx in either order)."""
        ids = [p.id for p in self.phases]
        if sorted(ids) != sorted(PHASES):
            return False
        ids = [("first_io" if i in ("first_tx", "first_rx") else i) for i in ids]
        want = [("first_io" if i in ("first_tx", "first_rx") else i) for i in PHASES]
        return ids == want

    def missing(self) -> list[str]:
        have = {p.id for p in self.phases}
        return [p for p in PHASES if p not in have]


def load(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Read and merge traces (several processes) onto one clock, via each ``trace.start.wall``."""
    merged: list[dict[str, Any]] = []
    walls: list[float] = []
    per_file: list[list[dict[str, Any]]] = []
    for p in paths:
        evs = list(read_events(p))
        if not evs:
            raise TraceError(f"{p}: empty trace")
        st = evs[0] if evs[0].get("cat") == "trace" and evs[0].get("ev") == "start" else {}
        walls.append(float(st.get("wall", 0.0)))
        per_file.append(evs)
    base = min(walls) if walls else 0.0
    for i, evs in enumerate(per_file):
        off = walls[i] - base if len(per_file) > 1 else 0.0
        for e in evs:
            e = dict(e)
            try:
                e["t"] = float(e.get("t", 0.0)) + off
            except (TypeError, ValueError):
                e["t"] = off
            e["_src"] = i
            merged.append(e)
    merged.sort(key=lambda e: e["t"])  # stable: file order kept for equal times
    return merged, [os.fspath(p) for p in paths]


def names(v: Any) -> list[str]:
    """A trace's list of names, defensively (a trace is data from anywhere)."""
    return [str(x) for x in v] if isinstance(v, list) else []


def _req(e: dict[str, Any]) -> str:
    r = str(e.get("req", ""))
    return r[len("VHOST_USER_"):] if r.startswith("VHOST_USER_") else r


def _trigger(e: dict[str, Any]) -> str | None:
    cat, ev = e.get("cat"), e.get("ev")
    if cat == "pci":
        if ev in ("bar_size", "bar_map"):
            return "bars"
        if ev == "bar_write" and str(e.get("reg", "")).lower().startswith(
                ("common_cfg.queue_", "legacy.queue_")):
            return "queues"  # the driver programs a virtqueue (§4.1.5.1.3)
        if ev in ("cfg_read", "cfg_write"):
            off = e.get("off")
            if ev == "cfg_write" and isinstance(off, int) and off in _BAR_REGS:
                return "bars"
            return "discovery"
        return None
    if cat == "vhost" and ev == "msg":
        r = _req(e)
        if r == "SET_OWNER":
            return "bars"
        if r in ("SET_FEATURES",):
            return "negotiation"
        if r in ("SET_MEM_TABLE", "ADD_MEM_REG", "SET_VRING_ADDR", "SET_VRING_NUM"):
            return "queues"
        return "discovery"
    if cat == "feature" and ev in ("ack", "negotiated"):
        return "negotiation"
    if cat == "status" and ev == "set":  # a driver write; ``reset`` may be the VMM's
        new = e.get("new", 0)
        if isinstance(new, int) and new & 4:  # DRIVER_OK closes queue set-up
            return "queues"
        return "negotiation"
    if cat == "queue" and ev == "setup":
        return "queues"
    if cat == "frame":
        return "first_tx" if e.get("dir") == "tx" else "first_rx"
    return None


def queue_role(q: int, ctrl_q: int | None) -> str:
    """virtio 1.2 §5.1.2: receiveq N = 2N, transmitq N = 2N+1, controlq last."""
    if q == ctrl_q:
        return "ctrl"
    return f"rx{q // 2}" if q % 2 == 0 else f"tx{q // 2}"


def _backdate_io(a: Analysis) -> None:
    """Start first_tx/first_rx at the kick and chain that led to their frame (same queue)."""
    for k in range(1, len(a.phases)):
        p, prev = a.phases[k], a.phases[k - 1]
        if p.id not in ("first_tx", "first_rx", "steady"):
            continue
        q = a.events[p.first].get("q")
        i = p.first
        while i - 1 > prev.first:
            e = a.events[i - 1]
            if e.get("cat") in ("kick", "chain", "used") and (e.get("q") == q
                                                              or q in (None, -1)):
                i -= 1
            else:
                break
        if i != p.first:
            p.first = prev.last = i
            p.start = prev.end = float(a.events[i].get("t", p.start))


def _w(e: dict[str, Any]) -> int:
    s = e.get("sample", 1)
    return s if isinstance(s, int) and s > 0 else 1


def _transport_and_counts(evs: list[dict[str, Any]]) -> tuple[str, dict[str, int]]:
    """The host kind (from ``host.start``, else guessed from the categories) and the true
    event counts summed over every ``trace.end``."""
    transport = "unknown"
    counts: dict[str, int] = {}
    for e in evs:
        if e.get("cat") == "host" and e.get("ev") == "start" and e.get("kind"):
            transport = str(e["kind"])
        if e.get("cat") == "trace" and e.get("ev") == "end" and isinstance(e.get("counts"), dict):
            for k, v in e["counts"].items():
                if isinstance(v, int):
                    counts[k] = counts.get(k, 0) + v
    if transport == "unknown":
        if any(e.get("cat") == "vhost" for e in evs):
            transport = "vhost-user"
        elif any(e.get("cat") == "pci" for e in evs):
            transport = "pci-proxy"
    return transport, counts


class _Walk:
    """What ``analyze`` carries from one event to the next: the phase so far and the facts."""

    def __init__(self, a: Analysis) -> None:
        self.a = a
        self.have_frames = any(e.get("cat") == "frame" and "dir" in e for e in a.events)
        self.order = {p: i for i, p in enumerate(PHASES)}
        self.seen_tx = self.seen_rx = False

    def qs(self, q: Any) -> QueueStats | None:
        if not isinstance(q, int) or q < 0 or q > 0xFFFF:
            return None
        if q not in self.a.queues:
            self.a.queues[q] = QueueStats(q)
        return self.a.queues[q]

    def trigger(self, e: dict[str, Any]) -> str | None:
        """The phase this event would start (before the order rules)."""
        cat, trig = e.get("cat"), _trigger(e)
        if not self.have_frames and isinstance(e.get("q"), int):
            # Frames not traced: the first tx chain / first filled rx buffer stand in for them.
            if cat == "chain" and e["q"] % 2 == 1 and not self.seen_tx:
                trig = "first_tx"
            elif cat == "used" and e["q"] % 2 == 0 and not self.seen_rx and e.get("len", 0):
                trig = "first_rx"
            elif cat == "chain" and self.seen_tx and self.seen_rx:
                trig = "steady"
        elif cat == "frame" and self.seen_tx and self.seen_rx:
            trig = "steady"
        return trig

    def phase(self, i: int, e: dict[str, Any], t: float) -> None:
        new = self.trigger(e)
        if new is None:
            return
        phases = self.a.phases
        cur = phases[-1].id if phases else None
        if new in ("first_tx", "first_rx"):
            if any(p.id == new for p in phases):
                return
        elif cur is not None and self.order[new] <= self.order[cur]:
            return
        elif cur in ("first_tx", "first_rx") and new != "steady":
            return  # control events during I/O do not rewind the story
        if new not in self.order:
            return
        if phases:
            phases[-1].end = t
            phases[-1].last = i
        title = PHASE_TITLES[new]
        if self.a.transport == "vhost-user":
            title = _VHOST_TITLES.get(new, title)
        phases.append(Phase(new, title, t, first=i))
        if new == "first_tx":
            self.seen_tx = True
        elif new == "first_rx":
            self.seen_rx = True

    def fact(self, e: dict[str, Any], t: float) -> None:
        a, cat, ev = self.a, e.get("cat"), e.get("ev")
        if cat == "feature" and ev == "offer" and isinstance(e.get("names"), list):
            a.offered[:] = [str(x) for x in e["names"]]
        elif cat == "feature" and ev == "negotiated" and isinstance(e.get("names"), list):
            a.negotiated[:] = [str(x) for x in e["names"]]
            a.negotiated_hex = str(e.get("features"))
        elif cat == "status" and ev == "set" and isinstance(e.get("new_names"), list):
            a.status_path.append("|".join(str(x) for x in e["new_names"]) or "0 (reset)")
        elif cat == "status" and ev == "reset":
            a.status_path.append("0 (reset)")
        elif cat == "queue" and ev == "setup":
            s = self.qs(e.get("q"))
            if s is not None:
                s.size, s.desc, s.avail, s.used_addr = (e.get("size"), e.get("desc"),
                                                       e.get("avail"), e.get("used"))
                s.packed = bool(e.get("packed", False))
        elif cat in DATA_CATS:
            self.data(e, t)

    def data(self, e: dict[str, Any], t: float) -> None:
        a, cat, ev, w = self.a, e.get("cat"), e.get("ev"), _w(e)
        s = self.qs(e.get("q"))
        if cat == "frame":
            n = e.get("len", 0) if isinstance(e.get("len"), int) else 0
            if e.get("dir") == "tx":
                a.frames_tx += w
                a.bytes_tx += n * w
            else:
                a.frames_rx += w
                a.bytes_rx += n * w
            if s is not None:
                s.frames += w
                s.bytes += n * w
        elif s is not None:
            if cat == "kick":
                s.kicks += w
            elif cat == "chain":
                s.chains += w
                d = e.get("descs")
                s.descs += (len(d) if isinstance(d, list) else 1) * w
            elif cat == "used" and ev == "used":
                s.used += w
            elif cat == "irq" and ev == "irq":
                s.irqs += w
            elif cat == "irq" and ev == "suppressed":
                s.suppressed += w
        if s is not None and len(s.times) < 200_000:
            s.times.append((t, f"{cat}.{ev}" if cat in ("irq", "used") else str(cat), w))


def analyze(events: Iterable[dict[str, Any]], sources: Sequence[str] = ()) -> Analysis:
    """Assign phases and gather the facts ``narrate`` and the HTML page tell (module docstring)."""
    evs = [e for e in events if isinstance(e, dict)]
    evs.sort(key=lambda e: float(e.get("t", 0.0)) if isinstance(e.get("t"), (int, float)) else 0)
    transport, counts = _transport_and_counts(evs)
    a = Analysis(evs, transport, [], [], [], None, {}, counts, 0.0, [], sources=list(sources))
    walk = _Walk(a)
    for i, e in enumerate(evs):
        t = float(e.get("t", 0.0)) if isinstance(e.get("t"), (int, float)) else 0.0
        walk.phase(i, e, t)
        walk.fact(e, t)
    if evs:
        a.duration = float(evs[-1].get("t", 0.0) or 0.0)
    if a.phases:
        a.phases[-1].end = a.duration
        a.phases[-1].last = len(evs)
    _backdate_io(a)
    # roles: the control queue is the last one when CTRL_VQ was negotiated and the count is odd
    set_up = sorted(q for q, s in a.queues.items() if s.size is not None)
    ctrl_q = set_up[-1] if ("CTRL_VQ" in a.negotiated and len(set_up) % 2 == 1) else None
    for q, s in a.queues.items():
        s.role = queue_role(q, ctrl_q)
    _steady(a)
    _facts(a)
    return a


def _steady(a: Analysis) -> None:
    p = a.phase("steady")
    if p is None:
        return
    dur = max(p.end - p.start, 1e-9)
    tx = rx = btx = brx = kicks = irqs = supp = chains = 0
    for e in a.events[p.first:p.last]:
        cat, w = e.get("cat"), _w(e)
        if cat == "frame":
            n = e.get("len", 0) if isinstance(e.get("len"), int) else 0
            if e.get("dir") == "tx":
                tx += w
                btx += n * w
            else:
                rx += w
                brx += n * w
        elif cat == "kick":
            kicks += w
        elif cat == "irq" and e.get("ev") == "irq":
            irqs += w
        elif cat == "irq" and e.get("ev") == "suppressed":
            supp += w
        elif cat == "chain":
            chains += w
    a.steady = {
        "duration": dur, "frames_tx": tx, "frames_rx": rx, "bytes_tx": btx, "bytes_rx": brx,
        "pps_tx": tx / dur, "pps_rx": rx / dur, "bps_tx": btx * 8 / dur, "bps_rx": brx * 8 / dur,
        "kicks": kicks, "irqs": irqs, "suppressed": supp, "chains": chains,
        "chains_per_kick": chains / kicks if kicks else None,
        "frames_per_irq": (tx + rx) / irqs if irqs else None,
    }


def _hx(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) else "?"


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def _facts(a: Analysis) -> None:
    for p in a.phases:
        _phase_facts(a, p)
        seen: set[str] = set()
        p.facts[:] = [f for f in p.facts if not (f in seen or seen.add(f))]


def _bars_facts(evs: list[dict[str, Any]], f: list[str]) -> None:
    for e in evs:
        if e.get("cat") == "pci" and e.get("ev") == "bar_size":
            f.append(f"BAR{e.get('bar')} sized: {_size(e.get('size'))} "
                     f"({e.get('kind', '?')})")
        elif e.get("cat") == "pci" and e.get("ev") == "bar_map":
            f.append(f"BAR{e.get('bar')} placed at {_hx(e.get('addr'))} "
                     f"({_size(e.get('size'))}, {e.get('kind', '?')})")
        elif e.get("cat") == "vhost" and e.get("ev") == "msg":
            f.append(_vhost_line(e))
    caps = _caps(evs)
    if caps:
        f.append(f"capabilities read: {', '.join(caps)}")
    cmd = [e for e in evs if e.get("cat") == "pci" and e.get("ev") == "cfg_write"
           and e.get("reg") == "command"]
    if cmd:
        v = cmd[-1].get("val", 0)
        if isinstance(v, int):
            bits = [n for b, n in ((0, "I/O"), (1, "memory"), (2, "bus master"))
                    if v >> b & 1]
            f.append(f"command register: {_hx(v)} ({', '.join(bits) or 'decoding off'})")


def _negotiation_facts(a: Analysis, evs: list[dict[str, Any]], f: list[str]) -> None:
    for e in evs:
        cat, ev = e.get("cat"), e.get("ev")
        if cat == "status" and ev == "set" and not names(e.get("new_names")):
            f.append("driver resets the device (status := 0)")
        elif cat == "status" and ev == "set":
            f.append(f"status {'|'.join(names(e.get('old_names'))) or '0'} -> "
                     f"{'|'.join(names(e.get('new_names')))}")
        elif cat == "status" and ev == "reset" and not (
                f and f[-1].startswith("driver resets")):
            f.append("device reset")
        elif cat == "feature" and ev == "offer":
            f.append(f"device offers {len(names(e.get('names')))} features: "
                     f"{' '.join(names(e.get('names')))}")
        elif cat == "feature" and ev == "ack" and e.get("names") is not None:
            acc = ' '.join(names(e.get('names'))) or 'none'
            f.append(f"driver writes feature word {e['sel']}; accepted so far: {acc}"
                     if "sel" in e else f"driver accepts {acc}")
        elif cat == "feature" and ev == "negotiated":
            f.append(f"negotiated {e.get('features')}: {' '.join(names(e.get('names')))}")
        elif cat == "vhost" and ev == "msg":
            f.append(_vhost_line(e))
    if a.offered and a.negotiated:
        declined = [n for n in a.offered if n not in a.negotiated]
        if declined:
            f.append(f"offered but not accepted: {' '.join(declined)}")


def _queues_facts(a: Analysis, evs: list[dict[str, Any]], f: list[str]) -> None:
    for e in evs:
        cat, ev = e.get("cat"), e.get("ev")
        if cat == "queue" and ev == "setup":
            q = e.get("q")
            s = a.queues.get(q) if isinstance(q, int) else None
            f.append(f"queue {q} ({s.role if s else '?'}): {e.get('size')} entries"
                     f"{', packed' if e.get('packed') else ''}, desc {_hx(e.get('desc'))}"
                     f", avail {_hx(e.get('avail'))}, used {_hx(e.get('used'))}")
        elif cat == "status" and ev == "set":
            f.append(f"status -> {'|'.join(names(e.get('new_names')))}")
        elif cat == "vhost" and ev == "msg" and _req(e) in ("SET_MEM_TABLE",
                                                            "ADD_MEM_REG"):
            f.append(_vhost_line(e))
        elif cat == "irq" and ev == "irq" and e.get("q", 0) == -1:
            f.append("config interrupt")


def _control_facts(evs: list[dict[str, Any]], f: list[str]) -> None:
    for e in evs:
        if e.get("cat") == "ctrl" and e.get("ev") == "cmd":
            f.append(f"control queue: {e.get('class_name', e.get('class'))} "
                     f"{e.get('cmd_name', e.get('cmd'))} -> "
                     f"{'OK' if e.get('ack') == 0 else 'ERR'}")
        elif e.get("cat") == "config" and e.get("ev") == "change":
            f.append(f"config change: {e.get('field')} = {e.get('val')}")


def _steady_facts(a: Analysis, f: list[str]) -> None:
    s = a.steady
    f.append(f"{s['duration']:.3f} s: {s['frames_tx']} frames out "
             f"({s['pps_tx']:.1f}/s, {_rate(s['bps_tx'])}), {s['frames_rx']} in "
             f"({s['pps_rx']:.1f}/s, {_rate(s['bps_rx'])})")
    f.append(f"notifications: {s['kicks']} kicks (guest -> device), {s['irqs']} "
             f"interrupts (device -> guest), {s['suppressed']} suppressed")
    if s["chains_per_kick"] is not None:
        f.append(f"{s['chains_per_kick']:.2f} chains per kick")
    if s["frames_per_irq"] is not None:
        f.append(f"{s['frames_per_irq']:.2f} frames per interrupt")


def _phase_facts(a: Analysis, p: Phase) -> None:
    evs = a.events[p.first:p.last]
    f = p.facts
    if p.id == "discovery":
        _discovery_facts(a, evs, f)
    elif p.id == "bars":
        _bars_facts(evs, f)
    elif p.id == "negotiation":
        _negotiation_facts(a, evs, f)
    elif p.id == "queues":
        _queues_facts(a, evs, f)
    elif p.id in ("first_tx", "first_rx"):
        _io_facts(a, evs, f, "tx" if p.id == "first_tx" else "rx")
    if p.id != "steady":
        _control_facts(evs, f)
    if p.id == "steady":
        _steady_facts(a, f)


def _rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} bit/s"


def _pv(k: str, v: Any) -> str:
    """One payload value: addresses, sizes and offsets in hex."""
    if isinstance(v, int) and not isinstance(v, bool) and any(
            w in k for w in ("addr", "size", "offset")):
        return f"{v:#x}"
    return str(v)


def _payload_text(pl: Any) -> str:
    if isinstance(pl, dict) and pl:
        if "features" in pl and isinstance(pl.get("names"), list):
            return f"{pl['features']} ({len(pl['names'])} bits: {' '.join(pl['names'][:24])})"
        if set(pl) == {"value"}:
            return str(pl["value"])
        text = ", ".join(f"{k}={_pv(k, v)}" for k, v in list(pl.items())[:6]
                         if not isinstance(v, (list, dict)) and k not in ("fd", "raw"))
        if isinstance(pl.get("regions"), list):
            regs = [r for r in pl["regions"] if isinstance(r, dict)]
            text += ", ".join(f"gpa {_pv('addr', r.get('guest_phys_addr'))}+"
                              f"{_pv('size', r.get('memory_size'))} at uva "
                              f"{_pv('addr', r.get('userspace_addr'))}" for r in regs[:4])
        return text
    return "" if pl in (None, {}, "") else str(pl)


def _vhost_line(e: dict[str, Any]) -> str:
    detail = _payload_text(e.get("payload"))
    return f"{e.get('req')}" + (f" {detail}" if detail else "")


def _discovery_facts(a: Analysis, evs: list[dict[str, Any]], f: list[str]) -> None:
    ids: dict[str, Any] = {}
    reads = 0
    for e in evs:
        cat, ev = e.get("cat"), e.get("ev")
        if cat == "pci" and ev == "cfg_read":
            reads += 1
            reg = str(e.get("reg", ""))
            val = e.get("val")
            if reg in ("vendor_id", "device_id", "subsystem_id", "class", "revision_id"):
                ids[reg] = val
            elif reg == "vendor_id|device_id" and isinstance(val, int):
                ids["vendor_id"], ids["device_id"] = val & 0xFFFF, val >> 16
            elif reg == "revision_id|prog_if|class" and isinstance(val, int):
                ids["class"] = val >> 8
        elif cat == "vhost" and ev in ("msg",):
            f.append(_vhost_line(e))
        elif cat == "vhost" and ev == "reply":
            f.append(f"  -> {_payload_text(e.get('payload')) or 'ok'}")
    if reads:
        idtxt = ", ".join(f"{k} {_hx(v)}" for k, v in ids.items())
        f.insert(0, f"{reads} config-space reads" + (f": {idtxt}" if idtxt else ""))
        if ids.get("vendor_id") == 0x1AF4:
            dev = ids.get("device_id")
            kind = ("virtio-net, modern" if dev == 0x1041 else
                    "virtio-net, transitional" if dev == 0x1000 else "virtio")
            f.insert(1, f"a virtio device ({kind})")
    caps = _caps(evs)
    if caps:
        f.append(f"capabilities read: {', '.join(caps)}")


def _caps(evs: list[dict[str, Any]]) -> list[str]:
    """Capabilities whose type field the driver read (virtio 1.2 §4.1.4), in order."""
    caps: list[str] = []
    for e in evs:
        reg = str(e.get("reg", "")) if e.get("cat") == "pci" and e.get("ev") == "cfg_read" \
            else ""
        if reg.startswith("cap.") and reg.endswith((".cfg_type", ".cap_vndr")):
            name = reg.split(".")[1]
            if name not in caps:
                caps.append(name)
    return caps


def _io_facts(a: Analysis, evs: list[dict[str, Any]], f: list[str], direction: str) -> None:
    shown = 0
    for e in evs[:5000]:
        cat, ev = e.get("cat"), e.get("ev")
        if cat == "frame":
            f.append(f"frame {'guest -> network' if e.get('dir') == 'tx' else 'network -> guest'}"
                     f": {e.get('summary', e.get('len'))}")
        elif cat == "kick":
            f.append(f"kick on queue {e.get('q')}")
        elif cat == "chain":
            descs = e.get("descs") if isinstance(e.get("descs"), list) else []
            dtxt = ", ".join(
                f"{_hx(d[0])}+{d[1]}{' W' if isinstance(d[2], int) and d[2] & 2 else ' R'}"
                for d in descs[:4] if isinstance(d, list) and len(d) >= 3)
            line = (f"chain head {e.get('head')} on queue {e.get('q')}: {len(descs)} "
                    f"descriptor(s) [{dtxt}]")
            prev = f[-1] if f else ""
            if prev.startswith(("chain head", "chains ")) and \
                    prev.split(" on queue ")[1].split(":")[0] == str(e.get("q")):
                # a run of buffers taken at once (RX refill, mergeable): one line
                n = int(prev.split()[1]) + 1 if prev.startswith("chains ") else 2
                first = prev.split(" heads ")[1].split("..")[0] if prev.startswith("chains ") \
                    else prev.split()[2]
                f[-1] = (f"chains {n} heads {first}..{e.get('head')} on queue {e.get('q')}: "
                         f"{e.get('rlen', 0)}R/{e.get('wlen', 0)}W bytes each (last)")
                continue
            f.append(line)
        elif cat == "used" and ev == "used":
            f.append(f"used: queue {e.get('q')} id {e.get('id')} len {e.get('len')}")
        elif cat == "irq" and ev == "irq":
            how = e.get("kind", "irq")
            vec = f" vector {e['vector']}" if "vector" in e else ""
            f.append(f"interrupt ({how}{vec}) for queue {e.get('q')}")
        elif cat == "irq" and ev == "suppressed":
            f.append(f"interrupt suppressed for queue {e.get('q')}")
        else:
            continue
        shown += 1
        if shown >= 8:
            break
