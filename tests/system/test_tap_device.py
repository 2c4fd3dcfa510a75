"""The virtio-net device on a real TAP in a network namespace we create (no QEMU).

Our driver model brings the device up in-process; the device's backend is a TAP inside a fresh
netns holding 10.77.0.1/24. ICMP echo requests written by the device must reach the kernel,
and its replies must come back through the device's RX path (readv straight into the driver's
receive buffers). Everything is removed by the fixtures, also on failure.
"""

from __future__ import annotations

import select
import time

import pytest

from virtwire.backends.tap import TapBackend, TapError
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.net.frame import decode, icmp_echo
from virtwire.netns import netns, unique_name
from virtwire.virtio import spec as s
from virtwire.virtio.pair import LocalNetTransport, RecordingInterrupt

pytestmark = pytest.mark.system

DEV_MAC = "02:76:77:00:00:02"
DEV_IP, NS_IP = "10.77.0.2", "10.77.0.1"


@pytest.fixture
def ns():
    with netns("vwn") as n:
        yield n


def _bring_up(taps: list[TapBackend], options: str | None, packed: bool = False,
              pairs: int = 1) -> tuple[VirtioNet, VirtioNetDriver]:
    dev = VirtioNet(taps if len(taps) > 1 else taps[0], options=options, mac=DEV_MAC)
    mem = BytearrayGuestMemory(64 << 20)
    dev.attach(mem, RecordingInterrupt())
    drv = VirtioNetDriver(LocalNetTransport(dev), mem, DmaAllocator(0x10000, (64 << 20) - 0x10000),
                          NetDriverConfig(packed=packed, pairs=pairs))
    drv.probe()
    return dev, drv


