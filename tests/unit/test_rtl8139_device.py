"""The RTL8139 register model against the datasheet's behaviour (and 8139too's use of it)."""

from __future__ import annotations

import struct
import zlib

import pytest

from virtwire.backends.memory import MemoryBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.rtl8139 import regs as r
from virtwire.rtl8139.device import Rtl8139, ether_crc_be, mar_bit
from virtwire.rtl8139.pci import Rtl8139Nic, Rtl8139Pci

MAC = bytes.fromhex("525400abcdef")
RAM = 1 << 20
RING = 0x10000
TXBUF = 0x40000


def chip(**kw) -> tuple[Rtl8139, BytearrayGuestMemory, list[bytes], list[bool]]:
    sent: list[bytes] = []
    levels: list[bool] = []
    m = Rtl8139(MAC, send_frame=lambda f: sent.append(bytes(f)) or True,
                on_irq=levels.append, **kw)
    mem = BytearrayGuestMemory(RAM)
    m.attach(mem)
    return m, mem, sent, levels


def start(m: Rtl8139, rcr: int = r.RCR_AB | r.RCR_APM, ring: int = RING) -> None:
    """What 8139too's rtl8139_hw_start does, in order."""
    m.write(r.CR, 1, r.CR_RST)
    m.write(r.RBSTART, 4, ring)
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    m.write(r.RCR, 4, rcr)
    m.write(r.IMR, 2, 0xE07F)


def frame(dst: bytes, n: int = 100, fill: int = 0x5A) -> bytes:
    return dst + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + bytes([fill]) * (n - 14)


def read_eeprom(m: Rtl8139, loc: int, addr_len: int) -> int:
    """8139too's read_eeprom(), access for access."""
    enb = 0x80 | r.EE_CS
    m.write(r.CR9346, 1, enb & ~r.EE_CS)
    m.write(r.CR9346, 1, enb)
    cmd = loc | (6 << addr_len)
    for i in range(4 + addr_len, -1, -1):
        d = r.EE_DI if cmd & (1 << i) else 0
        m.write(r.CR9346, 1, enb | d)
        m.write(r.CR9346, 1, enb | d | r.EE_SK)
    m.write(r.CR9346, 1, enb)
    v = 0
    for _ in range(16):
        m.write(r.CR9346, 1, enb | r.EE_SK)
        v = v << 1 | (m.read(r.CR9346, 1) & r.EE_DO)
        m.write(r.CR9346, 1, enb)
    m.write(r.CR9346, 1, 0)
    return v


def test_reset_state_mac_and_version():
    m, *_ = chip()
    assert m.read(r.IDR0, 4) == int.from_bytes(MAC[:4], "little")
    assert m.read(r.IDR0 + 4, 2) == int.from_bytes(MAC[4:], "little")
    assert m.read(r.TCR, 4) & 0x7CC00000 == 0x74000000  # an RTL8139C: 8139too names it
    assert m.read(r.CR, 1) == r.CR_BUFE  # empty ring, RX/TX off
    for i in range(4):
        assert m.read(r.TSD0 + 4 * i, 4) & r.TSD_OWN  # the host owns every descriptor
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    assert m.read(r.CR, 1) == r.CR_RE | r.CR_TE | r.CR_BUFE
    m.write(r.CR, 1, r.CR_RST)
    assert m.read(r.CR, 1) & r.CR_RST == 0  # reset completes at once


def test_eeprom_reads_give_the_mac_and_the_8bit_probe_fails():
    m, *_ = chip()
    assert read_eeprom(m, 0, 6) == 0x8129
    # 8139too probes with 8-bit addresses first; a 93C46 answers shifted, so it uses 6 bits.
    assert read_eeprom(m, 0, 8) != 0x8129
    words = [read_eeprom(m, 7 + i, 6) for i in range(3)]
    assert b"".join(w.to_bytes(2, "little") for w in words) == MAC
    assert m.eeprom.reads == 5


