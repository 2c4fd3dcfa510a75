"""The learning L2 switch backend: learning, flooding, filtering, aging, checksum completion."""

from __future__ import annotations

import pytest

from virtwire.backends.switch import L2Switch, SwitchPort
from virtwire.net.frame import inet_checksum
from virtwire.net.header import VirtioNetHdr
from virtwire.virtio import spec as s

A, B, C = (bytes.fromhex(x) for x in ("020000000001", "020000000002", "020000000003"))
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, n: int = 64, fill: int = 0x42) -> bytes:
    return dst + src + b"\x08\x00" + bytes([fill]) * (n - 14)


def tx(port: SwitchPort, f: bytes, hdr: VirtioNetHdr | None = None) -> None:
    h = (hdr or VirtioNetHdr()).pack(port.hdr_len)
    assert port.send([[memoryview(h), memoryview(f)]]) == 1


def rx_all(port: SwitchPort) -> list[tuple[VirtioNetHdr, bytes]]:
    out = []
    while (n := port.pending_len()):
        buf = bytearray(n)
        assert port.recv([memoryview(buf)]) == n
        out.append((VirtioNetHdr.unpack(buf, port.hdr_len), bytes(buf[port.hdr_len:])))
    return out


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sw() -> tuple[L2Switch, SwitchPort, SwitchPort, SwitchPort, Clock]:
    clock = Clock()
    sw = L2Switch("t", aging=10.0, clock=clock)
    return sw, sw.port("a"), sw.port("b"), sw.port("c"), clock


def test_flood_learn_forward_filter(sw) -> None:
    sw, pa, pb, pc, _ = sw
    tx(pa, frame(BCAST, A))  # broadcast: flooded to b and c, A learned on a
    assert [f for _h, f in rx_all(pb)] == [frame(BCAST, A)]
    assert [f for _h, f in rx_all(pc)] == [frame(BCAST, A)]
    assert rx_all(pa) == []
    tx(pb, frame(A, B))  # known unicast: only to a; B learned
    assert [f for _h, f in rx_all(pa)] == [frame(A, B)]
    assert rx_all(pc) == []
    tx(pa, frame(C, A))  # unknown unicast: flooded
    assert len(rx_all(pb)) == 1 and len(rx_all(pc)) == 1
    tx(pa, frame(A, A))  # destination on the ingress port: filtered
    assert rx_all(pb) == rx_all(pc) == []
    st = sw.stats()
    assert st["forwarded"] == 1 and st["flooded"] == 2 and st["filtered"] == 1
    assert {e["mac"]: e["port"] for e in st["fdb"]} == {"02:00:00:00:00:01": "a",
                                                        "02:00:00:00:00:02": "b"}


def test_multicast_source_never_learned_and_station_moves(sw) -> None:
    sw, pa, pb, pc, _ = sw
    tx(pa, frame(B, b"\x01\x00\x5e\x00\x00\x01"))
    assert sw.fdb == {}
    tx(pa, frame(BCAST, A))
    tx(pc, frame(BCAST, A))  # A moved to c
    assert sw.lookup(A) is pc and sw.counters["moved"] == 1


def test_aging(sw) -> None:
    sw, pa, pb, pc, clock = sw
    tx(pa, frame(BCAST, A))
    rx_all(pb), rx_all(pc)
    clock.t = 11.0
    tx(pb, frame(A, B))  # A aged out: flooded again
    assert len(rx_all(pa)) == 1 and len(rx_all(pc)) == 1
    assert sw.counters["aged"] == 1


def test_queue_limit_drops_counted(sw) -> None:
    sw, pa, pb, pc, _ = sw
    sw.queue_limit = 3
    for i in range(5):
        tx(pa, frame(BCAST, A, fill=i))
    assert [f[20] for _h, f in rx_all(pb)] == [0, 1, 2]
    assert pb.counters["rx_queue_drops"] == 2


