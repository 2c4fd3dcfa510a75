"""A switch uplink joined to other hosts through the kernel's VXLAN device.

Theory of operation
-------------------
We do not tunnel frames ourselves: ``--port ...,backend=switch,uplink=vxlan:VNI@REMOTE`` makes
the switch's uplink a TAP (``vwuVNI``) and puts it on a Linux bridge (``vwbrVNI``) together with
a VXLAN device (``vwvxVNI``: ``ip link add ... type vxlan id VNI remote REMOTE dstport 4789
dev DEV``). A frame a guest sends to a MAC on another host floods or is forwarded by our switch
to the uplink TAP, the bridge hands it to the VXLAN device, and the kernel sends it to REMOTE
inside UDP port 4789 with the VNI in the VXLAN header; the other host's VXLAN device decapsulates
it into its bridge, its TAP, its switch and its guest. Any host of the same VNI pointing at us
completes the link (point to point here; more hosts: one ``bridge fdb append`` per remote).

MTU: the encapsulation adds 50 bytes (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8; 70 over
IPv6) to every frame the guest sends, and the underlay (``DEV``, found by ``ip route get REMOTE``
unless ``uplink_dev=`` names it) does not fragment them. So the guest's MTU must be the
underlay's minus 50: 1450 on a 1500 underlay. ``wire`` gives the port's device that MTU when
``mtu=`` is not set (and refuses a larger one); the device offers VIRTIO_NET_F_MTU with it.
Under vhost-user QEMU owns the config space, so the guest sees it when QEMU's NIC has
``host_mtu=1450`` (otherwise set it inside the guest: ``ip link set eth0 mtu 1450``). The TAP,
VXLAN device and bridge get the same MTU. TCP segmentation offload still works: the guest's
64 KiB frames are cut into MSS-sized segments (from the 1450 MTU) before encapsulation.

``close()`` removes the bridge and the VXLAN device (the TAP goes with the switch).
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from virtwire.netlab.keys import NetlabError, Vxlan

__all__ = ["Overlay", "join_vxlan", "VXLAN_PORT", "uplink_tap_name"]

log = logging.getLogger(__name__)

VXLAN_PORT = 4789  # IANA


def uplink_tap_name(vx: Vxlan) -> str:
    return f"vwu{vx.vni}"


def _ip(args: Sequence[str], what: str) -> str:
    try:
        p = subprocess.run(["ip", *args], capture_output=True, text=True, check=False,
                           timeout=10)
    except FileNotFoundError:
        raise NetlabError(f"{what}: the ip command (iproute2) is not installed") from None
    if p.returncode:
        msg = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise NetlabError(f"{what}: {msg}")
    return p.stdout


def _mtu(dev: str) -> int:
    try:
        with open(f"/sys/class/net/{dev}/mtu") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        raise NetlabError(f"uplink_dev={dev}: no such network device here") from None


def route_dev(remote: str) -> str:
    """The device the kernel would send to ``remote`` through."""
    out = _ip(["-o", "route", "get", remote], f"uplink=vxlan: no route to {remote}")
    m = re.search(r"\bdev (\S+)", out)
    if not m:
        raise NetlabError(f"uplink=vxlan: no route to {remote}")
    return m.group(1)


@dataclass
class Overlay:
    """What ``join_vxlan`` made (see module docstring)."""

    vxlan: Vxlan
    dev: str
    bridge: str
    vxlan_if: str
    tap: str
    underlay_mtu: int
    overhead: int
    closed: bool = False

    @property
    def guest_mtu(self) -> int:
        return self.underlay_mtu - self.overhead

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for link in (self.vxlan_if, self.bridge):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)

    def describe(self) -> dict[str, object]:
        return {"vni": self.vxlan.vni, "remote": self.vxlan.remote, "dev": self.dev,
                "bridge": self.bridge, "vxlan": self.vxlan_if, "tap": self.tap,
                "underlay_mtu": self.underlay_mtu, "guest_mtu": self.guest_mtu}


def join_vxlan(tap: str, vx: Vxlan, *, dev: str | None = None) -> Overlay:
    """Bridge TAP ``tap`` with a new VXLAN device for ``vx`` (module docstring)."""
    dev = dev or route_dev(vx.remote)
    under = _mtu(dev)
    ov = Overlay(vx, dev, f"vwbr{vx.vni}", f"vwvx{vx.vni}", tap, under, vx.overhead)
    if ov.guest_mtu < 68:
        raise NetlabError(f"uplink=vxlan: {dev}'s MTU {under} leaves no room for frames")
    made: list[str] = []
    try:
        _ip(["link", "add", ov.vxlan_if, "type", "vxlan", "id", str(vx.vni), "remote",
             vx.remote, "dstport", str(VXLAN_PORT), "dev", dev],
            f"cannot create VXLAN device {ov.vxlan_if} (VNI {vx.vni})")
        made.append(ov.vxlan_if)
        _ip(["link", "add", ov.bridge, "type", "bridge"], f"cannot create bridge {ov.bridge}")
        made.append(ov.bridge)
        for link in (ov.vxlan_if, tap):
            _ip(["link", "set", link, "mtu", str(ov.guest_mtu)], f"cannot set {link}'s MTU")
            _ip(["link", "set", link, "master", ov.bridge], f"cannot put {link} on {ov.bridge}")
        for link in (ov.vxlan_if, tap, ov.bridge):
            _ip(["link", "set", link, "up"], f"cannot bring {link} up")
    except NetlabError:
        for link in made:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        raise
    log.info("uplink %s joined VXLAN %d to %s over %s (MTU %d -> guests %d)", tap, vx.vni,
             vx.remote, dev, under, ov.guest_mtu)
    return ov
