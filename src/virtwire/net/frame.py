"""Decode an Ethernet frame into a short summary, for traces and people.

Theory of operation
-------------------
``decode(frame)`` walks Ethernet II (with up to two 802.1Q/802.1ad tags), then ARP, IPv4 or IPv6,
then ICMP, ICMPv6, TCP or UDP, and returns a flat dict of what it found plus ``summary``, one line
in tcpdump's spirit ("IPv4 10.0.0.1 > 10.0.0.2 ICMP echo request id=7 seq=1"). Frames come from
the guest and the network: every length is checked before it is used, a truncated or malformed
layer stops the walk (``"truncated": true`` / ``"error"``) and the function never raises for any
input bytes. Nothing here copies the payload; it reads headers out of a memoryview.

Sources for the layouts: IEEE 802.3 / 802.1Q, RFC 826 (ARP), RFC 791 (IPv4), RFC 8200 (IPv6),
RFC 792 / RFC 4443 (ICMP / ICMPv6), RFC 9293 (TCP), RFC 768 (UDP).
"""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["decode", "summary", "mac_str", "ETH_P_IP", "ETH_P_ARP", "ETH_P_IPV6"]

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

_ETHERTYPES = {ETH_P_IP: "IPv4", ETH_P_ARP: "ARP", ETH_P_IPV6: "IPv6", 0x88CC: "LLDP"}
_IPPROTO = {IPPROTO_ICMP: "ICMP", IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP",
            IPPROTO_ICMPV6: "ICMPv6", 2: "IGMP"}
_ICMP_TYPES = {0: "echo reply", 3: "unreachable", 5: "redirect", 8: "echo request",
               11: "time exceeded"}
_ICMP6_TYPES = {1: "unreachable", 2: "packet too big", 3: "time exceeded",
                128: "echo request", 129: "echo reply", 133: "router solicitation",
                134: "router advertisement", 135: "neighbor solicitation",
                136: "neighbor advertisement", 143: "MLDv2 report"}
_TCP_FLAGS = "FSRPAUEC"  # FIN SYN RST PSH ACK URG ECE CWR, bit 0 first


def mac_str(b: bytes | memoryview) -> str:
    return ":".join(f"{x:02x}" for x in bytes(b))


def _u16(m: memoryview, o: int) -> int:
    return (m[o] << 8) | m[o + 1]


def _u32(m: memoryview, o: int) -> int:
    return (m[o] << 24) | (m[o + 1] << 16) | (m[o + 2] << 8) | m[o + 3]


