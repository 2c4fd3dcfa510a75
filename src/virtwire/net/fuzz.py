"""Fuzz target for the virtio-net device model: TX through the C and the Python paths, compared,
and hostile control commands.

Theory of operation
-------------------
Case ``seed``: a split TX ring of 16 mostly valid chains (a frame per descriptor, sizes around
the MTU) with a few hostile fields (addresses at and beyond the end of RAM, lengths 0 and
2^32-1, NEXT/WRITE/INDIRECT flags, heads beyond the ring) is served twice, once with the C fast
path and once without, each into a datagram socket that really receives the frames (``writev``
from C, ``os.writev`` from Python). The frames read back, the used ring, the status and the
counters must be identical; ``native_cases`` counts the cases where the C path actually ran.
Then 1-8 control commands with random classes, commands and payloads go through
``control_command``, which must answer OK or ERR and never raise.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.virtio import spec as s
from virtwire.virtio.pair import RecordingInterrupt

__all__ = ["NetFuzzReport", "run_case", "fuzz"]

MEM, SIZE = 1 << 20, 16
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x10000
_HOSTILE = {"addr": [MEM - 12, MEM, 1 << 40, 0, 0x4000], "len": [0, 5, 11, 0xFFFFFFFF, 70000],
            "flags": [1, 2, 4, 5, 3], "next": [SIZE, SIZE + 1, 0]}


@dataclass
class NetFuzzReport:
    cases: int = 0
    native_cases: int = 0
    frames: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"cases": self.cases, "native_cases": self.native_cases, "frames": self.frames,
                "failures": len(self.failures), "first_failures": self.failures[:5],
                "seconds": round(self.seconds, 2)}


class _SocketBackend:
    """A ``NetBackend`` whose frames become datagrams (C: writev on ``native_fd``)."""

    vnet_hdr = False
    host_offloads = 0

    def __init__(self) -> None:
        self.name = "fuzz"
        self.tx, self.rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.rx.setblocking(False)
        self.counters = {"tx_frames": 0, "tx_bytes": 0, "tx_errors": 0}

    def fileno(self) -> int | None:
        return None

    def native_fd(self) -> int:
        return self.tx.fileno()

    def drain_wakeup(self) -> None:
        pass

    def configure(self, features: int, hdr_len: int) -> None:
        pass

    def set_enabled(self, enabled: bool) -> None:
        pass

    def count_native(self, *, tx_frames: int = 0, tx_bytes: int = 0, tx_errors: int = 0,
                     **_rx: int) -> None:
        self.counters["tx_frames"] += tx_frames
        self.counters["tx_bytes"] += tx_bytes
        self.counters["tx_errors"] += tx_errors

    def send(self, frames: Sequence[Sequence[memoryview]]) -> int:
        for f in frames:
            n = os.writev(self.tx.fileno(), list(f))
            self.counters["tx_frames"] += 1
            self.counters["tx_bytes"] += n
        return len(frames)

    def recv(self, bufs: Sequence[memoryview]) -> int:
        return 0

    def pending_len(self) -> int | None:
        return 0

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

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


def _ring(rng: random.Random) -> BytearrayGuestMemory:
    mem = BytearrayGuestMemory(MEM)
    for i in range(SIZE):
        f = {"addr": BUF + 0x800 * i, "len": 12 + rng.choice([60, 60, 100, 1514, 1515]),
             "flags": 0, "next": 0}
        if rng.random() < 0.08:
            k = rng.choice(list(_HOSTILE))
            f[k] = rng.choice(_HOSTILE[k])
        o = DESC + 16 * i
        mem.write_u64(o, f["addr"])
        mem.write_u32(o + 8, f["len"])
        mem.write_u16(o + 12, f["flags"])
        mem.write_u16(o + 14, f["next"])
        mem.write(BUF + 0x800 * i, bytes(12) + bytes([i]) * 60)
        mem.write_u16(AVAIL + 4 + 2 * i, i if rng.random() > 0.03 else SIZE + 1)
    mem.write_u16(AVAIL + 2, rng.randint(1, SIZE))
    return mem


def _serve(mem: BytearrayGuestMemory, native: bool) -> tuple[Any, int, VirtioNet]:
    be = _SocketBackend()
    try:
        d = VirtioNet(be, options="ctrl_vq=off")  # type: ignore[arg-type]
        d.native = native
        for q, (a, b, c) in ((1, (DESC, AVAIL, USED)), (0, (0x8000, 0x9000, 0xA000))):
            d.set_queue_size(q, SIZE)
            d.set_queue_addresses(q, a, b, c)
            d.set_queue_ready(q)
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_F_INDIRECT_DESC), mem,
                       RecordingInterrupt())
        d.notify(1)
        c = dict(d.counters[1])
        ran = c.pop("tx_native", 0)
        c.pop("interrupts", None)
        n = mem.read_u16(USED + 2)
        used = sorted((mem.read_u32(USED + 4 + 8 * i), mem.read_u32(USED + 8 + 8 * i))
                      for i in range(min(n, SIZE)))
        return (be.received(), n, used, d.status, c, be.stats()), ran, d
    finally:
        be.close()


def run_case(seed: int) -> tuple[str | None, int, int]:
    """(failure or None, whether the C path ran, frames sent) for case ``seed``."""
    try:
        a, ran, _ = _serve(_ring(random.Random(seed)), native=True)
        b, _, dev = _serve(_ring(random.Random(seed)), native=False)
        if a != b:
            return f"seed {seed}: C and Python paths differ", ran, 0
        rng = random.Random(seed ^ 0x5EED)
        for _ in range(rng.randint(1, 8)):
            ack = dev.control_command(rng.randrange(0, 8), rng.randrange(0, 8),
                                      rng.randbytes(rng.choice([0, 1, 4, 6, 8, 14, 200])))
            if ack not in (0, 1):
                return f"seed {seed}: control command answered {ack}", ran, 0
        return None, ran, len(a[0])
    except Exception:
        return f"seed {seed}: " + traceback.format_exc(limit=6), 0, 0


def fuzz(cases: int, seconds: float, seed: int = 0) -> NetFuzzReport:
    report = NetFuzzReport()
    log = logging.getLogger("virtwire")
    level = log.level
    log.setLevel(logging.CRITICAL)
    t0 = time.monotonic()
    try:
        while report.cases < cases and time.monotonic() - t0 < seconds:
            err, ran, frames = run_case(seed + report.cases)
            report.cases += 1
            report.native_cases += ran > 0
            report.frames += frames
            if err is not None:
                report.failures.append(err)
    finally:
        log.setLevel(level)
    report.seconds = time.monotonic() - t0
    return report
