"""Guests on two "hosts" over VXLAN: two network namespaces joined by a veth, each with its own
``virtwire serve`` (a switch whose uplink is ``vxlan:VNI@PEER``) and its own guest. The guests
ping each other and move 16 MiB of TCP with matching sha256; tshark on the veth sees VXLAN with
our VNI; the guests' MTU is the underlay's minus the 50 bytes of VXLAN (VIRTIO_NET_F_MTU)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from contextlib import ExitStack

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netns import netns
from virtwire.testing.serve_process import ServeProcess

pytestmark = pytest.mark.system

VNI = 4242
UNDER = ["10.90.0.1", "10.90.0.2"]
GUEST = ["10.91.0.1", "10.91.0.2"]


def _guest(sock: str, ip: str, image, mtu: int) -> GuestVM:
    # vhost-user: QEMU owns the config space, so the MTU reaches the guest through host_mtu
    return GuestVM(net=[f"vhost-user,socket={sock}"], ip=f"{ip}/24", image=image,
                   memory="384M", extra_args=["-global", f"virtio-net-pci.host_mtu={mtu}"],
                   name=f"vwx{os.getpid() % 10000}-{ip.replace('.', '-')}")


def test_two_hosts_over_vxlan(tmp_path, guest_image):
    pcap = tmp_path / "veth.pcap"
    with ExitStack() as stack:
        hosts = [stack.enter_context(netns(f"vwx{i}")) for i in range(2)]
        subprocess.run(["ip", "link", "add", "vwxv0", "netns", hosts[0].name, "type", "veth",
                        "peer", "name", "vwxv1", "netns", hosts[1].name], check=True)
        for i, h in enumerate(hosts):
            h.run(["ip", "addr", "add", f"{UNDER[i]}/24", "dev", f"vwxv{i}"])
            h.run(["ip", "link", "set", f"vwxv{i}", "up"])
        socks = [str(tmp_path / f"vwx{i}.sock") for i in range(2)]
        servers = []
        for i, h in enumerate(hosts):
            srv = ServeProcess(h, [f"vhost-user,path={socks[i]},backend=switch,switch=x,name=g,"
                                   f"uplink=vxlan:{VNI}@{UNDER[1 - i]}"],
                               tmp_path / f"serve{i}.log")
            srv.start()
            stack.callback(srv.stop)
            servers.append(srv)
        for h in hosts:  # what serve built: TAP + VXLAN device on one bridge, MTU 1500 - 50
            links = h.run(["ip", "-o", "-d", "link", "show"]).stdout
            assert re.search(rf"vwvx{VNI}: .*mtu 1450 .*vxlan id {VNI} remote", links), links
            assert re.search(rf"vwu{VNI}: .*mtu 1450 .*master vwbr{VNI}", links), links
        cap = subprocess.Popen(["ip", "netns", "exec", hosts[0].name, "tshark", "-q", "-i",
                                "vwxv0", "-f", "udp port 4789", "-w", str(pcap)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(cap.wait, 10)
        stack.callback(cap.terminate)
        a = stack.enter_context(_guest(socks[0], GUEST[0], guest_image, 1450))
        b = stack.enter_context(_guest(socks[1], GUEST[1], guest_image, 1450))
        a.wait_ready(120)
        b.wait_ready(120)
        assert a.run("cat /sys/class/net/eth0/mtu", timeout=20).output.strip() == "1450"
        out = a.run(f"ping -c 10 -i 0.1 -W 2 {GUEST[1]}", timeout=60).output
        assert "10 packets received" in out, out
        # a full-size packet (1450 = 20 IP + 8 ICMP + 1422) crosses; the capture below shows
        # that no outer packet was fragmented
        out = b.run(f"ping -c 3 -s 1422 -W 2 {GUEST[0]}", timeout=60).output
        assert "3 packets received" in out, out
        # 16 MiB of TCP, a -> b, checked by sha256 at both ends
        # (the listener's stdin must never end: busybox nc shuts its side down at stdin EOF,
        # and the sender's nc then stops early)
        b.run("mkfifo /tmp/hold; (exec 3<>/tmp/hold; nc -l -p 5001 <&3 > /tmp/rx; "
              "echo done > /tmp/rx.done) >/dev/null 2>&1 &", timeout=20)
        time.sleep(0.5)
        sent = a.run("dd if=/dev/urandom of=/tmp/tx bs=1M count=16 2>/dev/null; "
                     f"sha256sum /tmp/tx; nc {GUEST[1]} 5001 < /tmp/tx; echo nc=$?",
                     timeout=300).output
        assert "nc=0" in sent, sent
        got = b.run("for i in $(seq 100); do [ -f /tmp/rx.done ] && break; sleep 0.2; done; "
                    "wc -c < /tmp/rx; sha256sum /tmp/rx", timeout=60).output
        assert got.split()[0] == str(16 << 20), got
        assert got.split()[1] == sent.split()[0], (sent, got)
        time.sleep(1)
        cap.terminate()
        cap.wait(10)
    vnis = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "vxlan.vni",
                           "-e", "ip.src", "-e", "ip.dst", "-e", "ip.flags.mf", "-e",
                           "frame.len"],
                          capture_output=True, text=True, timeout=120).stdout.split("\n")
    rows = [r.split("\t") for r in vnis if r]
    assert sum(int(r[4]) for r in rows) > 16 << 20, rows[:5]  # the 16 MiB went through it
    assert {r[0] for r in rows} == {str(VNI)}
    assert {(r[1].split(",")[0], r[2].split(",")[0]) for r in rows} == {
        (UNDER[0], UNDER[1]), (UNDER[1], UNDER[0])}
    assert not any(r[3].startswith(("1", "True")) for r in rows)  # no outer fragments
    # the full-size ping, encapsulated: 1450 + 14 + 50 bytes of VXLAN = the underlay's 1514
    # (TCP shows bigger frames here: the veth carries GSO super-frames, cut at the NIC)
    assert 1514 in {int(r[4]) for r in rows}
    for srv in servers:
        assert "Traceback" not in srv.log.read_text()
