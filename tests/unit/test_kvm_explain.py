"""explain/kvm.py: phases of a virtwire kvm trace tied to the vCPU exits that carried them."""

from __future__ import annotations

from virtwire.explain import analyze, narrate
from virtwire.explain.kvm import exit_facts, exit_text


def _ev(t: float, cat: str, ev: str, **kw: object) -> dict:
    return {"t": t, "cat": cat, "ev": ev, **kw}


def _trace() -> list[dict]:
    io = "KVM_EXIT_IO"
    mm = "KVM_EXIT_MMIO"
    return [
        _ev(0.0, "host", "start", kind="kvm"),
        _ev(0.1, "kvm", "exit", exit=io, dir="out", port=0xCF8, size=4, data=0x80001800,
            reg="pci.config_address"),
        _ev(0.1, "pci", "cfg_read", off=0, size=4, val=0x10411AF4, reg="vendor_id|device_id"),
        _ev(0.1, "kvm", "exit", exit=io, dir="in", port=0xCFC, size=4, data=0x10411AF4,
            reg="pci.config_data 03.0:0x00"),
        _ev(0.2, "kvm", "exit", exit=mm, dir="out", addr=0xE0003004, size=2, data=1,
            reg="notify.q1"),
        _ev(0.2, "kick", "kick", q=1),
        _ev(0.2, "chain", "chain", q=1, head=0, descs=[[0x500000, 54, 0]], rlen=54, wlen=0),
        _ev(0.2, "frame", "frame", dir="tx", len=42, q=1, summary="ARP reply", proto={}),
        _ev(0.3, "frame", "frame", dir="rx", len=42, q=0, summary="ARP request", proto={}),
        _ev(0.3, "irq", "irq", q=0, kind="intx", level=1),
        _ev(0.3, "kvm", "exit", exit=mm, dir="in", addr=0xE0001000, size=1, data=1, reg="isr"),
    ]


def test_exit_text() -> None:
    e = _trace()[4]
    assert exit_text(e) == "guest wrote 0x1 to notify.q1 (KVM_EXIT_MMIO at 0xe0003004, 2 bytes)"


def test_phases_are_tied_to_exits() -> None:
    a = analyze(_trace())
    facts = exit_facts(a)
    assert any("KVM_EXIT_IO" in f and "pci.config_address" in f
               for f in facts.get("discovery", []))
    tx = " ".join(facts["first_tx"])
    assert "notify.q1" in tx and "TAP/backend: ARP reply" in tx
    rx = " ".join(facts["first_rx"])
    assert "KVM_IRQ_LINE" in rx and "guest read isr = 0x1" in rx
    assert "notify.q1" in narrate(a)


def test_no_kvm_events_no_facts() -> None:
    a = analyze([e for e in _trace() if e["cat"] != "kvm"])
    assert exit_facts(a) == {}
