"""A real Debian guest under QEMU TCG on our virtio-net device, served over vhost-user.

Each test makes its own network namespace with a persistent TAP (the host end, 10.x.y.1/24),
runs ``virtwire serve`` inside it as a subprocess (so a test can kill and restart it) and boots a
guest whose eth0 is QEMU's vhost-user virtio-net-pci connected to that server. Everything is torn
down in ``finally`` blocks: QEMU, the server, the namespace (and with it the TAP).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netns import Netns, netns
from virtwire.testing import transfer
from virtwire.testing.serve_process import ServeProcess as Server
from virtwire.testing.serve_process import serve_on_tap

pytestmark = pytest.mark.system

MIB64 = 64 << 20


def _guest(sock: str, ip: str, image, *, nic_opts: str = "", smp: int = 1,
           memory: str = "256M") -> GuestVM:
    # The name seeds the guest's MAC: one per guest address, so two guests never share one.
    return GuestVM(net=[f"vhost-user,socket={sock}" + (f",{nic_opts}" if nic_opts else "")],
                   ip=ip, image=image, smp=smp, memory=memory,
                   name=f"vwv{os.getpid() % 10000}-{ip.split('/')[0].replace('.', '-')}")


def _ping_received(output: str) -> int:
    m = re.search(r"(\d+) packets received", output)
    assert m, output
    return int(m.group(1))


def _rings(stats: dict) -> dict[str, dict]:
    return {r["role"]: r for r in stats["ports"][0]["vhost_user"]["rings"]}


def test_guest_pings_the_tap_100_of_100(tmp_path, guest_image):
    with serve_on_tap(tmp_path, "vwv", tap_addr="10.71.0.1/24") as (ns, srv, sock), \
            _guest(sock, "10.71.0.2/24", guest_image) as vm:
        vm.wait_ready(90)
        link = vm.run("cat /sys/class/net/eth0/operstate; "
                      "readlink /sys/class/net/eth0/device/driver", timeout=20).output
        assert "virtio_net" in link
        out = vm.run("ping -c 100 -i 0.05 -W 2 10.71.0.1", timeout=90).output
        assert _ping_received(out) == 100, out
        st = srv.stats(sock)
        rings = _rings(st)
        assert rings["rx0"]["frames"] >= 100 and rings["tx0"]["frames"] >= 100
        assert rings["tx0"]["kicks"] > 0 and rings["rx0"]["interrupts"] > 0
        feats = st["ports"][0]["vhost_user"]["features"]
        assert "VERSION_1" in feats and "MRG_RXBUF" in feats
        # The TAP really carried the frames (host kernel counters).
        assert ns.link_stats("vwvt0")["rx_packets"] >= 100
        assert vm.run("cat /sys/class/net/eth0/operstate", timeout=20).output.strip() == "up"
        # An idle guest leaves the event loop idle too (no busy loop on a level-triggered TAP).
        it0 = srv.stats(sock)["loop"]["iterations"]
        time.sleep(2.0)
        it1 = srv.stats(sock)["loop"]["iterations"]
        assert it1 - it0 < 500, (it0, it1)


def _tcp_both_ways(vm: GuestVM, ns: Netns, host_ip: str, guest_ip: str, size: int) -> None:
    transfer.tcp_both_ways(vm, ns, host_ip, guest_ip, size, ports=(5201, 5202),
                           io_timeout=120, pattern=True)


def test_64mib_tcp_each_way_checksums_match(tmp_path, guest_image):
    with serve_on_tap(tmp_path, "vwv", tap_addr="10.72.0.1/24") as (ns, srv, sock), \
            _guest(sock, "10.72.0.2/24", guest_image, memory="512M") as vm:
        vm.wait_ready(90)
        _tcp_both_ways(vm, ns, "10.72.0.1", "10.72.0.2", MIB64)
        st = srv.stats(sock)
        rings = _rings(st)
        # TSO/CSUM were negotiated: the guest sent GSO frames larger than the MTU.
        feats = st["ports"][0]["vhost_user"]["features"]
        assert "HOST_TSO4" in feats and "CSUM" in feats
        assert rings["tx0"]["bytes"] > MIB64 and rings["rx0"]["bytes"] > MIB64
        assert rings["tx0"]["frames"] < MIB64 // 1448  # fewer frames than MSS-sized: GSO
        # GSO super-frames (larger than the 1500-byte MTU) crossed the TAP in both directions.
        assert rings["tx0"].get("tx_gso", 0) > 0 and rings["rx0"].get("rx_gso", 0) > 0, rings


def test_mrg_rxbuf_off_and_packed_ring(tmp_path, guest_image):
    opts = "mrg_rxbuf=off,packed=on"
    with serve_on_tap(tmp_path, "vwv", tap_addr="10.73.0.1/24",
                      port_opts=opts) as (ns, srv, sock), \
            _guest(sock, "10.73.0.2/24", guest_image, nic_opts=opts) as vm:
        vm.wait_ready(90)
        out = vm.run("ping -c 30 -i 0.05 -W 2 10.73.0.1", timeout=60).output
        assert _ping_received(out) == 30, out
        _tcp_both_ways(vm, ns, "10.73.0.1", "10.73.0.2", 8 << 20)
        feats = srv.stats(sock)["ports"][0]["vhost_user"]["features"]
        assert "RING_PACKED" in feats and "MRG_RXBUF" not in feats


@pytest.mark.parametrize("ring", ["split", "packed", "split-mq"])
def test_backend_killed_and_restarted_mid_ping(tmp_path, guest_image, ring):
    opts = "packed=on" if ring == "packed" else "packed=off"
    mq = 2 if ring.endswith("-mq") else 1
    with serve_on_tap(tmp_path, "vwv", tap_addr="10.74.0.1/24", port_opts=opts,
                     queues=mq) as (ns, srv, sock), \
            _guest(sock, "10.74.0.2/24", guest_image, smp=mq,
                   nic_opts=opts + (f",queues={mq}" if mq > 1 else "")) as vm:
        vm.wait_ready(90)
        assert _ping_received(vm.run("ping -c 5 -i 0.1 -W 2 10.74.0.1", timeout=30).output) == 5
        vm.run("ping -i 0.2 -W 1 -c 100 10.74.0.1 > /tmp/ping.log 2>&1 &", timeout=20)
        time.sleep(3)
        srv.kill()
        time.sleep(1.5)
        srv.start()  # QEMU's reconnect=1 re-sends the handshake; the rings resume
        time.sleep(12)
        log = vm.run("cat /tmp/ping.log", timeout=20).output
        seqs = [int(m) for m in re.findall(r"seq=(\d+)", log)]
        assert seqs, log
        # Replies before the kill and, after the restart, replies again up to the end.
        assert min(seqs) < 10 and max(seqs) > 60, log
        after = [s for s in seqs if s > 40]
        assert len(after) >= 15, log
        assert srv.starts == 2 and "front end connected (1)" in srv.log.read_text()
        if ring == "packed":
            # QEMU keeps no used index for a packed ring and re-sent a stale base: the restarted
            # back end read the position back from the descriptor flags. (Split: QEMU itself
            # restores next-avail from used.idx in guest memory.)
            assert "resuming from the ring" in srv.log.read_text()


def test_two_guests_on_one_switch_ping_each_other(tmp_path, guest_image):
    socks = [str(tmp_path / f"vwv-sw{i}.sock") for i in range(2)]
    srv = Server(None, [f"vhost-user,path={p},backend=switch,switch=vwvsw,name=p{i}"
                        for i, p in enumerate(socks)], tmp_path / "serve.log")
    srv.start()
    try:
        with _guest(socks[0], "10.75.0.1/24", guest_image) as a, \
                _guest(socks[1], "10.75.0.2/24", guest_image) as b:
            a.wait_ready(120)
            b.wait_ready(120)
            out = a.run("ping -c 20 -i 0.1 -W 2 10.75.0.2", timeout=60).output
            assert _ping_received(out) == 20, out
            out = b.run("ping -c 10 -i 0.1 -W 2 10.75.0.1", timeout=60).output
            assert _ping_received(out) == 10, out
            st = srv.stats(socks[0])
            assert len(st["ports"]) == 2
            for port in st["ports"]:
                rings = {r["role"]: r for r in port["vhost_user"]["rings"]}
                assert rings["tx0"]["frames"] >= 30 and rings["rx0"]["frames"] >= 30
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


MULTI_SINK = r"""
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

