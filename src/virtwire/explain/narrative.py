"""The terminal narrative of an ``Analysis``: phases in order, then queues and notifications."""

from __future__ import annotations

import textwrap

from virtwire.explain.kvm import exit_facts
from virtwire.explain.model import PHASE_TITLES, Analysis

__all__ = ["narrate"]

INTRO = {
    "discovery": "The guest finds the device and reads what it is.",
    "bars": "Resources are assigned so the device's registers become reachable.",
    "negotiation": "Driver and device agree on features (virtio 1.2 §3.1.1, §2.2).",
    "queues": "The driver sizes the virtqueues and tells the device where the rings live "
              "(§2.7), then sets DRIVER_OK.",
    "first_tx": "The guest sends its first frame: kick, descriptor chain, used element, "
                "interrupt (§2.7.13, §5.1.6.2).",
    "first_rx": "The first frame reaches the guest through a receive buffer it had posted "
                "(§5.1.6.3).",
    "steady": "Traffic flows; notification counts show how well suppression batches (§2.7.7).",
}
VHOST_INTRO = {
    "discovery": "QEMU connects to the vhost-user socket and asks what the back end can do.",
    "bars": "QEMU sets itself as owner and hands over notification eventfds.",
    "negotiation": "The guest driver has negotiated features with QEMU; QEMU passes them on "
                   "(SET_FEATURES).",
    "queues": "QEMU shares guest RAM (SET_MEM_TABLE) and describes every ring: size, base, "
              "addresses, kick and call eventfds.",
}


def narrate(a: Analysis, width: int = 100) -> str:
    """A person-readable story of the trace (plain text, ``width`` columns)."""
    out: list[str] = []
    src = ", ".join(a.sources) if a.sources else "trace"
    out.append(f"virtwire explain: {src}")
    out.append(f"  transport {a.transport}, {a.duration:.3f} s, {len(a.events)} events")
    out.append("")
    wrap = textwrap.TextWrapper(width=width, initial_indent="     - ",
                                subsequent_indent="       ")
    kvm_facts = exit_facts(a)
    for n, p in enumerate(a.phases, 1):
        count = p.last - p.first
        head = f"{n}. {p.title}"
        out.append(f"  {head:<44} t={p.start:9.4f} s  ({p.end - p.start:.4f} s, "
                   f"{count} events)")
        intro = (VHOST_INTRO.get(p.id) if a.transport == "vhost-user" else None) or \
            INTRO.get(p.id, "")
        out.extend(textwrap.wrap(intro, width=width, initial_indent="     ",
                                 subsequent_indent="     "))
        for f in p.facts[:24]:
            out.extend(wrap.wrap(f))
        if len(p.facts) > 24:
            out.append(f"       ... {len(p.facts) - 24} more")
        for f in kvm_facts.get(p.id, []):
            out.extend(wrap.wrap(f))
    missing = a.missing()
    if missing:
        out.append("")
        out.append("  Not seen in this trace: " + ", ".join(PHASE_TITLES[m] for m in missing))
    out.append("")
    if a.negotiated:
        out.append(f"  Negotiated features {a.negotiated_hex or ''}:")
        out.extend(textwrap.wrap(" ".join(a.negotiated), width=width, initial_indent="     ",
                                 subsequent_indent="     "))
    if a.queues:
        out.append("")
        out.append("  Queues")
        hdr = (f"     {'q':>3} {'role':<5} {'size':>5} {'kicks':>7} {'chains':>7} {'descs':>7} "
               f"{'used':>7} {'irqs':>7} {'supp':>6} {'frames':>7} {'bytes':>10}")
        out.append(hdr)
        for q in sorted(a.queues):
            s = a.queues[q]
            if q < 0:
                continue
            out.append(f"     {q:>3} {s.role:<5} {s.size if s.size is not None else '-':>5} "
                       f"{s.kicks:>7} {s.chains:>7} {s.descs:>7} {s.used:>7} {s.irqs:>7} "
                       f"{s.suppressed:>6} {s.frames:>7} {s.bytes:>10}")
    out.append("")
    out.append(f"  Frames: {a.frames_tx} out ({a.bytes_tx} bytes), {a.frames_rx} in "
               f"({a.bytes_rx} bytes)")
    if a.counts:
        notif = {k: v for k, v in a.counts.items() if k.split(".")[0] in ("kick", "irq")}
        if notif:
            out.append("  Notification totals (untrimmed): " +
                       ", ".join(f"{k} {v}" for k, v in sorted(notif.items())))
    return "\n".join(out) + "\n"