def _serve_until(dev: VirtioNet, drv: VirtioNetDriver, taps: list[TapBackend], pred,
                 timeout: float = 5.0, queue: int = 0) -> list:
    """The event loop's job in miniature: wait on the TAP fds, let the device serve RX."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([t.fileno() for t in taps], [], [], 0.05)
        for t in r:
            dev.backend_ready(taps.index(next(x for x in taps if x.fileno() == t)))
        for q in range(len(drv.rxqs)):
            for f in drv.receive(queue=q):
                got.append(f)
        if pred(got):
            break
    return got


def _echo_replies(frames: list, ident: int) -> list:
    out = []
    for f in frames:
        d = decode(f.data)
        ic = d.get("icmp")
        if ic and ic["name"] == "echo reply" and ic.get("id") == ident:
            out.append((ic["seq"], f))
    return out


@pytest.mark.parametrize("options,packed", [(None, False), ("mrg_rxbuf=off", False),
                                            (None, True)])
def test_ping_kernel_through_tap(ns, options: str | None, packed: bool) -> None:
    name = unique_name("vwnt")
    tap = TapBackend(name, netns=ns.name)
    try:
        ns.run(["ip", "addr", "add", f"{NS_IP}/24", "dev", name])
        ns.run(["ip", "neigh", "replace", DEV_IP, "lladdr", DEV_MAC, "dev", name])
        dev, drv = _bring_up([tap], options, packed)
        tap_mac = ns.run(["cat", f"/sys/class/net/{name}/address"]).stdout.strip()
        ident = 0x4242
        sizes = [8, 56, 200, 1000, 1472, 4000, 8000]  # the last two are fragmented by IPv4
        n = 100
        for seq in range(n):
            data = bytes((seq + i) & 0xFF for i in range(sizes[seq % len(sizes)]))
            req = icmp_echo(DEV_MAC, tap_mac, DEV_IP, NS_IP, ident, seq, data=data)
            if len(req) <= 1514:
                assert drv.send([req]) == 1
        small = [q for q in range(n) if 14 + 20 + 8 + sizes[q % len(sizes)] <= 1514]
        got = _serve_until(dev, drv, [tap],
                           lambda g: len(_echo_replies(g, ident)) >= len(small))
        replies = dict(_echo_replies(got, ident))
        assert sorted(replies) == small
        for seq, f in replies.items():
            data = bytes((seq + i) & 0xFF for i in range(sizes[seq % len(sizes)]))
            assert f.data.endswith(data)
        st = dev.stats()
        assert st["queues"][1]["frames"] >= len(small) and st["queues"][1]["drops"] == 0
        assert st["queues"][0]["frames"] >= len(small)
        link = ns.link_stats(name) if name in ns.links else None
        assert link is None or link["rx_packets"] >= len(small)
    finally:
        tap.close()


def test_large_udp_from_kernel_arrives_as_gso_or_fragments(ns) -> None:
    """A 30000-byte UDP datagram from the namespace reaches the device complete (fragments,
    reassembled here by concatenation of the IP payloads)."""
    name = unique_name("vwnt")
    tap = TapBackend(name, netns=ns.name)
    try:
        ns.run(["ip", "addr", "add", f"{NS_IP}/24", "dev", name])
        ns.run(["ip", "neigh", "replace", DEV_IP, "lladdr", DEV_MAC, "dev", name])
        dev, drv = _bring_up([tap], None)
        payload = bytes(i & 0xFF for i in range(30000))
        ns.run(["python3", "-c",
                "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                f"s.sendto(bytes(i & 0xFF for i in range(30000)), ('{DEV_IP}', 9999))"])

        def udp_bytes(g: list) -> int:
            return sum(len(f.data) - 34 for f in g if decode(f.data).get("ip", {}).get(
                "proto") == 17)

        got = _serve_until(dev, drv, [tap], lambda g: udp_bytes(g) >= 30008)
        frags = [f for f in got if decode(f.data).get("ip", {}).get("proto") == 17]
        body = b"".join(f.data[34:34 + int.from_bytes(f.data[16:18], "big") - 20]
                        for f in sorted(frags, key=lambda f: int.from_bytes(f.data[20:22], "big")
                                        & 0x1FFF))
        assert body[8:] == payload
        assert dev.counters[0]["drops"] == 0
    finally:
        tap.close()


def test_multiqueue_tap_two_pairs(ns) -> None:
    name = unique_name("vwnt")
    taps = [TapBackend(name, multi_queue=True, netns=ns.name) for _ in range(2)]
    try:
        ns.run(["ip", "addr", "add", f"{NS_IP}/24", "dev", name])
        ns.run(["ip", "neigh", "replace", DEV_IP, "lladdr", DEV_MAC, "dev", name])
        dev, drv = _bring_up(taps, "queues=2", pairs=2)
        assert dev.curr_pairs == 2 and len(drv.txqs) == 2
        tap_mac = ns.run(["cat", f"/sys/class/net/{name}/address"]).stdout.strip()
        for seq in range(20):
            req = icmp_echo(DEV_MAC, tap_mac, DEV_IP, NS_IP, 0x77, seq)
            assert drv.send([req], queue=seq % 2) == 1
        got = _serve_until(dev, drv, taps, lambda g: len(_echo_replies(g, 0x77)) >= 20)
        assert sorted(q for q, _f in _echo_replies(got, 0x77)) == list(range(20))
        assert dev.counters[1]["frames"] == 10 and dev.counters[3]["frames"] == 10
        with pytest.raises(TapError, match="multi-queue mismatch"):
            TapBackend(name, netns=ns.name)
    finally:
        for t in taps:
            t.close()


def test_tap_errors_are_clear(ns) -> None:
    with pytest.raises(TapError, match="bad interface name"):
        TapBackend("x" * 20)
    with pytest.raises(TapError, match="network namespace"):
        TapBackend("vwnnope0", netns="vwn-does-not-exist")
    with pytest.raises(TapError, match="not a TAP"):
        import os

        r, w = os.pipe()
        try:
            TapBackend("vwnfd0", fd=r)
        finally:
            os.close(r)
            os.close(w)


def test_offloads_follow_negotiated_features(ns) -> None:
    name = unique_name("vwnt")
    tap = TapBackend(name, netns=ns.name)
    try:
        dev, drv = _bring_up([tap], None)
        assert dev.has_feature(s.VIRTIO_NET_F_GUEST_TSO4)
        out = ns.run(["ethtool", "-k", name]).stdout
        assert "tcp-segmentation-offload: on" in out
        tap2n = unique_name("vwnt")
        tap2 = TapBackend(tap2n, netns=ns.name)
        try:
            _bring_up([tap2], "guest_csum=off")
            out = ns.run(["ethtool", "-k", tap2n]).stdout
            assert "tcp-segmentation-offload: off" in out
            assert "tx-checksumming: off" in out
        finally:
            tap2.close()
    finally:
        tap.close()


def _tcp_gso_frame(src_mac: bytes, dst_mac: bytes, payload: bytes) -> tuple[bytes, bytes]:
    """An Ethernet/IPv4/TCP super-frame with a partial checksum, and its 10-byte GSO header."""
    import ipaddress
    import struct

    from virtwire.net.frame import inet_checksum

    src = ipaddress.IPv4Address(NS_IP).packed
    dst = ipaddress.IPv4Address(DEV_IP).packed
    tcp = bytearray(struct.pack(">HHIIBBHHH", 5001, 5002, 1000, 0, 5 << 4, 0x18, 65535, 0, 0))
    seg = bytes(tcp) + payload
    pseudo = src + dst + b"\x00\x06" + len(seg).to_bytes(2, "big")
    tcp[16:18] = ((~inet_checksum(pseudo)) & 0xFFFF).to_bytes(2, "big")
    ip = bytearray(20)
    ip[0], ip[8], ip[9] = 0x45, 64, 6
    ip[2:4] = (20 + len(seg)).to_bytes(2, "big")
    ip[6:8] = b"\x40\x00"
    ip[12:16], ip[16:20] = src, dst
    ip[10:12] = inet_checksum(bytes(ip)).to_bytes(2, "big")
    frame = dst_mac + src_mac + b"\x08\x00" + bytes(ip) + bytes(tcp) + payload
    hdr = struct.pack("<BBHHHH", 1, 1, 54, 1000, 34, 16)  # NEEDS_CSUM, TCPV4, mss 1000
    return frame, hdr


def _packet_socket(ns_name: str, ifname: str, vnet: bool):
    import socket

    from virtwire.backends.tap import in_netns

    def mk():
        sk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        if vnet:
            sk.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
        sk.bind((ifname, 0))
        sk.settimeout(3.0)
        return sk

    return in_netns(ns_name, mk)


@pytest.mark.parametrize("guest_tso", [True, False])
def test_gso_from_kernel_honours_negotiated_offloads(ns, guest_tso: bool) -> None:
    """A 3000-byte TCP super-frame sent into the TAP arrives whole (gso TCPV4, counted rx_gso)
    when the guest negotiated GUEST_TSO4, and segmented by the kernel when it did not."""
    name = unique_name("vwnt")
    tap = TapBackend(name, netns=ns.name)
    sk = None
    try:
        dev, drv = _bring_up([tap], None if guest_tso else "guest_tso4=off,guest_tso6=off,"
                             "guest_ecn=off")
        tap_mac = bytes.fromhex(ns.run(["cat", f"/sys/class/net/{name}/address"])
                                .stdout.strip().replace(":", ""))
        sk = _packet_socket(ns.name, name, vnet=True)
        payload = bytes(i & 0xFF for i in range(3000))
        frame, hdr = _tcp_gso_frame(tap_mac, bytes.fromhex(DEV_MAC.replace(":", "")), payload)
        sk.send(hdr + frame)

        def tcp_payload(g: list) -> int:
            return sum(len(f.data) - 54 for f in g if decode(f.data).get("tcp"))

        got = _serve_until(dev, drv, [tap], lambda g: tcp_payload(g) >= 3000)
        tcp = [f for f in got if decode(f.data).get("tcp")]
        assert b"".join(f.data[54:] for f in tcp) == payload
        if guest_tso:
            assert len(tcp) == 1 and len(tcp[0].data) > 1514
            assert tcp[0].gso_type == s.VIRTIO_NET_HDR_GSO_TCPV4 and tcp[0].gso_size == 1000
            assert dev.counters[0]["rx_gso"] == 1
        else:
            assert len(tcp) == 3 and all(len(f.data) <= 1514 and f.gso_type == 0 for f in tcp)
            assert "rx_gso" not in dev.counters[0]
    finally:
        if sk is not None:
            sk.close()
        tap.close()


def test_gso_from_device_crosses_tap_whole(ns) -> None:
    """The device passes a guest's GSO frame (HOST_TSO4) to the TAP unsegmented: a packet
    socket on the TAP sees one frame larger than the MTU; the device counts it (tx_gso)."""
    name = unique_name("vwnt")
    tap = TapBackend(name, netns=ns.name)
    sk = None
    try:
        ns.run(["ip", "addr", "add", f"{NS_IP}/24", "dev", name])
        dev, drv = _bring_up([tap], None)
        assert dev.has_feature(s.VIRTIO_NET_F_HOST_TSO4)
        sk = _packet_socket(ns.name, name, vnet=False)
        tap_mac = bytes.fromhex(ns.run(["cat", f"/sys/class/net/{name}/address"])
                                .stdout.strip().replace(":", ""))
        payload = bytes((i * 3) & 0xFF for i in range(4000))
        frame, _hdr = _tcp_gso_frame(bytes.fromhex(DEV_MAC.replace(":", "")), tap_mac, payload)
        assert drv.send([frame], flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM,
                        gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1000,
                        csum_start=34, csum_offset=16) == 1
        deadline = time.monotonic() + 3
        seen = None
        while time.monotonic() < deadline:
            data = sk.recv(70000)
            if len(data) > 1514 and data[54:] == payload:
                seen = data
                break
        assert seen is not None, "GSO frame not seen whole on the TAP"
        assert dev.counters[1]["tx_gso"] == 1 and dev.counters[1]["drops"] == 0
    finally:
        if sk is not None:
            sk.close()
        tap.close()
