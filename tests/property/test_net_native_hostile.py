"""Hostile raw split rings through the C TX fast path and the pure-Python path: the same used
ring, status and counters either way, and never a crash (every guest value is checked in C)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.backends.null import NullBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.net import native as _native
from virtwire.net.device import VirtioNet
from virtwire.virtio import spec as s
from virtwire.virtio.pair import RecordingInterrupt

pytestmark = pytest.mark.skipif(_native.load() is None, reason="no C compiler")

MEM = 1 << 20
SIZE = 16
DESC, AVAIL, USED, TABLE, BUF = 0x1000, 0x2000, 0x3000, 0x4000, 0x10000
ADDRS = [BUF, BUF + 0x800, BUF + 0x1000, MEM - 40, MEM - 12, MEM, 1 << 40, 0, TABLE]
LENS = [0, 5, 12, 26, 60, 76, 100, 1514, 2000, 70000, 0xFFFFFFFF, 16, 48]
FLAGS = [0, 1, 2, 4, 5, 3, 1, 0, 0]

desc_st = st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENS), st.sampled_from(FLAGS),
                    st.integers(0, SIZE + 2))


def build(descs, table, heads, avail_idx, hdr_bytes) -> BytearrayGuestMemory:
    mem = BytearrayGuestMemory(MEM)
    for i, (a, n, f, nx) in enumerate(descs):
        o = DESC + 16 * i
        mem.write_u64(o, a)
        mem.write_u32(o + 8, n)
        mem.write_u16(o + 12, f)
        mem.write_u16(o + 14, nx)
    for i, (a, n, f, nx) in enumerate(table):
        o = TABLE + 16 * i
        mem.write_u64(o, a)
        mem.write_u32(o + 8, n)
        mem.write_u16(o + 12, f)
        mem.write_u16(o + 14, nx)
    for i, h in enumerate(heads):
        mem.write_u16(AVAIL + 4 + 2 * i, h)
    mem.write_u16(AVAIL + 2, avail_idx)
    for k in range(3):
        mem.write(BUF + 0x800 * k, hdr_bytes)
    return mem


def _serve_tx(mem: BytearrayGuestMemory, native: bool, extra_features: int = 0
              ) -> tuple[VirtioNet, NullBackend, dict]:
    """A device with its TX queue on the hostile ring, started and kicked once; the device,
    its backend and the TX counters both paths keep (``tx_native``/``interrupts`` left out)."""
    be = NullBackend()
    d = VirtioNet(be, options="ctrl_vq=off")
    d.native = native
    d.set_queue_size(1, SIZE)
    d.set_queue_addresses(1, DESC, AVAIL, USED)
    d.set_queue_ready(1)
    d.set_queue_size(0, SIZE)
    d.set_queue_addresses(0, 0x8000, 0x9000, 0xA000)
    d.set_queue_ready(0)
    d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_F_INDIRECT_DESC, s.VIRTIO_NET_F_CSUM,
                         s.VIRTIO_NET_F_HOST_TSO4) | extra_features, mem, RecordingInterrupt())
    d.notify(1)
    c = dict(d.counters[1])
    c.pop("tx_native", None)
    c.pop("interrupts", None)
    return d, be, c


def run(mem: BytearrayGuestMemory, native: bool):
    d, be, c = _serve_tx(mem, native)
    n = mem.read_u16(USED + 2)
    # Used order may differ (Python returns a batch's dropped chains first); the elements not.
    used = sorted((mem.read_u32(USED + 4 + 8 * i), mem.read_u32(USED + 8 + 8 * i))
                  for i in range(min(n, SIZE)))
    return n, used, d.status, c, be.stats()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(desc_st, min_size=SIZE, max_size=SIZE),
       table=st.lists(desc_st, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, SIZE + 1), min_size=SIZE, max_size=SIZE),
       avail_idx=st.integers(0, SIZE + 3),
       hdr=st.sampled_from([bytes(12), b"\x01\x00" + bytes(10), b"\x01\x01" + bytes(2)
                            + b"\xe8\x03\x22\x00\x10\x00" + bytes(2), b"\x00\x09" + bytes(10)]))
def test_native_and_python_agree_on_hostile_rings(descs, table, heads, avail_idx, hdr) -> None:
    a = run(build(descs, table, heads, avail_idx, hdr), native=True)
    b = run(build(descs, table, heads, avail_idx, hdr), native=False)
    assert a == b


# --- packed rings (§2.8): random descriptor slots, wrap bits included ----------------------------
PFLAGS = [0x80, 0x81, 0x82, 0x84, 0x8080, 0x0, 0x8000, 0x80, 0x80, 0x81]

pdesc_st = st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENS), st.integers(0, SIZE + 1),
                     st.sampled_from(PFLAGS))


def build_packed(descs, table, hdr_bytes) -> BytearrayGuestMemory:
    mem = BytearrayGuestMemory(MEM)
    for base, entries in ((DESC, descs), (TABLE, table)):
        for i, (a, n, i_d, f) in enumerate(entries):
            o = base + 16 * i
            mem.write_u64(o, a)
            mem.write_u32(o + 8, n)
            mem.write_u16(o + 12, i_d)
            mem.write_u16(o + 14, f)
    for k in range(3):
        mem.write(BUF + 0x800 * k, hdr_bytes)
    return mem


def run_packed(mem: BytearrayGuestMemory, native: bool):
    d, be, c = _serve_tx(mem, native, s.bit(s.VIRTIO_F_RING_PACKED))
    # Where each used descriptor lands depends on the order chains of different lengths are
    # returned in (Python returns a batch's dropped chains first), so compare the used side's
    # position, the status and every counter instead of slot contents.
    q = d.queues[1]
    pos = (q.next_used, q.used_wrap, q.inflight, q.next_avail, q.avail_wrap) if q else None
    return pos, d.status, c, be.stats()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(pdesc_st, min_size=SIZE, max_size=SIZE),
       table=st.lists(pdesc_st, min_size=4, max_size=4),
       hdr=st.sampled_from([bytes(12), b"\x01\x00" + bytes(10), b"\x00\x09" + bytes(10)]))
def test_native_and_python_agree_on_hostile_packed_rings(descs, table, hdr) -> None:
    a = run_packed(build_packed(descs, table, hdr), native=True)
    b = run_packed(build_packed(descs, table, hdr), native=False)
    assert a == b


# --- RX (vw_split_rx_burst): hostile RX chains, frames waiting in a TAP-shaped socket ------------
RX_ADDRS = [BUF, BUF + 0x800, BUF + 0x1000, BUF + 0x4000, MEM - 40, MEM - 12, MEM, 1 << 40, 0,
            TABLE]
RX_LENS = [0, 5, 11, 12, 26, 100, 1514, 1600, 2000, 9000, 70000, 0xFFFFFFFF, 16]
RX_FLAGS = [2, 3, 2, 3, 3, 0, 1, 6, 7, 4]
RX_FRAMES = [b"", b"\x00" * 5, bytes(12) + b"\xff" * 14, bytes(12) + b"\x02" * 60,
             b"\x00\x01" + bytes(10) + b"\x02" * 1500, bytes(12) + b"\x03" * 3000,
             bytes(12) + b"\x04" * 20000]

# Mostly plain writable buffers (so whole batches reach the C path), some hostile ones.
rx_good_st = st.tuples(st.sampled_from([BUF + 0x1000 * k for k in range(8)]),
                       st.sampled_from([12, 26, 100, 1600, 2000, 4096]), st.just(2),
                       st.integers(0, SIZE - 1))
rx_bad_st = st.tuples(st.sampled_from(RX_ADDRS), st.sampled_from(RX_LENS),
                      st.sampled_from(RX_FLAGS), st.integers(0, SIZE + 2))
rx_desc_st = st.one_of(rx_good_st, rx_bad_st)


RX_SEEN: list[int] = []  # frames the C path delivered, per run (checked at the end)


def run_rx(mem: BytearrayGuestMemory, frames: list[bytes], native: bool):
    from virtwire._native.dgram import DgramBackend

    be = DgramBackend()
    try:
        d = VirtioNet(be, options="ctrl_vq=off")
        d.native = native
        d.set_queue_size(0, SIZE)
        d.set_queue_addresses(0, DESC, AVAIL, USED)
        d.set_queue_ready(0)
        d.set_queue_size(1, SIZE)
        d.set_queue_addresses(1, 0x8000, 0x9000, 0xA000)
        d.set_queue_ready(1)
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_F_INDIRECT_DESC,
                             s.VIRTIO_NET_F_MRG_RXBUF), mem, RecordingInterrupt())
        for f in frames:
            be.peer.send(f)
        d.backend_ready(0)
        d.backend_ready(0)
        c = dict(d.counters[0])
        RX_SEEN.append(c.pop("rx_native", 0))
        q = d.queues[0]
        pos = (q.next_avail, q.next_used, q.in_flight) if q is not None else None
        # The guest sees the same bytes everywhere (buffers, headers, used ring) either way.
        return d.status, c, be.stats(), pos, bytes(mem.view(0, MEM))
    finally:
        be.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(rx_good_st, min_size=SIZE, max_size=SIZE),
       bad=st.lists(st.tuples(st.integers(0, SIZE - 1), rx_bad_st), max_size=4),
       table=st.lists(rx_desc_st, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, SIZE + 1) | st.integers(0, SIZE - 1), min_size=SIZE,
                      max_size=SIZE),
       avail_idx=st.integers(0, SIZE + 3) | st.integers(1, SIZE),
       frames=st.lists(st.sampled_from(RX_FRAMES), min_size=0, max_size=6))
def test_native_and_python_agree_on_hostile_rx_rings(descs, bad, table, heads, avail_idx,
                                                     frames) -> None:
    for i, dsc in bad:  # a few hostile descriptors among plain ones
        descs[i] = dsc
    a = run_rx(build(descs, table, heads, avail_idx, bytes(12)), frames, native=True)
    b = run_rx(build(descs, table, heads, avail_idx, bytes(12)), frames, native=False)
    assert a[:4] == b[:4]
    assert a[4] == b[4]


def test_hostile_rx_rings_reached_the_native_path() -> None:
    """The property above is only worth something if C delivered frames in many runs."""
    RX_SEEN.clear()
    test_native_and_python_agree_on_hostile_rx_rings()
    assert sum(1 for n in RX_SEEN if n) > 20


# --- packed RX: random descriptor slots (wrap bits included) among plain writable ones -----------
RX_PFLAGS = [0x82, 0x83, 0x80, 0x81, 0x84, 0x86, 0x8082, 0x02, 0x8002, 0x82]
rx_pgood_st = st.tuples(st.sampled_from([BUF + 0x1000 * k for k in range(8)]),
                        st.sampled_from([12, 26, 100, 1600, 2000, 4096]),
                        st.integers(0, SIZE - 1), st.sampled_from([0x82, 0x82, 0x83]))
rx_pbad_st = st.tuples(st.sampled_from(RX_ADDRS), st.sampled_from(RX_LENS),
                       st.integers(0, SIZE + 1), st.sampled_from(RX_PFLAGS))


def run_rx_packed(mem: BytearrayGuestMemory, frames: list[bytes], native: bool):
    from virtwire._native.dgram import DgramBackend

    be = DgramBackend()
    try:
        d = VirtioNet(be, options="ctrl_vq=off")
        d.native = native
        d.set_queue_size(0, SIZE)
        d.set_queue_addresses(0, DESC, AVAIL, USED)
        d.set_queue_ready(0)
        d.set_queue_size(1, SIZE)
        d.set_queue_addresses(1, 0x8000, 0x9000, 0xA000)
        d.set_queue_ready(1)
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_F_INDIRECT_DESC,
                             s.VIRTIO_NET_F_MRG_RXBUF, s.VIRTIO_F_RING_PACKED), mem,
                       RecordingInterrupt())
        for f in frames:
            be.peer.send(f)
        d.backend_ready(0)
        d.backend_ready(0)
        c = dict(d.counters[0])
        RX_SEEN.append(c.pop("rx_native", 0))
        q = d.queues[0]
        pos = ((q.next_avail, q.avail_wrap, q.next_used, q.used_wrap, q.inflight)
               if q is not None else None)
        return d.status, c, be.stats(), pos, bytes(mem.view(0, MEM))
    finally:
        be.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(rx_pgood_st, min_size=SIZE, max_size=SIZE),
       bad=st.lists(st.tuples(st.integers(0, SIZE - 1), rx_pbad_st), max_size=4),
       table=st.lists(rx_pbad_st, min_size=4, max_size=4),
       frames=st.lists(st.sampled_from(RX_FRAMES), min_size=0, max_size=6))
def test_native_and_python_agree_on_hostile_packed_rx_rings(descs, bad, table, frames) -> None:
    for i, dsc in bad:
        descs[i] = dsc
    a = run_rx_packed(build_packed(descs, table, bytes(12)), frames, native=True)
    b = run_rx_packed(build_packed(descs, table, bytes(12)), frames, native=False)
    assert a[:4] == b[:4]
    assert a[4] == b[4]


def test_hostile_packed_rx_rings_reached_the_native_path() -> None:
    RX_SEEN.clear()
    test_native_and_python_agree_on_hostile_packed_rx_rings()
    assert sum(1 for n in RX_SEEN if n) > 20