MULTI_SOURCE = r"""
import socket, sys, threading, time
host, ports, n = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], int(sys.argv[3])
def send(p):
    for _ in range(100):
        try:
            c = socket.create_connection((host, p), timeout=5); break
        except OSError: time.sleep(0.2)
    c.sendall(bytes(n)); c.close()
ts = [threading.Thread(target=send, args=(p,)) for p in ports]
[t.start() for t in ts]; [t.join(150) for t in ts]
"""


def test_multiqueue_two_pairs_carry_traffic(tmp_path, guest_image):
    opts = "queues=2"
    with serve_on_tap(tmp_path, "vwv", tap_addr="10.76.0.1/24", queues=2) as (ns, srv, sock), \
            _guest(sock, "10.76.0.2/24", guest_image, nic_opts=opts, smp=2,
                   memory="384M") as vm:
        vm.wait_ready(120)
        assert vm.run("ls /sys/class/net/eth0/queues/", timeout=20).output.split() == [
            "rx-0", "rx-1", "tx-0", "tx-1"]
        ports = [5301 + i for i in range(8)]
        # host -> guest: 8 flows; the multi-queue TAP spreads them over both RX rings
        vm.run("; ".join(f"(nc -l -p {p} > /dev/null &)" for p in ports), timeout=20)
        src = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                              MULTI_SOURCE, "10.76.0.2", ",".join(map(str, ports)),
                              str(2 << 20)], capture_output=True, text=True, timeout=200)
        assert src.returncode == 0, src.stderr
        # guest -> host: 8 flows from processes the scheduler spreads over both vCPUs
        sink = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                                 MULTI_SINK, "10.76.0.1", ",".join(map(str, ports))],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
            vm.run(" ".join(f"dd if=/dev/zero bs=64k count=32 2>/dev/null | nc 10.76.0.1 {p} &"
                            for p in ports) + " wait", timeout=200)
            sizes = [int(x) for x in sink.stdout.readline().split()]
        finally:
            sink.kill()
            sink.wait()
        assert sizes == [2 << 20] * 8
        st = srv.stats(sock)
        rings = _rings(st)
        assert st["ports"][0]["device"]["queue_pairs"]["max"] == 2
        for role in ("rx0", "rx1", "tx0", "tx1"):
            assert rings[role]["started"] and rings[role]["enabled"], rings[role]
            assert rings[role]["frames"] > 50, (role, rings)


