"""IEEE 802.1Q tags on the switch's queued frames, and VLAN port membership.

A queued frame is the switch's ``_Item``: ``(flags, gso_type, gso_size, hdr_len, csum_start,
csum_offset, frame)`` with offsets counted from the frame's first byte, so inserting or removing
the 4-byte tag after the source MAC moves ``csum_start`` and ``hdr_len`` (when set) by 4.

Membership (``Membership``): a port is *unaware* (no ``vlan=``, no ``trunk=``: the untagged
domain 0 of the switch, frames pass as they are -- a switch without VLAN settings behaves as
before), an *access* port (``vlan=N``: untagged frames belong to VLAN N, tagged ones are
dropped), or a *trunk* (``trunk=A:B``: frames tagged A or B belong to that VLAN and leave it
tagged; untagged frames belong to ``vlan=`` when given -- the native VLAN -- or to domain 0).
Once a switch has VLANs, a tagged frame from a port that is not a trunk of that VLAN is dropped
(counted in the port's ``vlan_drops``): letting it into domain 0 with its tag would let a guest
hop into a VLAN through a trunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TPID", "Membership", "strip", "insert", "tag_of"]

TPID = 0x8100
Item = tuple[int, int, int, int, int, int, bytes]


@dataclass(frozen=True)
class Membership:
    """A port's VLAN mode (see module docstring)."""

    vlan: int | None = None  # access VLAN, or a trunk's native VLAN
    trunk: frozenset[int] = field(default_factory=frozenset)

    @property
    def aware(self) -> bool:
        return self.vlan is not None or bool(self.trunk)

    def ingress(self, tagged_vid: int | None) -> int | None:
        """The VLAN a frame arriving here belongs to (0: the untagged domain), None: drop."""
        if tagged_vid is None:
            return self.vlan if self.vlan is not None else 0
        if tagged_vid in self.trunk:
            return tagged_vid
        return None

    def egress(self, vid: int) -> int | None:
        """How a frame of VLAN ``vid`` leaves here: -1 untagged, else the tag; None: not here."""
        if vid == 0:
            return -1 if self.vlan is None else None
        if vid == self.vlan:
            return -1
        if vid in self.trunk:
            return vid
        return None

    def describe(self) -> str:
        if not self.aware:
            return "untagged"
        parts = []
        if self.vlan is not None:
            parts.append(f"{'native' if self.trunk else 'access'} {self.vlan}")
        if self.trunk:
            parts.append("trunk " + ",".join(str(v) for v in sorted(self.trunk)))
        return "; ".join(parts)


def tag_of(frame: bytes) -> int | None:
    """The VLAN id of an 802.1Q-tagged frame, None when untagged (or too short)."""
    if len(frame) >= 18 and frame[12] == 0x81 and frame[13] == 0x00:
        return (frame[14] << 8 | frame[15]) & 0x0FFF
    return None


def strip(item: Item) -> Item:
    flags, gso_type, gso_size, hdr_len, cs, co, frame = item
    return (flags, gso_type, gso_size, max(hdr_len - 4, 0) if hdr_len else 0,
            cs - 4 if flags and cs >= 16 else cs, co, frame[:12] + frame[16:])


def insert(item: Item, vid: int, pcp: int = 0) -> Item:
    flags, gso_type, gso_size, hdr_len, cs, co, frame = item
    tci = (pcp & 7) << 13 | (vid & 0x0FFF)
    tag = bytes([0x81, 0x00, tci >> 8, tci & 0xFF])
    return (flags, gso_type, gso_size, hdr_len + 4 if hdr_len else 0,
            cs + 4 if flags else cs, co, frame[:12] + tag + frame[12:])
