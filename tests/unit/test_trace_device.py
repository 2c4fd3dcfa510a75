"""Tracing through the real device code: virtwire's PCI driver drives our virtio-pci virtio-net
device over an in-process bus (``explain.live``, as QEMU's proxy would forward a guest's
accesses), and the trace tells every phase in order, with the features really negotiated."""

from __future__ import annotations

import io
import json

import pytest

from virtwire import cli, trace
from virtwire.backends.memory import MemoryBackend
from virtwire.explain import PHASES, analyze, narrate
from virtwire.explain.html import render_html
from virtwire.explain.live import run_pci_session
from virtwire.net.device import VirtioNet
from virtwire.net.frame import decode
from virtwire.pci.device import VirtioPciDevice
from virtwire.virtio import spec
from virtwire.virtio.traced_queue import TracedQueue


@pytest.fixture(scope="module")
def session():
    buf = io.StringIO()
    trace.start(out=buf, decode=decode)
    try:
        res = run_pci_session(pings=3)
    finally:
        trace.stop()
    return [json.loads(x) for x in buf.getvalue().splitlines()], res


def test_every_phase_in_order_with_the_real_features(session) -> None:
    events, res = session
    pci, feats = res["device"], res["features"]
    a = analyze(events)
    assert [p.id for p in a.phases] == list(PHASES), [p.id for p in a.phases]
    assert a.in_order()
    assert int(a.negotiated_hex, 16) == feats == pci.device.negotiated
    assert a.negotiated == spec.feature_names(feats)
    assert a.offered == spec.feature_names(pci.device.offered_features)
    disc = a.phase("discovery").facts
    assert any("vendor_id 0x1af4" in f and "device_id 0x1041" in f for f in disc)
    assert "a virtio device (virtio-net, modern)" in disc
    caps = [f for p in a.phases[:2] for f in p.facts if f.startswith("capabilities read")]
    assert caps == ["capabilities read: common_cfg, notify_cfg, isr_cfg, device_cfg, pci_cfg"]
    assert f"BAR4 placed at {res['bar4']:#x} (16 KiB, mem32)" in a.phase("bars").facts
    assert [q.role for _, q in sorted(a.queues.items())] == ["rx0", "tx0"]
    assert any("ARP who-has 10.9.0.1 tell 10.9.0.2" in f for f in a.phase("first_tx").facts)
    assert any("ARP 10.9.0.1 is-at" in f for f in a.phase("first_rx").facts)
    assert a.steady["frames_tx"] == 3 and a.steady["frames_rx"] == 3
    assert a.steady["kicks"] >= 3 and a.steady["irqs"] >= 3
    assert "7. Steady state" in narrate(a)
    assert "<svg" in render_html(a)


def test_event_details(session) -> None:
    events, res = session
    pci, feats = res["device"], res["features"]
    by: dict = {}
    for e in events:
        by.setdefault((e["cat"], e["ev"]), []).append(e)
    regs = {e["reg"] for e in by[("pci", "bar_write")]}
    assert {"common_cfg.device_status", "common_cfg.queue_desc_lo", "notify.q1"} <= regs
    assert [e["new_names"] for e in by[("status", "set")]][-1] == [
        "ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"]
    assert by[("feature", "negotiated")][-1]["features"] == hex(feats)
    setups = {e["q"]: e for e in by[("queue", "setup")]}
    assert setups[1]["desc"] == pci.device.queue_config[1].desc and setups[1]["size"] > 0
    tx = [e for e in by[("frame", "frame")] if e["dir"] == "tx"]
    assert [e["proto"].get("icmp", {}).get("seq") for e in tx] == [None, 1, 2, 3]
    chains = [e for e in by[("chain", "chain")] if e["q"] == 1]
    assert chains[0]["descs"][0][1] == 12 + 42 and chains[0]["rlen"] == 54
    rx_used = [e for e in by[("used", "used")] if e["q"] == 0]
    assert rx_used[0]["len"] == 12 + 42
    assert all(e["kind"] == "intx" for e in by[("irq", "irq")])
    assert len(res["sent"]) == 4


def test_cli_live(tmp_path, capsys) -> None:
    saved = tmp_path / "live.jsonl"
    assert cli.main(["explain", "--live", "--save", str(saved), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["in_order"] is True and j["frames"] == {"tx": 4, "rx": 4, "bytes_tx": 336,
                                                     "bytes_rx": 336}
    assert saved.stat().st_size > 10_000 and (tmp_path / "live.jsonl.pcapng").exists()


def test_off_means_no_wrapping_and_no_events() -> None:
    trace.stop()
    res = run_pci_session(pings=1)
    pci = res["device"]
    assert all(not isinstance(q, TracedQueue) for q in pci.device.queues if q is not None)
    assert isinstance(pci, VirtioPciDevice) and isinstance(pci.device, VirtioNet)
    assert isinstance(pci.device.pairs[0].backend, MemoryBackend)


def test_legacy_interface_tells_the_same_story() -> None:
    """A transitional device driven through its legacy I/O BAR (§4.1.4.8): features negotiated
    at DRIVER_OK (no FEATURES_OK), queues placed by page frame number, every phase in order."""
    buf = io.StringIO()
    trace.start(out=buf, decode=decode)
    try:
        res = run_pci_session(pings=2, legacy=True)
    finally:
        trace.stop()
    events = [json.loads(x) for x in buf.getvalue().splitlines()]
    a = analyze(events)
    assert a.in_order(), [p.id for p in a.phases]
    assert int(a.negotiated_hex, 16) == res["features"]
    assert not res["features"] >> spec.VIRTIO_F_VERSION_1 & 1
    assert any("virtio-net, transitional" in f for f in a.phase("discovery").facts)
    assert any(f.startswith("BAR0 placed at 0xc000") for f in a.phase("bars").facts)
    regs = {e.get("reg") for e in events if e["cat"] == "pci" and e["ev"] == "bar_write"}
    assert {"legacy.GUEST_FEATURES", "legacy.QUEUE_PFN", "legacy.STATUS"} <= regs
