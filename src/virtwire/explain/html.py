"""The self-contained HTML page of ``virtwire explain --html``.

Theory of operation
-------------------
One file, no external resources: inline CSS, inline SVG charts drawn here in Python, and a few
lines of inline JavaScript (category filters, expand/collapse). The sequence diagram is a list of
native ``<details>`` rows, one per message between four lanes (guest, VMM, virtwire device,
network; ``virtwire.trace.reader.flow``), so it expands down to the descriptor without any
script. Runs of the same message (a burst of config reads, of used pushes) fold into one row with
a count. Every value from the trace is escaped: a trace is data, and it may come from anywhere.
"""

from __future__ import annotations

import html
import json
from typing import Any

from virtwire.explain.model import DATA_CATS, PHASE_TITLES, Analysis, QueueStats, names
from virtwire.explain.narrative import INTRO, VHOST_INTRO
from virtwire.trace import CATEGORIES
from virtwire.trace.reader import LANES, flow

__all__ = ["render_html"]

MAX_ROWS = 2500  # rows of the sequence diagram outside steady state
MAX_STEADY_ROWS = 300
MAX_GROUP_ITEMS = 100
_LANE_TITLES = {"guest": "Guest driver", "vmm": "QEMU (VMM)", "device": "virtwire device",
                "net": "Network"}
_COLORS = {"kick": "#d9480f", "chain": "#1971c2", "used": "#2f9e44", "irq.irq": "#ae3ec9",
           "irq.suppressed": "#adb5bd", "frame": "#f08c00", "used.publish": "#96f2d7"}
_FLAG_NAMES = ((1, "NEXT"), (2, "WRITE"), (4, "INDIRECT"), (1 << 7, "AVAIL"), (1 << 15, "USED"))

_CSS = """
:root{--fg:#1d2127;--mut:#69707a;--bd:#dde1e6;--bg:#fff;--hi:#f4f6f8}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
  background:var(--bg);margin:0;padding:0 24px 48px}
header{padding:18px 0 6px;border-bottom:1px solid var(--bd)}
h1{font-size:22px;margin:0}h2{font-size:17px;margin:28px 0 8px}
.sub{color:var(--mut)}
nav a{margin-right:12px;color:#1971c2;text-decoration:none;font-size:13px}
ol.phases{padding-left:22px}ol.phases li{margin:8px 0}
.ph-t{font-weight:600}.ph-m{color:var(--mut);font-size:12px;margin-left:8px}
.ph-i{color:var(--mut);margin:2px 0}
ul.facts{margin:2px 0 0 0;padding-left:18px;font-family:ui-monospace,monospace;font-size:12.5px}
.chip{display:inline-block;border-radius:10px;padding:1px 8px;margin:2px;font-size:12px;
  font-family:ui-monospace,monospace;border:1px solid var(--bd)}
.chip.on{background:#d3f9d8;border-color:#8ce99a}.chip.off{color:var(--mut);
  text-decoration:line-through}
table.q{border-collapse:collapse;font-size:13px}
table.q td,table.q th{border-bottom:1px solid var(--bd);padding:3px 10px;text-align:right}
table.q th{background:var(--hi)}table.q td:nth-child(2){text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:16px;margin-top:12px}
.chart{border:1px solid var(--bd);border-radius:6px;padding:6px 8px}
.chart h3{font-size:13px;margin:0 0 4px}
.legend span{font-size:11px;margin-right:10px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:3px;vertical-align:-1px}
.controls{position:sticky;top:0;background:var(--bg);padding:6px 0;z-index:2;
  border-bottom:1px solid var(--bd)}
.controls label{margin-right:10px;font-size:12px;white-space:nowrap}
.controls button{font-size:12px;margin-right:6px}
.lanes{display:grid;grid-template-columns:80px 1fr;position:sticky;top:34px;z-index:1;
  background:var(--bg)}
.lanes .names{display:grid;grid-template-columns:repeat(4,1fr);text-align:center;
  font-weight:600;font-size:12.5px;border-bottom:2px solid var(--fg)}
#seq .row summary{display:grid;grid-template-columns:80px 1fr;cursor:pointer;list-style:none;
  min-height:22px}
#seq .row summary::-webkit-details-marker{display:none}
#seq .row summary:hover{background:var(--hi)}
.t{font:11.5px ui-monospace,monospace;color:var(--mut);padding-top:3px}
.track{position:relative;height:22px;background:linear-gradient(90deg,transparent calc(12.5% - 1px),
  var(--bd) calc(12.5% - 1px),var(--bd) 12.5%,transparent 12.5%,transparent calc(37.5% - 1px),
  var(--bd) calc(37.5% - 1px),var(--bd) 37.5%,transparent 37.5%,transparent calc(62.5% - 1px),
  var(--bd) calc(62.5% - 1px),var(--bd) 62.5%,transparent 62.5%,transparent calc(87.5% - 1px),
  var(--bd) calc(87.5% - 1px),var(--bd) 87.5%,transparent 87.5%)}
.arrow{position:absolute;top:13px;height:0;border-top:2px solid var(--c,#495057)}
.arrow.r::after,.arrow.l::after{content:"";position:absolute;top:-6px;border:5px solid transparent}
.arrow.r::after{right:-2px;border-left:7px solid var(--c,#495057)}
.arrow.l::after{left:-2px;border-right:7px solid var(--c,#495057)}
.arrow.self{width:22px!important;height:8px;top:7px;border:2px solid var(--c,#495057);
  border-left:none;border-radius:0 6px 6px 0}
.lbl{position:absolute;bottom:1px;left:4px;right:4px;white-space:nowrap;overflow:hidden;
  text-overflow:ellipsis;font-size:11.5px;font-family:ui-monospace,monospace;text-align:center}
.arrow.self .lbl{left:26px;right:auto;text-align:left;bottom:-4px;overflow:visible}
.n{background:#495057;color:#fff;border-radius:8px;padding:0 5px;margin-right:4px;
  font-size:10.5px}
.body{margin:2px 0 8px 80px;padding:6px 10px;background:var(--hi);border-radius:4px;
  font:12px ui-monospace,monospace;overflow-x:auto}
.body table{border-collapse:collapse}.body td,.body th{padding:1px 8px;text-align:left;
  vertical-align:top}
.body details{margin-left:0}.body summary{cursor:pointer}
.phase-sep{margin:14px 0 4px 80px;padding:3px 8px;background:#e7f5ff;border-left:4px solid
  #1971c2;font-weight:600;font-size:13px}
.note{color:var(--mut);font-style:italic;margin:6px 0 6px 80px}
pre{margin:0;white-space:pre-wrap}
"""

