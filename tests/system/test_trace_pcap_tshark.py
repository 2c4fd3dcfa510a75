"""--pcap end to end: real ICMP from a kernel over a TAP, written with direction, read by tshark.

This process plays the guest's side of a link: it holds a TAP whose other end lives in a network
namespace of its own, answers ARP and ICMP echo for 10.77.N.2, and passes every frame through
virtwire's ``trace.FRAMES`` hook (received frames as "rx", our answers as "tx"), exactly as a
device does. The kernel's ``ping`` in the namespace must get its replies, and tshark must read
the requests as inbound and the replies as outbound.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtwire import trace
from virtwire.net import frame as fr
from virtwire.trace import reader

pytestmark = pytest.mark.system

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
OUR_MAC = "52:54:00:77:00:02"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, timeout=20, capture_output=True)


@pytest.fixture
def tap_in_netns() -> Iterator[tuple[int, str, int]]:
    n = os.getpid() % 200 + 20
    ns, ifname = f"vwtpc{os.getpid()}", f"vwtpc{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
        _sh("ip", "netns", "add", ns)
        try:
            _sh("ip", "link", "set", ifname, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"10.77.{n}.1/24", "dev", ifname)
            _sh("ip", "-n", ns, "link", "set", ifname, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            yield fd, ns, n
        finally:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
    finally:
        os.close(fd)


def _answer(fd: int, data: bytes, our_ip: str) -> None:
    """Reply to ARP who-has and ICMP echo request for ``our_ip``; trace both directions."""
    fh = trace.FRAMES
    if fh is not None:
        fh("rx", data, 0)
    d = fr.decode(data)
    out = None
    if "arp" in d and d["arp"].get("op") == 1 and d["arp"].get("tpa") == our_ip:
        out = fr.arp(2, OUR_MAC, our_ip, d["arp"]["sha"], d["arp"]["spa"])
    elif d.get("icmp", {}).get("name") == "echo request" and d["ip"]["dst"] == our_ip:
        ihl = (data[14] & 0xF) * 4
        payload = data[14 + ihl + 8:14 + d["ip"]["total_len"]]
        out = fr.icmp_echo(OUR_MAC, d["src"], our_ip, d["ip"]["src"], d["icmp"]["id"],
                           d["icmp"]["seq"], reply=True, data=payload)
    if out is not None:
        if fh is not None:
            fh("tx", out, 1)
        os.write(fd, out)


def test_pcap_of_real_pings_has_both_directions(tap_in_netns, tmp_path: Path) -> None:
    fd, ns, n = tap_in_netns
    our_ip = f"10.77.{n}.2"
    pcap, tpath = tmp_path / "ping.pcapng", tmp_path / "ping.jsonl"
    trace.start(tpath, pcap=pcap, decode=fr.decode)
    try:
        ping = subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-A",
                                 "-w", "10", our_ip], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 15
        while ping.poll() is None and time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                _answer(fd, os.read(fd, 65536), our_ip)
        if ping.poll() is None:
            ping.kill()
        out = ping.communicate(timeout=10)[0]
    finally:
        trace.stop()
    assert ping.returncode == 0, out
    assert "3 packets received" in out

    res = subprocess.run(["tshark", "-r", str(pcap), "-Y", "icmp", "-T", "fields",
                          "-e", "frame.packet_flags_direction", "-e", "icmp.type",
                          "-e", "icmp.seq", "-e", "ip.src", "-e", "ip.dst"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [ln.split("\t") for ln in res.stdout.splitlines() if ln.strip()]
    requests = [r for r in rows if r[1] == "8"]
    replies = [r for r in rows if r[1] == "0"]
    assert len(requests) == 3 and len(replies) == 3, res.stdout
    assert all(int(r[0], 16) == 1 and r[3] == f"10.77.{n}.1" for r in requests)  # inbound
    assert all(int(r[0], 16) == 2 and r[3] == our_ip for r in replies)  # outbound
    assert sorted(r[2] for r in requests) == sorted(r[2] for r in replies) == ["0", "1", "2"]
    # tshark's own summary names them too
    summ = subprocess.run(["tshark", "-r", str(pcap), "-Y", "icmp"], capture_output=True,
                          text=True, timeout=60).stdout
    assert summ.count("Echo (ping) request") == 3 and summ.count("Echo (ping) reply") == 3

    evs = [e for e in reader.read_events(tpath) if e["cat"] == "frame"]
    assert sum("ICMP echo request" in e["summary"] for e in evs if e["dir"] == "rx") == 3
    assert sum("ICMP echo reply" in e["summary"] for e in evs if e["dir"] == "tx") == 3
