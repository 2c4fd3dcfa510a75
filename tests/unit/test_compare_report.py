"""``virtwire compare``: parsing what the guest prints, and the table / JSON / HTML rendering."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.rtl8139 import report
from virtwire.rtl8139.compare import (
    ROWS,
    count_trace,
    parse_interrupts,
    parse_iperf,
    parse_only,
    parse_ping,
)

ROWS_OUT = [
    {"row": "qemu-e1000", "label": "QEMU e1000", "tx_mbps": 812.5, "rx_mbps": 640.0,
     "rtt_ms": 0.61, "udp_pps": 20000.0, "udp_loss_pct": 0.0, "traps_per_pkt_tx": 1.5,
     "traps_per_pkt_rx": 0.6, "irqs_per_pkt_tx": 0.12, "irqs_per_pkt_rx": 0.08,
     "cpu_s_per_gb": 3.2, "error": None},
    {"row": "virtwire-rtl8139", "label": "virtwire rtl8139 <8139too>", "tx_mbps": 2.4,
     "rx_mbps": None, "rtt_ms": 2.9, "traps_per_pkt_tx": 13.1, "traps_per_pkt_rx": 16.0,
     "irqs_per_pkt_tx": 1.0, "irqs_per_pkt_rx": 0.9, "cpu_s_per_gb": 900.0, "error": None},
    {"row": "virtwire-vhost-user", "label": "virtwire vhost-user", "error": "GuestTimeout: x"},
]


def test_table_has_every_row_dashes_for_missing_and_the_error():
    text = report.format_table(ROWS_OUT)
    lines = text.splitlines()
    assert lines[0].split()[0] == "row" and "traps/pkt" in lines[0]
    e1000 = next(line for line in lines if line.startswith("qemu-e1000"))
    assert "812.5" in e1000 and "1.50" in e1000 and "0.120" in e1000
    rtl = next(line for line in lines if line.startswith("virtwire-rtl8139"))
    assert "13.10" in rtl and " - " in rtl  # rx_mbps not measured
    assert "error: GuestTimeout: x" in text
    assert len({len(line) for line in lines[:4]}) == 1  # aligned columns


def test_json_round_trips():
    data = json.loads(report.to_json(ROWS_OUT, {"seconds": 5}))
    assert data["rows"] == ROWS_OUT and data["meta"] == {"seconds": 5}


def test_html_is_well_formed_with_one_svg_chart_per_metric_group():
    page = report.to_html(ROWS_OUT, {"seconds": 5})
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http://" not in \
        page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    root = ET.fromstring(page.split("\n", 1)[1].replace('<meta charset="utf-8">',
                                                         '<meta charset="utf-8"/>'))
    svgs = root.findall(".//{http://www.w3.org/2000/svg}svg")
    assert len(svgs) == len(report.CHARTS)
    # labels are escaped, every measured value has a bar, unmeasured ones say so
    assert "&lt;8139too&gt;" in page
    throughput = ET.tostring(svgs[0], encoding="unicode")
    assert throughput.count("<ns0:rect") + throughput.count("<rect") >= 3 + 2  # bars + legend
    assert "not measured" in throughput and "log scale" in throughput  # 2.4 vs 812.5


def test_bar_lengths_are_proportional_on_a_linear_scale():
    svg = report.bar_chart_svg("t", "u", ["a", "b"], [("s", [10.0, 20.0])], width=600)
    root = ET.fromstring(svg)
    bars = [float(r.get("width")) for r in root.iter("{http://www.w3.org/2000/svg}rect")
            if r.find("{http://www.w3.org/2000/svg}title") is not None]  # legend has none
    assert len(bars) == 2 and bars[1] == pytest.approx(2 * bars[0])
    assert "log scale" not in svg


def test_parsers():
    out = ("[  5]   0.00-5.00   sec  1.44 MBytes  2.41 Mbits/sec    0             sender\n"
           "[  5]   0.00-5.04   sec  1.37 MBytes  2.28 Mbits/sec                  receiver\n")
    assert parse_iperf(out) == {"seconds": 5.04, "mbps": 2.28}
    udp = ("[  5]   0.00-1.21   sec   977 KBytes  6.61 Mbits/sec  0.000 ms  0/1000 (0%)  sender\n"
           "[  5]   0.00-1.25   sec   967 KBytes  6.33 Mbits/sec  0.120 ms  10/1000 (1%)  "
           "receiver\n")
    assert parse_iperf(udp) == {"seconds": 1.25, "mbps": 6.33, "lost": 10.0, "total": 1000.0}
    assert parse_iperf("iperf3: error - unable to connect") is None
    assert parse_ping("100 packets transmitted, 99 packets received, 1% packet loss\n"
                      "round-trip min/avg/max = 1.374/3.302/40.230 ms") == (99, 3.302)
    irq = ("           CPU0\n  0:  41  IO-APIC   2-edge  timer\n"
           " 10:  2087   IO-APIC  10-fasteoi   eth0\n"
           " 24:  5  PCI-MSI 49152-edge  virtio0-input.0\n")
    assert parse_interrupts(irq) == 2092


def test_count_trace_filters_by_region_and_resumes(tmp_path):
    p = tmp_path / "t.log"
    line = "memory_region_ops_{} cpu 0 mr 0x55 addr 0x3e value 0x1 size 2 name '{}'\n"
    p.write_text(line.format("read", "rtl8139") + line.format("write", "rtl8139")
                 + line.format("write", "kvm-apic-msi"))
    n, off, names = count_trace(p, 0, ROWS["qemu-rtl8139"].regions)
    assert n == 2 and names == {"rtl8139": 2, "kvm-apic-msi": 1}
    with open(p, "a") as f:
        f.write(line.format("read", "rtl8139"))
    assert count_trace(p, off, r"^rtl8139$")[0] == 1


def test_only_and_cli_errors(capsys):
    assert parse_only(None) == list(ROWS)
    assert parse_only("qemu-e1000, virtwire-rtl8139,qemu-e1000") == ["qemu-e1000",
                                                                      "virtwire-rtl8139"]
    assert main(["compare", "--only", "nope"]) == 2
    assert "unknown row 'nope'" in capsys.readouterr().err
    assert main(["compare", "--seconds", "0"]) == 2
    assert main(["compare", "--html", "/nonexistent/dir/x.html"]) == 2
    assert main(["compare", "--list"]) == 0
    assert "virtwire-rtl8139" in capsys.readouterr().out