_JS = """
(function () {
  "use strict";
  var seq = document.getElementById("seq");
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input[data-cat]"));
  function apply() {
    var off = {};
    boxes.forEach(function (b) { if (!b.checked) { off[b.getAttribute("data-cat")] = 1; } });
    var rows = seq.querySelectorAll(".row");
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var hide = off[rows[i].getAttribute("data-cat")] === 1;
      rows[i].hidden = hide;
      if (!hide) { shown++; }
    }
    document.getElementById("shown").textContent = shown + " of " + rows.length + " rows";
  }
  boxes.forEach(function (b) { b.addEventListener("change", apply); });
  function setAll(open) {
    var ds = seq.querySelectorAll("details");
    for (var i = 0; i < ds.length; i++) { ds[i].open = open; }
  }
  document.getElementById("expand").addEventListener("click", function () { setAll(true); });
  document.getElementById("collapse").addEventListener("click", function () { setAll(false); });
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _hx(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _flags(f: Any) -> str:
    if not isinstance(f, int):
        return _e(f)
    names = [n for b, n in _FLAG_NAMES if f & b]
    return f"{f:#x}" + (f" ({'|'.join(names)})" if names else "")


def label(e: dict[str, Any]) -> str:
    """A short label for one event (plain text)."""
    cat, ev = e.get("cat"), e.get("ev")
    q = e.get("q")
    if cat == "pci":
        if ev in ("cfg_read", "bar_read"):
            return f"read {e.get('reg', _hx(e.get('off')))} = {_hx(e.get('val'))}"
        if ev in ("cfg_write", "bar_write"):
            return f"write {e.get('reg', _hx(e.get('off')))} := {_hx(e.get('val'))}"
        if ev == "bar_size":
            return f"BAR{e.get('bar')} size {_hx(e.get('size'))}"
        if ev == "bar_map":
            return f"BAR{e.get('bar')} at {_hx(e.get('addr'))}"
    if cat == "vhost":
        r = str(e.get("req", "?")).replace("VHOST_USER_", "")
        return f"{r}" if ev == "msg" else f"reply {r}"
    if cat == "feature":
        return f"features {ev} ({len(names(e.get('names')))})"
    if cat == "status":
        return "status := " + ("|".join(names(e.get("new_names"))) or "0 (reset)") \
            if ev == "set" else f"status {ev}"
    if cat == "queue":
        if ev == "setup":
            return f"queue {q} setup: {e.get('size')} entries"
        return f"queue {q} {ev}"
    if cat == "kick":
        return f"kick q{q}"
    if cat == "chain":
        d = e.get("descs")
        return (f"chain q{q} head {e.get('head')} ({len(d) if isinstance(d, list) else '?'} "
                f"desc, {e.get('rlen', 0)}R/{e.get('wlen', 0)}W)")
    if cat == "used":
        if ev == "publish":
            return f"used idx publish q{q} (+{e.get('n')})"
        return f"used q{q} id {e.get('id')} len {e.get('len')}"
    if cat == "irq":
        if ev == "suppressed":
            return f"irq q{q} suppressed"
        what = "config" if q == -1 else f"q{q}"
        vec = f" vec {e['vector']}" if "vector" in e else ""
        return f"irq {what} ({e.get('kind', '?')}{vec})"
    if cat == "config":
        return f"config change {e.get('field')}={e.get('val')}"
    if cat == "ctrl":
        return f"ctrl {e.get('class_name', e.get('class'))} {e.get('cmd_name', e.get('cmd'))}"
    if cat == "frame":
        return str(e.get("summary") or f"frame {e.get('len')} B")
    return f"{cat}.{ev}"


def _detail(e: dict[str, Any]) -> str:
    """The expanded body of one event: fields, and the descriptor table of a chain."""
    parts = []
    rows = []
    for k, v in e.items():
        if k in ("descs", "proto", "_src") or (k == "t"):
            continue
        if isinstance(v, (dict, list)):
            v = json.dumps(v, indent=1, default=str)
            rows.append(f"<tr><th>{_e(k)}</th><td><pre>{_e(v)}</pre></td></tr>")
        else:
            shown = _hx(v) if k in ("addr", "desc", "avail", "used", "val", "size") else v
            rows.append(f"<tr><th>{_e(k)}</th><td>{_e(shown)}</td></tr>")
    parts.append(f"<table>{''.join(rows)}</table>")
    descs = e.get("descs")
    if isinstance(descs, list) and descs:
        dr = []
        for i, d in enumerate(descs[:64]):
            if isinstance(d, list) and len(d) >= 3:
                dr.append(f"<tr><td>{i}</td><td>{_e(_hx(d[0]))}</td><td>{_e(d[1])}</td>"
                          f"<td>{_e(_flags(d[2]))}</td></tr>")
        parts.append("<table><tr><th>#</th><th>addr</th><th>len</th><th>flags</th></tr>"
                     f"{''.join(dr)}</table>")
    proto = e.get("proto")
    if isinstance(proto, dict):
        parts.append(f"<details><summary>decoded frame</summary><pre>"
                     f"{_e(json.dumps(proto, indent=1, default=str))}</pre></details>")
    return "".join(parts)


def _key(e: dict[str, Any]) -> tuple:
    return (e.get("cat"), e.get("ev"), e.get("q"), e.get("dir"), e.get("reg") if
            e.get("cat") == "pci" else None, e.get("_src"))


def _arrow(e: dict[str, Any], text: str, count: int) -> str:
    a, b = flow(e)
    ia = LANES.index(a) if a in LANES else 2
    ib = LANES.index(b) if b in LANES else 2
    cat = str(e.get("cat"))
    color = _COLORS.get(f"{cat}.{e.get('ev')}", _COLORS.get(cat, "#495057"))
    n = f'<span class="n">&times;{count}</span>' if count > 1 else ""
    if ia == ib:
        style = f"left:{12.5 + 25 * ia}%;--c:{color}"
        cls = "self"
    else:
        lo, hi = sorted((ia, ib))
        style = f"left:{12.5 + 25 * lo}%;width:{25 * (hi - lo)}%;--c:{color}"
        cls = "r" if ib > ia else "l"
    return (f'<span class="arrow {cls}" style="{style}"><span class="lbl">{n}{_e(text)}'
            f"</span></span>")


def _row(group: list[dict[str, Any]]) -> str:
    e = group[0]
    t = float(e.get("t", 0.0)) if isinstance(e.get("t"), (int, float)) else 0.0
    head = (f'<summary><span class="t">{t:.6f}</span><span class="track">'
            f"{_arrow(e, label(e), len(group))}</span></summary>")
    if len(group) == 1:
        body = _detail(e)
    else:
        items = []
        for x in group[:MAX_GROUP_ITEMS]:
            xt = float(x.get("t", 0.0)) if isinstance(x.get("t"), (int, float)) else 0.0
            items.append(f"<details><summary>{xt:.6f} {_e(label(x))}</summary>{_detail(x)}"
                         "</details>")
        if len(group) > MAX_GROUP_ITEMS:
            items.append(f"<div>... {len(group) - MAX_GROUP_ITEMS} more</div>")
        body = "".join(items)
    return (f'<details class="row" data-cat="{_e(e.get("cat"))}">{head}'
            f'<div class="body">{body}</div></details>')


def _sequence(a: Analysis) -> str:
    out: list[str] = []
    phase_at = {p.first: p for p in a.phases}
    steady = a.phase("steady")
    rows = 0
    i = 0
    evs = a.events
    truncated = 0
    while i < len(evs):
        if i in phase_at:
            p = phase_at[i]
            out.append(f'<div class="phase-sep" id="seq-{_e(p.id)}">{_e(p.title)} '
                       f'<span class="ph-m">t={p.start:.6f} s</span></div>')
        e = evs[i]
        if e.get("cat") == "trace":
            i += 1
            continue
        j = i + 1
        while j < len(evs) and j not in phase_at and _key(evs[j]) == _key(e):
            j += 1
        in_steady = steady is not None and i >= steady.first
        limit = MAX_STEADY_ROWS if in_steady else MAX_ROWS
        if (in_steady and rows_steady(out) >= limit) or (not in_steady and rows >= limit):
            nxt = min((k for k in phase_at if k > i), default=len(evs))
            truncated += nxt - i
            out.append(f'<div class="note">{nxt - i} more events in this phase are not drawn'
                       " (see the per-queue charts)</div>")
            i = nxt
            continue
        out.append(_row(evs[i:j]))
        if not in_steady:
            rows += 1
        i = j
    return "".join(out)


def rows_steady(out: list[str]) -> int:
    """Rows drawn since the steady-state separator."""
    n = 0
    for s in reversed(out):
        if s.startswith('<div class="phase-sep" id="seq-steady"'):
            return n
        if s.startswith('<details class="row"'):
            n += 1
    return n


def _chart(s: QueueStats, t0: float, t1: float, width: int = 520) -> str:
    """Events per time bin for one queue as an inline SVG: one strip per kind of event (kicks,
    chains, used, interrupts, suppressed, frames), bars scaled to that strip's busiest bin."""
    bins = 80
    span = max(t1 - t0, 1e-9)
    series: dict[str, list[int]] = {}
    for t, kind, w in s.times:
        b = min(bins - 1, max(0, int((t - t0) / span * bins)))
        series.setdefault(kind, [0] * bins)[b] += w
    kinds = [k for k in ("kick", "chain", "used.used", "irq.irq", "irq.suppressed", "frame")
             if k in series]
    label_w, strip, gap, axis = 118, 20, 4, 16
    iw = width - label_w - 8
    height = len(kinds) * (strip + gap) + axis + 4
    bw = iw / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="queue {s.q} events over time">']
    for r, k in enumerate(kinds):
        y = r * (strip + gap)
        vals = series[k]
        vmax = max(vals) or 1
        color = _COLORS.get(k, _COLORS.get(k.split(".")[0], "#495057"))
        name = {"used.used": "used", "irq.irq": "interrupts", "irq.suppressed": "suppressed",
                "kick": "kicks", "chain": "chains", "frame": "frames"}.get(k, k)
        parts.append(f'<rect x="{label_w}" y="{y}" width="{iw}" height="{strip}" '
                     'fill="#fafbfc" stroke="#eef0f2"/>')
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" font-size="11" text-anchor="end">'
                     f"{_e(name)} {sum(vals)}</text>")
        for b, v in enumerate(vals):
            if v:
                h = max(1.5, v / vmax * (strip - 2))
                parts.append(f'<rect x="{label_w + b * bw:.1f}" y="{y + strip - h:.1f}" '
                             f'width="{max(bw - 0.6, 0.8):.1f}" height="{h:.1f}" '
                             f'fill="{color}"><title>{_e(name)}: {v}</title></rect>')
    ya = len(kinds) * (strip + gap) + 11
    parts.append(f'<text x="{label_w}" y="{ya}" font-size="10">{t0:.3f} s</text>')
    parts.append(f'<text x="{label_w + iw}" y="{ya}" font-size="10" text-anchor="end">'
                 f"{t1:.3f} s</text>")
    parts.append("</svg>")
    return (f'<div class="chart"><h3>queue {s.q} ({_e(s.role)}) &mdash; events per '
            f'{span / bins * 1000:.2f} ms</h3>'
            f'{"".join(parts)}</div>')


