"""Hostile guests against the RTL8139 model: every bad value counted and dropped, never raised."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.memory import BytearrayGuestMemory
from virtwire.rtl8139 import regs as r
from virtwire.rtl8139.device import MAX_TX_SIZE, Rtl8139

MAC = bytes.fromhex("525400abcdef")
RAM = 0x20000  # 128 KiB at 0: most 32-bit addresses are outside it


def chip() -> tuple[Rtl8139, BytearrayGuestMemory, list[bytes]]:
    sent: list[bytes] = []
    m = Rtl8139(MAC, send_frame=lambda f: sent.append(bytes(f)) or True)
    mem = BytearrayGuestMemory(RAM)
    m.attach(mem)
    return m, mem, sent


_ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 255), st.sampled_from([1, 2, 4, 3, 8]),
              st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("r"), st.integers(0, 255), st.sampled_from([1, 2, 4, 3, 8]),
              st.just(0)),
    st.tuples(st.just("rx"), st.integers(0, 2100), st.just(0), st.just(0)),
), max_size=120)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_any_register_sequence_is_survived_and_invariants_hold(ops):
    m, mem, sent = chip()
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    m.write(r.RCR, 4, r.RCR_AAP)
    for op, off, width, value in ops:
        if op == "w":
            m.write(off, width, value)
        elif op == "r":
            v = m.read(off, width)
            assert 0 <= v < 1 << (8 * max(width, 1))
        else:
            body = (MAC + bytes(off))[:off] if off >= 14 else bytes(off)
            m.receive(body)
        assert 0 <= m.cbr < m.ring_size and m.cbr % 4 == 0
        assert m.level == bool(m.isr & m.imr)
    for f in sent:
        assert 0 < len(f) <= MAX_TX_SIZE


@settings(max_examples=200, deadline=None)
@given(addr=st.integers(0, 0xFFFFFFFF), size=st.integers(0, 0x1FFF), slot=st.integers(0, 3))
def test_tx_outside_ram_or_oversized_is_aborted_and_counted(addr, size, slot):
    m, mem, sent = chip()
    m.write(r.CR, 1, r.CR_TE)
    m.write(r.IMR, 2, 0xFFFF)
    m.write(r.TSAD0 + 4 * slot, 4, addr)
    m.write(r.TSD0 + 4 * slot, 4, size)
    tsd = m.read(r.TSD0 + 4 * slot, 4)
    assert tsd & r.TSD_OWN  # the descriptor always comes back to the host
    good = 0 < size <= MAX_TX_SIZE and addr + size <= RAM
    if good:
        assert sent and tsd & r.TSD_TOK and m.isr & r.INT_TOK
    else:
        assert not sent and tsd & r.TSD_TABT and m.isr & r.INT_TER
        assert m.counters["tx_bad_size"] + m.counters["dma_errors"] == 1
    assert m.level  # either way the driver is told


@settings(max_examples=200, deadline=None)
@given(rbstart=st.integers(0, 0xFFFFFFFF), capr=st.integers(0, 0xFFFF),
       rblen=st.integers(0, 3), nowrap=st.booleans(), sizes=st.lists(st.integers(14, 1800),
                                                                       max_size=30))
def test_rx_with_a_hostile_ring_never_writes_outside_it(rbstart, capr, rblen, nowrap, sizes):
    m, mem, _ = chip()
    mem.write(0, b"\xee" * RAM)
    m.write(r.RBSTART, 4, rbstart)
    m.write(r.RCR, 4, r.RCR_AAP | rblen << 11 | (r.RCR_WRAP if nowrap else 0))
    m.write(r.CR, 1, r.CR_RE)
    m.write(r.CAPR, 2, capr)
    ring = 8192 << rblen
    for n in sizes:
        m.receive((MAC + bytes(n))[:n])
    delivered = m.counters["rx_frames"]
    if rbstart + ring + 2048 > RAM:
        # a ring at (or past) the end of RAM: whatever did not fit was counted, not written
        assert delivered + m.counters["dma_errors"] + m.counters["rx_overflow"] + \
            m.counters["rx_oversize"] == len(sizes)
    # nothing outside [rbstart, rbstart + ring + the no-wrap run-on] changed
    lo, hi = rbstart & ~3, rbstart + ring + (2048 if nowrap else 0)  # word-granular check
    raw = mem.read(0, RAM)
    changed = [i for i in range(0, RAM, 4) if raw[i:i + 4] != b"\xee" * 4]
    assert all(lo <= i < hi for i in changed)


def test_rbstart_at_the_very_end_of_ram_drops_every_frame():
    m, mem, _ = chip()
    m.write(r.RBSTART, 4, RAM - 4)
    m.write(r.RCR, 4, r.RCR_AAP)
    m.write(r.CR, 1, r.CR_RE)
    for _ in range(5):
        assert m.receive(MAC + bytes(100))
    assert m.counters["rx_frames"] == 0 and m.counters["dma_errors"] == 5
    assert m.cbr == 0  # nothing was consumed from the ring


_desc = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
                  st.integers(0, (1 << 64) - 1))


@settings(max_examples=200, deadline=None)
@given(tx=st.lists(_desc, min_size=1, max_size=8), rx=st.lists(_desc, min_size=1, max_size=8),
       tnpds=st.sampled_from([0x1000, RAM - 16, RAM - 8, 0xFFFFFFF0]),
       sizes=st.lists(st.integers(0, 2000), max_size=10))
def test_cplus_any_descriptor_contents_are_survived(tx, rx, tnpds, sizes):
    import struct

    from virtwire.rtl8139.cplus import Rtl8139CPlus

    sent: list[bytes] = []
    m = Rtl8139CPlus(MAC, revision=0x20, send_frame=lambda f: sent.append(bytes(f)) or True)
    mem = BytearrayGuestMemory(RAM)
    m.attach(mem)
    for i, d in enumerate(tx):
        mem.write(0x1000 + 16 * i, struct.pack("<IIQ", *d))
    for i, d in enumerate(rx):
        mem.write(0x2000 + 16 * i, struct.pack("<IIQ", *d))
    m.write(r.CPCR, 2, r.CPCR_CPRX | r.CPCR_CPTX)
    m.write(r.TNPDS, 4, tnpds)
    m.write(r.RDSAR, 4, 0x2000)
    m.write(r.CR, 1, r.CR_RE | r.CR_TE)
    m.write(r.RCR, 4, r.RCR_AAP)
    m.write(r.TPPOLL, 1, r.TPPOLL_NPQ)
    for n in sizes:
        m.receive((MAC + bytes(n))[:n])
    assert m.tx_idx < 1024 and m.rx_idx < 1024
    assert all(len(f) <= 65535 + 18 + 4 for f in sent)
