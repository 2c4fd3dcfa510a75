"""``virtwire bench``: virtqueue micro-benchmark -- chains popped and pushed per second.

For each ring format and device batch size, the driver model fills the whole ring with buffers
of ``--segments`` descriptors (not timed), then the device side is timed draining it: ``pop_batch``
(one avail read per batch), ``push`` per chain, one ``publish`` and one ``needs_notification`` per
batch. The driver then collects the used buffers (not timed) and the cycle repeats until
``--seconds`` of device time are accumulated. ``round_trip`` additionally times the driver's
add/publish/kick decision/get_used, i.e. both halves in one thread.

Rates are per CPU second of this thread (``time.thread_time``), so a busy shared machine does
not distort them much; wall-clock rates are reported beside them. The table goes to stderr, the
JSON result to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

from virtwire.errors import CliError
from virtwire.virtio.pair import make_ring_pair
from virtwire.virtio.queue import QueueFull

NAME = "bench"
HELP = "virtqueue micro-benchmark: chains popped+pushed per second (split and packed)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ring", choices=["split", "packed", "both"], default="both")
    p.add_argument("--size", type=int, default=256, help="queue size (default 256)")
    p.add_argument("--batch", default="1,16,64,256", help="device batch sizes (comma list)")
    p.add_argument("--segments", type=int, default=2, help="descriptors per chain (default 2)")
    p.add_argument("--indirect", action="store_true", help="use indirect descriptors")
    p.add_argument("--event-idx", action="store_true", help="negotiate VIRTIO_F_EVENT_IDX")
    p.add_argument("--seconds", type=float, default=1.0, help="device CPU time per point")


def _packed_available() -> bool:
    try:
        import virtwire.virtio.packed_ring  # noqa: F401
    except ImportError:
        return False
    return True


def bench_point(
    fmt: str,
    size: int,
    batch: int,
    segments: int,
    seconds: float,
    indirect: bool = False,
    event_idx: bool = False,
) -> dict[str, Any]:
    """One measurement (see module docstring); returns a JSON-ready dict."""
    rp = make_ring_pair(fmt, size, event_idx=event_idx, indirect=indirect)
    mem, drv, dev = rp.mem, rp.driver, rp.device
    seg = [rp.buffer(64) for _ in range(segments)]
    out = seg
    perf = time.thread_time
    wall = time.perf_counter
    dev_time = 0.0
    dev_wall = 0.0
    rt_time = 0.0
    chains = 0
    while dev_time < seconds:
        t0 = perf()
        n = 0
        try:
            while True:
                drv.add(mem, out, (), n)
                n += 1
        except QueueFull:  # the ring is full
            pass
        if n == 0:
            raise CliError(f"a chain of {segments} descriptors does not fit a ring of {size}")
        drv.publish(mem)
        drv.kick_needed(mem)
        t1 = perf()
        w1 = wall()
        pop_batch, push, publish, notify = (
            dev.pop_batch,
            dev.push,
            dev.publish,
            dev.needs_notification,
        )
        while True:
            cs = pop_batch(mem, batch)
            if not cs:
                break
            for c in cs:
                push(mem, c, 0)
            publish(mem)
            notify(mem)
        t2 = perf()
        dev_wall += wall() - w1
        get_used = drv.get_used
        got = 0
        while get_used(mem) is not None:
            got += 1
        t3 = perf()
        if got != n:
            raise RuntimeError(f"bench: {n} buffers out, {got} back")
        chains += n
        dev_time += t2 - t1
        rt_time += (t1 - t0) + (t2 - t1) + (t3 - t2)
    return {
        "ring": fmt,
        "size": size,
        "batch": batch,
        "segments": segments,
        "indirect": indirect,
        "event_idx": event_idx,
        "chains": chains,
        "device_cpu_seconds": round(dev_time, 4),
        "chains_per_second": round(chains / dev_time),
        "chains_per_wall_second": round(chains / dev_wall),
        "round_trip_chains_per_second": round(chains / rt_time),
    }


def run(args: argparse.Namespace) -> int:
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise CliError(
            f"--batch must be a comma-separated list of integers, not {args.batch!r}"
        ) from None
    if not batches or any(b < 1 for b in batches):
        raise CliError("--batch values must be positive")
    if not 1 <= args.segments <= 64:
        raise CliError("--segments must be in 1..64")
    if not 0 < args.seconds <= 600:
        raise CliError("--seconds must be in (0, 600]")
    if not 1 <= args.size <= 32768:
        raise CliError("--size must be in 1..32768")
    rings = ["split", "packed"] if args.ring == "both" else [args.ring]
    if "packed" in rings and not _packed_available():
        if args.ring == "packed":
            raise CliError("the packed ring is not available in this build")
        rings.remove("packed")
    if "split" in rings and args.size & (args.size - 1):
        raise CliError("split rings need a power-of-2 --size")
    results = []
    err = sys.stderr
    err.write(
        f"{'ring':<7}{'size':>6}{'batch':>7}{'segs':>6}  {'chains/s (device)':>18}"
        f"  {'chains/s (round trip)':>22}\n"
    )
    for fmt in rings:
        for b in batches:
            r = bench_point(
                fmt, args.size, b, args.segments, args.seconds, args.indirect, args.event_idx
            )
            results.append(r)
            err.write(
                f"{fmt:<7}{args.size:>6}{b:>7}{args.segments:>6}  "
                f"{r['chains_per_second']:>18,}  {r['round_trip_chains_per_second']:>22,}\n"
            )
            err.flush()
    json.dump(
        {
            "benchmark": "virtqueue pop+push",
            "python": platform.python_version(),
            "machine": platform.machine(),
            "results": results,
        },
        sys.stdout,
        indent=2,
    )
    sys.stdout.write("\n")
    return 0