_PHASE_COLORS = ("#e7f5ff", "#d0ebff", "#fff3bf", "#ffe8cc", "#d3f9d8", "#c3fae8", "#f3f0ff")


def _timeline(a: Analysis, width: int = 1000) -> str:
    """The phases as equal-width chevrons (durations differ by orders of magnitude), each
    labelled with its start and length and linked to its place in the sequence."""
    if not a.phases:
        return ""
    n = len(a.phases)
    w = width / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="46" role="img" '
             'aria-label="phases in order" class="timeline">']
    for i, p in enumerate(a.phases):
        x = i * w
        tip = 10
        pts = (f"{x:.1f},0 {x + w - tip:.1f},0 {x + w:.1f},23 {x + w - tip:.1f},46 {x:.1f},46 "
               + (f"{x + tip:.1f},23" if i else f"{x:.1f},23"))
        color = _PHASE_COLORS[i % len(_PHASE_COLORS)]
        parts.append(f'<a href="#seq-{_e(p.id)}"><polygon points="{pts}" fill="{color}" '
                     f'stroke="#fff" stroke-width="2"><title>{_e(p.title)}</title></polygon>'
                     f'<text x="{x + w / 2:.1f}" y="19" font-size="12" font-weight="600" '
                     f'text-anchor="middle">{_e(_short(a, p.id))}'
                     f'</text><text x="{x + w / 2:.1f}" y="36" font-size="10.5" '
                     f'text-anchor="middle" fill="#495057">t={p.start:.3f} s, '
                     f"{_dur(p.end - p.start)}</text></a>")
    parts.append("</svg>")
    return "".join(parts)


