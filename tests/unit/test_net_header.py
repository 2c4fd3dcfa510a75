"""virtio_net_hdr (virtio 1.2 §5.1.6): layout, size rule, TX validation, checksum completion."""

from __future__ import annotations

import pytest

from virtwire.net.frame import inet_checksum
from virtwire.net.header import (
    MAX_FRAME,
    VirtioNetHdr,
    check_tx_header,
    ethertype,
    finish_checksum,
    gather,
    hdr_size,
    inet_sum,
    is_multicast,
    scatter,
    skip,
)
from virtwire.virtio import spec as s

ALL = s.bit(s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_HOST_TSO6,
            s.VIRTIO_NET_F_HOST_ECN, s.VIRTIO_NET_F_HOST_UFO)


def test_layout_little_endian_12_and_10() -> None:
    h = VirtioNetHdr(flags=1, gso_type=4, hdr_len=0x0102, gso_size=0x0304, csum_start=0x0506,
                     csum_offset=0x0708, num_buffers=0x090A)
    assert h.pack(12) == bytes([1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0A, 0x09])
    assert h.pack(10) == h.pack(12)[:10]
    assert VirtioNetHdr.unpack(h.pack(12)) == h
    h10 = VirtioNetHdr.unpack(h.pack(10), 10)
    assert h10.num_buffers == 0 and h10.csum_offset == 0x0708
    with pytest.raises(ValueError):
        VirtioNetHdr.unpack(b"\0" * 11, 12)
    with pytest.raises(ValueError):
        h.pack(11)


def test_header_size_rule() -> None:
    assert hdr_size(0) == 10
    assert hdr_size(1 << s.VIRTIO_F_VERSION_1) == 12
    assert hdr_size(1 << s.VIRTIO_NET_F_MRG_RXBUF) == 12


@pytest.mark.parametrize(
    "hdr,frame_len,features,reason",
    [
        (VirtioNetHdr(), 60, 0, None),
        (VirtioNetHdr(), 13, 0, "runt"),
        (VirtioNetHdr(), MAX_FRAME + 1, ALL, "oversize"),
        (VirtioNetHdr(flags=1, csum_start=34, csum_offset=6), 60, 0, "csum_not_negotiated"),
        (VirtioNetHdr(flags=1, csum_start=34, csum_offset=6), 60, ALL, None),
        (VirtioNetHdr(flags=1, csum_start=34, csum_offset=25), 60, ALL, "bad_csum_offset"),
        (VirtioNetHdr(flags=1, csum_start=34, csum_offset=24), 60, ALL, None),
        (VirtioNetHdr(flags=1, csum_start=59, csum_offset=0), 60, ALL, "bad_csum_offset"),
        (VirtioNetHdr(flags=1, csum_start=58, csum_offset=0), 60, ALL, None),
        (VirtioNetHdr(flags=0x80), 60, 0, None),  # unknown flag bits are ignored
        (VirtioNetHdr(flags=1, gso_type=2, gso_size=1000, csum_start=34, csum_offset=16), 3000,
         ALL, "bad_gso_type"),
        (VirtioNetHdr(flags=1, gso_type=1, gso_size=1000, csum_start=34, csum_offset=16), 3000,
         s.bit(s.VIRTIO_NET_F_CSUM), "gso_not_negotiated"),
        (VirtioNetHdr(flags=1, gso_type=4, gso_size=1000, csum_start=54, csum_offset=16), 3000,
         s.bit(s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4), "gso_not_negotiated"),
        (VirtioNetHdr(flags=1, gso_type=0x81, gso_size=1000, csum_start=34, csum_offset=16),
         3000, s.bit(s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4), "ecn_not_negotiated"),
        (VirtioNetHdr(flags=1, gso_type=0x81, gso_size=1000, csum_start=34, csum_offset=16),
         3000, ALL, None),
        (VirtioNetHdr(gso_type=1, gso_size=1000), 3000, ALL, "gso_without_csum"),
        (VirtioNetHdr(flags=1, gso_type=1, gso_size=0, csum_start=34, csum_offset=16), 3000,
         ALL, "bad_gso_size"),
        (VirtioNetHdr(gso_type=0x80), 60, ALL, "bad_gso_type"),  # ECN bit alone
    ],
)
def test_check_tx_header(hdr: VirtioNetHdr, frame_len: int, features: int,
                         reason: str | None) -> None:
    assert check_tx_header(hdr, frame_len, features) == reason


def test_inet_sum_matches_reference() -> None:
    import random

    rnd = random.Random(1)
    for n in (0, 1, 2, 3, 20, 1499, 65535):
        data = bytes(rnd.getrandbits(8) for _ in range(n))
        assert (~inet_sum(data)) & 0xFFFF == inet_checksum(data) or (
            inet_checksum(data) == 0xFFFF and inet_sum(data) == 0)
    assert inet_sum(b"\xff\xff") == 0xFFFF  # ones' complement: never folds to +0 for data
    assert inet_sum(b"") == 0