def test_partial_checksum_passed_or_completed(sw) -> None:
    sw, pa, pb, pc, _ = sw
    pb.configure(1 << s.VIRTIO_NET_F_GUEST_CSUM | 1 << s.VIRTIO_F_VERSION_1, 12)
    pc.configure(1 << s.VIRTIO_F_VERSION_1, 12)
    body = bytearray(frame(BCAST, A, 100))
    # Checksum field at 14+6 seeded with 0 -> completing it gives the plain sum of the tail.
    body[20:22] = b"\0\0"
    h = VirtioNetHdr(flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=14, csum_offset=6)
    tx(pa, bytes(body), h)
    ((hb, fb),) = rx_all(pb)
    assert hb.flags == s.VIRTIO_NET_HDR_F_NEEDS_CSUM and (hb.csum_start, hb.csum_offset) == (14, 6)
    assert fb == bytes(body)
    ((hc, fc),) = rx_all(pc)
    assert hc.flags == 0
    assert inet_checksum(fc[14:]) == 0  # a complete checksum verifies to zero
    assert fc[:20] == bytes(body[:20]) and fc[22:] == bytes(body[22:])


def test_disabled_port_gets_nothing_and_closed_port_forgotten(sw) -> None:
    sw, pa, pb, pc, _ = sw
    pc.set_enabled(False)
    tx(pb, frame(BCAST, B))
    assert len(rx_all(pa)) == 1 and rx_all(pc) == []
    pb.close()
    assert "b" not in sw.ports and sw.lookup(B) is None
    with pytest.raises(ValueError):
        sw.port("a")


def test_wakeup_fd_signalled_once_per_batch(sw) -> None:
    import os
    import select

    sw, pa, pb, pc, _ = sw
    fd = pb.fileno()  # an epoll fd over the port's eventfd (and an uplink, if any)
    assert select.select([fd], [], [], 0)[0] == []
    h = memoryview(VirtioNetHdr().pack(12))
    pa.send([[h, memoryview(frame(BCAST, A, fill=i))] for i in range(10)])
    assert select.select([fd], [], [], 0)[0] == [fd]
    assert os.eventfd_read(pb._efd) == 1  # one wake-up for the whole batch
    pb.drain_wakeup()
    assert select.select([fd], [], [], 0)[0] == []
    assert len(rx_all(pb)) == 10


def _tcp_super(payload: bytes) -> bytes:
    """Ethernet/IPv4/TCP super-frame (checksums left to the segmenter)."""
    import struct

    tcp = struct.pack(">HHIIBBHHH", 1, 2, 100, 7, 5 << 4, 0x18, 1000, 0, 0)
    ip = bytearray(20)
    ip[0], ip[8], ip[9] = 0x45, 64, 6
    ip[2:4] = (40 + len(payload)).to_bytes(2, "big")
    ip[12:16], ip[16:20] = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    return b"\x02" * 6 + A + b"\x08\x00" + bytes(ip) + tcp + payload


def test_gso_passed_whole_or_segmented_per_egress(sw) -> None:
    sw, pa, pb, pc, _ = sw
    v1 = 1 << s.VIRTIO_F_VERSION_1
    pb.configure(v1 | 1 << s.VIRTIO_NET_F_GUEST_CSUM | 1 << s.VIRTIO_NET_F_GUEST_TSO4, 12)
    pc.configure(v1, 12)
    payload = bytes(range(256)) * 12
    f = BCAST + _tcp_super(payload)[6:]  # flood to both
    h = VirtioNetHdr(flags=1, gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1000, hdr_len=54,
                     csum_start=34, csum_offset=16)
    tx(pa, f, h)
    ((hb, fb),) = rx_all(pb)
    assert (hb.gso_type, hb.gso_size, hb.flags) == (s.VIRTIO_NET_HDR_GSO_TCPV4, 1000, 1)
    assert fb == f
    segs = rx_all(pc)
    assert len(segs) == 4 and all(x[0].gso_type == 0 and x[0].flags == 0 for x in segs)
    assert b"".join(x[1][54:] for x in segs) == payload
    for _h, x in segs:
        pseudo = x[26:34] + b"\0\x06" + (len(x) - 34).to_bytes(2, "big")
        assert inet_checksum(pseudo + x[34:]) == 0
    assert pc.counters["gso_segmented"] == 1
