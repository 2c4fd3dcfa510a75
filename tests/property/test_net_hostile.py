"""Hostile guests against the virtio-net device: random TX headers, random control commands and
random receive-buffer geometries. Invariants: nothing but counted drops / ERR answers, the device
never raises and stays usable, every chain comes back, delivered frames are intact."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.backends.memory import MemoryBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, resolve_features
from virtwire.net.header import VirtioNetHdr
from virtwire.virtio import spec as s
from virtwire.virtio.pair import RecordingInterrupt
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.split_ring import SplitDriverQueue

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
MEM = 8 << 20


class Rig:
    """A device with raw driver-side split queues (no driver-model checks in the way)."""

    def __init__(self, options: str | None = None, offloads: bool = False) -> None:
        self.b = MemoryBackend(offloads=offloads, vnet_hdr=offloads)
        self.d = VirtioNet(self.b, options=options, mac="02:00:00:00:00:01")
        self.mem = BytearrayGuestMemory(MEM)
        self.alloc = DmaAllocator(0x10000, MEM - 0x10000)
        self.q = []
        for i in range(self.d.num_queues):
            q = SplitDriverQueue.allocate(self.alloc, 64)
            q.setup(self.mem)
            self.d.set_queue_size(i, 64)
            self.d.set_queue_addresses(i, *q.layout())
            self.d.set_queue_ready(i)
            self.q.append(q)
        f = resolve_features(self.d.offered_features, ~0 & ~(1 << s.VIRTIO_F_RING_PACKED))
        self.d.start_direct(f, self.mem, RecordingInterrupt())
        assert self.d.active

    def post(self, qi: int, out: list[bytes], in_lens: list[int], token: object) -> None:
        ob = []
        for data in out:
            g = self.alloc.alloc(max(len(data), 1), 8)
            self.mem.write(g, data)
            ob.append((g, len(data)))
        ib = [(self.alloc.alloc(max(n, 1), 8), n) for n in in_lens]
        self.q[qi].add(self.mem, ob, ib, (token, ib))
        self.q[qi].publish(self.mem)
        self.d.notify(qi)

    def used(self, qi: int) -> list[tuple[object, int, bytes]]:
        out = []
        while (u := self.q[qi].get_used(self.mem)) is not None:
            (token, ib), n = u
            data = b"".join(self.mem.read(g, ln) for g, ln in ib)[:n]
            out.append((token, n, data))
        return out


@SETTINGS
@given(hdr=st.binary(min_size=12, max_size=12), n=st.integers(0, 3000),
       offloads=st.booleans(), split=st.integers(0, 12))
def test_random_tx_header(hdr: bytes, n: int, offloads: bool, split: int) -> None:
    r = Rig(offloads=offloads)
    frame = bytes((i * 13) & 0xFF for i in range(n))
    buf = hdr + frame
    # The header may straddle descriptors (any layout, §5.1.6.6 VERSION_1).
    r.post(1, [buf[:split], buf[split:]] if split else [buf], [], "t")
    assert r.d.active
    (used,) = r.used(1)
    assert used[0] == "t" and used[1] == 0
    c = r.d.counters[1]
    assert c["frames"] + c["drops"] == 1
    if c["frames"]:
        sent = r.b.frames()[0]
        h = VirtioNetHdr.unpack(hdr)
        if h.flags & s.VIRTIO_NET_HDR_F_NEEDS_CSUM and not offloads:
            assert len(sent) == n  # checksum finished on a copy, rest untouched
            pos = h.csum_start + h.csum_offset
            assert sent[:pos] == frame[:pos] and sent[pos + 2:] == frame[pos + 2:]
        else:
            assert sent == frame
    # The device still works afterwards.
    r.post(1, [bytes(12) + b"\x02" * 60], [], "ok")
    assert r.used(1)[0][0] == "ok"


@SETTINGS
@given(cls=st.integers(0, 7), cmd=st.integers(0, 7), data=st.binary(max_size=80),
       ack_len=st.integers(0, 3))
def test_random_control_commands(cls: int, cmd: int, data: bytes, ack_len: int) -> None:
    r = Rig(options="queues=2")
    ci = r.d.ctrl_index()
    r.post(ci, [bytes([cls, cmd]) + data], [ack_len], "c")
    assert r.d.active
    ((tok, n, ack),) = r.used(ci)
    if ack_len:
        assert n == 1 and ack[0] in (s.VIRTIO_NET_OK, s.VIRTIO_NET_ERR)
    else:
        assert n == 0
    assert 1 <= r.d.curr_pairs <= 2
    r.post(ci, [bytes([s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_PROMISC, 1])], [1], "p")
    assert r.used(ci)[0][2] == bytes([s.VIRTIO_NET_OK])


@SETTINGS
@given(chains=st.lists(st.lists(st.integers(0, 2500), min_size=1, max_size=3), min_size=1,
                       max_size=40),
       sizes=st.lists(st.integers(14, 6000), min_size=1, max_size=8), mrg=st.booleans())
def test_random_rx_buffers(chains: list[list[int]], sizes: list[int], mrg: bool) -> None:
    r = Rig(options=None if mrg else "mrg_rxbuf=off")
    frames = [bytes([k]) * 6 + b"\x02" * 6 + b"\x08\x00" + bytes((k + i) & 0xFF
                                                               for i in range(n - 14))
              for k, n in enumerate(sizes)]
    r.b.inject_many(frames)
    used = []
    for i, lens in enumerate(chains[:60]):
        try:
            r.post(0, [], lens, i)
        except QueueFull:  # as a driver does with a full ring: reap the used buffers, retry
            used += r.used(0)
            try:
                r.post(0, [], lens, i)
            except QueueFull:
                break  # the device holds every descriptor, waiting for frames
    assert r.d.active
    used += r.used(0)
    c = r.d.counters[0]
    # Reassemble: each frame starts in a buffer whose header carries num_buffers.
    got = []
    k = 0
    while k < len(used):
        _tok, n, data = used[k]
        if n == 0:
            k += 1  # a chain too small for the header, returned unused
            continue
        hdr = VirtioNetHdr.unpack(data)
        assert hdr.num_buffers >= 1
        if not mrg:
            assert hdr.num_buffers == 1
        body = data[12:]
        for j in range(1, hdr.num_buffers):
            body += used[k + j][2]
        got.append(body)
        k += hdr.num_buffers
    # In order, intact; a frame no single buffer could hold (no MRG_RXBUF) may be skipped.
    it = iter(frames)
    assert all(any(g == f for f in it) for g in got)
    if mrg:
        assert got == frames[:len(got)]
    assert len(got) + len(r.b.rx) + c.get("rx_drop_too_big", 0) == len(frames)
    assert c["frames"] == len(got)
