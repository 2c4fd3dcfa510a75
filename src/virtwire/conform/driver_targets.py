"""Drivers the driver suite observes: ``virtwire conform --driver NAME``.

- ``virtwire``: our own driver (``net.driver``) on the device model in process.
- ``linux-pci``: Debian's guest kernel (virtio_net over virtio_pci) on virtwire's whole PCI
  device (``--net pci``: the device runs in a sidecar thread of this process, so the recorder
  sees it directly), on a TAP in a namespace of ours.
- ``linux-vhost-user``: the same guest on ``virtwire serve``'s vhost-user port (QEMU's front end
  in between: the control queue stays in QEMU); serve writes a trace file that is read back.
- ``dpdk``: DPDK's virtio-user PMD (testpmd ``--vdev net_virtio_user0``, txonly) against serve.

Each one drives traffic both ways (ping, fragmented large pings; testpmd's txonly burst and
frames injected on the TAP) and, where the driver owns the control queue, control commands
(promiscuous, all-multicast, MAC address, a VLAN).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

from virtwire.conform.context import test_frame
from virtwire.conform.drivers import analyze, observe_local, recording
from virtwire.errors import CliError, UserFacingError

__all__ = ["DRIVERS", "run_driver"]

GUEST_TRAFFIC = [
    "ping -c 10 -i 0.2 -W 2 {peer}",
    "ping -c 3 -s 1472 -W 2 {peer}",
    "ping -c 3 -s 8000 -W 2 {peer}",  # fragments: non-GSO frames within the MTU
]
GUEST_CTRL = [
    "ip link set eth0 promisc on", "ip link set eth0 allmulticast on",
    "ip link add link eth0 name eth0.42 type vlan id 42", "ip link set eth0.42 up",
    "ip link del eth0.42", "ip link set eth0 promisc off",
    "ip link set eth0 address 02:00:00:00:00:77", "ping -c 3 -i 0.2 -W 2 {peer}",
]


def _virtwire() -> dict[str, Any]:
    def drive(t: Any) -> None:
        drv = t.driver()
        rnd = random.Random(5)
        frames = [test_frame(rnd, rnd.randint(60, 1514)) for _ in range(500)]
        drv.send_all(frames)
        for f in frames[:200]:
            t.peer_send(f)
        drv.poll_receive(200, 3)
        drv.set_promisc(True)
        drv.set_allmulti(True)
        drv.vlan(42, True)
        drv.set_mac(bytes.fromhex("020000000077"))
    return observe_local(drive)


def _guest(vm: Any, peer: str, ctrl: bool) -> None:
    vm.wait_ready(240)
    for c in GUEST_TRAFFIC + (GUEST_CTRL if ctrl else []):
        out = vm.run(c.format(peer=peer), timeout=60).output
        if c.startswith("ping") and " 0 received" in out:
            raise UserFacingError(f"guest: {c.format(peer=peer)!r} got no reply: {out[-300:]}")


def _linux_pci() -> dict[str, Any]:
    from virtwire.guest.qemu import GuestVM
    from virtwire.netns import netns

    with netns("vwcd") as ns:
        ns.add_tap("vwcdp0", addr="10.75.0.1/24")
        with recording() as rec, GuestVM(net=["pci,backend=tap,ifname=vwcdp0"],
                                         ip="10.75.0.2/24", netns=ns.name,
                                         name=f"vwcd{os.getpid() % 10000}") as vm:
            _guest(vm, "10.75.0.1", ctrl=True)
    return analyze(rec.events, "linux-pci", "Debian's Linux virtio_net + virtio_pci on "
                   "virtwire's PCI device (x-pci-proxy-dev), TAP peer", rec.tx_headers)


def _serve_trace(run: Any, name: str, description: str) -> dict[str, Any]:
    from virtwire.conform.peers import VirtwireServe
    from virtwire.trace.reader import read_events

    d = tempfile.mkdtemp(prefix="vwcd-")
    tpath = os.path.join(d, "serve.jsonl")
    with VirtwireServe(name="vwcd", trace=tpath) as srv:
        run(srv)
    events = list(read_events(tpath))
    return analyze(events, name, description)


def _linux_vhost_user() -> dict[str, Any]:
    from virtwire.guest.qemu import GuestVM

    def run(srv: Any) -> None:
        srv.ns.run(["ip", "addr", "add", "10.76.0.1/24", "dev", srv.tap], check=False)
        with GuestVM(net=[f"vhost-user,socket={srv.sock_path}"], ip="10.76.0.2/24",
                     name=f"vwcd{os.getpid() % 10000}") as vm:
            _guest(vm, "10.76.0.1", ctrl=True)
    return _serve_trace(run, "linux-vhost-user", "Debian's Linux virtio_net behind QEMU's "
                        "vhost-user front end, on virtwire serve (trace file)")


def _dpdk() -> dict[str, Any]:
    from virtwire.conform.dpdk import Testpmd

    def run(srv: Any) -> None:
        vdev = f"net_virtio_user0,path={srv.sock_path},queues=1,queue_size=256"
        with Testpmd("txonly", name="vwcd", vdev=vdev):
            rnd = random.Random(9)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                srv.send_to_device(test_frame(rnd, rnd.randint(60, 1514)))
                time.sleep(0.01)
    return _serve_trace(run, "dpdk", "DPDK virtio-user PMD (testpmd txonly) on virtwire serve "
                        "(trace file)")


DRIVERS = {"virtwire": _virtwire, "linux-pci": _linux_pci,
           "linux-vhost-user": _linux_vhost_user, "dpdk": _dpdk}


def run_driver(name: str) -> dict[str, Any]:
    """The driver suite's report for driver ``name`` (``DRIVERS``)."""
    if name not in DRIVERS:
        raise CliError(f"unknown driver {name!r} (known: {', '.join(DRIVERS)})")
    return DRIVERS[name]()
