"""Issue 14: the native-vs-Python TX differential with a back end that really ``writev``s.

Both paths send into a datagram socket (the C path through ``native_fd()``, the Python path
through ``send``); the frames read back from the peer, the used ring, the status and the
counters must match. Rings are mostly valid with a few hostile fields, so the C path really runs:
``test_the_c_path_ran_on_most_examples`` counts it over a fixed sample."""

from __future__ import annotations

import os
import random
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtwire.backends.base import BackendBase
from virtwire.memory import BytearrayGuestMemory
from virtwire.net import native as _native
from virtwire.net.device import VirtioNet
from virtwire.virtio import spec as s
from virtwire.virtio.pair import RecordingInterrupt

pytestmark = pytest.mark.skipif(_native.load() is None, reason="no C compiler")

MEM = 1 << 20
SIZE = 16
DESC, AVAIL, USED, TABLE, BUF = 0x1000, 0x2000, 0x3000, 0x4000, 0x10000
HOSTILE = {"addr": [MEM - 12, MEM, 1 << 40, 0, TABLE], "len": [0, 5, 11, 0xFFFFFFFF, 70000],
           "flags": [1, 2, 4, 5, 3], "next": [SIZE, SIZE + 1, 0]}


class WritevBackend(BackendBase):
    """Frames go out as datagrams on a socketpair, from C (writev on ``native_fd``) or Python."""

    vnet_hdr = False
    host_offloads = 0

    def __init__(self) -> None:
        super().__init__("writev")
        self.tx, self.rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.rx.setblocking(False)

    def fileno(self) -> int | None:
        return None

    def native_fd(self) -> int:
        return self.tx.fileno()

    def send(self, frames) -> int:  # noqa: ANN001
        for f in frames:
            os.writev(self.tx.fileno(), list(f))
            self.counters["tx_frames"] += 1
        return len(frames)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.rx.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        super().close()


def build(rng: random.Random) -> BytearrayGuestMemory:
    mem = BytearrayGuestMemory(MEM)
    n = rng.randint(1, SIZE)
    for i in range(SIZE):
        fields = {"addr": BUF + 0x800 * i, "len": 12 + rng.choice([60, 60, 100, 1514, 1515]),
                  "flags": 0, "next": 0}
        if rng.random() < 0.08:  # a hostile field now and then
            k = rng.choice(list(HOSTILE))
            fields[k] = rng.choice(HOSTILE[k])
        o = DESC + 16 * i
        mem.write_u64(o, fields["addr"])
        mem.write_u32(o + 8, fields["len"])
        mem.write_u16(o + 12, fields["flags"])
        mem.write_u16(o + 14, fields["next"])
        mem.write(BUF + 0x800 * i, bytes(12) + bytes([i]) * 60)
        mem.write_u16(AVAIL + 4 + 2 * i, i if rng.random() > 0.03 else SIZE + 1)
    mem.write_u16(AVAIL + 2, n)
    return mem


def run(mem: BytearrayGuestMemory, native: bool):  # noqa: ANN201
    be = WritevBackend()
    try:
        d = VirtioNet(be, options="ctrl_vq=off")
        d.native = native
        d.set_queue_size(1, SIZE)
        d.set_queue_addresses(1, DESC, AVAIL, USED)
        d.set_queue_ready(1)
        d.set_queue_size(0, SIZE)
        d.set_queue_addresses(0, 0x8000, 0x9000, 0xA000)
        d.set_queue_ready(0)
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_F_INDIRECT_DESC), mem,
                       RecordingInterrupt())
        d.notify(1)
        c = dict(d.counters[1])
        ran_c = c.pop("tx_native", 0)
        c.pop("interrupts", None)
        n = mem.read_u16(USED + 2)
        used = sorted((mem.read_u32(USED + 4 + 8 * i), mem.read_u32(USED + 8 + 8 * i))
                      for i in range(min(n, SIZE)))
        return (be.received(), n, used, d.status, c), ran_c
    finally:
        be.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 32))
def test_native_and_python_send_the_same_frames(seed: int) -> None:
    a, _ = run(build(random.Random(seed)), native=True)
    b, _ = run(build(random.Random(seed)), native=False)
    assert a == b


def test_the_c_path_ran_on_most_examples() -> None:
    ran = sum(1 for seed in range(300) if run(build(random.Random(seed)), native=True)[1] > 0)
    assert ran >= 200, f"the C path ran on only {ran} of 300 examples"