def test_isr_is_write_one_to_clear_and_drives_the_line():
    m, mem, sent, levels = chip()
    start(m)
    m.raise_isr(r.INT_ROK | r.INT_TOK, "test")
    assert m.read(r.ISR, 2) == r.INT_ROK | r.INT_TOK and levels == [True]
    m.write(r.ISR, 2, r.INT_TOK)  # clears only TOK
    assert m.read(r.ISR, 2) == r.INT_ROK and levels == [True]
    m.write(r.ISR, 2, 0)  # writing 0s changes nothing
    assert m.read(r.ISR, 2) == r.INT_ROK
    m.write(r.IMR, 2, 0)  # masked: line low, status kept
    assert levels == [True, False] and m.read(r.ISR, 2) == r.INT_ROK
    m.write(r.IMR, 2, 0xFFFF)
    m.write(r.ISR, 1, 0x01)  # a byte write clears the low byte's bit
    assert m.read(r.ISR, 2) == 0 and levels == [True, False, True, False]
    assert m.counters["interrupts"] == 2


def test_tsd_own_tok_sequence_and_tsad_summary():
    m, mem, sent, levels = chip()
    start(m)
    for i in range(4):
        m.write(r.TSAD0 + 4 * i, 4, TXBUF + 0x800 * i)
    data = frame(b"\x02" * 6, 200)
    mem.write(TXBUF + 0x800, data)
    tsd = (8 << 16) | len(data)  # early TX threshold (ignored) | size
    m.write(r.TSD0 + 4, 4, tsd)
    assert sent == [data]
    v = m.read(r.TSD0 + 4, 4)
    assert v & r.TSD_OWN and v & r.TSD_TOK and v & r.TSD_SIZE == len(data)
    assert m.read(r.ISR, 2) & r.INT_TOK and levels[-1]
    assert m.read(r.TSAD_SUMMARY, 2) & (1 << 13)  # TOK1
    # a new write clears the old status until the chip is done again
    m.on_tx = lambda i: None  # defer, as the proxy host does
    m.write(r.TSD0 + 4, 4, len(data))
    v = m.read(r.TSD0 + 4, 4)
    assert not v & (r.TSD_OWN | r.TSD_TOK) and m.tx_pending
    assert m.run_tx() == 1 and m.read(r.TSD0 + 4, 4) & r.TSD_TOK


def test_tx_waits_for_te():
    m, mem, sent, _ = chip()
    start(m)
    m.write(r.CR, 1, r.CR_RE)
    m.write(r.TSAD0, 4, TXBUF)
    m.write(r.TSD0, 4, 64)
    assert sent == [] and not m.read(r.TSD0, 4) & r.TSD_OWN
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    assert len(sent) == 1


def _ring_frames(mem: BytearrayGuestMemory, size: int, capr_start: int, count: int,
                 nowrap: bool = False) -> list[tuple[int, bytes]]:
    """Parse ``count`` frames from the ring as 8139too's rtl8139_rx does."""
    out = []
    cur = capr_start
    for _ in range(count):
        off = cur % size
        status, length = struct.unpack("<HH", mem.read(RING + off, 4))
        body_at = off + 4
        if nowrap or body_at + length <= size:
            body = mem.read(RING + body_at, length)
        else:
            first = size - body_at
            body = mem.read(RING + body_at, first) + mem.read(RING, length - first)
        out.append((status, body))
        cur = (cur + length + 4 + 3) & ~3
    return out


def test_rx_header_crc_and_cbr_capr():
    m, mem, *_ = chip()
    start(m)
    f = frame(MAC, 100)
    assert m.receive(f)
    (status, body), = _ring_frames(mem, m.ring_size, 0, 1)
    assert status == r.RX_ROK | r.RX_PAM
    assert body == f + zlib.crc32(f).to_bytes(4, "little")
    assert m.read(r.CBR, 2) == (4 + 104 + 3) & ~3
    assert not m.read(r.CR, 1) & r.CR_BUFE and m.read(r.ISR, 2) & r.INT_ROK
    # the driver consumed it: CAPR = read offset - 16, and the ring reads empty again
    m.write(r.CAPR, 2, (m.read(r.CBR, 2) - 16) & 0xFFFF)
    assert m.read(r.CR, 1) & r.CR_BUFE


