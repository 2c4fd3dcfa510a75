"""``virtwire libvirt domifstat``: a domain's vhost-user interfaces -> virsh domifstat counters.

The mapping is checked offline over a sample domain and ``Server.stats()`` dict; then for real:
frames go both ways between the project's vhost-user front end + driver and an in-process
``virtwire serve`` (memory back end), and the CLI, run as a process against a domain XML that
points at that socket, must report exactly those packets and bytes, each in the guest's
direction.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from virtwire.errors import UserFacingError
from virtwire.libvirt.stats import (
    FIELDS,
    Interface,
    collect,
    port_counters,
    records,
    select,
    table,
    vhostuser_interfaces,
)

# A running domain's XML as `virsh dumpxml` prints it: libvirt named the vhost-user interfaces
# (target dev), there is an ordinary interface too, and one vhost-user NIC without a serve.
DOMAIN = """<domain type='qemu' id='3'>
  <name>vwd-guest</name>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <interface type='vhostuser'>
      <mac address='52:54:00:12:34:56'/>
      <source type='unix' path='{a}' mode='client'/>
      <target dev='vhost-user1'/>
      <model type='virtio'/>
      <driver queues='2'/>
      <alias name='ua-vw0'/>
    </interface>
    <interface type='vhostuser'>
      <mac address='52:54:00:12:34:57'/>
      <source type='unix' path='{b}' mode='client'/>
      <target dev='vhost-user2'/>
      <model type='virtio'/>
      <alias name='ua-vw1'/>
    </interface>
  </devices>