def decode(frame: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode ``frame`` (an Ethernet frame, no virtio-net header); never raises."""
    try:
        m = memoryview(frame).cast("B")
    except TypeError:
        m = memoryview(bytes(frame))
    d: dict[str, Any] = {"len": len(m)}
    try:
        _decode_eth(m, d)
    except (IndexError, ValueError) as e:  # a bug guard: the walk checks lengths itself
        d["error"] = f"undecodable: {e}"
    d["summary"] = summary(d)
    return d


def _decode_eth(m: memoryview, d: dict[str, Any]) -> None:
    if len(m) < 14:
        d["truncated"] = True
        d["layer"] = "eth"
        return
    d["dst"] = mac_str(m[0:6])
    d["src"] = mac_str(m[6:12])
    etype = _u16(m, 12)
    off = 14
    vlans = []
    while etype in (ETH_P_8021Q, ETH_P_8021AD) and len(vlans) < 2:
        if len(m) < off + 4:
            d["truncated"] = True
            d["layer"] = "vlan"
            return
        vlans.append(_u16(m, off) & 0x0FFF)
        etype = _u16(m, off + 2)
        off += 4
    if vlans:
        d["vlan"] = vlans
    if etype < 0x0600:
        d["ethertype"] = None
        d["l2"] = "802.3"
        d["llc_len"] = etype
        return
    d["ethertype"] = etype
    d["l2"] = _ETHERTYPES.get(etype, f"0x{etype:04x}")
    p = m[off:]
    if etype == ETH_P_ARP:
        _decode_arp(p, d)
    elif etype == ETH_P_IP:
        _decode_ipv4(p, d)
    elif etype == ETH_P_IPV6:
        _decode_ipv6(p, d)


def _decode_arp(p: memoryview, d: dict[str, Any]) -> None:
    if len(p) < 8:
        d["truncated"] = True
        d["layer"] = "arp"
        return
    htype, ptype, hlen, plen, op = _u16(p, 0), _u16(p, 2), p[4], p[5], _u16(p, 6)
    a: dict[str, Any] = {"op": op, "op_name": {1: "request", 2: "reply"}.get(op, str(op))}
    d["arp"] = a
    if htype == 1 and ptype == ETH_P_IP and hlen == 6 and plen == 4:
        if len(p) < 28:
            d["truncated"] = True
            d["layer"] = "arp"
            return
        a["sha"] = mac_str(p[8:14])
        a["spa"] = str(ipaddress.IPv4Address(bytes(p[14:18])))
        a["tha"] = mac_str(p[18:24])
        a["tpa"] = str(ipaddress.IPv4Address(bytes(p[24:28])))


def _decode_ipv4(p: memoryview, d: dict[str, Any]) -> None:
    if len(p) < 20:
        d["truncated"] = True
        d["layer"] = "ipv4"
        return
    ver, ihl = p[0] >> 4, (p[0] & 0xF) * 4
    if ver != 4 or ihl < 20 or len(p) < ihl:
        d["error"] = f"bad IPv4 header (version {ver}, ihl {ihl})"
        return
    total = _u16(p, 2)
    frag = _u16(p, 6)
    ip = {"v": 4, "src": str(ipaddress.IPv4Address(bytes(p[12:16]))),
          "dst": str(ipaddress.IPv4Address(bytes(p[16:20]))), "ttl": p[8], "proto": p[9],
          "total_len": total}
    if frag & 0x3FFF:
        ip["frag_off"] = (frag & 0x1FFF) * 8
        ip["mf"] = bool(frag & 0x2000)
    d["ip"] = ip
    end = min(len(p), total) if total >= ihl else len(p)
    if ip.get("frag_off"):
        return  # not the first fragment: no L4 header here
    _decode_l4(p[ihl:end], p[9], d)


def _decode_ipv6(p: memoryview, d: dict[str, Any]) -> None:
    if len(p) < 40:
        d["truncated"] = True
        d["layer"] = "ipv6"
        return
    if p[0] >> 4 != 6:
        d["error"] = f"bad IPv6 version {p[0] >> 4}"
        return
    plen, nh = _u16(p, 4), p[6]
    d["ip"] = {"v": 6, "src": str(ipaddress.IPv6Address(bytes(p[8:24]))),
               "dst": str(ipaddress.IPv6Address(bytes(p[24:40]))), "hlim": p[7], "proto": nh,
               "payload_len": plen}
    off = 40
    # Skip hop-by-hop, routing and destination options headers (RFC 8200 §4), at most 4.
    for _ in range(4):
        if nh not in (0, 43, 60) or len(p) < off + 8:
            break
        nh, off = p[off], off + (p[off + 1] + 1) * 8
    d["ip"]["proto"] = nh
    _decode_l4(p[off: 40 + plen] if off <= 40 + plen else p[0:0], nh, d)


def _decode_l4(p: memoryview, proto: int, d: dict[str, Any]) -> None:
    d["l4"] = _IPPROTO.get(proto, str(proto))
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if len(p) < 4:
            d["truncated"] = True
            d["layer"] = "icmp"
            return
        names = _ICMP_TYPES if proto == IPPROTO_ICMP else _ICMP6_TYPES
        ic: dict[str, Any] = {"type": p[0], "code": p[1],
                              "name": names.get(p[0], f"type {p[0]}")}
        echo = (0, 8) if proto == IPPROTO_ICMP else (128, 129)
        if p[0] in echo and len(p) >= 8:
            ic["id"], ic["seq"] = _u16(p, 4), _u16(p, 6)
        if proto == IPPROTO_ICMPV6 and p[0] in (135, 136) and len(p) >= 24:
            ic["target"] = str(ipaddress.IPv6Address(bytes(p[8:24])))
        d["icmp"] = ic
    elif proto == IPPROTO_TCP:
        if len(p) < 20:
            d["truncated"] = True
            d["layer"] = "tcp"
            return
        flags = p[13]
        d["tcp"] = {"sport": _u16(p, 0), "dport": _u16(p, 2), "seq": _u32(p, 4),
                    "ack": _u32(p, 8), "flags": "".join(c for i, c in enumerate(_TCP_FLAGS)
                                                        if flags >> i & 1),
                    "win": _u16(p, 14), "payload": max(0, len(p) - (p[12] >> 4) * 4)}
    elif proto == IPPROTO_UDP:
        if len(p) < 8:
            d["truncated"] = True
            d["layer"] = "udp"
            return
        d["udp"] = {"sport": _u16(p, 0), "dport": _u16(p, 2), "len": _u16(p, 4)}


def summary(d: dict[str, Any]) -> str:
    """One line for a decoded frame (the ``summary`` field of ``decode``)."""
    if "dst" not in d:
        return f"runt frame ({d.get('len', 0)} bytes)"
    vlan = "".join(f" vlan {v}" for v in d.get("vlan", ()))
    l2 = d.get("l2", "?")
    if "arp" in d:
        a = d["arp"]
        if "tpa" in a and a["op"] == 1:
            s = f"ARP who-has {a['tpa']} tell {a['spa']}"
        elif "tpa" in a and a["op"] == 2:
            s = f"ARP {a['spa']} is-at {a['sha']}"
        else:
            s = f"ARP {a['op_name']}"
    elif "ip" in d:
        ip = d["ip"]
        s = f"IPv{ip['v']} {ip['src']} > {ip['dst']} {d.get('l4', '')}"
        if "icmp" in d:
            ic = d["icmp"]
            s += f" {ic['name']}"
            if "id" in ic:
                s += f" id={ic['id']} seq={ic['seq']}"
            if "target" in ic:
                s += f" {ic['target']}"
        elif "tcp" in d:
            t = d["tcp"]
            s = (f"IPv{ip['v']} {ip['src']}:{t['sport']} > {ip['dst']}:{t['dport']} TCP "
                 f"[{t['flags'] or '.'}] seq={t['seq']} len={t['payload']}")
        elif "udp" in d:
            u = d["udp"]
            s = (f"IPv{ip['v']} {ip['src']}:{u['sport']} > {ip['dst']}:{u['dport']} UDP "
                 f"len={u['len']}")
        if ip.get("frag_off"):
            s += f" frag@{ip['frag_off']}"
    else:
        s = f"{l2} {d['src']} > {d['dst']}"
    s = s.rstrip()
    if vlan:
        s = vlan.strip() + " " + s
    if d.get("truncated"):
        s += f" [truncated {d.get('layer', '')}]"
    if d.get("error"):
        s += f" [{d['error']}]"
    return f"{s} ({d['len']} bytes)"


# --- building frames (tests, demos, synthetic traffic) ------------------------------------------
def inet_checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _mac(b: str) -> bytes:
    return bytes(int(x, 16) for x in b.split(":"))


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    """An Ethernet II frame (no FCS)."""
    return _mac(dst) + _mac(src) + ethertype.to_bytes(2, "big") + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, ident: int = 0) -> bytes:
    """An IPv4 packet with a correct header checksum (RFC 791)."""
    hdr = bytearray(20)
    hdr[0] = 0x45
    hdr[2:4] = (20 + len(payload)).to_bytes(2, "big")
    hdr[4:6] = ident.to_bytes(2, "big")
    hdr[6:8] = (0x4000).to_bytes(2, "big")  # DF
    hdr[8], hdr[9] = ttl, proto
    hdr[12:16] = ipaddress.IPv4Address(src).packed
    hdr[16:20] = ipaddress.IPv4Address(dst).packed
    hdr[10:12] = inet_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def icmp_echo(
    src_mac: str, dst_mac: str, src: str, dst: str, ident: int, seq: int,
    reply: bool = False, data: bytes = b"virtwire".ljust(56, b"."),
) -> bytes:
    """An Ethernet frame carrying an ICMP echo request (or reply) with correct checksums."""
    body = bytearray([0 if reply else 8, 0, 0, 0]) + ident.to_bytes(2, "big") + \
        seq.to_bytes(2, "big") + data
    body[2:4] = inet_checksum(bytes(body)).to_bytes(2, "big")
    return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4(src, dst, IPPROTO_ICMP, bytes(body)))


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    """An ARP request (op 1, broadcast) or reply (op 2) frame, RFC 826."""
    body = (b"\x00\x01\x08\x00\x06\x04" + op.to_bytes(2, "big") + _mac(sha) +
            ipaddress.IPv4Address(spa).packed + _mac(tha) + ipaddress.IPv4Address(tpa).packed)
    dst = "ff:ff:ff:ff:ff:ff" if op == 1 else tha
    return ethernet(dst, sha, ETH_P_ARP, body)