def test_finish_checksum_tcp_and_udp_zero() -> None:
    frame = bytearray(b"\x00" * 14 + bytes(range(60)))
    frame[14 + 16 : 14 + 18] = b"\x12\x34"  # seed
    finish_checksum(frame, 14, 16)
    # The seed stands for the pseudo-header: region + pseudo-header sum verifies to zero, so
    # the region alone checks to the seed.
    assert inet_checksum(bytes(frame[14:])) == 0x1234
    # UDP: a computed 0 is transmitted as 0xFFFF (RFC 768).
    udp = bytearray(b"\x00" * 14 + b"\xff\xff" + b"\x00" * 6)
    finish_checksum(udp, 14, 6)
    assert udp[20:22] == b"\xff\xff"
    with pytest.raises(ValueError):
        finish_checksum(bytearray(20), 14, 6)


def test_scatter_gather_skip() -> None:
    bufs = [bytearray(3), bytearray(1), bytearray(5)]
    views = [memoryview(b) for b in bufs]
    assert scatter(views, b"abcdefg", 1) == 7
    assert bytes(bufs[0] + bufs[1] + bufs[2]) == b"\0abcdefg\0"
    assert gather(views, 4, 2) == b"bcde"
    assert gather(views, 100) == b"\0abcdefg\0"
    assert b"".join(bytes(v) for v in skip(views, 4)) == b"defg\0"
    assert scatter(views, b"0123456789") == 9  # truncated at the end of the buffers


def test_frame_helpers() -> None:
    f = b"\x01\x00\x5e\x00\x00\x01" + b"\x02" * 6 + b"\x86\xdd"
    assert ethertype(f) == 0x86DD and ethertype(f[:10]) == -1
    assert is_multicast(f[:6]) and not is_multicast(b"\x02" * 6)


def _tcp_super(v6: bool, payload: bytes, flags: int = 0x19, vlan: bool = False) -> bytes:
    import ipaddress
    import struct

    tcp = struct.pack(">HHIIBBHHH", 1, 2, 0xFFFFFF00, 7, 5 << 4, flags, 1000, 0, 0)
    if v6:
        ip = (b"\x60\0\0\0" + (20 + len(payload)).to_bytes(2, "big") + b"\x06\x40"
              + ipaddress.IPv6Address("fd00::1").packed + ipaddress.IPv6Address("fd00::2").packed)
        et = b"\x86\xdd"
    else:
        ip = bytearray(20)
        ip[0], ip[8], ip[9] = 0x45, 64, 6
        ip[2:4] = (40 + len(payload)).to_bytes(2, "big")
        ip[4:6] = (0xFFFE).to_bytes(2, "big")
        ip[12:16] = bytes([10, 0, 0, 1])
        ip[16:20] = bytes([10, 0, 0, 2])
        ip = bytes(ip)
        et = b"\x08\x00"
    eth = b"\x02" * 6 + b"\x04" * 6 + (b"\x81\x00\x00\x05" if vlan else b"") + et
    return eth + ip + tcp + payload


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("vlan", [False, True])
def test_gso_segment_tcp(v6: bool, vlan: bool) -> None:
    from virtwire.net.header import gso_segment

    payload = bytes((i * 7) & 0xFF for i in range(3500))
    f = _tcp_super(v6, payload, vlan=vlan)
    l3 = 18 if vlan else 14
    l4 = l3 + (40 if v6 else 20)
    gt = s.VIRTIO_NET_HDR_GSO_TCPV6 if v6 else s.VIRTIO_NET_HDR_GSO_TCPV4
    segs = gso_segment(f, VirtioNetHdr(flags=1, gso_type=gt, gso_size=1000, csum_start=l4,
                                       csum_offset=16))
    assert [len(x) - l4 - 20 for x in segs] == [1000, 1000, 1000, 500]
    assert b"".join(x[l4 + 20:] for x in segs) == payload
    for i, x in enumerate(segs):
        seq = int.from_bytes(x[l4 + 4:l4 + 8], "big")
        assert seq == (0xFFFFFF00 + 1000 * i) & 0xFFFFFFFF  # wraps
        fl = x[l4 + 13]
        assert fl & 0x01 == (0x01 if i == 3 else 0) and fl & 0x08 == (0x08 if i == 3 else 0)
        assert fl & 0x10  # ACK everywhere
        tcp = x[l4:]
        if v6:
            pseudo = x[l3 + 8:l3 + 40] + len(tcp).to_bytes(4, "big") + b"\0\0\0\x06"
            assert int.from_bytes(x[l3 + 4:l3 + 6], "big") == len(tcp)
        else:
            assert inet_checksum(x[l3:l4]) == 0
            assert int.from_bytes(x[l3 + 2:l3 + 4], "big") == len(x) - l3
            assert int.from_bytes(x[l3 + 4:l3 + 6], "big") == (0xFFFE + i) & 0xFFFF
            pseudo = x[l3 + 12:l3 + 20] + b"\0\x06" + len(tcp).to_bytes(2, "big")
        assert inet_checksum(pseudo + tcp) == 0


def test_gso_segment_refuses_what_it_cannot_cut() -> None:
    from virtwire.net.header import GsoError, gso_segment

    f = _tcp_super(False, b"x" * 3000)
    with pytest.raises(GsoError):
        gso_segment(f, VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_UDP, gso_size=1000))
    with pytest.raises(GsoError):
        gso_segment(f, VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_TCPV6, gso_size=1000))
    with pytest.raises(GsoError):
        gso_segment(f[:40], VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=100))
    with pytest.raises(GsoError):
        gso_segment(f, VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=0))