</domain>
"""


def _ring(index: int, frames: int, nbytes: int, drops: int, errors: int) -> dict:
    return {"index": index, "role": ("rx" if index % 2 == 0 else "tx") + str(index // 2),
            "started": True, "enabled": True, "size": 256, "kicks": 7, "interrupts": 5,
            "errors": errors, "frames": frames, "bytes": nbytes, "drops": drops, "chains": 99,
            "rx_filtered": 1000}


def _stats(path: str) -> dict:
    """``Server.stats()`` of a serve with one 2-pair port on ``path`` (distinct numbers)."""
    return {"ports": [{
        "name": "port0",
        "config": f"vhost-user {path} (server) -> null, 2 queue pair(s)",
        "vhost_user": {"path": path, "connected": True, "rings": [
            _ring(0, 10, 1000, 1, 0),      # rx0: to the guest
            _ring(1, 20, 2000, 2, 1),      # tx0: from the guest
            _ring(2, 30, 3000, 3, 0),      # rx1
            _ring(3, 40, 4000, 4, 2),      # tx1
        ]},
        "device": {}, "backends": [{"name": "tap:vwdt0", "tx_frames": 58, "tx_errors": 2,
                                     "rx_errors": 9, "drops": 5},
                                    {"name": "tap:vwdt0", "tx_frames": 0, "tx_errors": 1}],
    }], "loop": {"iterations": 1, "errors": 0}}


def test_interfaces_found_in_order():
    root = ET.fromstring(DOMAIN.format(a="/run/vwd/a.sock", b="/run/vwd/b.sock"))
    ifs = vhostuser_interfaces(root)
    assert ifs == [
        Interface(0, "/run/vwd/a.sock", "vhost-user1", "ua-vw0", "52:54:00:12:34:56"),
        Interface(1, "/run/vwd/b.sock", "vhost-user2", "ua-vw1", "52:54:00:12:34:57"),
    ]
    # An inactive domain has no target dev: named by alias, then MAC, then position.
    assert Interface(0, "/x", None, "ua-vw0", "52:54:00:12:34:56").name == "ua-vw0"
    assert Interface(0, "/x", None, None, "52:54:00:12:34:56").name == "52:54:00:12:34:56"
    assert Interface(3, "/x").name == "vhostuser#3"
    with pytest.raises(UserFacingError, match="not <domain>"):
        vhostuser_interfaces(ET.fromstring("<network/>"))


def test_counters_are_the_guests_view_summed_over_pairs():
    c = port_counters(_stats("/run/vwd/a.sock")["ports"][0])
    # RX rings (even: receiveq) hold what the guest received; TX rings what it sent.
    # The back ends' refused writes (tx_errors 2 + 1) are TX drops too.
    assert c == {"rx_bytes": 4000, "rx_packets": 40, "rx_errs": 0, "rx_drop": 4,
                 "tx_bytes": 6000, "tx_packets": 60, "tx_errs": 3, "tx_drop": 9}
    assert tuple(c) == FIELDS


def test_records_map_each_interface_and_report_missing_serves():
    a, b = "/run/vwd/a.sock", "/run/vwd/b.sock"
    ifs = vhostuser_interfaces(ET.fromstring(DOMAIN.format(a=a, b=b)))
    recs = records(ifs, {a + ".ctl": _stats(a), b + ".ctl": "cannot read counters from "
                                                            f"{b}.ctl: Connection refused"})
    assert recs[0].error is None and recs[0].counters["rx_packets"] == 40
    assert recs[0].port == {"name": "port0", "config": _stats(a)["ports"][0]["config"],
                            "control": a + ".ctl", "connected": True}
    assert recs[1].counters is None
    assert "vhost-user2" in recs[1].error and "Connection refused" in recs[1].error
    assert recs[0].counters["tx_drop"] == 9
    js = [r.to_json() for r in recs]
    assert js[0]["interface"] == "vhost-user1" and js[0]["tx_bytes"] == 6000
    assert js[1]["rx_bytes"] is None and js[1]["error"] == recs[1].error
    json.dumps(js)  # JSON-ready

    # No control socket of its own: found through another serve's (a serve with two ports).
    two = _stats(a)
    two["ports"].append({**_stats(b)["ports"][0], "name": "port1"})
    recs = records(ifs, {a + ".ctl": two})
    assert [r.port["name"] for r in recs] == ["port0", "port1"]
    assert all(r.error is None for r in recs)

    # A serve that does not serve that socket; no serve at all.
    recs = records(ifs, {a + ".ctl": _stats("/run/vwd/other.sock")})
    assert "has no port on it" in recs[0].error and "/run/vwd/other.sock" in recs[0].error
    assert "no control socket /run/vwd/b.sock.ctl" in recs[1].error
    # Hostile answers (a stats dict of the wrong shape) give an error record, not a crash.
    recs = records(ifs, {a + ".ctl": {"ports": [None, {"vhost_user": "x"}, 3]}})
    assert recs[0].error is not None and recs[0].counters is None


def test_hostile_ring_values_count_as_zero():
    port = {"vhost_user": {"path": "/x", "rings": [
        {"index": 0, "frames": -5, "bytes": "9", "drops": True, "errors": None},
        {"index": 1, "frames": 3, "bytes": 180},
        "junk", {"role": 7}]}, "backends": [{"tx_errors": -1}, "x", {"tx_errors": 2**70}]}
    c = port_counters(port)
    assert c["rx_packets"] == 0 and c["rx_bytes"] == 0 and c["rx_drop"] == 0
    assert c["tx_packets"] == 3 and c["tx_bytes"] == 180
    assert c["tx_drop"] == 2**70  # JSON integers are unbounded; only negatives are nonsense
    assert port_counters({"vhost_user": [], "backends": {}}) == dict.fromkeys(FIELDS, 0)


def test_select_by_target_alias_mac_path():
    a, b = "/run/vwd/a.sock", "/run/vwd/b.sock"
    ifs = vhostuser_interfaces(ET.fromstring(DOMAIN.format(a=a, b=b)))
    assert select(ifs, None) == ifs
    assert select(ifs, "vhost-user2") == [ifs[1]]
    assert select(ifs, "ua-vw0") == [ifs[0]]
    assert select(ifs, "52:54:00:12:34:57".upper()) == [ifs[1]]
    assert select(ifs, "/run/vwd/../vwd/a.sock") == [ifs[0]]
    with pytest.raises(UserFacingError, match="no vhost-user interface 'vnet0'.*vhost-user1, "
                                              "vhost-user2"):
        select(ifs, "vnet0")  # the ordinary interface is not ours
    with pytest.raises(UserFacingError, match="has no <interface type='vhostuser'>"):
        select([], None, "domain 'x'")


def test_collect_reads_each_serve_once(tmp_path):
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    open(a + ".ctl", "w").close()  # b has no control socket at all
    ifs = vhostuser_interfaces(ET.fromstring(DOMAIN.format(a=a, b=b)))
    asked = []

    def query(ctl):
        asked.append(ctl)
        return _stats(a)

    recs = collect(ifs + ifs, query=query)
    assert asked == [a + ".ctl"]
    assert recs[0].counters["tx_packets"] == 60 and recs[1].error is not None
    out = table(recs)
    assert "vhost-user1 rx_packets 40" in out and "vhost-user2" not in out

    # serve links every further port's PATH.ctl to its one control socket: asked once.
    os.symlink(a + ".ctl", b + ".ctl")
    two = _stats(a)
    two["ports"].append({**_stats(b)["ports"][0], "name": "port1"})
    asked.clear()
    recs = collect(ifs, query=lambda ctl: asked.append(ctl) or two)
    assert asked == [a + ".ctl"]
    assert [r.port["name"] for r in recs] == ["port0", "port1"]
    assert [r.error for r in recs] == [None, None]
    # A --control socket that cannot be read is named in the record's error.
    recs = collect(ifs[:1], [str(tmp_path / "x.ctl")],
                   query=lambda ctl: (_ for _ in ()).throw(UserFacingError(f"{ctl}: refused")))
    assert "x.ctl: refused" in recs[0].error


# -- for real: an in-process virtwire serve, frames both ways, the CLI as a process -------------
@pytest.fixture
def served(tmp_path):
    from virtwire.config import parse_port
    from virtwire.serve import build

    sock = str(tmp_path / "vwd-st.sock")
    srv = build([parse_port(f"vhost-user,path={sock},backend=memory,queue_size=256,"
                            "name=vwdport")])
    srv.start(sock + ".ctl")
    srv.loop.call_every(0.02, lambda: None)  # lets loop.stop() from this thread take effect
    t = threading.Thread(target=srv.loop.run, daemon=True)
    t.start()
    stopped = False

    def stop():
        nonlocal stopped
        if not stopped:
            stopped = True
            srv.loop.stop()
            t.join(5)
            srv.close()

    try:
        yield srv, sock, stop
    finally:
        stop()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "virtwire", "libvirt", "domifstat", *argv],
                          capture_output=True, text=True, timeout=60)


def test_cli_reports_the_frames_that_crossed(served, tmp_path):
    from virtwire.drive.vhost_user_frontend import VhostUserFrontend
    from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver

    srv, sock, stop = served
    be = srv.ports[0].backends[0]
    xml = tmp_path / "vwd-dom.xml"
    xml.write_text(DOMAIN.format(a=sock, b=str(tmp_path / "vwd-none.sock")))
    fe = VhostUserFrontend(sock, mem_size=32 << 20)
    try:
        drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                              NetDriverConfig()).probe()
        rnd = random.Random(8)
        sent = [rnd.randbytes(rnd.randint(60, 1514)) for _ in range(37)]  # guest -> device
        assert drv.send_all(sent, timeout=10) == len(sent)
        deadline = time.monotonic() + 10
        while len(be.frames()) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert be.frames() == sent
        back = [rnd.randbytes(rnd.randint(60, 1514)) for _ in range(23)]  # device -> guest
        for f in back:
            be.inject(f)
        assert [g.data for g in drv.poll_receive(len(back), timeout=10)] == back

        r = _cli(str(xml), "ua-vw0", "--json")
        assert r.returncode == 0, r.stderr
        (rec,) = json.loads(r.stdout)
        assert rec["interface"] == "vhost-user1" and rec["path"] == sock
        assert (rec["rx_packets"], rec["rx_bytes"]) == (23, sum(map(len, back)))
        assert (rec["tx_packets"], rec["tx_bytes"]) == (37, sum(map(len, sent)))
        assert rec["rx_drop"] == rec["tx_drop"] == rec["rx_errs"] == rec["tx_errs"] == 0
        assert rec["port"]["name"] == "vwdport" and rec["port"]["connected"] is True
        assert rec["error"] is None

        r = _cli(str(xml), "vhost-user1")  # virsh's lines
        assert r.returncode == 0, r.stderr
        lines = [ln.split() for ln in r.stdout.splitlines() if not ln.startswith("#")]
        assert lines == [["vhost-user1", k, str(rec[k])] for k in FIELDS]

        # Every interface: the second has no serve -> its line on stderr, exit 1, the first
        # still printed.
        r = _cli(str(xml))
        assert r.returncode == 1
        assert f"vhost-user1 tx_packets {37}" in " ".join(r.stdout.split())
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and "vhost-user2: no counters for" in err[0], r.stderr

        r = _cli(str(xml), "vnet0")
        assert r.returncode != 0 and "no vhost-user interface 'vnet0'" in r.stderr
        assert "Traceback" not in r.stderr
        drv.shutdown()
    finally:
        fe.close()
    stop()  # the serve is gone: its interface cannot be read any more
    r = _cli(str(xml), "ua-vw0")
    assert r.returncode == 1 and r.stdout == ""
    assert "vhost-user1: no counters for" in r.stderr and "Traceback" not in r.stderr


def test_cli_domain_without_vhostuser(tmp_path):
    xml = tmp_path / "vwd-plain.xml"
    xml.write_text("<domain type='kvm'><name>vwd-plain</name><devices/></domain>")
    r = _cli(str(xml))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert "vwd-plain" in r.stderr and "no <interface type='vhostuser'>" in r.stderr
    r = _cli(str(tmp_path / "vwd-missing.xml"))
    assert r.returncode != 0 and "cannot read" in r.stderr


def test_domain_name_reads_live_xml(monkeypatch, tmp_path):
    """A DOMAIN name is read with ``virsh -c URI dumpxml NAME`` (live: no --inactive)."""
    from virtwire.cli import main

    fake = tmp_path / "virsh"
    log = tmp_path / "argv"
    fake.write_text("#!/bin/sh\n"
                    f"echo \"$@\" > {log}\n"
                    "echo \"<domain type='kvm'><name>vwd-live</name><devices/></domain>\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    rc = main(["libvirt", "domifstat", "vwd-live", "--connect", "test:///vwd"])
    assert rc != 0
    assert log.read_text().split() == ["-c", "test:///vwd", "dumpxml", "--", "vwd-live"]
