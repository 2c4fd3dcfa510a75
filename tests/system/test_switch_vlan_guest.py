"""VLANs on the switch with real guests: access ports of different VLANs are isolated, the same
VLAN connects (changed at run time with ``virtwire ctl``), and a trunk uplink carries both
VLANs with their 802.1Q tags (tshark on the uplink TAP)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netns import netns
from virtwire.testing.serve_process import ServeProcess

pytestmark = pytest.mark.system


def _guest(sock: str, ip: str, image) -> GuestVM:
    return GuestVM(net=[f"vhost-user,socket={sock}"], ip=ip, image=image, memory="256M",
                   name=f"vwl{os.getpid() % 10000}-{ip.split('/')[0].replace('.', '-')}")


def _received(vm: GuestVM, host: str, count: int = 5) -> int:
    out = vm.run(f"ping -c {count} -i 0.1 -W 1 {host}", timeout=60).output
    m = re.search(r"(\d+) packets received", out)
    assert m, out
    return int(m.group(1))


def test_access_vlans_isolate_and_trunk_uplink_tags(tmp_path, guest_image):
    socks = [str(tmp_path / f"vwl{i}.sock") for i in range(2)]
    mac_a = mac_b = ""
    pcap = tmp_path / "trunk.pcap"
    with netns("vwl") as ns:
        ports = [f"vhost-user,path={socks[0]},backend=switch,switch=vwlsw,name=a,vlan=10,"
                 "uplink=vwlup,uplink_trunk=10:20",
                 f"vhost-user,path={socks[1]},backend=switch,switch=vwlsw,name=b,vlan=20"]
        srv = ServeProcess(ns, ports, tmp_path / "serve.log")
        srv.start()
        cap = None
        try:
            # (this kernel has neither 8021q nor bridge VLAN filtering: the host end of the
            # trunk is checked by capture only)
            cap = subprocess.Popen(["ip", "netns", "exec", ns.name, "tshark", "-q", "-i",
                                    "vwlup", "-w", str(pcap)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            with _guest(socks[0], "10.83.0.2/24", guest_image) as a, \
                    _guest(socks[1], "10.83.0.3/24", guest_image) as b:
                a.wait_ready(120)
                b.wait_ready(120)
                mac_a = a.run("cat /sys/class/net/eth0/address", timeout=20).output.strip()
                mac_b = b.run("cat /sys/class/net/eth0/address", timeout=20).output.strip()
                time.sleep(1)  # tshark is capturing
                assert _received(a, "10.83.0.3", 3) == 0  # VLAN 10 -> VLAN 20: isolated
                assert _received(b, "10.83.0.2", 3) == 0
                # run time: b joins VLAN 10
                out = subprocess.run([sys.executable, "-m", "virtwire", "ctl", socks[0],
                                      "port/set", "b", "vlan=10"], capture_output=True,
                                     text=True, timeout=20)
                assert out.returncode == 0, out.stderr
                assert _received(b, "10.83.0.2") == 5
                assert _received(a, "10.83.0.3") == 5
                # a refused change (VLAN 4095) leaves VLAN 10 in force
                bad = subprocess.run([sys.executable, "-m", "virtwire", "ctl", socks[0],
                                      "port/set", "b", "vlan=4095"], capture_output=True,
                                     text=True, timeout=20)
                assert bad.returncode != 0 and bad.stderr.count("\n") == 1
                assert "1-4094" in bad.stderr
                assert _received(b, "10.83.0.2", 2) == 2
                time.sleep(1)
        finally:
            if cap is not None:
                cap.terminate()
                cap.wait(10)
            srv.stop()
        assert "Traceback" not in srv.log.read_text()
    fields = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "eth.src",
                             "-e", "vlan.id", "-e", "_ws.col.Protocol"],
                            capture_output=True, text=True, timeout=60).stdout
    seen = {tuple(line.split("\t")[:2]) for line in fields.splitlines() if line}
    assert (mac_a, "10") in seen, fields[:2000]
    assert (mac_b, "20") in seen, fields[:2000]  # b's ARP while on VLAN 20
    assert (mac_b, "10") in seen, fields[:2000]  # and on VLAN 10 after the change
    assert not any(src in (mac_a, mac_b) and not vid for src, vid in seen), fields[:2000]
