"""The guest's VLAN filter (VIRTIO_NET_CTRL_VLAN) where virtwire owns the control queue (issue 18).

In PCI-proxy mode (``GuestVM(net=["pci,backend=tap,..."])``) the whole device is ours, control
queue included: the guest's 8021q module adds each VLAN interface's id to the device's filter
with VIRTIO_NET_CTRL_VLAN_ADD, and the device drops tagged frames of VLANs the guest did not add
before they reach a receive buffer (counted in ``rx_filtered``). The host kernel here has no
8021q, so tagged frames are written on the TAP's host end with a packet socket: broadcast
frames of a local experimental EtherType (0x88b5) tagged 10 or 20. What the guest got is read
from its VLAN interfaces' ``rx_packets``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from virtwire.guest.qemu import GuestVM
from virtwire.netns import Netns, netns_with_tap

pytestmark = pytest.mark.system

N = 20
SEND = r"""
import socket, struct, sys
ifname, vid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
for i in range(n):
    f = b"\xff" * 6 + bytes.fromhex("02aabbccdd01") + struct.pack("!HH", 0x8100, vid)
    f += struct.pack("!HI", 0x88B5, i) + bytes(50)
    s.send(f)
"""


def _send_tagged(ns: Netns, tap: str, vid: int) -> None:
    subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", SEND, tap, str(vid),
                    str(N)], check=True, capture_output=True, timeout=30)


def _rx_packets(vm: GuestVM, ifname: str) -> int:
    out = vm.run(f"cat /sys/class/net/{ifname}/statistics/rx_packets", timeout=20).output
    return int(out.strip().split()[-1])


def _device(vm: GuestVM) -> dict:
    return vm.pci_proxy.stats()["device"]


def _filtered(dev: dict) -> int:
    return sum(q.get("rx_filtered", 0) for q in dev["queues"])


def _add_vlan(vm: GuestVM, vid: int) -> None:
    r = vm.run(f"ip link add link eth0 name eth0.{vid} type vlan id {vid} && "
               f"ip link set eth0.{vid} up && echo added", timeout=20)
    assert "added" in r.output, r.output


def test_guest_vlan_filter_drops_vlans_it_did_not_add(guest_image):
    with netns_with_tap("vwf", addr="10.85.0.1/24") as (ns, tap):
        vm = GuestVM([f"pci,backend=tap,ifname={tap}"], ip="10.85.0.2/24", netns=ns.name,
                     image=guest_image, name=f"vwf{os.getpid() % 10000}")
        with vm:
            vm.wait_ready(90)
            features = vm.run("cat /sys/class/net/eth0/device/features", timeout=20).output
            bits = features.strip().split()[-1]
            assert bits[19] == "1", bits  # VIRTIO_NET_F_CTRL_VLAN negotiated
            _add_vlan(vm, 10)
            vlans = _device(vm)["rx_mode"]["vlans"]
            assert 10 in vlans and 20 not in vlans, vlans

            before = _filtered(_device(vm))
            _send_tagged(ns, tap, 10)
            _send_tagged(ns, tap, 20)
            vm.run("sleep 1", timeout=10)
            assert _rx_packets(vm, "eth0.10") >= N  # VLAN 10: the guest added it
            dropped = _filtered(_device(vm)) - before
            assert dropped >= N, dropped  # VLAN 20: dropped by the device's filter

            _add_vlan(vm, 20)  # now the guest wants VLAN 20 too
            assert 20 in _device(vm)["rx_mode"]["vlans"]
            before = _filtered(_device(vm))
            _send_tagged(ns, tap, 20)
            vm.run("sleep 1", timeout=10)
            assert _rx_packets(vm, "eth0.20") >= N
            assert _filtered(_device(vm)) - before < N

            vm.run("ip link del eth0.20", timeout=20)  # VLAN_DEL: filtered again
            assert 20 not in _device(vm)["rx_mode"]["vlans"]
            before = _filtered(_device(vm))
            _send_tagged(ns, tap, 20)
            vm.run("sleep 1", timeout=10)
            assert _filtered(_device(vm)) - before >= N
        assert vm.pci_proxy.stopped.is_set()
