"""``struct virtio_net_hdr`` (virtio 1.2 §5.1.6): pack, unpack, validate, finish checksums.

Theory of operation
-------------------
Every frame on a virtio-net queue is preceded by a header::

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset;
    le16 num_buffers;   /* only with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF */

so the header is 12 bytes when VERSION_1 or MRG_RXBUF was negotiated and 10 bytes otherwise
(§5.1.6 "Legacy Interface: Device Operation"). ``hdr_size(features)`` is that rule.

The TX header comes from the guest and is hostile. ``check_tx_header`` returns ``None`` for an
acceptable header or a short *reason* string (a counter name, e.g. ``"bad_csum_offset"``): the
device then drops the frame, counts the reason and goes on -- a bad header is the guest's fault
for that frame only, never a reason to reset the device (§5.1.6.2.1 driver requirements).

When a backend cannot take checksum offload, ``finish_checksum`` computes the partial checksum a
guest left (NEEDS_CSUM: sum everything from ``csum_start`` to the end, store the complement at
``csum_start + csum_offset``; the guest already seeded that field with the pseudo-header sum).
The ones' complement sum uses ``int.from_bytes(...) % 0xFFFF`` (2^16 = 1 mod 0xFFFF, so the big
integer's residue is the folded 16-bit word sum) -- linear time in C, no per-byte Python loop.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from virtwire.virtio.spec import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VIRTIO_NET_HDR_LEN,
    VIRTIO_NET_HDR_MRG_RXBUF_LEN,
)

__all__ = [
    "VirtioNetHdr",
    "hdr_size",
    "gather",
    "scatter",
    "check_tx_header",
    "finish_checksum",
    "inet_sum",
    "ethertype",
    "dst_mac",
    "src_mac",
    "is_multicast",
    "MAX_FRAME",
    "ETH_HLEN",
    "gso_segment",
    "GsoError",
]

ETH_HLEN = 14
# Largest frame (without the virtio header) a backend hands us or we hand it: 64 KiB GSO frames
# plus an Ethernet header and a VLAN tag, as the tun driver allows.
MAX_FRAME = 65535 + ETH_HLEN + 4
NUM_BUFFERS_OFFSET = 10  # le16 num_buffers within the 12-byte header

_HDR10 = struct.Struct("<BBHHHH")
_HDR12 = struct.Struct("<BBHHHHH")

# gso_type (without the ECN bit) -> the device feature that lets a driver send it (§5.1.6.2.1).
GSO_FEATURE = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_HDR_GSO_UDP_L4: VIRTIO_NET_F_HOST_USO,
}

# The reasons ``check_tx_header`` may return (counter names, "tx_drop_<reason>").
TX_DROP_REASONS = (
    "short_header",
    "runt",
    "oversize",
    "csum_not_negotiated",
    "bad_csum_offset",
    "bad_gso_type",
    "gso_not_negotiated",
    "ecn_not_negotiated",
    "gso_without_csum",
    "bad_gso_size",
)


def hdr_size(features: int) -> int:
    """§5.1.6: 12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10."""
    if features >> VIRTIO_F_VERSION_1 & 1 or features >> VIRTIO_NET_F_MRG_RXBUF & 1:
        return VIRTIO_NET_HDR_MRG_RXBUF_LEN
    return VIRTIO_NET_HDR_LEN


@dataclass(slots=True)
class VirtioNetHdr:
    """One ``struct virtio_net_hdr`` (§5.1.6), host byte values."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, size: int = VIRTIO_NET_HDR_MRG_RXBUF_LEN) -> bytes:
        """The header's ``size`` (10 or 12) bytes."""
        if size == VIRTIO_NET_HDR_MRG_RXBUF_LEN:
            return _HDR12.pack(self.flags & 0xFF, self.gso_type & 0xFF, self.hdr_len & 0xFFFF,
                               self.gso_size & 0xFFFF, self.csum_start & 0xFFFF,
                               self.csum_offset & 0xFFFF, self.num_buffers & 0xFFFF)
        if size == VIRTIO_NET_HDR_LEN:
            return _HDR10.pack(self.flags & 0xFF, self.gso_type & 0xFF, self.hdr_len & 0xFFFF,
                               self.gso_size & 0xFFFF, self.csum_start & 0xFFFF,
                               self.csum_offset & 0xFFFF)
        raise ValueError(f"virtio_net_hdr size {size} (must be 10 or 12)")

    def pack_into(self, buf: memoryview | bytearray, offset: int = 0,
                  size: int = VIRTIO_NET_HDR_MRG_RXBUF_LEN) -> None:
        """Write the header into a (private, not concurrently read) buffer."""
        buf[offset : offset + size] = self.pack(size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview,
               size: int = VIRTIO_NET_HDR_MRG_RXBUF_LEN) -> VirtioNetHdr:
        """Parse ``size`` bytes; raises ``ValueError`` if ``data`` is shorter."""
        if len(data) < size:
            raise ValueError(f"virtio_net_hdr needs {size} bytes, got {len(data)}")
        if size == VIRTIO_NET_HDR_MRG_RXBUF_LEN:
            return cls(*_HDR12.unpack_from(data, 0))
        if size == VIRTIO_NET_HDR_LEN:
            return cls(*_HDR10.unpack_from(data, 0))
        raise ValueError(f"virtio_net_hdr size {size} (must be 10 or 12)")

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

