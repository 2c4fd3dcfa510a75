"""The RTL8139C+ descriptor rings (what 8139cp drives), offloads and hostile descriptors."""

from __future__ import annotations

import struct

from virtwire.backends.memory import MemoryBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.header import inet_sum
from virtwire.rtl8139 import regs as r
from virtwire.rtl8139.cplus import EOR, FS, IPCS, LGSEN, LS, OWN, TCPCS, Rtl8139CPlus
from virtwire.rtl8139.pci import Rtl8139Nic

MAC = bytes.fromhex("525400abcdef")
RAM = 1 << 20
RXRING, TXRING, RXBUF, TXBUF = 0x1000, 0x2000, 0x10000, 0x80000
NDESC = 4


def chip(backend=None):
    sent: list[bytes] = []
    if backend is None:
        m = Rtl8139CPlus(MAC, revision=0x20, send_frame=lambda f: sent.append(bytes(f)) or True)
    else:
        m = Rtl8139Nic(backend, mac=MAC, revision=0x20).model
    mem = BytearrayGuestMemory(RAM)
    m.attach(mem)
    # cp_init_hw / cp_start_hw, in order
    m.write(r.CR, 1, r.CR_RST)
    m.write(r.CPCR, 2, 0x0020 | r.CPCR_CPRX | r.CPCR_CPTX)
    m.write(r.RDSAR, 4, RXRING)
    m.write(r.RDSAR + 4, 4, 0)
    m.write(r.TNPDS, 4, TXRING)
    m.write(r.TNPDS + 4, 4, 0)
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    m.write(r.RCR, 4, r.RCR_AB | r.RCR_APM)
    m.write(r.IMR, 2, 0xFFFF)
    for i in range(NDESC):
        put_rx(mem, i)
    return m, mem, sent


def put_rx(mem, i: int, size: int = 1536) -> None:
    o1 = OWN | (EOR if i == NDESC - 1 else 0) | size
    mem.write(RXRING + 16 * i, struct.pack("<IIQ", o1, 0, RXBUF + 0x800 * i))


def put_tx(mem, i: int, data: bytes, flags: int = FS | LS, at: int = TXBUF) -> None:
    mem.write(at, data)
    o1 = OWN | flags | (EOR if i == NDESC - 1 else 0) | len(data)
    mem.write(TXRING + 16 * i, struct.pack("<IIQ", o1, 0, at))


def ipv4_tcp(payload: bytes, dst: bytes = b"\x02" * 6) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", 1234, 80, 1000, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0, 64, 6, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return dst + MAC + b"\x08\x00" + ip + tcp


def tcp_ok(frame: bytes) -> bool:
    ip = frame[14:34]
    tcp = frame[34:14 + int.from_bytes(ip[2:4], "big")]
    pseudo = ip[12:20] + b"\x00\x06" + len(tcp).to_bytes(2, "big")
    return inet_sum(ip) == 0xFFFF and inet_sum(pseudo + tcp) == 0xFFFF


def test_rx_fills_owned_descriptors_and_wraps_at_eor():
    m, mem, _ = chip()
    for k in range(6):
        if k == NDESC:
            for i in range(NDESC):  # the driver refills
                put_rx(mem, i)
        f = MAC + b"\x02" * 6 + b"\x08\x00" + bytes([k]) * 100
        assert m.receive(f)
        i = k % NDESC
        o1, o2, _ = struct.unpack("<IIQ", mem.read(RXRING + 16 * i, 16))
        assert not o1 & OWN and o1 & FS and o1 & LS and o1 & 0x1FFF == 114 + 4
        assert bool(o1 & EOR) == (i == NDESC - 1) and o2 == 0
        assert mem.read(RXBUF + 0x800 * i, 114) == f
    assert m.isr & r.INT_ROK and m.counters["rx_frames"] == 6


