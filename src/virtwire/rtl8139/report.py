"""Rendering of a ``virtwire compare`` run: a terminal table, JSON, and an HTML page with charts.

The input is a list of row results (plain dicts, as ``rtl8139.compare`` produces and ``--json``
prints). Every metric may be ``None`` (not measured, or the row failed: then ``error`` says why);
renderers show a dash for it. The HTML page is self-contained: inline CSS and inline SVG bar
charts, no scripts, no network, so it opens as a file in any browser. Bars use a log scale when a
metric spans more than two orders of magnitude across rows (emulated and paravirtual NICs differ
by that much), and say so in the chart's title.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["COLUMNS", "CHARTS", "format_table", "to_json", "to_html", "bar_chart_svg"]

# (key, header, format) for the terminal table and the HTML table
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("tx_mbps", "TX Mbit/s", "{:.1f}"),
    ("rx_mbps", "RX Mbit/s", "{:.1f}"),
    ("rtt_ms", "RTT ms", "{:.2f}"),
    ("udp_pps", "UDP pps", "{:.0f}"),
    ("udp_loss_pct", "UDP loss %", "{:.1f}"),
    ("traps_per_pkt_tx", "traps/pkt TX", "{:.2f}"),
    ("traps_per_pkt_rx", "traps/pkt RX", "{:.2f}"),
    ("irqs_per_pkt_tx", "irq/pkt TX", "{:.3f}"),
    ("irqs_per_pkt_rx", "irq/pkt RX", "{:.3f}"),
    ("cpu_s_per_gb", "CPU s/GB", "{:.1f}"),
)

# (title, unit, [(key, series label)]) for the HTML charts
CHARTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("Throughput (iperf3 TCP)", "Mbit/s", (("tx_mbps", "guest to host"),
                                            ("rx_mbps", "host to guest"))),
    ("Round-trip time (100 pings)", "ms", (("rtt_ms", "average"),)),
    ("Register accesses (traps) per packet", "accesses",
     (("traps_per_pkt_tx", "guest to host"), ("traps_per_pkt_rx", "host to guest"))),
    ("Interrupts per packet", "interrupts", (("irqs_per_pkt_tx", "guest to host"),
                                             ("irqs_per_pkt_rx", "host to guest"))),
    ("Host CPU per gigabyte moved", "CPU s/GB", (("cpu_s_per_gb", "QEMU + virtwire"),)),
)

_SERIES_COLOURS = ("#3465a4", "#f57900", "#4e9a06")


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one line per row (failed rows show their error after the name)."""
    head = ["row", *(h for _, h, _ in COLUMNS)]
    body = []
    for r in rows:
        name = str(r.get("row", "?"))
        if r.get("error"):
            body.append([name, *("-" for _ in COLUMNS)])
        else:
            body.append([name, *(_fmt(r.get(k), f) for k, _, f in COLUMNS)])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                       for i, h in enumerate(head))]
    lines.append("  ".join("-" * w for w in widths))
    for r, cells in zip(rows, body):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(cells)))
        if r.get("error"):
            lines.append(f"    error: {r['error']}")
    return "\n".join(lines)


def to_json(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    return json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=2, sort_keys=True)


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    out: list[float | None] = []
    for r in rows:
        v = r.get(key)
        out.append(float(v) if isinstance(v, int | float) and not r.get("error")
                   and math.isfinite(v) else None)
    return out


