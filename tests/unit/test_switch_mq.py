"""Switch ports with several queue pairs: one identity on the switch, RX spread by flow hash."""

from __future__ import annotations

import select
import struct

from virtwire.backends.switch import L2Switch, SwitchQueue
from virtwire.net.header import VirtioNetHdr
from virtwire.netlab import rss

A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def udp4(dst: bytes, src: bytes, sport: int, dport: int, ip_src: int = 0x0A000001,
         ip_dst: int = 0x0A000002, payload: bytes = b"x" * 18) -> bytes:
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, 17, 0,
                     ip_src, ip_dst)
    return dst + src + b"\x08\x00" + ip + struct.pack("!HHHH", sport, dport,
                                                        8 + len(payload), 0) + payload


def tx(q: SwitchQueue, f: bytes) -> None:
    h = VirtioNetHdr().pack(q.hdr_len)
    assert q.send([[memoryview(h), memoryview(f)]]) == 1


def rx_all(q: SwitchQueue) -> list[bytes]:
    out = []
    while (n := q.pending_len()):
        buf = bytearray(n)
        assert q.recv([memoryview(buf)]) == n
        out.append(bytes(buf[q.hdr_len:]))
    return out


def readable(q: SwitchQueue) -> bool:
    fd = q.fileno()
    assert fd is not None
    return bool(select.select([fd], [], [], 0)[0])


def test_frames_from_either_pair_are_one_port_on_the_switch() -> None:
    sw = L2Switch("mq")
    p = sw.port("g", queues=2)
    other = sw.port("h")
    assert len(p.queues) == 2 and p.queues[0] is p
    tx(p.queues[0], udp4(B, A, 1000, 2000))
    tx(p.queues[1], udp4(B, A, 1001, 2000))  # same MAC on the other pair: not a move
    assert sw.counters["learned"] == 1 and sw.counters["moved"] == 0
    fdb = sw.stats()["fdb"]
    assert [(e["mac"], e["port"]) for e in fdb] == [("02:00:00:00:00:01", "g")]
    assert len(rx_all(other)) == 2
    # a reply to A is forwarded to the port (one of its queues), never flooded
    tx(other, udp4(A, B, 2000, 1000))
    assert sw.counters["forwarded"] == 1
    assert len(rx_all(p.queues[0])) + len(rx_all(p.queues[1])) == 1
    st = sw.stats()["ports"]["g"]
    assert st["tx_frames"] == 2 and [q["tx_frames"] for q in st["queues"]] == [1, 1]


def test_rx_flows_spread_over_queues_and_each_stays_on_one() -> None:
    sw = L2Switch("mq")
    p = sw.port("g", queues=2)
    src = sw.port("s")
    for q in p.queues:
        q.fileno()  # make the wake-up eventfds
    tx(src, udp4(A, B, 1, 1))
    assert [readable(q) for q in p.queues].count(True) == 1  # only the queue it went to
    for q in p.queues:
        q.drain_wakeup()
        rx_all(q)
    seen: dict[int, set[int]] = {}
    for rnd in range(3):
        for flow in range(32):
            tx(src, udp4(A, B, 5000 + flow, 53, payload=bytes([rnd]) * 18))
        for qi, q in enumerate(p.queues):
            for f in rx_all(q):
                sport = struct.unpack_from("!H", f, 34)[0]
                seen.setdefault(sport, set()).add(qi)
    assert len(seen) == 32
    assert all(len(qs) == 1 for qs in seen.values()), seen  # a flow never changes queue
    per_queue = [sum(1 for qs in seen.values() if qi in qs) for qi in range(2)]
    assert min(per_queue) >= 6, per_queue  # 32 flows over 2 queues: both get a share
    assert all(readable(q) for q in p.queues)  # each queue has its own wake-up


def test_flow_hash_ignores_payload_and_sees_ports_and_addresses() -> None:
    a = udp4(A, B, 1, 2, payload=b"a" * 18)
    assert rss.flow_hash(a) == rss.flow_hash(udp4(A, B, 1, 2, payload=b"b" * 40))
    assert rss.flow_hash(a) != rss.flow_hash(udp4(A, B, 1, 3))
    assert rss.flow_hash(a) != rss.flow_hash(udp4(A, B, 1, 2, ip_src=0x0A000009))
    tagged = a[:12] + b"\x81\x00\x00\x0a" + a[12:]
    assert rss.flow_hash(tagged) == rss.flow_hash(a)
    for n in range(0, 60):  # short, hostile frames hash without raising
        rss.flow_hash(a[:n])
        rss.flow_hash(tagged[:n])


def test_disabled_queue_hands_its_frames_to_the_enabled_ones() -> None:
    sw = L2Switch("mq")
    p = sw.port("g", queues=2)
    src = sw.port("s")
    for flow in range(16):
        tx(src, udp4(A, B, 7000 + flow, 53))
    assert p.queues[1].rx, "some flow hashed to queue 1"
    p.queues[1].set_enabled(False)  # the guest went back to one queue pair
    assert not p.queues[1].rx and len(rx_all(p.queues[0])) == 16
    for flow in range(16):
        tx(src, udp4(A, B, 7000 + flow, 53))
    assert len(rx_all(p.queues[0])) == 16 and not p.queues[1].rx
    for q in p.queues:
        q.set_enabled(False)
    tx(src, udp4(A, B, 1, 2))  # no pair of g enabled: g is not an egress port
    assert not p.queues[0].rx and not p.queues[1].rx
