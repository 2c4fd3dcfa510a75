"""Two virtio-net devices on one in-process learning switch with a TAP uplink in our netns:
each device pings the kernel through the uplink, and the devices reach each other."""

from __future__ import annotations

import select
import time

import pytest

from virtwire.backends.switch import L2Switch
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.net.frame import decode, icmp_echo
from virtwire.netns import netns, unique_name
from virtwire.virtio.pair import LocalNetTransport, RecordingInterrupt

pytestmark = pytest.mark.system


def _device(port, mac: str, packed: bool) -> tuple[VirtioNet, VirtioNetDriver]:
    dev = VirtioNet(port, mac=mac)
    mem = BytearrayGuestMemory(16 << 20)
    dev.attach(mem, RecordingInterrupt())
    drv = VirtioNetDriver(LocalNetTransport(dev), mem, DmaAllocator(0x10000, (16 << 20) - 0x10000),
                          NetDriverConfig(packed=packed))
    drv.probe()
    return dev, drv


@pytest.mark.parametrize("packed", [False, True])
def test_switch_uplink_and_peers(packed: bool) -> None:
    with netns("vwn") as ns:
        sw = L2Switch(unique_name("vwns"))
        up = unique_name("vwnu")
        sw.add_uplink(up, netns=ns.name)
        try:
            ns.run(["ip", "addr", "add", "10.77.1.1/24", "dev", up])
            tap_mac = ns.run(["cat", f"/sys/class/net/{up}/address"]).stdout.strip()
            ports = [sw.port("a"), sw.port("b")]
            macs = ["02:76:77:00:01:0a", "02:76:77:00:01:0b"]
            ips = ["10.77.1.10", "10.77.1.11"]
            devs = [_device(p, m, packed) for p, m in zip(ports, macs)]
            for ip, mac in zip(ips, macs):
                ns.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", up])
            got: list[list] = [[], []]

            def serve(pred, timeout=5.0) -> None:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and not pred():
                    r, _, _ = select.select([p.fileno() for p in ports], [], [], 0.05)
                    for i, p in enumerate(ports):
                        if p.fileno() in r:
                            devs[i][0].backend_ready(0)
                        got[i].extend(devs[i][1].receive())

            def replies(i: int, ident: int) -> set[int]:
                return {d["icmp"]["seq"] for d in (decode(f.data) for f in got[i])
                        if d.get("icmp", {}).get("name") == "echo reply"
                        and d["icmp"].get("id") == ident}

            for i in range(2):
                for seq in range(50):
                    devs[i][1].send([icmp_echo(macs[i], tap_mac, ips[i], "10.77.1.1", 100 + i,
                                               seq)])
            serve(lambda: len(replies(0, 100)) == 50 and len(replies(1, 101)) == 50)
            assert replies(0, 100) == set(range(50)) and replies(1, 101) == set(range(50))
            # Device a pings device b; b's "guest" (our driver) answers.
            devs[0][1].send([icmp_echo(macs[0], macs[1], ips[0], ips[1], 7, 1)])
            serve(lambda: any(decode(f.data).get("icmp", {}).get("id") == 7 for f in got[1]))
            req = [f for f in got[1] if decode(f.data).get("icmp", {}).get("id") == 7]
            assert req and decode(req[0].data)["icmp"]["name"] == "echo request"
            st = sw.stats()
            assert st["uplink"]["rx_frames"] >= 100 and st["forwarded"] >= 100
            assert {e["port"] for e in st["fdb"]} >= {"a", "b", "uplink"}
        finally:
            for p in list(sw.ports.values()):
                p.close()
            sw.close()
