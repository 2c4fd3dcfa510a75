"""Real libvirt guests on virtwire: a libvirtd of the test's own, ``virsh start``, pings.

The domain comes from ``virtwire libvirt domain NAME --define`` (the default guest image, no NIC),
gets its NIC from ``virtwire libvirt attach`` (libvirt API, validated before saving) and boots
under TCG with ``virsh start``; its eth0 is QEMU's vhost-user virtio-net on ``virtwire serve``,
whose TAP back end sits in a namespace the test made. Everything is torn down in fixtures and
``finally`` blocks: the domains (destroyed and undefined), libvirtd, the server, the namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from virtwire.cli import main
from virtwire.libvirt.check import check_domain
from virtwire.testing.libvirtd import Libvirtd, LibvirtGuest
from virtwire.testing.serve_process import serve_on_tap

pytestmark = pytest.mark.system


def _define(libvirtd: Libvirtd, tmp_path, tag: str, ip: str) -> tuple[str, str]:
    name = f"vwl{os.getpid() % 10000}{tag}"
    console = str(tmp_path / "console.sock")
    libvirtd.adopt(name)
    assert main(["libvirt", "domain", name, "--ip", ip, "--console-socket", console,
                 "--define", "-c", libvirtd.uri]) == 0
    return name, console


def _attach(libvirtd: Libvirtd, name: str, port: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["libvirt", "attach", name, "--port", port, "-c", libvirtd.uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _ping(vm: LibvirtGuest, addr: str, count: int) -> int:
    out = vm.run(f"ping -c {count} -i 0.2 -W 2 {addr}", timeout=60).output
    m = re.search(r"(\d+) packets received", out)
    assert m, out
    return int(m.group(1))


def test_attached_domain_boots_with_virsh_start_and_pings_20_of_20(libvirtd, tmp_path, capsys,
                                                                   guest_image):
    name, console = _define(libvirtd, tmp_path, "a", "10.78.0.2/24")
    with serve_on_tap(tmp_path, "vwl", tap_addr="10.78.0.1/24") as (ns, srv, sock):
        done = _attach(libvirtd, name, f"vhost-user,path={sock}", capsys)
        assert done["saved"] and done["alias"] == "ua-vw0", done
        assert any("vectors=0" in c for c in done["changes"]), done
        # What libvirt saved is what check wants, socket and all (serve is listening).
        saved = libvirtd.virsh("dumpxml", "--inactive", name).stdout
        rep = check_domain(ET.fromstring(saved))
        assert rep.ok, rep.table()
        # Attaching again replaces the NIC on that socket instead of adding a second one.
        again = _attach(libvirtd, name, f"vhost-user,path={sock}", capsys)
        assert again["alias"] == "ua-vw0"
        root = ET.fromstring(libvirtd.virsh("dumpxml", "--inactive", name).stdout)
        assert len(root.findall("./devices/interface[@type='vhostuser']")) == 1

        with LibvirtGuest(libvirtd, name, console) as vm:
            vm.wait_ready(120)
            assert vm.state() == "running"
            assert _ping(vm, "10.78.0.1", 20) == 20
            st = srv.stats(sock)
            port = st["ports"][0]
            assert port["vhost_user"]["connected"], port
            # The live XML names the NIC libvirt started, on our socket.
            live = ET.fromstring(libvirtd.virsh("dumpxml", name).stdout)
            src = live.find("./devices/interface[@type='vhostuser']/source")
            assert src is not None and src.get("path") == sock
        # detach takes the NIC and its override out again (validated save).
        assert main(["libvirt", "detach", name, sock, "-c", libvirtd.uri]) == 0
        root = ET.fromstring(libvirtd.virsh("dumpxml", "--inactive", name).stdout)
        assert root.findall("./devices/interface") == []
        assert "vectors" not in ET.tostring(root, encoding="unicode")


def test_reconnect_guest_started_before_the_backend_waits_then_comes_up(libvirtd, tmp_path,
                                                                       capsys, guest_image):
    name, console = _define(libvirtd, tmp_path, "r", "10.79.0.2/24")
    with serve_on_tap(tmp_path, "vwl", tap_addr="10.79.0.1/24", start=False) as (ns, srv, sock):
        done = _attach(libvirtd, name, f"vhost-user,path={sock}", capsys)
        src = ET.fromstring(libvirtd.virsh("dumpxml", "--inactive", name).stdout).find(
            "./devices/interface[@type='vhostuser']/source")
        assert src is not None and src.get("mode") == "client", done
        assert src.find("reconnect").get("enabled") == "yes"
        assert not os.path.exists(sock)
        with LibvirtGuest(libvirtd, name, console) as vm:
            # No back end: QEMU keeps retrying the socket; the guest does not run yet (QEMU
            # may already have connected its console, which stays silent).
            vm.connect_console(timeout=6)
            time.sleep(2)
            assert vm.state() != "running"
            assert "Linux version" not in vm.console_text and "ready" not in vm.console_text
            assert vm.proc is not None and vm.proc.poll() is None  # virsh start still waits
            t0 = time.monotonic()
            srv.start()
            vm.wait_ready(120)
            assert vm.proc.wait(30) == 0  # virsh start returned: "Domain ... started"
            assert vm.state() == "running"
            assert _ping(vm, "10.79.0.1", 20) == 20
            assert time.monotonic() - t0 < 120


def test_interface_into_domain_passes_virsh_define_validate(libvirtd, tmp_path, capsys):
    """What ``virtwire libvirt domain`` and ``interface --into`` write, libvirt accepts."""
    name = f"vwl{os.getpid() % 10000}v"
    base = tmp_path / "base.xml"
    capsys.readouterr()
    assert main(["libvirt", "domain", name, "--ip", "10.80.0.2/24"]) == 0
    base.write_text(capsys.readouterr().out)
    assert main(["libvirt", "interface", "--port", "vhost-user,path=/tmp/vwl-v.sock,queues=2",
                 "--alias", "nic1", "--into", str(base)]) == 0
    full = tmp_path / "full.xml"
    full.write_text(capsys.readouterr().out)
    libvirtd.adopt(name)
    r = libvirtd.virsh("define", "--validate", str(full), check=False)
    assert r.returncode == 0, r.stderr
    saved = ET.fromstring(libvirtd.virsh("dumpxml", "--inactive", name).stdout)
    assert check_domain(saved, check_paths=False).ok
    # And a domain libvirt's schema refuses is refused (the check can fail).
    bad = full.read_text().replace("<vcpu>", "<vcpu><bogus/>", 1)
    full.write_text(bad)
    r = libvirtd.virsh("define", "--validate", str(full), check=False)
    assert r.returncode != 0


def test_attach_errors_are_one_line(libvirtd, tmp_path):
    out = subprocess.run([sys.executable, "-m", "virtwire", "libvirt", "attach", "vwl-nosuch",
                          "--port", f"vhost-user,path={tmp_path}/x.sock", "-c", libvirtd.uri],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "vwl-nosuch" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
