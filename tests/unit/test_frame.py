"""net.frame: decoding of Ethernet/ARP/IPv4/IPv6/ICMP/TCP/UDP, and its refusal to crash."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from virtwire.net import frame as f

A, B = "52:54:00:12:34:01", "52:54:00:12:34:02"


def test_icmp_echo_request_and_reply() -> None:
    req = f.decode(f.icmp_echo(A, B, "10.9.0.1", "10.9.0.2", 0x1234, 5))
    assert req["dst"] == B and req["src"] == A and req["l2"] == "IPv4"
    assert req["ip"]["src"] == "10.9.0.1" and req["ip"]["dst"] == "10.9.0.2"
    assert req["icmp"] == {"type": 8, "code": 0, "name": "echo request", "id": 0x1234, "seq": 5}
    assert req["summary"] == "IPv4 10.9.0.1 > 10.9.0.2 ICMP echo request id=4660 seq=5 (98 bytes)"
    rep = f.decode(f.icmp_echo(B, A, "10.9.0.2", "10.9.0.1", 0x1234, 5, reply=True))
    assert rep["icmp"]["name"] == "echo reply"


def test_built_ipv4_checksums_verify() -> None:
    fr = f.icmp_echo(A, B, "10.9.0.1", "10.9.0.2", 1, 1)
    assert f.inet_checksum(fr[14:34]) == 0
    assert f.inet_checksum(fr[34:]) == 0


def test_arp_request_and_reply() -> None:
    d = f.decode(f.arp(1, A, "10.9.0.1", "00:00:00:00:00:00", "10.9.0.2"))
    assert d["dst"] == "ff:ff:ff:ff:ff:ff"
    assert d["summary"].startswith("ARP who-has 10.9.0.2 tell 10.9.0.1")
    d = f.decode(f.arp(2, B, "10.9.0.2", A, "10.9.0.1"))
    assert d["summary"].startswith(f"ARP 10.9.0.2 is-at {B}")


def _tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    hdr = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (100).to_bytes(4, "big") + \
        (0).to_bytes(4, "big") + bytes([5 << 4, flags]) + (64240).to_bytes(2, "big") + bytes(4)
    return f.ethernet(B, A, f.ETH_P_IP, f.ipv4("10.9.0.1", "10.9.0.2", 6, hdr + payload))


def test_tcp_flags_and_payload() -> None:
    d = f.decode(_tcp(40000, 5201, 0x02))
    assert d["tcp"]["flags"] == "S" and d["tcp"]["sport"] == 40000 and d["tcp"]["payload"] == 0
    d = f.decode(_tcp(40000, 5201, 0x18, b"x" * 100))
    assert d["tcp"]["flags"] == "PA" and d["tcp"]["payload"] == 100
    assert "10.9.0.1:40000 > 10.9.0.2:5201 TCP [PA]" in d["summary"]


def test_udp_in_vlan() -> None:
    udp = (53).to_bytes(2, "big") + (1234).to_bytes(2, "big") + (12).to_bytes(2, "big") + \
        bytes(2) + b"abcd"
    ip = f.ipv4("10.9.0.1", "10.9.0.2", 17, udp)
    fr = bytes.fromhex(B.replace(":", "") + A.replace(":", "")) + b"\x81\x00\x00\x64\x08\x00" + ip
    d = f.decode(fr)
    assert d["vlan"] == [100]
    assert d["udp"] == {"sport": 53, "dport": 1234, "len": 12}
    assert d["summary"].startswith("vlan 100 IPv4 10.9.0.1:53 > 10.9.0.2:1234 UDP")


def test_ipv6_neighbor_solicitation() -> None:
    target = ipaddress.IPv6Address("fe80::2")
    icmp6 = bytes([135, 0, 0, 0, 0, 0, 0, 0]) + target.packed
    ip6 = bytearray(40)
    ip6[0] = 0x60
    ip6[4:6] = len(icmp6).to_bytes(2, "big")
    ip6[6], ip6[7] = 58, 255
    ip6[8:24] = ipaddress.IPv6Address("fe80::1").packed
    ip6[24:40] = ipaddress.IPv6Address("ff02::1:ff00:2").packed
    d = f.decode(f.ethernet("33:33:ff:00:00:02", A, f.ETH_P_IPV6, bytes(ip6) + icmp6))
    assert d["ip"]["v"] == 6 and d["l4"] == "ICMPv6"
    assert d["icmp"]["name"] == "neighbor solicitation" and d["icmp"]["target"] == "fe80::2"


def test_truncated_layers_are_marked() -> None:
    fr = f.icmp_echo(A, B, "10.9.0.1", "10.9.0.2", 1, 1)
    assert f.decode(fr[:10])["summary"] == "runt frame (10 bytes)"
    d = f.decode(fr[:20])
    assert d["truncated"] and d["layer"] == "ipv4"
    d = f.decode(fr[:36])
    assert d["truncated"] and d["layer"] == "icmp"


def test_bad_ip_header_is_an_error_not_an_exception() -> None:
    fr = bytearray(f.icmp_echo(A, B, "10.9.0.1", "10.9.0.2", 1, 1))
    fr[14] = 0x41  # IHL 4 words < 20 bytes
    d = f.decode(bytes(fr))
    assert "bad IPv4 header" in d["error"]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([0x0800, 0x0806, 0x86DD, 0x8100]))
def test_never_raises_on_hostile_bytes(tail: bytes, etype: int) -> None:
    fr = bytes(12) + etype.to_bytes(2, "big") + tail
    d = f.decode(fr)
    assert isinstance(d["summary"], str) and d["len"] == len(fr)
    d = f.decode(memoryview(fr)[: len(fr) // 2])
    assert isinstance(d["summary"], str)