def bar_chart_svg(title: str, unit: str, labels: Sequence[str],
                  series: Sequence[tuple[str, Sequence[float | None]]], width: int = 720) -> str:
    """A horizontal grouped bar chart as an inline ``<svg>`` element (log scale when the values
    span more than 100x). ``series``: (name, one value or None per label)."""
    vals = [v for _, vs in series for v in vs if v is not None and v > 0]
    log = bool(vals) and max(vals) / min(vals) > 100
    top = max(vals) if vals else 1.0
    low = min(vals) if vals else 1.0
    # room for the longest label (about 7 px per character at 12 px sans-serif)
    label_w = min(360, max(120, 16 + 7 * max((len(x) for x in labels), default=0)))
    right_pad, bar_h, gap = 90, 14, 10
    width = max(width, label_w + right_pad + 240)
    plot_w = width - label_w - right_pad
    group_h = bar_h * len(series) + gap
    legend_h = 22
    height = 34 + legend_h + group_h * len(labels) + 10

    def scale(v: float) -> float:
        if v <= 0:
            return 0.0
        if log:
            lo = math.log10(low) - 0.3
            return max(2.0, plot_w * (math.log10(v) - lo) / (math.log10(top) - lo))
        return plot_w * v / top

    esc = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{esc(title)}" font-family="sans-serif" font-size="12">',
             f'<text x="4" y="18" font-size="14" font-weight="bold">{esc(title)} ({esc(unit)}'
             f'{", log scale" if log else ""})</text>']
    for i, (name, _) in enumerate(series):
        x = label_w + i * 160
        colour = _SERIES_COLOURS[i % len(_SERIES_COLOURS)]
        parts.append(f'<rect x="{x}" y="28" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{x + 16}" y="38">{esc(name)}</text>')
    y0 = 34 + legend_h
    for li, label in enumerate(labels):
        gy = y0 + li * group_h
        parts.append(f'<text x="{label_w - 6}" y="{gy + group_h / 2}" text-anchor="end" '
                     f'dominant-baseline="middle">{esc(label)}</text>')
        for si, (_, vs) in enumerate(series):
            v = vs[li]
            y = gy + si * bar_h
            colour = _SERIES_COLOURS[si % len(_SERIES_COLOURS)]
            if v is None:
                parts.append(f'<text x="{label_w + 4}" y="{y + bar_h - 3}" fill="#888">'
                             'not measured</text>')
                continue
            w = scale(v)
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                         f'fill="{colour}"><title>{esc(label)}: {v:.4g} {esc(unit)}</title>'
                         '</rect>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 3}">{v:.4g}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#eee}
.err{color:#a40000}figure{margin:1.5em 0}p.note{color:#555}"""


def to_html(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The whole page: heading, parameters, the table and one chart per metric group."""
    meta = meta or {}
    esc = html.escape
    labels = [str(r.get("label") or r.get("row")) for r in rows]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>virtwire compare</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Emulated versus paravirtual NICs: virtwire compare</h1>"]
    if meta:
        out.append("<p class=\"note\">" + "; ".join(
            f"{esc(str(k))}: {esc(str(v))}" for k, v in sorted(meta.items())) + "</p>")
    out.append("<table><tr><th>row</th>"
               + "".join(f"<th>{esc(h)}</th>" for _, h, _ in COLUMNS) + "</tr>")
    for r, label in zip(rows, labels):
        if r.get("error"):
            out.append(f"<tr><td>{esc(label)}</td><td class=\"err\" colspan=\"{len(COLUMNS)}\">"
                       f"{esc(str(r['error']))}</td></tr>")
            continue
        out.append(f"<tr><td>{esc(label)}</td>" + "".join(
            f"<td class=\"n\">{esc(_fmt(r.get(k), f))}</td>" for k, _, f in COLUMNS) + "</tr>")
    out.append("</table>")
    for title, unit, keys in CHARTS:
        series = [(name, _values(rows, k)) for k, name in keys]
        out.append("<figure>" + bar_chart_svg(title, unit, labels, series) + "</figure>")
    out.append("<p class=\"note\">Traps are register (BAR) accesses: counted by virtwire's own "
               "devices, from QEMU's memory_region_ops trace events for QEMU's devices (virtio "
               "with ioeventfd=off so kicks are seen), plus the back end's kick count for "
               "vhost-user. Packets are wire frames (a TSO/GSO super-frame counts as bytes / "
               "1514). Interrupts are the guest's /proc/interrupts for the NIC.</p>")
    out.append("</body></html>")
    return "\n".join(out)