def test_rx_short_frames_are_padded_to_60():
    m, mem, *_ = chip()
    start(m)
    assert m.receive(b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"a" * 28)  # a 42-byte ARP
    (status, body), = _ring_frames(mem, m.ring_size, 0, 1)
    assert status == r.RX_ROK | r.RX_BAR and len(body) == 64


@pytest.mark.parametrize("nowrap", [False, True])
def test_rx_frame_split_across_the_ring_end(nowrap):
    m, mem, *_ = chip()
    start(m, rcr=r.RCR_APM | (r.RCR_WRAP if nowrap else 0))
    size = m.ring_size
    assert size == 8192
    # Bring CBR near the end: consume 1500-byte frames until < 1500 bytes remain.
    capr = 0
    while size - m.cbr > 1600:
        assert m.receive(frame(MAC, 1500))
        capr = m.cbr
        m.write(r.CAPR, 2, (capr - 16) & 0xFFFF)
    at = m.cbr
    f = frame(MAC, 1500, fill=0xA7)
    assert m.receive(f)
    (status, body), = _ring_frames(mem, size, at, 1, nowrap=nowrap)
    assert body[:-4] == f and status & r.RX_ROK
    assert m.cbr == (at + 4 + 1504 + 3 & ~3) % size  # CBR wrapped
    if nowrap:  # the frame ran on past the end, into the driver's padding
        assert mem.read(RING + size, 16) == mem.read(RING + at + 4 + (size - at - 4), 16)
    else:  # its tail is at the ring's start
        assert mem.read(RING, 8) == f[size - at - 4 : size - at - 4 + 8]


def test_rx_overflow_when_capr_is_not_advanced():
    m, mem, *_ = chip()
    start(m)
    n = 0
    while m.receive(frame(MAC, 1000)):
        n += 1
        assert n < 20
    assert n == 8  # 8 KiB ring: 8 records of 1008 bytes; the 9th does not fit in the 128 left
    assert m.read(r.ISR, 2) & r.INT_RXOVW and m.read(r.MPC, 4) == 1
    assert m.counters["rx_overflow"] == 1
    m.write(r.MPC, 4, 0)
    assert m.read(r.MPC, 4) == 0
    # the guest frees everything: the ring takes frames again
    m.write(r.CAPR, 2, (m.cbr - 16) & 0xFFFF)
    assert m.receive(frame(MAC, 1000))


@pytest.mark.parametrize("rcr,dst,accepted,status", [
    (r.RCR_AB, b"\xff" * 6, True, r.RX_BAR),
    (r.RCR_APM, b"\xff" * 6, False, 0),
    (r.RCR_APM, MAC, True, r.RX_PAM),
    (r.RCR_APM, bytes.fromhex("525400000001"), False, 0),
    (r.RCR_AAP, bytes.fromhex("525400000001"), True, 0),
    (r.RCR_AM, bytes.fromhex("01005e000001"), True, r.RX_MAR),  # hash bit set below
    (r.RCR_AM, bytes.fromhex("01005e000002"), False, 0),  # hash bit not set
])
def test_rcr_accept_modes(rcr, dst, accepted, status):
    m, mem, *_ = chip()
    start(m, rcr=rcr)
    bit = mar_bit(bytes.fromhex("01005e000001"))
    assert bit != mar_bit(bytes.fromhex("01005e000002"))
    m.write(r.MAR0 + (bit >> 3), 1, 1 << (bit & 7))
    m.receive(frame(dst))
    assert m.counters["rx_frames"] == int(accepted)
    if accepted:
        assert _ring_frames(mem, m.ring_size, 0, 1)[0][0] == status | r.RX_ROK