def _short(a: Analysis, pid: str) -> str:
    if a.transport == "vhost-user":
        return {"bars": "Device set-up", "queues": "Memory, queues"}.get(pid, PHASE_TITLES[pid])
    return PHASE_TITLES[pid]


def _dur(d: float) -> str:
    if d >= 1:
        return f"{d:.2f} s"
    if d >= 1e-3:
        return f"{d * 1e3:.1f} ms"
    return f"{d * 1e6:.0f} µs"


def _story_html(a: Analysis, h: list[str]) -> None:
    h.append('<h2 id="story">What happened</h2>')
    h.append(_timeline(a))
    h.append('<ol class="phases">')
    for p in a.phases:
        intro = (VHOST_INTRO.get(p.id) if a.transport == "vhost-user" else None) or \
            INTRO.get(p.id, "")
        facts = "".join(f"<li>{_e(f)}</li>" for f in p.facts[:40])
        h.append(f'<li id="ph-{_e(p.id)}"><span class="ph-t">{_e(p.title)}</span>'
                 f'<span class="ph-m">t={p.start:.6f} s, {p.end - p.start:.6f} s, '
                 f'{p.last - p.first} events &middot; <a href="#seq-{_e(p.id)}">in sequence'
                 f'</a></span><div class="ph-i">{_e(intro)}</div><ul class="facts">{facts}'
                 "</ul></li>")
    h.append("</ol>")
    missing = a.missing()
    if missing:
        h.append(f"<p class='sub'>Not seen in this trace: {_e(', '.join(missing))}</p>")


