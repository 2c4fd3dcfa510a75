"""``virtwire compare --only`` on two rows: an emulated NIC of ours and QEMU's e1000.

Runs the real command (QEMU TCG, TAPs in private namespaces, iperf3 both ways, the trap counters)
with short runs, checks the JSON, and renders the HTML report in headless Chromium; the
screenshot is kept in the test's tmp dir.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_compare_only_two_rows_json_and_html(tmp_path):
    page = tmp_path / "compare.html"
    proc = subprocess.run([sys.executable, "-m", "virtwire", "compare", "--only",
                           "virtwire-rtl8139,qemu-e1000", "--seconds", "2", "--json",
                           "--html", str(page)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/2] virtwire-rtl8139: booting" in proc.stderr  # progress on stderr
    assert "[2/2] qemu-e1000: done" in proc.stderr
    rows = {r["row"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"virtwire-rtl8139", "qemu-e1000"}
    for r in rows.values():
        assert r["error"] is None, r
        assert r["ping_received"] == 100
        assert r["tx_mbps"] > 0 and r["rx_mbps"] > 0 and r["rtt_ms"] > 0
        assert r["count_tx"]["packets"] > 100 and r["count_rx"]["packets"] > 100
        assert r["traps_per_pkt_tx"] > 0 and r["irqs_per_pkt_tx"] > 0
    rtl, e1000 = rows["virtwire-rtl8139"], rows["qemu-e1000"]
    assert rtl["driver"] == "8139too" and e1000["driver"] == "e1000"
    # the classic RTL8139 touches TSD per frame; its trap count is its own, by register name
    acc = rtl["device_accesses"]
    assert sum(acc.get(f"TSD{i}", 0) for i in range(4)) > 0 and acc.get("ISR", 0) > 0
    assert e1000["count_tx"]["regions"].get("e1000-mmio", 0) > 0
    assert rtl["traps_per_pkt_tx"] > e1000["traps_per_pkt_tx"]
    html = page.read_text()
    assert html.count("<svg") == 5 and "virtwire rtl8139" in html
    assert CHROMIUM, "chromium is not installed"
    shot = tmp_path / "compare.png"
    subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,1800", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