# --- scatter/gather over lists of views ---------------------------------------------------------
def gather(views: Sequence[memoryview], n: int, offset: int = 0) -> bytes:
    """Up to ``n`` bytes starting at ``offset`` across the concatenation of ``views``."""
    out = []
    need = n
    for v in views:
        ln = len(v)
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, need)
        out.append(bytes(v[offset : offset + take]))
        need -= take
        offset = 0
        if not need:
            break
    return b"".join(out)


def scatter(views: Sequence[memoryview], data: bytes | memoryview, offset: int = 0) -> int:
    """Write ``data`` at ``offset`` across ``views``; returns the bytes written."""
    src = memoryview(data)
    done = 0
    for v in views:
        ln = len(v)
        if offset >= ln:
            offset -= ln
            continue
        take = min(ln - offset, len(src) - done)
        v[offset : offset + take] = src[done : done + take]
        done += take
        offset = 0
        if done == len(src):
            break
    return done


def skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views with the first ``n`` bytes removed (zero-copy slices)."""
    out: list[memoryview] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


# --- TX header validation (§5.1.6.2) ------------------------------------------------------------
def check_tx_header(hdr: VirtioNetHdr, frame_len: int, features: int) -> str | None:
    """Why the guest's TX header is unacceptable (a reason from ``TX_DROP_REASONS``), or None.

    ``frame_len`` is the Ethernet frame length after the header; ``features`` the negotiated
    word. Unknown flag bits are ignored (§5.1.6.2.2: the device MUST ignore flag bits it does
    not recognize).
    """
    if frame_len < ETH_HLEN:
        return "runt"
    gso = hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if frame_len > MAX_FRAME:
        return "oversize"
    if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if not features >> VIRTIO_NET_F_CSUM & 1:
            return "csum_not_negotiated"
        # The 16-bit checksum field must lie inside the frame.
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            return "bad_csum_offset"
    if gso != VIRTIO_NET_HDR_GSO_NONE or hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN:
        feat = GSO_FEATURE.get(gso)
        if feat is None:
            return "bad_gso_type"
        if not features >> feat & 1:
            return "gso_not_negotiated"
        if hdr.gso_type & VIRTIO_NET_HDR_GSO_ECN and not features >> VIRTIO_NET_F_HOST_ECN & 1:
            return "ecn_not_negotiated"
        if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return "gso_without_csum"
        if hdr.gso_size == 0:
            return "bad_gso_size"
    return None


# --- checksums (RFC 1071) -----------------------------------------------------------------------
def inet_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit ones' complement sum of ``data`` (big-endian words, odd tail padded)."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    r = (int.from_bytes(b, "big") + initial) % 0xFFFF
    if r == 0 and (initial or any(b)):
        return 0xFFFF
    return r


def finish_checksum(frame: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Complete a NEEDS_CSUM partial checksum in place (§5.1.6.2 "csum_start/csum_offset").

    The field at ``csum_start + csum_offset`` holds the pseudo-header sum the sender seeded;
    the result is the complement of the sum over ``frame[csum_start:]`` including that field.
    A UDP checksum (offset 6) of 0 is sent as 0xFFFF (RFC 768).
    """
    pos = csum_start + csum_offset
    if csum_start < 0 or pos + 2 > len(frame):
        raise ValueError(f"checksum field {csum_start}+{csum_offset} outside {len(frame)} bytes")
    s = inet_sum(frame[csum_start:])
    c = ~s & 0xFFFF
    if c == 0 and csum_offset == 6:
        c = 0xFFFF
    frame[pos] = c >> 8
    frame[pos + 1] = c & 0xFF


# --- tiny Ethernet helpers (full decoding lives in net/frame.py) --------------------------------
def dst_mac(frame: bytes | memoryview) -> bytes:
    return bytes(frame[0:6])


