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
