#!/usr/bin/env python3
"""In-process RX benchmark of the virtio-net device: frames from a TAP-shaped fd into the
guest's mergeable split-ring buffers, with the native RX path, with the pure-Python path, and
a peer: a bare Python ``os.readv`` loop over the same fd (no virtio at all).

    python3 tools/bench_rx_native.py [--frames 200000] [--size 64] [--burst 128] [--packed]
                                     [--json]

Set-up: ``VirtioNet`` on a ``DgramBackend`` (a datagram socketpair that behaves like a TAP with
a virtio_net_hdr: one read, one frame), VERSION_1 + MRG_RXBUF + EVENT_IDX (+ RING_PACKED with
``--packed``), a 256-entry RX ring of 2048-byte buffers in a ``BytearrayGuestMemory``. Per
round the benchmark writes ``--burst`` frames to the socket (not timed), wakes the device once
(``backend_ready``: timed) and then plays the guest: it re-posts every used buffer (not
timed). Reported: device-side frames per second for each path and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from virtwire._native.dgram import DgramBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.native import load
from virtwire.virtio import spec as s
from virtwire.virtio.pair import RecordingInterrupt

SIZE = 256
BUF_LEN = 2048
DESC, AVAIL, USED, BUFS = 0x1000, 0x3000, 0x4000, 0x10000
TXQ = (0x8000, 0x9000, 0xA000)


PK_AVAIL, PK_USED = 1 << 7, 1 << 15  # §2.8.1 descriptor flags


def _setup(native: bool, packed: bool) -> tuple[VirtioNet, DgramBackend, BytearrayGuestMemory]:
    mem = BytearrayGuestMemory(BUFS + SIZE * BUF_LEN + 0x1000)
    for i in range(SIZE):
        o = DESC + 16 * i
        mem.write_u64(o, BUFS + BUF_LEN * i)
        mem.write_u32(o + 8, BUF_LEN)
        if packed:  # buffer id i in slot i, available for wrap counter 1
            mem.write_u16(o + 12, i)
            mem.write_u16(o + 14, s.VIRTQ_DESC_F_WRITE | PK_AVAIL)
        else:
            mem.write_u16(o + 12, s.VIRTQ_DESC_F_WRITE)
            mem.write_u16(AVAIL + 4 + 2 * i, i)
    if not packed:
        mem.write_u16(AVAIL + 2, SIZE)
    be = DgramBackend()
    d = VirtioNet(be, options="ctrl_vq=off")
    d.native = native
    d.set_queue_size(0, SIZE)
    d.set_queue_addresses(0, DESC, AVAIL, USED)
    d.set_queue_ready(0)
    d.set_queue_size(1, SIZE)
    d.set_queue_addresses(1, *TXQ)
    d.set_queue_ready(1)
    d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MRG_RXBUF,
                         s.VIRTIO_F_EVENT_IDX) | (s.bit(s.VIRTIO_F_RING_PACKED) if packed else 0),
                   mem, RecordingInterrupt())
    return d, be, mem


def _run_device(native: bool, frames: int, size: int, burst: int, packed: bool = False
                ) -> dict[str, float]:
    d, be, mem = _setup(native, packed)
    frame = bytes(12) + b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + bytes(
        max(0, size - 14))
    used_seen = 0
    avail_idx = SIZE
    slot, wrap = 0, 1  # packed: the guest's next used slot = next slot to re-post (1 desc each)
    spent = 0.0
    sent = 0
    try:
        while sent < frames:
            n = min(burst, frames - sent)
            for _ in range(n):
                be.peer.send(frame)
            sent += n
            t0 = time.perf_counter()
            d.backend_ready(0)
            spent += time.perf_counter() - t0
            if packed:  # the guest: re-post every used descriptor in its slot
                while True:
                    o = DESC + 16 * slot
                    f = mem.read_u16(o + 14)
                    if bool(f & PK_AVAIL) != bool(wrap) or bool(f & PK_USED) != bool(wrap):
                        break
                    bid = mem.read_u16(o + 12)
                    mem.write_u64(o, BUFS + BUF_LEN * bid)
                    mem.write_u32(o + 8, BUF_LEN)
                    # slot reused at once: it becomes available for the next lap's wrap counter
                    mem.write_u16(o + 14, s.VIRTQ_DESC_F_WRITE | (PK_USED if wrap else PK_AVAIL))
                    slot += 1
                    if slot == SIZE:
                        slot, wrap = 0, wrap ^ 1
                continue
            # The guest: give every used buffer back (one avail.idx store).
            used_idx = mem.read_u16(USED + 2)
            while used_seen != used_idx:
                head = mem.read_u32(USED + 4 + 8 * (used_seen % SIZE))
                mem.write_u16(AVAIL + 4 + 2 * (avail_idx % SIZE), head)
                avail_idx = (avail_idx + 1) & 0xFFFF
                used_seen = (used_seen + 1) & 0xFFFF
            mem.write_u16(AVAIL + 2, avail_idx)
        c = d.counters[0]
        if c["frames"] != frames or not d.active:
            raise SystemExit(f"bench: {c['frames']} of {frames} frames delivered ({c})")
        return {"frames": frames, "seconds": spent, "fps": frames / spent,
                "native_frames": c.get("rx_native", 0)}
    finally:
        be.close()


def _run_bare(frames: int, size: int, burst: int) -> dict[str, float]:
    """The peer: read the same frames with a plain Python readv loop (no guest, no virtio)."""
    be = DgramBackend()
    frame = bytes(12 + max(size, 14))
    buf = [memoryview(bytearray(BUF_LEN)), memoryview(bytearray(65600))]
    spent = 0.0
    sent = 0
    try:
        while sent < frames:
            n = min(burst, frames - sent)
            for _ in range(n):
                be.peer.send(frame)
            sent += n
            t0 = time.perf_counter()
            while True:
                try:
                    os.readv(be.fd, buf)
                except BlockingIOError:
                    break
            spent += time.perf_counter() - t0
        return {"frames": frames, "seconds": spent, "fps": frames / spent}
    finally:
        be.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200000)
    ap.add_argument("--size", type=int, default=64, help="Ethernet frame bytes (no header)")
    ap.add_argument("--burst", type=int, default=128, help="frames per device wake-up")
    ap.add_argument("--packed", action="store_true", help="a packed ring (§2.8)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not 14 <= a.size <= BUF_LEN - 12 or not 1 <= a.burst <= SIZE:
        raise SystemExit(f"bench: --size 14..{BUF_LEN - 12}, --burst 1..{SIZE}")
    if load() is None:
        raise SystemExit("bench: the native helper did not build (no C compiler?)")
    py = _run_device(False, a.frames, a.size, a.burst, a.packed)
    nat = _run_device(True, a.frames, a.size, a.burst, a.packed)
    bare = _run_bare(a.frames, a.size, a.burst)
    if nat["native_frames"] != a.frames:
        raise SystemExit(f"bench: only {nat['native_frames']} frames went through C")
    out = {"frames": a.frames, "size": a.size, "burst": a.burst,
           "ring": "packed" if a.packed else "split",
           "native_fps": round(nat["fps"]), "python_fps": round(py["fps"]),
           "bare_readv_fps": round(bare["fps"]),
           "native_over_python": round(nat["fps"] / py["fps"], 2),
           "native_over_bare_readv": round(nat["fps"] / bare["fps"], 2)}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"RX {a.size}-byte frames, {a.burst} per wake-up, {a.frames} frames, "
              f"{out['ring']} ring")
        print(f"  native path     {out['native_fps'] / 1e6:8.3f} Mpps")
        print(f"  Python path     {out['python_fps'] / 1e6:8.3f} Mpps")
        print(f"  bare readv loop {out['bare_readv_fps'] / 1e6:8.3f} Mpps (peer: no virtio)")
        print(f"  native/Python {out['native_over_python']}x, "
              f"native/bare-readv {out['native_over_bare_readv']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