def _features_html(a: Analysis, h: list[str]) -> None:
    h.append('<h2 id="features">Features</h2>')
    if a.offered or a.negotiated:
        names = a.offered or a.negotiated
        extra = [n for n in a.negotiated if n not in names]
        chips = "".join(f'<span class="chip {"on" if n in a.negotiated else "off"}">{_e(n)}'
                        "</span>" for n in names + extra)
        h.append(f"<div>{chips}</div><p class='sub'>green: negotiated "
                 f"({_e(a.negotiated_hex or '?')}); struck out: offered by the device, not "
                 "accepted by the driver</p>")
    else:
        h.append("<p class='sub'>No feature events in this trace.</p>")


def _queues_html(a: Analysis, h: list[str]) -> None:
    h.append('<h2 id="queues">Queues</h2>')
    qs = [a.queues[q] for q in sorted(a.queues) if q >= 0]
    if qs:
        h.append("<table class='q'><tr><th>q</th><th>role</th><th>size</th><th>desc</th>"
                 "<th>avail</th><th>used ring</th><th>kicks</th><th>chains</th><th>descs</th>"
                 "<th>used</th><th>irqs</th><th>suppressed</th><th>frames</th><th>bytes</th>"
                 "</tr>")
        for s in qs:
            h.append(f"<tr><td>{s.q}</td><td>{_e(s.role)}</td><td>{_e(s.size or '-')}</td>"
                     f"<td>{_e(_hx(s.desc) if s.desc is not None else '-')}</td>"
                     f"<td>{_e(_hx(s.avail) if s.avail is not None else '-')}</td>"
                     f"<td>{_e(_hx(s.used_addr) if s.used_addr is not None else '-')}</td>"
                     f"<td>{s.kicks}</td><td>{s.chains}</td><td>{s.descs}</td><td>{s.used}</td>"
                     f"<td>{s.irqs}</td><td>{s.suppressed}</td><td>{s.frames}</td>"
                     f"<td>{s.bytes}</td></tr>")
        h.append("</table>")
        qp = a.phase("queues")
        t0 = qp.start if qp else 0.0
        t1 = max(a.duration, t0 + 1e-6)
        h.append('<div class="charts">')
        for s in qs:
            if s.times:
                h.append(_chart(s, t0, t1))
        h.append("</div>")
    else:
        h.append("<p class='sub'>No queue events in this trace.</p>")
    if a.steady:
        s = a.steady
        h.append(f"<p>Steady state: {s['frames_tx']} frames out, {s['frames_rx']} in over "
                 f"{s['duration']:.3f} s; {s['kicks']} kicks, {s['irqs']} interrupts, "
                 f"{s['suppressed']} suppressed.</p>")