def test_rx_without_an_owned_descriptor_waits_then_drops_with_rdu():
    m, mem, _ = chip()
    for i in range(NDESC):
        mem.write(RXRING + 16 * i, struct.pack("<IIQ", 0, 0, 0))  # the driver owns them all
    assert not m.rx_room(1514)
    assert not m.receive(MAC + bytes(100))
    assert m.isr & r.INT_RXOVW and m.counters["rx_no_descriptor"] == 1 and m.missed == 1
    # a starved host is told when the driver, having refilled, touches IMR
    calls: list[int] = []
    m.on_rx_space = lambda: calls.append(1)
    m.rx_starved = True
    put_rx(mem, 0)
    m.write(r.IMR, 2, 0xFFFF)
    assert calls == [1] and m.rx_room(1514)


def test_tx_walks_owned_descriptors_and_gathers_fragments():
    m, mem, sent = chip()
    a, b = ipv4_tcp(b"x" * 50), ipv4_tcp(b"y" * 700)
    put_tx(mem, 0, a, at=TXBUF)
    put_tx(mem, 1, b[:300], FS, at=TXBUF + 0x1000)
    put_tx(mem, 2, b[300:], LS, at=TXBUF + 0x2000)
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    assert sent == [a, b]
    for i in range(3):
        assert not struct.unpack("<I", mem.read(TXRING + 16 * i, 4))[0] & OWN
    assert m.isr & r.INT_TOK and m.tx_idx == 3 and m.counters["tpoll"] == 1


def test_tx_checksum_offload_and_software_tso():
    m, mem, sent = chip()
    f = bytearray(ipv4_tcp(b"z" * 200))
    put_tx(mem, 0, bytes(f), FS | LS | IPCS | TCPCS)
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    assert len(sent) == 1 and tcp_ok(sent[0])
    big = ipv4_tcp(bytes(range(256)) * 12)  # 3072 bytes of payload
    put_tx(mem, 1, big, FS | LS | LGSEN | (1000 << 16))
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    segs = sent[1:]
    assert [len(s) - 54 for s in segs] == [1000, 1000, 1000, 72]
    assert all(tcp_ok(s) for s in segs)
    assert b"".join(s[54:] for s in segs) == big[54:]


def test_tso_to_a_vnet_hdr_backend_is_one_gso_frame():
    be = MemoryBackend(vnet_hdr=True, offloads=True)
    m, mem, _ = chip(be)
    big = ipv4_tcp(b"q" * 5000)
    put_tx(mem, 0, big, FS | LS | LGSEN | (1448 << 16))
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    (h,) = be.headers()
    assert (h.gso_type, h.gso_size, h.csum_start, h.csum_offset, h.hdr_len) == (1, 1448, 34, 16,
                                                                                54)
    assert be.frames()[0][54:] == big[54:]


def test_hostile_descriptors_are_counted_not_raised():
    m, mem, sent = chip()
    m.write(r.TNPDS, 4, RAM - 8)  # the ring's first descriptor straddles the end of RAM
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    assert m.counters["dma_errors"] == 1 and not sent
    m.write(r.TNPDS, 4, TXRING)
    mem.write(TXRING, struct.pack("<IIQ", OWN | FS | LS | 0xFFFF, 0, RAM - 100))
    mem.write(TXRING + 16, struct.pack("<IIQ", OWN | FS | LS | LGSEN | 100, 0, TXBUF))
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    assert m.counters["dma_errors"] == 2 and m.counters["tx_bad_size"] == 2 and not sent
    m.write(r.RDSAR, 4, 0xFFFFFFF0)
    assert m.receive(MAC + bytes(100)) and m.counters["dma_errors"] == 3


def test_dtccr_dumps_the_tally_counters():
    m, mem, sent = chip()
    put_tx(mem, 0, ipv4_tcp(b"a" * 10))
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    m.write(0x14, 4, 0)
    m.write(0x10, 4, 0x3000 | 8)
    assert not m.read(0x10, 4) & 8
    assert struct.unpack("<Q", mem.read(0x3000, 8))[0] == 1
    assert m.accesses["DTCCR_LO"] == 2