def _ether_crc_bitwise(data: bytes) -> int:
    """The CRC-32 shift register fed bit by bit, LSB of each byte first (802.3 order)."""
    crc = 0xFFFFFFFF
    for byte in data:
        for bit in range(8):
            top = crc >> 31
            crc = (crc << 1) & 0xFFFFFFFF
            if top ^ (byte >> bit) & 1:
                crc ^= 0x04C11DB7
    return crc


@pytest.mark.parametrize("addr", ["333300000001", "01005e000001", "01005e7fffff", "ffffffffffff"])
def test_mar_hash_is_the_top_six_bits_of_the_ethernet_crc(addr):
    a = bytes.fromhex(addr)
    assert ether_crc_be(a) == _ether_crc_bitwise(a)
    assert mar_bit(a) == _ether_crc_bitwise(a) >> 26


def test_config_registers_need_unlock_and_phy_reads():
    m, *_ = chip()
    c1 = m.read(r.CONFIG1, 1)
    m.write(r.CONFIG1, 1, c1 ^ 0x20)
    assert m.read(r.CONFIG1, 1) == c1 and m.counters["locked_writes"] == 1
    m.write(r.CR9346, 1, 0xC0)
    m.write(r.CONFIG1, 1, c1 ^ 0x20)
    m.write(r.BMCR, 2, 0x1200)  # autoneg enable + restart
    m.write(r.CR9346, 1, 0)
    assert m.read(r.CONFIG1, 1) == c1 ^ 0x20
    assert m.read(r.BMCR, 2) == 0x1000  # restart self-clears
    assert m.read(r.BMSR, 2) & 0x24 == 0x24  # link up, autoneg complete
    m.set_link(False)
    assert not m.read(r.BMSR, 2) & 0x04 and m.read(r.MSR, 1) & 0x04


def test_every_access_is_counted_by_register_name():
    m, *_ = chip()
    m.read(r.ISR, 2)
    m.write(r.ISR, 2, 0xFFFF)
    m.read(r.TSD0 + 8, 4)
    m.write(r.IDR0 + 4, 4, 0x1234)  # IDR4-5 and the reserved bytes after them
    m.read(0xF0, 4)
    assert m.accesses["ISR"] == 2 and m.accesses["TSD2"] == 1 and m.accesses["IDR4"] == 1
    assert m.accesses["unknown@0xf0"] == 1 and m.counters["unknown_accesses"] == 4


def test_pci_function_ids_bars_and_intx():
    be = MemoryBackend()
    nic = Rtl8139Nic(be, mac=MAC)
    levels: list[bool] = []

    class Line:
        def set_level(self, level: bool) -> None:
            levels.append(level)

    pci = Rtl8139Pci(nic, intx=Line(), defer_notify=True)
    assert pci.config_read(0, 4) == 0x813910EC
    assert pci.config_read(8, 4) == 0x02000010  # class 02/00/00, revision 0x10
    pci.config_write(0x10, 4, 0xFFFFFFFF)
    assert pci.config_read(0x10, 4) == 0xFFFFFF01  # 256-byte I/O BAR
    pci.config_write(0x14, 4, 0xFFFFFFFF)
    assert pci.config_read(0x14, 4) == 0xFFFFFF00  # 256-byte memory BAR
    pci.config_write(0x10, 4, 0xC000)
    pci.config_write(0x14, 4, 0xFEB00000)
    mem = BytearrayGuestMemory(RAM)
    pci.set_memory(mem)
    assert pci.bar_read(0xFEB00000 + r.IDR0, 4, True) == int.from_bytes(MAC[:4], "little")
    assert pci.bar_read(0xC000 + r.IDR0, 4, False) == int.from_bytes(MAC[:4], "little")
    assert pci.bar_read(0xFEB00100, 4, True) is None
    base = 0xFEB00000
    pci.bar_write(base + r.RBSTART, 4, RING, True)
    pci.bar_write(base + r.CR, 1, r.CR_RE | r.CR_TE, True)
    pci.bar_write(base + r.RCR, 4, r.RCR_APM, True)
    pci.bar_write(base + r.IMR, 2, 0xFFFF, True)
    # TX is deferred until flush, as a kick is
    f = frame(b"\x02" * 6, 80)
    mem.write(TXBUF, f)
    pci.bar_write(base + r.TSAD0, 4, TXBUF, True)
    pci.bar_write(base + r.TSD0, 4, len(f), True)
    assert be.sent == [] and pci.pending
    pci.flush()
    assert be.sent == [f] and levels == [True]
    pci.bar_write(base + r.ISR, 2, 0xFFFF, True)
    assert levels == [True, False]
    # RX from the backend through backend_ready
    be.inject(frame(MAC, 300))
    assert nic.active and nic.backend_ready(0) == 1
    assert nic.model.counters["rx_frames"] == 1 and levels[-1] is True


