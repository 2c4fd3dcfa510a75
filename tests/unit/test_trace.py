"""trace: the JSON-lines tracer, categories, sampling, the process hooks and the CLI options."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from virtwire import trace
from virtwire.commands import trace_options as topts
from virtwire.errors import CliError
from virtwire.net import frame as f
from virtwire.trace import reader
from virtwire.trace.pcap import EPB_INBOUND, EPB_OUTBOUND, read_pcapng
from virtwire.virtio import traced_queue


@pytest.fixture(autouse=True)
def _tracing_off():
    trace.stop()
    yield
    trace.stop()


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_off_by_default() -> None:
    assert trace.TRACE is None and trace.FRAMES is None


def test_start_emit_end_schema() -> None:
    buf = io.StringIO()
    tr = trace.Tracer(buf, close_out=False, clock=iter([10.0, 10.5, 11.0]).__next__)
    tr.emit("status", "set", old=0, new=1, old_names=[], new_names=["ACKNOWLEDGE"])
    tr.close()
    ev = _lines(buf)
    assert ev[0]["cat"] == "trace" and ev[0]["ev"] == "start"
    assert ev[0]["version"] == trace.SCHEMA_VERSION and ev[0]["sample"] == 1
    assert ev[1] == {"t": 0.5, "cat": "status", "ev": "set", "old": 0, "new": 1, "old_names": [],
                     "new_names": ["ACKNOWLEDGE"]}
    assert ev[2]["ev"] == "end" and ev[2]["counts"] == {"status.set": 1} and ev[2]["t"] == 1.0


def test_categories_filter_but_counts_stay_true() -> None:
    buf = io.StringIO()
    tr = trace.Tracer(buf, close_out=False, categories=["kick"])
    tr.emit("kick", "kick", q=1)
    tr.emit("chain", "chain", q=1, head=0, descs=[])
    tr.close()
    ev = _lines(buf)
    assert [e["cat"] for e in ev] == ["trace", "kick", "trace"]
    assert ev[-1]["counts"] == {"chain.chain": 1, "kick.kick": 1}


def test_sampling_applies_to_data_path_only() -> None:
    buf = io.StringIO()
    tr = trace.Tracer(buf, close_out=False, sample=4)
    for i in range(10):
        tr.emit("chain", "chain", q=0, head=i)
        tr.emit("status", "set", new=i)
    tr.close()
    ev = _lines(buf)
    chains = [e for e in ev if e["cat"] == "chain"]
    assert [e["head"] for e in chains] == [0, 4, 8]
    assert all(e["sample"] == 4 for e in chains)
    assert len([e for e in ev if e["cat"] == "status"]) == 10
    assert ev[-1]["counts"]["chain.chain"] == 10


def test_bad_options_raise() -> None:
    with pytest.raises(trace.TraceError):
        trace.Tracer(io.StringIO(), categories=["bogus"])
    with pytest.raises(trace.TraceError):
        trace.Tracer(io.StringIO(), sample=0)


def test_bytes_and_odd_values_serialize() -> None:
    buf = io.StringIO()
    tr = trace.Tracer(buf, close_out=False)
    tr.emit("vhost", "msg", req="X", raw=b"\x01\x02", fds=(3, 4))
    tr.close()
    e = _lines(buf)[1]
    assert e["raw"] == "0102" and e["fds"] == [3, 4]


def test_flow_lanes() -> None:
    assert reader.flow({"cat": "kick", "ev": "kick"}) == ("guest", "device")
    assert reader.flow({"cat": "used", "ev": "used"}) == ("device", "guest")
    assert reader.flow({"cat": "vhost", "ev": "msg"}) == ("vmm", "device")
    assert reader.flow({"cat": "vhost", "ev": "reply"}) == ("device", "vmm")
    assert reader.flow({"cat": "feature", "ev": "offer"}) == ("device", "guest")
    assert reader.flow({"cat": "frame", "ev": "frame", "dir": "tx"}) == ("device", "net")
    assert reader.flow({"cat": "frame", "ev": "frame", "dir": "rx"}) == ("net", "device")
    assert reader.flow({"cat": "pci", "ev": "x", "src": "vmm", "dst": "device"}) == ("vmm",
                                                                                  "device")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    topts.add_trace_arguments(p)
    return p


def test_cli_options_configure_trace_and_pcap(tmp_path: Path) -> None:
    tp, pp = tmp_path / "t.jsonl", tmp_path / "p.pcapng"
    args = _parser().parse_args(["--trace", str(tp), "--trace-categories", "frame,kick",
                                 "--trace-sample", "2", "--pcap", str(pp)])
    tr = topts.configure_from_args(args)
    assert tr is trace.TRACE and tr is not None and tr.sample == 2
    req = f.icmp_echo("52:54:00:00:00:01", "52:54:00:00:00:02", "10.9.0.1", "10.9.0.2", 3, 1)
    rep = f.icmp_echo("52:54:00:00:00:02", "52:54:00:00:00:01", "10.9.0.2", "10.9.0.1", 3, 1,
                      reply=True)
    assert trace.FRAMES is not None
    trace.FRAMES("tx", req, 1)
    trace.FRAMES("rx", [rep[:20], memoryview(rep[20:])], 0)  # scattered segments
    trace.FRAMES("tx", req, 1)
    trace.stop()
    assert trace.TRACE is None and trace.FRAMES is None
    ev = list(reader.read_events(tp))
    frames = [e for e in ev if e["cat"] == "frame"]
    assert len(frames) == 2  # 1 in 2 sampled
    assert frames[0]["dir"] == "tx" and frames[0]["len"] == len(req) and frames[0]["q"] == 1
    assert "ICMP echo request" in frames[0]["summary"]
    assert frames[0]["proto"]["icmp"]["seq"] == 1
    assert ev[-1]["counts"]["frame.frame"] == 3
    pk = read_pcapng(pp)
    assert [(d, x) for _, d, x in pk] == [(EPB_OUTBOUND, req), (EPB_INBOUND, rep),
                                          (EPB_OUTBOUND, req)]


def test_pcap_only_sets_frame_hook_not_tracer(tmp_path: Path) -> None:
    args = _parser().parse_args(["--pcap", str(tmp_path / "p.pcapng")])
    assert topts.configure_from_args(args) is None
    assert trace.TRACE is None and trace.FRAMES is not None
    trace.FRAMES("tx", b"\xff" * 60, 0)
    trace.stop()
    assert len(read_pcapng(tmp_path / "p.pcapng")) == 1


def test_no_options_is_a_no_op() -> None:
    assert topts.configure_from_args(_parser().parse_args([])) is None
    assert trace.TRACE is None and trace.FRAMES is None


@pytest.mark.parametrize("argv", [["--trace-categories", "nope"], ["--trace-sample", "0"]])
def test_bad_cli_values_are_cli_errors(tmp_path: Path, argv: list[str]) -> None:
    args = _parser().parse_args(["--trace", str(tmp_path / "t.jsonl"), *argv])
    with pytest.raises(CliError):
        topts.configure_from_args(args)
    assert trace.TRACE is None


def test_unwritable_trace_is_a_cli_error(tmp_path: Path) -> None:
    args = _parser().parse_args(["--trace", str(tmp_path / "no" / "t.jsonl")])
    with pytest.raises(CliError, match="cannot write trace"):
        topts.configure_from_args(args)


def test_read_events_skips_torn_last_line_and_rejects_garbage(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"t":0,"cat":"trace","ev":"start"}\n{"t":1,"cat":"kick","ev":"kick","q":1}\n'
                 '{"t":2,"cat":"ki')
    assert [e["cat"] for e in reader.read_events(p)] == ["trace", "kick"]
    p.write_text('not json\n{"t":0,"cat":"trace","ev":"start"}\n')
    with pytest.raises(trace.TraceError, match=":1:"):
        list(reader.read_events(p))
    p.write_text('[1,2]\n{"t":0,"cat":"trace","ev":"start"}\n')
    with pytest.raises(trace.TraceError):
        list(reader.read_events(p))


def test_settings_are_inherited_by_child_processes(tmp_path: Path, monkeypatch) -> None:
    for k in (topts.ENV_TRACE, topts.ENV_PCAP, topts.ENV_CATEGORIES, topts.ENV_SAMPLE):
        monkeypatch.delenv(k, raising=False)
    parent = tmp_path / "t.jsonl"
    args = _parser().parse_args(["--trace", str(parent), "--trace-categories", "kick,status",
                                 "--trace-sample", "3"])
    topts.configure_from_args(args)
    import os
    import subprocess
    import sys

    code = ("import argparse; from virtwire import trace; "
            "from virtwire.commands import trace_options as topts; p = argparse.ArgumentParser(); "
            "topts.add_trace_arguments(p); a = p.parse_args([]); a.command = 'serve'; "
            "tr = topts.configure_from_args(a); print(tr.sample, ','.join(sorted(tr.categories)));"
            " tr.emit('kick', 'kick', q=1); trace.stop()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.split() == ["3", "kick,status"]
    kids = topts.child_files(parent)
    assert len(kids) == 1 and kids[0].startswith(str(parent) + ".serve.")
    assert [e["cat"] for e in reader.read_events(kids[0])] == ["trace", "kick", "trace"]
    trace.stop()
    assert topts.ENV_TRACE not in os.environ  # withdrawn: later children do not trace
    assert topts.configure_from_args(_parser().parse_args([])) is None


def test_frame_hook_skips_the_header_and_copies_only_when_needed(tmp_path: Path) -> None:
    buf = io.StringIO()
    trace.start(out=buf, sample=2, pcap=tmp_path / "f.pcapng", decode=f.decode)
    req = f.icmp_echo("52:54:00:00:00:01", "52:54:00:00:00:02", "10.9.0.1", "10.9.0.2", 3, 1)
    hdr = bytes(12)
    views = [memoryview(hdr + req[:30]), memoryview(req[30:] + b"\xee" * 20)]
    for _ in range(3):
        trace.FRAMES("rx", views, 0, 12, len(req))
    trace.stop()
    frames = [json.loads(x) for x in buf.getvalue().splitlines() if '"frame"' in x
              and '"ev":"frame"' in x]
    assert len(frames) == 2 and frames[0]["len"] == len(req)  # sampled 1 in 2
    assert [x for _, _, x in read_pcapng(tmp_path / "f.pcapng")] == [req] * 3  # pcap: all


def test_data_path_hooks_stay_off_for_control_categories() -> None:
    trace.start(out=io.StringIO(), categories=["status", "kick"])
    assert trace.FRAMES is None
    from virtwire.virtio.pair import make_ring_pair

    rp = make_ring_pair("split", 8)
    assert traced_queue.wrap_queue(rp.device, 0) is rp.device