def _sequence_html(a: Analysis, h: list[str]) -> None:
    cats = [c for c in CATEGORIES if any(e.get("cat") == c for e in a.events)]
    boxes = "".join(f'<label><input type="checkbox" data-cat="{_e(c)}" checked> {_e(c)}'
                    "</label>" for c in cats)
    h.append('<h2>Sequence</h2><p class="sub">Each row is one message; click a row to see every '
             "decoded field, down to the descriptors of a chain. Runs of the same message are "
             "folded (&times;N). Data-path categories: " + _e(", ".join(sorted(DATA_CATS))) +
             ".</p>")
    h.append(f'<div class="controls">{boxes}<button id="expand" type="button">expand all'
             '</button><button id="collapse" type="button">collapse all</button>'
             '<span id="shown" class="sub"></span></div>')
    lanes = "".join(f"<div>{_e(_LANE_TITLES[x])}</div>" for x in LANES)
    h.append(f'<div class="lanes"><div></div><div class="names">{lanes}</div></div>')
    h.append(f'<div id="seq">{_sequence(a)}</div>')
    h.append(f"<script>{_JS}</script></body></html>")


def render_html(a: Analysis, title: str = "virtwire explain") -> str:
    """The whole page as one string (see module docstring)."""
    h: list[str] = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width,initial-scale=1">',
                    f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"]
    src = ", ".join(a.sources) or "trace"
    h.append(f"<header><h1>{_e(title)}</h1><div class='sub'>{_e(src)} &middot; transport "
             f"<b>{_e(a.transport)}</b> &middot; {a.duration:.3f} s &middot; {len(a.events)} "
             "events</div><nav>")
    for p in a.phases:
        h.append(f'<a href="#ph-{_e(p.id)}">{_e(p.title)}</a>')
    h.append('<a href="#features">Features</a><a href="#queues">Queues</a>'
             '<a href="#seq">Sequence</a></nav></header>')
    _story_html(a, h)
    _features_html(a, h)
    _queues_html(a, h)
    _sequence_html(a, h)
    return "\n".join(h)