def test_backend_with_vnet_hdr_gets_a_zero_header():
    be = MemoryBackend(vnet_hdr=True)
    nic = Rtl8139Nic(be, mac=MAC)
    mem = BytearrayGuestMemory(RAM)
    nic.model.attach(mem)
    start(nic.model)
    f = frame(b"\x02" * 6, 80)
    mem.write(TXBUF, f)
    nic.model.write(r.TSAD0, 4, TXBUF)
    nic.model.write(r.TSD0, 4, len(f))
    assert be.sent == [bytes(be.hdr_len) + f] and be.frames() == [f]
    be.inject(frame(MAC, 90))
    assert nic.backend_ready(0) == 1
    assert _ring_frames(mem, nic.model.ring_size, 0, 1)[0][1][:-4] == frame(MAC, 90)


def test_full_ring_parks_the_backend_until_capr_frees_space():
    be = MemoryBackend()
    nic = Rtl8139Nic(be, mac=MAC)
    nic.model.attach(BytearrayGuestMemory(RAM))
    start(nic.model)
    watch: list[tuple[int, bool]] = []
    nic.rx_watch = lambda pair, on: watch.append((pair, on))
    for _ in range(10):
        be.inject(frame(MAC, 1500))
    got = nic.backend_ready(0)
    assert got == 5 and watch == [(0, False)] and len(be.rx) == 5  # nothing was dropped
    nic.model.write(r.CAPR, 2, (nic.model.cbr - 16) & 0xFFFF)
    assert watch == [(0, False), (0, True)]
    assert nic.backend_ready(0) == 5 and nic.model.counters["rx_overflow"] == 0


def test_a_full_ring_or_an_unmask_with_unread_frames_re_raises_rok():
    # 8139too acks ROK per frame; frames left when its budget ran out must not be stranded.
    be = MemoryBackend()
    nic = Rtl8139Nic(be, mac=MAC)
    m = nic.model
    m.attach(BytearrayGuestMemory(RAM))
    start(m)
    for _ in range(8):
        be.inject(frame(MAC, 1500))
    nic.backend_ready(0)
    m.write(r.ISR, 2, 0xFFFF)  # the driver acked while draining (and then stopped)
    m.write(r.IMR, 2, 0)  # NAPI: RX masked
    assert not m.isr & r.INT_ROK and not m.read(r.CR, 1) & r.CR_BUFE
    m.write(r.IMR, 2, 0xC07F)  # napi_complete re-enables: the unread frames re-raise ROK
    assert m.isr & r.INT_ROK and m.level and m.isr_causes["ROK-unmask"] == 1
    m.write(r.ISR, 2, 0xFFFF)
    nic.backend_ready(0)  # ring still full: parks and nudges
    assert m.isr & r.INT_ROK and m.isr_causes["ROK-full"] >= 1
    m.write(r.CAPR, 2, (m.cbr - 16) & 0xFFFF)  # drained: the empty ring does not nudge
    m.write(r.ISR, 2, 0xFFFF)
    m.write(r.IMR, 2, 0)
    m.write(r.IMR, 2, 0xC07F)
    assert not m.isr & r.INT_ROK