def src_mac(frame: bytes | memoryview) -> bytes:
    return bytes(frame[6:12])


def ethertype(frame: bytes | memoryview) -> int:
    """The outer EtherType (or 802.3 length); -1 for a runt."""
    if len(frame) < ETH_HLEN:
        return -1
    return (frame[12] << 8) | frame[13]


def is_multicast(mac: bytes | memoryview) -> bool:
    """Group bit of a MAC address (broadcast included)."""
    return bool(mac[0] & 1)


# --- software segmentation (GSO) ----------------------------------------------------------------
class GsoError(ValueError):
    """A GSO frame this module cannot segment (not Ethernet/IPv4|IPv6/TCP, or inconsistent)."""


def _pseudo_sum(frame: bytes | bytearray, l3: int, v6: bool, l4_len: int) -> int:
    if v6:
        return inet_sum(bytes(frame[l3 + 8 : l3 + 40]) + l4_len.to_bytes(4, "big") + b"\0\0\0\x06")
    return inet_sum(bytes(frame[l3 + 12 : l3 + 20]) + b"\x00\x06" + l4_len.to_bytes(2, "big"))


def gso_segment(frame: bytes | bytearray | memoryview, hdr: VirtioNetHdr) -> list[bytes]:
    """Cut a TCP GSO super-frame (VIRTIO_NET_HDR_GSO_TCPV4/TCPV6, §5.1.6.2) into MSS-sized
    frames with complete IPv4 and TCP checksums, as a NIC doing TSO would (RFC 9293 sequence
    numbers; FIN/PSH only on the last segment, CWR only on the first; IPv4 ids incremented).

    Raises ``GsoError`` for anything else (the caller drops the frame, counted).
    """
    f = bytes(frame)
    gso = hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) or hdr.gso_size == 0:
        raise GsoError(f"cannot segment gso_type {hdr.gso_type} / gso_size {hdr.gso_size}")
    l3 = ETH_HLEN
    et = ethertype(f)
    if et == 0x8100 and len(f) >= 18:
        l3, et = 18, (f[16] << 8) | f[17]
    v6 = gso == VIRTIO_NET_HDR_GSO_TCPV6
    if v6:
        if et != 0x86DD or len(f) < l3 + 40 or f[l3 + 6] != 6:
            raise GsoError("not an IPv6/TCP frame (extension headers are not segmented)")
        l4 = l3 + 40
    else:
        if et != 0x0800 or len(f) < l3 + 20 or f[l3] >> 4 != 4 or f[l3 + 9] != 6:
            raise GsoError("not an IPv4/TCP frame")
        l4 = l3 + (f[l3] & 0x0F) * 4
    if len(f) < l4 + 20:
        raise GsoError("truncated TCP header")
    hlen = l4 + (f[l4 + 12] >> 4) * 4
    if hlen < l4 + 20 or len(f) < hlen:
        raise GsoError("bad TCP header length")
    mss = hdr.gso_size
    payload = f[hlen:]
    n = max(1, -(-len(payload) // mss))
    if n > 1024:
        raise GsoError(f"{n} segments")
    seq0 = int.from_bytes(f[l4 + 4 : l4 + 8], "big")
    flags0 = f[l4 + 13]
    ip_id = int.from_bytes(f[l3 + 4 : l3 + 6], "big") if not v6 else 0
    out = []
    for i in range(n):
        data = payload[i * mss : (i + 1) * mss]
        seg = bytearray(f[:hlen]) + data
        if v6:
            seg[l3 + 4 : l3 + 6] = (len(seg) - l3 - 40).to_bytes(2, "big")
        else:
            seg[l3 + 2 : l3 + 4] = (len(seg) - l3).to_bytes(2, "big")
            seg[l3 + 4 : l3 + 6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            seg[l3 + 10 : l3 + 12] = b"\0\0"
            seg[l3 + 10 : l3 + 12] = (~inet_sum(seg[l3:l4]) & 0xFFFF).to_bytes(2, "big")
        seg[l4 + 4 : l4 + 8] = ((seq0 + i * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        fl = flags0
        if i < n - 1:
            fl &= ~0x09  # FIN, PSH only on the last segment
        if i > 0:
            fl &= ~0x80  # CWR only on the first
        seg[l4 + 13] = fl
        seg[l4 + 16 : l4 + 18] = b"\0\0"
        tcp_len = len(seg) - l4
        c = ~inet_sum(seg[l4:], _pseudo_sum(seg, l3, v6, tcp_len)) & 0xFFFF
        seg[l4 + 16 : l4 + 18] = c.to_bytes(2, "big")
        out.append(bytes(seg))
    return out