@pytest.mark.parametrize("server", ["on", "off"], ids=["serve-listens", "qemu-listens"])
def test_vm_net_vhost_user_starts_its_own_serve_sidecar(tmp_path, guest_image, server):
    """``--net vhost-user,serve=tap:IF``: the launcher starts and stops ``virtwire serve``;
    ``server=off`` makes QEMU listen and our back end connect (client mode)."""
    with netns("vwv") as ns:
        ns.add_tap("vwvs0", addr="10.79.0.1/24")
        vm = GuestVM(net=[f"vhost-user,serve=tap:vwvs0,mrg_rxbuf=off,server={server}"],
                     ip="10.79.0.2/24",
                     image=guest_image, netns=ns.name, name=f"vwv{os.getpid() % 10000}-sc")
        with vm:
            vm.wait_ready(90)
            out = vm.run("ping -c 10 -i 0.1 -W 2 10.79.0.1", timeout=60).output
            assert _ping_received(out) == 10, out
            logs = list(vm.tmpdir.glob("*.serve.log"))
            assert len(logs) == 1
            sock = next(vm.tmpdir.glob("*.vhost.sock"))
            st = json.loads(subprocess.run(
                [sys.executable, "-m", "virtwire", "stats", str(sock), "--compact"],
                capture_output=True, text=True, check=True, timeout=20).stdout)
            assert "MRG_RXBUF" not in st["ports"][0]["vhost_user"]["features"]
        # after the guest: the sidecar is gone
        left = subprocess.run(["pgrep", "-f", f"path={sock}"], capture_output=True, text=True)
        assert left.stdout.strip() == ""


def test_switch_with_tap_uplink_reaches_the_host(tmp_path, guest_image):
    with netns("vwv") as ns:
        ns.add_tap("vwvu0", addr="10.80.0.1/24")
        sock = str(tmp_path / "vwv-up.sock")
        srv = Server(ns, [f"vhost-user,path={sock},backend=switch,switch=vwvsw,uplink=vwvu0"],
                     tmp_path / "serve.log")
        srv.start()
        try:
            with _guest(sock, "10.80.0.2/24", guest_image) as vm:
                vm.wait_ready(90)
                out = vm.run("ping -c 20 -i 0.1 -W 2 10.80.0.1", timeout=60).output
                assert _ping_received(out) == 20, out
        finally:
            srv.stop()
        assert "Traceback" not in srv.log.read_text()
