"""explain: phases, facts, narrative and the HTML page, from traces that follow the schema."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from virtwire import cli
from virtwire.explain import PHASES, analyze, load, narrate
from virtwire.explain.html import render_html
from virtwire.explain.synthetic import ACCEPTED, pci_proxy_session, vhost_user_session
from virtwire.trace import Tracer
from virtwire.virtio import spec


def _events(session, **kw) -> list[dict]:
    buf = io.StringIO()
    session(buf, **kw)
    return [json.loads(x) for x in buf.getvalue().splitlines()]


@pytest.mark.parametrize("session,transport", [(pci_proxy_session, "pci-proxy"),
                                               (vhost_user_session, "vhost-user")])
def test_every_phase_in_order(session, transport) -> None:
    a = analyze(_events(session))
    assert a.transport == transport
    assert [p.id for p in a.phases] == list(PHASES)
    assert a.in_order() and a.missing() == []
    starts = [p.start for p in a.phases]
    assert starts == sorted(starts)
    # phases tile the event list without gaps
    assert all(e["cat"] in ("trace", "host") for e in a.events[: a.phases[0].first])
    for p, q in zip(a.phases, a.phases[1:]):
        assert p.last == q.first and p.end == q.start
    assert a.phases[-1].last == len(a.events)


def test_pci_facts() -> None:
    a = analyze(_events(pci_proxy_session, pings=3))
    d = a.phase("discovery")
    assert any("vendor_id 0x1af4" in f for f in d.facts)
    assert any("virtio-net, modern" in f for f in d.facts)
    assert any("common_cfg, notify_cfg, isr_cfg, device_cfg, pci_cfg" in f for f in d.facts)
    b = a.phase("bars")
    assert "BAR4 placed at 0xfebf0000 (16 KiB, mem32)" in b.facts
    assert a.negotiated == spec.feature_names(ACCEPTED)
    assert a.negotiated_hex == f"{ACCEPTED:#x}"
    n = a.phase("negotiation")
    assert "offered but not accepted: CSUM RING_PACKED" in n.facts
    assert [s.role for _, s in sorted(a.queues.items())] == ["rx0", "tx0", "ctrl"]
    assert a.queues[0].size == 256 and a.queues[1].desc == 0x7010000
    tx = a.phase("first_tx")
    assert tx.facts[0] == "kick on queue 1"
    assert any("ARP who-has 10.0.2.2 tell 10.0.2.15" in f for f in tx.facts)
    rx = a.phase("first_rx")
    assert any("ARP 10.0.2.2 is-at" in f for f in rx.facts)
    assert a.frames_tx == 4 and a.frames_rx == 4  # ARP + 3 pings each way
    s = a.steady
    assert s["frames_tx"] == 3 and s["frames_rx"] == 3
    assert s["kicks"] == 3 and s["irqs"] + s["suppressed"] == 6
    assert s["pps_tx"] > 0


def test_vhost_user_phases_name_the_messages() -> None:
    a = analyze(_events(vhost_user_session))
    assert a.phase("discovery").title.startswith("Discovery (vhost-user")
    assert a.phase("bars").facts[0] == "VHOST_USER_SET_OWNER"
    assert any(f.startswith("VHOST_USER_SET_MEM_TABLE") for f in a.phase("queues").facts)
    assert "PROTOCOL_FEATURES/BAD_FEATURE" in a.negotiated
    assert set(a.queues) == {0, 1}


def test_narrative_tells_phases_in_order() -> None:
    a = analyze(_events(pci_proxy_session))
    text = narrate(a)
    pos = [text.index(f"{i}. {p.title}") for i, p in enumerate(a.phases, 1)]
    assert pos == sorted(pos)
    assert "Negotiated features" in text and "VERSION_1" in text
    assert re.search(r"^\s+1 tx0\s+256", text, re.M)
    assert all(len(line) <= 110 for line in text.splitlines())


def test_sampled_events_are_scaled() -> None:
    buf = io.StringIO()
    tr = Tracer(buf, close_out=False, sample=10)
    tr.emit("queue", "setup", q=1, size=64, desc=0, avail=0, used=0)
    for _ in range(100):
        tr.emit("kick", "kick", q=1)
    tr.close()
    a = analyze([json.loads(x) for x in buf.getvalue().splitlines()])
    assert a.queues[1].kicks == 100
    assert a.counts["kick.kick"] == 100


def test_partial_trace_reports_missing_phases() -> None:
    evs = [e for e in _events(pci_proxy_session) if e["cat"] not in ("frame", "chain", "used")]
    a = analyze(evs)
    assert not a.in_order()
    assert "first_rx" in a.missing() and "steady" in a.missing()
    line = [x for x in narrate(a).splitlines() if "Not seen in this trace" in x]
    assert len(line) == 1 and "First receive" in line[0] and "Steady state" in line[0]


def test_without_frames_chains_stand_in() -> None:
    evs = [e for e in _events(pci_proxy_session) if e["cat"] != "frame"]
    a = analyze(evs)
    assert a.in_order(), [p.id for p in a.phases]


def test_hostile_trace_values_do_not_crash() -> None:
    evs = [{"t": "x", "cat": "queue", "ev": "setup", "q": "zero"},
           {"t": 1, "cat": "chain", "ev": "chain", "q": 1, "descs": "nope", "sample": -3},
           {"t": 2, "cat": "pci", "ev": "bar_map", "bar": "<b>", "addr": None},
           {"t": 3, "cat": "frame", "ev": "frame", "dir": "rx", "len": "big", "q": 10**9},
           {"t": 4, "cat": "status", "ev": "set", "new": "DRIVER_OK", "new_names": 5},
           {"t": 5, "cat": "feature", "ev": "negotiated", "names": [1, None]}]
    a = analyze(evs)
    narrate(a)
    page = render_html(a)
    assert "<b>" not in page.split("<body>")[1].replace("<b>" + a.transport, "")


def test_html_is_self_contained_and_escaped() -> None:
    evs = _events(pci_proxy_session)
    evs.insert(5, {"t": 0.0002, "cat": "pci", "ev": "cfg_read", "off": 0, "size": 4, "val": 1,
                   "reg": "</script><script>alert(1)</script>"})
    page = render_html(analyze(evs))
    assert page.startswith("<!doctype html>")
    assert "alert(1)</script>" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert page.count("<script>") == 1
    for p in PHASES:
        assert f'id="seq-{p}"' in page and f'id="ph-{p}"' in page
    assert '<details class="row" data-cat="chain">' in page
    assert "<th>addr</th><th>len</th><th>flags</th>" in page  # descriptor tables
    assert page.count("<div class=\"chart\">") == 2  # rx and tx (ctrl had no traffic)
    assert page.count("class=\"timeline\"") == 1 and page.count("<polygon") == 7


def test_long_steady_state_is_capped() -> None:
    a = analyze(_events(pci_proxy_session, pings=400))
    page = render_html(a)
    assert "more events in this phase are not drawn" in page
    assert page.count('<details class="row"') < 700


def _write(tmp_path: Path, session, name: str) -> Path:
    p = tmp_path / name
    buf = io.StringIO()
    session(buf)
    p.write_text(buf.getvalue())
    return p


def test_cli_narrative_json_and_html(tmp_path: Path, capsys) -> None:
    tp = _write(tmp_path, pci_proxy_session, "t.jsonl")
    out = tmp_path / "o.html"
    assert cli.main(["explain", str(tp), "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1. Discovery" in text and "7. Steady state" in text and str(out) in text
    assert out.read_text().startswith("<!doctype html>")
    assert cli.main(["explain", str(tp), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["in_order"] is True and [p["id"] for p in j["phases"]] == list(PHASES)
    assert j["negotiated"] == spec.feature_names(ACCEPTED)
    assert j["queues"]["1"]["role"] == "tx0"


def test_cli_example(capsys) -> None:
    assert cli.main(["explain", "--example", "vhost-user"]) == 0
    assert "SET_MEM_TABLE" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert cli.main(["explain", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read trace" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("garbage\nmore\n")
    assert cli.main(["explain", str(bad)]) == 2
    assert cli.main(["explain"]) == 2


def test_merge_two_processes_by_wall_clock(tmp_path: Path) -> None:
    a_path, b_path = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a_path.write_text('{"t":0,"cat":"trace","ev":"start","wall":1000.0}\n'
                      '{"t":0.5,"cat":"kick","ev":"kick","q":1}\n')
    b_path.write_text('{"t":0,"cat":"trace","ev":"start","wall":1000.2}\n'
                      '{"t":0.1,"cat":"kick","ev":"kick","q":0}\n')
    evs, src = load([a_path, b_path])
    kicks = [(round(e["t"], 3), e["q"]) for e in evs if e["cat"] == "kick"]
    assert kicks == [(0.3, 0), (0.5, 1)]
    assert src == [str(a_path), str(b_path)]


def test_cli_merges_child_process_traces(tmp_path: Path, capsys) -> None:
    parent = tmp_path / "t.jsonl"
    parent.write_text('{"t":0,"cat":"trace","ev":"start","wall":1000.0}\n'
                      '{"t":0.1,"cat":"host","ev":"start","kind":"vm"}\n')
    child = tmp_path / "t.jsonl.serve.4242"
    buf = io.StringIO()
    vhost_user_session(buf)
    child.write_text(buf.getvalue())
    assert cli.main(["explain", str(parent), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["sources"] == [str(parent), str(child)] and j["in_order"] is True
    assert cli.main(["explain", str(parent), "--json", "--no-children"]) == 0
    assert json.loads(capsys.readouterr().out)["in_order"] is False


def test_a_vmm_reset_before_discovery_does_not_start_negotiation() -> None:
    evs = _events(pci_proxy_session)
    evs.insert(1, {"t": 0.00001, "cat": "status", "ev": "reset"})
    evs.insert(1, {"t": 0.000005, "cat": "pci", "ev": "reset"})
    a = analyze(evs)
    assert a.in_order(), [p.id for p in a.phases]


def test_cli_schema(capsys) -> None:
    assert cli.main(["explain", "--schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Event schema (version 1)")
    for cat in ("pci", "vhost", "feature", "status", "queue", "kick", "chain", "used", "irq",
                "config", "ctrl", "frame"):
        assert f"\n{cat} " in out
