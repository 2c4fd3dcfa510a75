"""A real guest on virtwire's whole virtio-net PCI device (QEMU's PCI proxy), traced.

The PCI proxy sidecar runs in this process (``--net pci``), so ``trace.start`` here sees every
config-space and BAR access the guest (and its firmware) makes. After booting and pinging the TAP
in a namespace of our own, the trace must hold every phase in order (discovery, BAR set-up,
negotiation, queue set-up, first transmit, first receive, steady state); the features it says were
negotiated must be exactly what the guest's virtio driver reports; ``virtwire explain`` must
narrate it; tshark must read the pcap's echo requests (outbound) and replies (inbound).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from virtwire import cli, trace
from virtwire.explain import analyze, load
from virtwire.guest.qemu import GuestVM
from virtwire.net.frame import decode
from virtwire.netns import netns_with_tap
from virtwire.virtio import spec

pytestmark = pytest.mark.system


def _guest_features(vm: GuestVM) -> int:
    out = vm.run("cat /sys/class/net/eth0/device/features", timeout=20).output
    bits = re.search(r"[01]{32,}", out)
    assert bits, out
    return sum(1 << i for i, c in enumerate(bits.group(0)) if c == "1")


def test_pci_proxy_guest_trace_tells_every_phase(tmp_path: Path, guest_image, capsys) -> None:
    tpath, ppath = tmp_path / "pci.jsonl", tmp_path / "pci.pcapng"
    trace.start(tpath, pcap=ppath, decode=decode)
    try:
        with netns_with_tap("vwt", addr="10.74.0.1/24") as (ns, tap):
            with GuestVM([f"pci,backend=tap,ifname={tap}"], ip="10.74.0.2/24", netns=ns.name,
                         image=guest_image, name=f"vwt{os.getpid() % 10000}") as vm:
                vm.wait_ready(120)
                out = vm.run("ping -c 5 -i 0.3 -W 2 10.74.0.1", timeout=60).output
                assert "5 packets received" in out, out
                feats = _guest_features(vm)
    finally:
        trace.stop()

    events, sources = load([tpath])
    a = analyze(events, sources)
    assert a.transport == "pci-proxy"
    assert a.in_order(), [(p.id, round(p.start, 3)) for p in a.phases]
    # The guest negotiated with our device directly: the same bits, all of them.
    assert int(a.negotiated_hex, 16) == feats, (a.negotiated, spec.feature_names(feats))
    disc = " ".join(a.phase("discovery").facts)
    assert "vendor_id 0x1af4" in disc and "virtio-net, modern" in disc
    bars = a.phase("bars").facts
    assert any(f.startswith("BAR4 placed at 0x") for f in bars), bars
    caps = [f for p in a.phases for f in p.facts if f.startswith("capabilities read")]
    assert caps and "common_cfg" in caps[0] and "notify_cfg" in caps[0]
    assert [s.role for _, s in sorted(a.queues.items())][:2] == ["rx0", "tx0"]
    assert a.steady["kicks"] > 0 and a.steady["irqs"] > 0
    assert any(e.get("cat") == "irq" and e.get("kind") == "intx" for e in a.events)

    html = tmp_path / "pci.html"
    assert cli.main(["explain", str(tpath), "--html", str(html)]) == 0
    text = capsys.readouterr().out
    (tmp_path / "narrative.txt").write_text(text)
    pos = [text.index(t) for t in ("Discovery", "BAR set-up", "Feature negotiation",
                                   "Queue set-up", "Steady state")]
    assert pos == sorted(pos)
    assert html.stat().st_size > 10_000

    res = subprocess.run(["tshark", "-r", str(ppath), "-Y", "icmp", "-T", "fields", "-e",
                          "frame.packet_flags_direction", "-e", "icmp.type"],
                         capture_output=True, text=True, timeout=60)
    rows = [r.split("\t") for r in res.stdout.splitlines() if r.strip()]
    assert sum(1 for d, t in rows if t == "8" and int(d, 16) == 2) >= 5  # requests: outbound
    assert sum(1 for d, t in rows if t == "0" and int(d, 16) == 1) >= 5  # replies: inbound
