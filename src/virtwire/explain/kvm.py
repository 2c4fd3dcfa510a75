"""``virtwire explain`` for ``virtwire kvm`` traces: each phase tied to the exits that carried it.

A ``virtwire kvm --trace`` file holds, beside the device's own events (``pci``, ``status``,
``queue``, ``kick``, ``irq``, ``frame``...), one ``kvm.exit`` event per ``KVM_EXIT_IO`` /
``KVM_EXIT_MMIO`` (port or address, size, data, the register it hit). ``exit_facts`` adds to each
phase of the analysis how many exits of which kind carried it, with the first one as an example,
and follows the first transmit and receive from the guest's instruction to the network:
"guest wrote 0x1 to notify.q1 -> KVM_EXIT_MMIO at 0xe0003004 -> virtio-net TX queue 1 -> TAP".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["exit_facts", "exit_text"]


def exit_text(e: dict[str, Any]) -> str:
    """One exit as a phrase: "guest wrote 0x7 to common_cfg.device_status (KVM_EXIT_MMIO at
    0xe0000014, 1 byte)"."""
    where = f"port {e['port']:#x}" if "port" in e else f"{e.get('addr', 0):#x}"
    data = e.get("data")
    val = f"{data:#x}" if isinstance(data, int) else str(data)
    size = e.get("size", "?")
    unit = "byte" if size == 1 else "bytes"
    reg = e.get("reg", "-")
    if e.get("dir") == "out":
        what = f"guest wrote {val} to {reg}"
    else:
        what = f"guest read {reg} = {val}"
    return f"{what} ({e.get('exit', 'KVM_EXIT_?')} at {where}, {size} {unit})"


def _first(events: list[dict[str, Any]], start: int, pred: Any) -> tuple[int, dict] | None:
    for i in range(max(start, 0), len(events)):
        if pred(events[i]):
            return i, events[i]
    return None


def exit_facts(a: Any) -> dict[str, list[str]]:
    """{phase id: [fact, ...]} for the ``kvm.exit`` events of ``a`` (empty without any)."""
    evs: list[dict[str, Any]] = a.events
    if not any(e.get("cat") == "kvm" for e in evs):
        return {}
    out: dict[str, list[str]] = {}
    for p in a.phases:
        lo, hi = _back_over_writes(evs, p.first), _back_over_writes(evs, p.last)
        exits = [e for e in evs[lo:hi] if e.get("cat") == "kvm" and e.get("ev") == "exit"]
        if not exits:
            continue
        kinds = Counter(e.get("exit", "?") for e in exits)
        regs = Counter(str(e.get("reg", "-")).split(" ")[0] for e in exits)
        top = ", ".join(f"{n} {r}" for r, n in regs.most_common(5))
        out.setdefault(p.id, []).append(
            f"carried by {len(exits)} vCPU exits ("
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"): {top}")
        out[p.id].append("first: " + exit_text(exits[0]))
    _tx_path(evs, out)
    _rx_path(evs, out)
    return out


def _back_over_writes(evs: list[dict[str, Any]], i: int) -> int:
    """A write's exit is traced before the device events it causes: the run of write exits
    just before index ``i`` belongs with what follows ``i``."""
    while i > 0 and evs[i - 1].get("cat") == "kvm" and evs[i - 1].get("dir") == "out":
        i -= 1
    return i


def _is_exit(e: dict[str, Any], reg_prefix: str) -> bool:
    return e.get("cat") == "kvm" and e.get("ev") == "exit" and \
        str(e.get("reg", "")).startswith(reg_prefix)


def _tx_path(evs: list[dict[str, Any]], out: dict[str, list[str]]) -> None:
    for reg in ("notify.q1", "legacy.QUEUE_NOTIFY"):
        hit = _first(evs, 0, lambda e, r=reg: _is_exit(e, r) and (
            r.startswith("notify") or e.get("data") == 1))
        if hit is None:
            continue
        i, e = hit
        frame = _first(evs, i, lambda x: x.get("cat") == "frame" and x.get("dir") == "tx")
        tail = f" -> TAP/backend: {frame[1].get('summary', '')}" if frame else ""
        out.setdefault("first_tx", []).append(
            f"{exit_text(e)} -> virtio-net TX queue 1 (kick, deferred to the device thread "
            f"like an ioeventfd){tail}")
        return


def _rx_path(evs: list[dict[str, Any]], out: dict[str, list[str]]) -> None:
    rx = _first(evs, 0, lambda x: x.get("cat") == "frame" and x.get("dir") == "rx")
    if rx is None:
        return
    i, frame = rx
    irq = _first(evs, i, lambda x: x.get("cat") == "irq" and x.get("ev") == "irq")
    isr = _first(evs, irq[0] if irq else i,
                 lambda x: _is_exit(x, "isr") or _is_exit(x, "legacy.ISR"))
    facts = [f"network -> device: {frame.get('summary', '')}"]
    if irq is not None:
        facts.append("device raised INTx (KVM_IRQ_LINE on the in-kernel PIC/IOAPIC)")
    if isr is not None:
        facts.append(exit_text(isr[1]) + " -> the line is lowered before the read returns")
    out.setdefault("first_rx", []).append(" -> ".join(facts))
