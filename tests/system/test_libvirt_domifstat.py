"""``virtwire libvirt domifstat DOMAIN`` on a running libvirt guest: the guest's own counters.

A libvirtd of the test's own starts the default guest image (``virtwire libvirt domain``/
``attach``, TCG) with its NIC on ``virtwire serve`` (TAP back end in a namespace of the test's).
The guest pings the TAP; then ``domifstat`` by domain name (the live XML, through virsh) must
name the interface as libvirt does (its target dev; libvirt 9.0 gives none: its alias) and
report what the guest's own eth0 counters say, direction for direction: rx = what the guest
received, tx = what it sent.
Everything is torn down in fixtures and ``finally`` blocks (domain, libvirtd, serve, namespace).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.testing.libvirtd import LibvirtGuest
from virtwire.testing.serve_process import serve_on_tap

pytestmark = pytest.mark.system

KEYS = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")


def _guest_counters(vm: LibvirtGuest) -> dict[str, int]:
    out = vm.run("cd /sys/class/net/eth0/statistics && for f in " + " ".join(KEYS)
                 + "; do echo vwd-$f=$(cat $f); done", timeout=30).output
    got = dict(re.findall(r"vwd-(\w+)=(\d+)", out))
    assert set(got) == set(KEYS), out
    return {k: int(v) for k, v in got.items()}


def _domifstat(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "virtwire", "libvirt", "domifstat", *argv],
                          capture_output=True, text=True, timeout=60)


def test_domifstat_of_a_running_domain_matches_the_guests_counters(libvirtd, tmp_path, capsys,
                                                                  guest_image):
    name = f"vwd{os.getpid() % 10000}s"
    console = str(tmp_path / "vwd-console.sock")
    libvirtd.adopt(name)
    assert main(["libvirt", "domain", name, "--ip", "10.81.0.2/24", "--console-socket", console,
                 "--define", "-c", libvirtd.uri]) == 0
    with serve_on_tap(tmp_path, "vwd", tap_addr="10.81.0.1/24") as (ns, srv, sock):
        assert main(["libvirt", "attach", name, "--port", f"vhost-user,path={sock}",
                     "-c", libvirtd.uri]) == 0
        with LibvirtGuest(libvirtd, name, console) as vm:
            vm.wait_ready(120)
            out = vm.run("ping -c 10 -i 0.2 -W 2 10.81.0.1", timeout=60).output
            assert "10 packets received" in out, out
            # ... and ARP requests nobody answers: the two directions differ, so a swap of
            # rx and tx could not pass the comparison below.
            vm.run("ping -c 2 -i 0.5 -W 1 10.81.0.99", timeout=30)
            live = ET.fromstring(libvirtd.virsh("dumpxml", name).stdout)
            target = live.find("./devices/interface[@type='vhostuser']/target")
            # libvirt 9.0 gives a running vhost-user interface no <target dev> (no host
            # netdev; virsh domiflist shows "-", virsh domifstat NAME ua-vw0 says "not a
            # known interface"): virtwire names it by its alias then.
            dev = (target.get("dev") if target is not None else None) or "ua-vw0"
            before = _guest_counters(vm)
            r = _domifstat(name, "-c", libvirtd.uri, "--json")
            after = _guest_counters(vm)
            assert r.returncode == 0, r.stderr
            (rec,) = json.loads(r.stdout)
            assert rec["interface"] == dev and rec["path"] == sock and rec["error"] is None
            assert rec["port"]["connected"] is True
            # What the device counted is what the guest's driver counted, each direction
            # (the guest may send or take a stray frame between the two readings).
            assert (before["tx_packets"], before["tx_bytes"]) != (before["rx_packets"],
                                                                  before["rx_bytes"]), before
            for k in KEYS:
                assert before[k] <= rec[k] <= after[k], (k, before, rec, after)
            assert rec["tx_packets"] >= 10 and rec["rx_packets"] >= 10  # echo, reply
            assert rec["rx_drop"] == rec["tx_drop"] == rec["rx_errs"] == rec["tx_errs"] == 0

            # virsh's lines, selected by the live target dev; by MAC too.
            r = _domifstat(name, dev, "-c", libvirtd.uri)
            assert r.returncode == 0, r.stderr
            assert re.search(rf"^{re.escape(dev)} rx_packets +\d+$", r.stdout, re.M), r.stdout
            r = _domifstat(name, rec["mac"].upper(), "-c", libvirtd.uri, "--json")
            assert r.returncode == 0 and json.loads(r.stdout)[0]["interface"] == dev
            r = _domifstat(f"{name}-vwd-none", "-c", libvirtd.uri)
            assert r.returncode != 0 and "Traceback" not in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr

            # The TAP's link down: serve's writes are refused (EIO), so the guest's frames
            # are sent (tx_packets, as the guest counts them) and lost (tx_drop).
            ns.run(["ip", "link", "set", "vwdt0", "down"])
            vm.run("ping -c 3 -i 0.2 -W 1 10.81.0.1", timeout=30)
            g2 = _guest_counters(vm)
            r = _domifstat(name, "ua-vw0", "-c", libvirtd.uri, "--json")
            g3 = _guest_counters(vm)
            assert r.returncode == 0, r.stderr
            (rec2,) = json.loads(r.stdout)
            # (the guest may send a stray frame, an ARP probe, between the readings)
            assert g2["tx_packets"] <= rec2["tx_packets"] <= g3["tx_packets"], (g2, rec2, g3)
            sent = rec2["tx_packets"] - after["tx_packets"]  # all after the link went down
            assert sent >= 3, (after, rec2)
            # (the 3 echo requests; a frame sent before the link went down is not lost)
            assert 3 <= rec2["tx_drop"] <= sent, (sent, rec2)
            assert rec2["tx_errs"] == 0

            srv.stop()  # the guest keeps running; its NIC's counters are gone
            r = _domifstat(name, "-c", libvirtd.uri)
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert f"{dev}: no counters for {sock}" in r.stderr, r.stderr
    capsys.readouterr()
