"""The netlab keys through ``virtwire serve`` in one process: ``--port`` parsing, a shaped
memory port driven by the Python vhost-user front end, and run-time ``port/set`` (``ctl``)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from virtwire.cli import main
from virtwire.config import parse_port
from virtwire.drive.vhost_user_frontend import VhostUserFrontend
from virtwire.errors import CliError
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.netlab.control import request
from virtwire.serve import build, query_stats


def test_port_keys_parse_and_stay_on_the_config() -> None:
    cfg = parse_port("vhost-user,path=/x,backend=memory,tx.loss=10%,tx.delay=50ms,"
                     "rx.rate=100mbit,seed=3")
    assert cfg.netlab == {"tx.loss": "10%", "tx.delay": "50ms", "rx.rate": "100mbit",
                          "seed": "3"}
    sw = parse_port("vhost-user,path=/x,backend=switch,vlan=10,trunk=20:30-32")
    assert sw.netlab == {"vlan": "10", "trunk": "20:30-32"}
    vx = parse_port("vhost-user,path=/x,backend=switch,uplink=vxlan:42@10.9.0.2")
    assert vx.uplink == "vwu42" and vx.netlab_vxlan.vni == 42  # type: ignore[attr-defined]


@pytest.mark.parametrize("opts,reason", [
    ("tx.loss=101%", "tx.loss=101%: expected a percentage 0-100"),
    ("rx.delay=50", "give a unit"),
    ("tx.rate=fast", "expected a rate"),
    ("tx.limit=0", "expected 1-1000000"),
    ("tx.rate=10mbit,tx.bw_size=1000", "both set the same bucket"),
    ("tx.wobble=1", "unknown key 'tx.wobble'"),
    ("backend=switch,vlan=4095", "vlan=4095: a VLAN id is 1-4094"),
    ("backend=switch,vlan=0", "1-4094"),
    ("backend=switch,trunk=10:5000", "1-4094"),
    ("vlan=10", "needs backend=switch"),
    ("backend=switch,uplink=vxlan:0@10.0.0.1", "VNI is 1-16777215"),
    ("backend=switch,uplink=vxlan:5@nowhere", "expected vxlan:VNI@REMOTE_IP"),
])
def test_bad_values_are_one_clear_line(opts: str, reason: str) -> None:
    text = "vhost-user,path=/x" + ("" if "backend=" in opts else ",backend=memory") + "," + opts
    with pytest.raises(CliError) as e:
        parse_port(text)
    msg = str(e.value)
    assert reason in msg and "\n" not in msg


@pytest.fixture
def served(tmp_path):
    sock = str(tmp_path / "vwn.sock")
    srv = build([parse_port(f"vhost-user,path={sock},backend=memory,queue_size=256,"
                            "packed=off,name=p0,tx.loss=50%,seed=5")])
    srv.start(sock + ".ctl")
    srv.loop.call_every(0.02, lambda: None)
    t = threading.Thread(target=srv.loop.run, daemon=True)
    t.start()
    try:
        yield srv, sock
    finally:
        srv.loop.stop()
        t.join(5)
        srv.close()


def _wait(pred, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_shaped_port_loses_frames_and_changes_at_run_time(served, capsys) -> None:
    srv, sock = served
    shaped = srv.ports[0].backends[0]
    inner = shaped.inner
    fe = VhostUserFrontend(sock, mem_size=32 << 20)
    try:
        drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                              NetDriverConfig(packed=False)).probe()
        out = [bytes([i % 256]) * 100 for i in range(400)]
        assert drv.send_all(out, timeout=10) == 400
        assert _wait(lambda: shaped.stats()["tx.lost"] + len(inner.sent) == 400)
        lost = shaped.stats()["tx.lost"]
        assert 150 < lost < 250
        st = query_stats(sock + ".ctl")  # the counters are in `virtwire stats`
        be = st["ports"][0]["backends"][0]
        assert be["tx.lost"] == lost and be["tx.passed"] == 400 - lost
        # run time: a refused change keeps the old settings
        assert main(["ctl", sock, "port/set", "p0", "tx.loss=0%", "vlan=7"]) == 1
        assert "vlan= needs backend=switch" in capsys.readouterr().err
        assert main(["ctl", sock, "port/set", "p0", "tx.loss=200%"]) == 1
        assert "tx.loss=200%" in capsys.readouterr().err
        assert request(sock + ".ctl", {"cmd": "port/get", "port": "p0"})["settings"][
            "tx.loss"] == "50%"
        # an accepted one applies to the next frames
        assert main(["ctl", sock, "port/set", "p0", "tx.loss=0", "--compact"]) == 0
        reply = json.loads(capsys.readouterr().out)
        assert reply["ok"] and reply["settings"]["tx.loss"] == "0"
        sent0 = len(inner.sent)
        assert drv.send_all(out[:100], timeout=10) == 100
        assert _wait(lambda: len(inner.sent) == sent0 + 100)
        assert shaped.stats()["tx.lost"] == lost
        drv.shutdown()
    finally:
        fe.close()


def test_control_requests_refused_cleanly(served) -> None:
    srv, sock = served
    ctl = sock + ".ctl"
    assert request(ctl, {"cmd": "port/set", "port": "nope", "set": {"tx.loss": "1%"}}) == {
        "ok": False, "error": "no port 'nope' (ports: p0)"}
    assert not request(ctl, {"cmd": "reboot"})["ok"]
    assert not request(ctl, {"cmd": "port/set", "port": "p0", "set": {"mtu": "9000"}})["ok"]
    assert "ports" in request(ctl, {"cmd": "stats"})
    assert "ports" in query_stats(ctl)  # a silent client still gets the counters


def test_serve_refuses_bad_netlab_values_in_one_line(capsys, tmp_path) -> None:
    for opt in ("tx.loss=150%", "backend=switch,vlan=5000", "tx.jam=1"):
        assert main(["serve", "-q", "--port", f"vhost-user,path={tmp_path}/s.sock,{opt}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
