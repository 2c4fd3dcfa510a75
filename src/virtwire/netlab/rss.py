"""A flow hash for spreading a switch port's RX over its queue pairs, as a NIC's RSS does.

A multi-queue NIC hashes each received frame's flow -- the IPv4/IPv6 addresses and, for TCP and
UDP, the ports (Microsoft RSS's 4-tuple) -- and delivers it on the queue the hash picks, so
every frame of one flow lands on one queue (no reordering inside a flow) while different flows
spread over the queues. ``flow_hash`` does that for an Ethernet frame (one 802.1Q tag is looked
through); a frame that is not IP hashes its MAC addresses, a fragment of an IP datagram only its
addresses (a later fragment has no ports). The hash is CRC-32, not Toeplitz: nothing outside
the process needs to reproduce it.

Frames come from guests and the uplink: every offset is bounds-checked; a short or malformed
header just hashes what there is.
"""

from __future__ import annotations

import zlib

__all__ = ["flow_hash", "pick"]

_TCP, _UDP = 6, 17


def _l4_ports(frame: bytes, off: int) -> bytes:
    return frame[off:off + 4] if len(frame) >= off + 4 else b""


def flow_hash(frame: bytes) -> int:
    """The 32-bit flow hash of an Ethernet frame (see module docstring)."""
    off = 12
    if len(frame) >= 18 and frame[12] == 0x81 and frame[13] == 0x00:
        off = 16
    if len(frame) < off + 2:
        return zlib.crc32(frame[:12])
    etype = frame[off] << 8 | frame[off + 1]
    ip = off + 2
    if etype == 0x0800 and len(frame) >= ip + 20 and frame[ip] >> 4 == 4:
        ihl = (frame[ip] & 0x0F) * 4
        proto = frame[ip + 9]
        key = frame[ip + 12:ip + 20] + bytes([proto])
        fragment = (frame[ip + 6] & 0x3F) or frame[ip + 7]  # MF flag or an offset
        if proto in (_TCP, _UDP) and not fragment and ihl >= 20:
            key += _l4_ports(frame, ip + ihl)
        return zlib.crc32(key)
    if etype == 0x86DD and len(frame) >= ip + 40:
        nxt = frame[ip + 6]
        key = frame[ip + 8:ip + 40] + bytes([nxt])
        if nxt in (_TCP, _UDP):
            key += _l4_ports(frame, ip + 40)
        return zlib.crc32(key)
    return zlib.crc32(frame[:12])


def pick(frame: bytes, n: int) -> int:
    """The queue (0..n-1) of ``frame`` among ``n`` queues."""
    return flow_hash(frame) % n if n > 1 else 0
