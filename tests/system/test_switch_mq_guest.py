"""A guest with two queue pairs on a switch port (issue 18): traffic on both pairs.

The switch port has ``queues=2``: QEMU's ``-netdev vhost-user,queues=2`` + ``mq=on`` on a
2-vCPU guest. The switch's uplink is a TAP in a namespace (the host, 10.84.0.1). Host -> guest:
8 TCP flows (fixed source ports, chosen to cover both queues), which the switch spreads over the
port's two RX rings by flow hash (as a NIC's RSS would). Guest -> host: 8 flows from processes
the guest's scheduler puts on both vCPUs, whose XPS maps each vCPU to its own TX ring.
``virtwire stats`` must show frames on rx0, rx1, tx0 and tx1, and on both pairs' backends.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netlab import rss
from virtwire.netns import netns
from virtwire.testing.serve_process import ServeProcess

pytestmark = pytest.mark.system

SINK = r"""
import socket, sys, threading
host, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
got = {}
def serve(s, p):
    c, _ = s.accept(); c.settimeout(120); n = 0
    while True:
        b = c.recv(1 << 16)
        if not b: break
        n += len(b)
    got[p] = n
socks = []
for p in ports:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, p)); s.listen(1); s.settimeout(120); socks.append((s, p))
print("listening", flush=True)
ts = [threading.Thread(target=serve, args=sp) for sp in socks]
[t.start() for t in ts]; [t.join(150) for t in ts]
print(" ".join(str(got.get(p, 0)) for p in ports), flush=True)
"""

SOURCE = r"""
import socket, sys, threading, time
host, ports, n = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])
def send(p):
    for _ in range(100):
        try:
            c = socket.create_connection((host, p), timeout=5, source_address=("", p + 1000))
            break
        except OSError: time.sleep(0.2)
    c.sendall(bytes(n)); c.close()
ts = [threading.Thread(target=send, args=(p,)) for p in ports]
[t.start() for t in ts]; [t.join(150) for t in ts]
"""


def _queue_of(sport: int, dport: int) -> int:
    """The RX queue the switch's flow hash gives host:sport -> guest:dport (TCP)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     bytes([10, 84, 0, 1]), bytes([10, 84, 0, 2]))
    return rss.pick(bytes(12) + b"\x08\x00" + ip + struct.pack("!HH", sport, dport), 2)


def test_two_queue_pairs_on_a_switch_port_both_carry_traffic(tmp_path, guest_image):
    ports = [5401 + i for i in range(8)]
    # the host's source ports are fixed (port + 1000): the flows must cover both RX queues
    assert {_queue_of(p + 1000, p) for p in ports} == {0, 1}
    with netns("vwq") as ns:
        ns.add_tap("vwqu0", addr="10.84.0.1/24")
        sock = str(tmp_path / "vwq.sock")
        srv = ServeProcess(ns, [f"vhost-user,path={sock},backend=switch,switch=vwqsw,"
                                "uplink=vwqu0,queues=2,name=g"], tmp_path / "serve.log")
        srv.start()
        try:
            vm = GuestVM(net=[f"vhost-user,socket={sock},queues=2"], ip="10.84.0.2/24",
                         image=guest_image, smp=2, memory="384M",
                         name=f"vwq{os.getpid() % 10000}")
            with vm:
                vm.wait_ready(120)
                assert vm.run("ls /sys/class/net/eth0/queues/", timeout=20).output.split() == [
                    "rx-0", "rx-1", "tx-0", "tx-1"]
                out = vm.run("ping -c 10 -i 0.1 -W 2 10.84.0.1", timeout=60).output
                m = re.search(r"(\d+) packets received", out)
                assert m and int(m.group(1)) == 10, out
                vm.run("; ".join(f"(nc -l -p {p} > /dev/null &)" for p in ports), timeout=20)
                src = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                                      SOURCE, "10.84.0.2", ",".join(map(str, ports)),
                                      str(1 << 20)], capture_output=True, text=True,
                                     timeout=200)
                assert src.returncode == 0, src.stderr
                sink = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                                         SINK, "10.84.0.1", ",".join(map(str, ports))],
                                        stdout=subprocess.PIPE, text=True)
                try:
                    assert sink.stdout is not None
                    assert sink.stdout.readline().strip() == "listening"
                    vm.run(" ".join(f"dd if=/dev/zero bs=64k count=16 2>/dev/null | "
                                    f"nc 10.84.0.1 {p} &" for p in ports) + " wait",
                           timeout=200)
                    sizes = [int(x) for x in sink.stdout.readline().split()]
                finally:
                    sink.kill()
                    sink.wait()
                assert sizes == [1 << 20] * 8
                st = srv.stats(sock)
        finally:
            srv.stop()
        assert "Traceback" not in srv.log.read_text()
    port = st["ports"][0]
    rings = {r["role"]: r for r in port["vhost_user"]["rings"]}
    for role in ("rx0", "rx1", "tx0", "tx1"):
        assert rings[role]["started"] and rings[role]["enabled"], rings[role]
        assert rings[role]["frames"] > 50, (role, rings)
    rx_per_queue = [b["rx_frames"] for b in port["backends"]]
    assert len(rx_per_queue) == 2 and min(rx_per_queue) > 50, port["backends"]
