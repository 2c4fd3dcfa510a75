"""VLANs on the learning switch: access ports, trunks (802.1Q tags added and stripped), the FDB
per VLAN, offload offsets moved with the tag, and the tag helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtwire.backends.switch import L2Switch, SwitchPort
from virtwire.net.header import VirtioNetHdr
from virtwire.netlab import vlan as vl
from virtwire.virtio import spec as s

A, B, C, D = (bytes.fromhex(f"02000000000{i}") for i in range(1, 5))
BCAST = b"\xff" * 6


def frame(dst: bytes, src: bytes, n: int = 64) -> bytes:
    return dst + src + b"\x08\x00" + bytes([0x42]) * (n - 14)


def tagged(f: bytes, vid: int) -> bytes:
    return f[:12] + bytes([0x81, 0x00, vid >> 8, vid & 0xFF]) + f[12:]


def tx(port: SwitchPort, f: bytes, hdr: VirtioNetHdr | None = None) -> None:
    assert port.send([[memoryview((hdr or VirtioNetHdr()).pack(12)), memoryview(f)]]) == 1


def rx_all(port: SwitchPort) -> list[bytes]:
    out = []
    while (n := port.pending_len()):
        buf = bytearray(n)
        port.recv([memoryview(buf)])
        out.append(bytes(buf[12:]))
    return out


@pytest.fixture
def sw() -> tuple[L2Switch, dict[str, SwitchPort]]:
    sw = L2Switch("v")
    ports = {n: sw.port(n) for n in ("a10", "b10", "c20", "trunk")}
    ports["a10"].set_vlans(10)
    ports["b10"].set_vlans(10)
    ports["c20"].set_vlans(20)
    ports["trunk"].set_vlans(None, frozenset({10, 20}))
    return sw, ports


def test_access_ports_are_isolated_by_vlan_and_the_trunk_carries_both_tagged(sw) -> None:
    sw, p = sw
    tx(p["a10"], frame(BCAST, A))
    assert rx_all(p["b10"]) == [frame(BCAST, A)]
    assert rx_all(p["c20"]) == []  # another VLAN never sees it
    assert rx_all(p["trunk"]) == [tagged(frame(BCAST, A), 10)]
    tx(p["c20"], frame(BCAST, C))
    assert rx_all(p["a10"]) == [] and rx_all(p["b10"]) == []
    assert rx_all(p["trunk"]) == [tagged(frame(BCAST, C), 20)]
    # from the trunk: the tag picks the VLAN and is stripped towards access ports
    tx(p["trunk"], tagged(frame(A, D), 10))
    assert rx_all(p["a10"]) == [frame(A, D)] and rx_all(p["c20"]) == []
    tx(p["trunk"], tagged(frame(BCAST, D), 20))
    assert rx_all(p["c20"]) == [frame(BCAST, D)] and rx_all(p["b10"]) == []


def test_fdb_is_per_vlan_and_foreign_tags_are_dropped(sw) -> None:
    sw, p = sw
    tx(p["a10"], frame(BCAST, A))
    for q in p.values():
        rx_all(q)
    # the same MAC in VLAN 20 is a different station: unknown there, so flooded in VLAN 20
    tx(p["c20"], frame(A, C))
    assert rx_all(p["trunk"]) == [tagged(frame(A, C), 20)] and rx_all(p["a10"]) == []
    fdb = {(e["vlan"], e["mac"]): e["port"] for e in sw.stats()["fdb"]}
    assert fdb[(10, "02:00:00:00:00:01")] == "a10" and fdb[(20, "02:00:00:00:00:03")] == "c20"
    tx(p["trunk"], tagged(frame(BCAST, D), 30))  # not a VLAN of this trunk
    tx(p["a10"], tagged(frame(BCAST, A), 10))  # an access port takes no tagged frames
    assert p["trunk"].stats()["vlan_drops"] == 1 and p["a10"].stats()["vlan_drops"] == 1
    assert all(rx_all(q) == [] for q in p.values())


def test_native_vlan_and_untagged_domain() -> None:
    sw = L2Switch("n")
    plain, native, acc = sw.port("plain"), sw.port("native"), sw.port("acc")
    native.set_vlans(10, frozenset({20}))
    acc.set_vlans(10)
    tx(native, frame(BCAST, A))  # untagged on a trunk with native VLAN 10
    assert rx_all(acc) == [frame(BCAST, A)] and rx_all(plain) == []
    tx(plain, frame(BCAST, B))  # a port without VLAN settings: domain 0, alone here
    assert rx_all(acc) == [] and rx_all(native) == []
    native.set_vlans(None, frozenset({20}))  # no native VLAN: untagged joins domain 0
    tx(plain, frame(BCAST, B))
    assert rx_all(native) == [frame(BCAST, B)]


def test_offload_offsets_move_with_the_tag(sw) -> None:
    sw, p = sw
    p["trunk"].configure(1 << s.VIRTIO_NET_F_GUEST_CSUM, 12)
    h = VirtioNetHdr(flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    tx(p["a10"], frame(BCAST, A, 80), h)
    n = p["trunk"].pending_len()
    buf = bytearray(n)
    p["trunk"].recv([memoryview(buf)])
    got = VirtioNetHdr.unpack(buf, 12)
    assert got.csum_start == 38 and got.csum_offset == 6
    assert bytes(buf[12:]) == tagged(frame(BCAST, A, 80), 10)


def test_no_vlan_settings_forwards_tagged_frames_untouched() -> None:
    sw = L2Switch("plain")
    a, b = sw.port("a"), sw.port("b")
    tx(a, tagged(frame(BCAST, A), 99))
    assert rx_all(b) == [tagged(frame(BCAST, A), 99)] and not sw.vlan_aware


@given(vid=st.integers(1, 4094), pcp=st.integers(0, 7), cs=st.integers(0, 200),
       payload=st.binary(min_size=0, max_size=100), flags=st.sampled_from([0, 1]))
def test_insert_then_strip_is_identity(vid, pcp, cs, payload, flags) -> None:
    item = (flags, 0, 0, 0, cs + 16 if flags else 0, 6, frame(B, A) + payload)
    t = vl.insert(item, vid, pcp)
    assert vl.tag_of(t[6]) == vid and t[6][14] >> 5 == pcp
    assert vl.strip(t) == item


def test_membership_rules() -> None:
    m = vl.Membership(5, frozenset({7, 8}))
    assert (m.ingress(None), m.ingress(7), m.ingress(9)) == (5, 7, None)
    assert (m.egress(5), m.egress(8), m.egress(9), m.egress(0)) == (-1, 8, None, None)
    assert vl.Membership().egress(0) == -1 and vl.Membership().ingress(3) is None
