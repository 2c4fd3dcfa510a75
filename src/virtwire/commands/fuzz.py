"""``virtwire fuzz``: hostile ring contents against the device side of both ring formats.

Case ``i`` of a run uses seed ``SEED + i`` (one case per ring format and seed), so any failure
is replayed with ``virtwire fuzz --ring FMT --seed CASE_SEED --cases 1``. Progress goes to
stderr; the summary is JSON on stdout; the exit status is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import signal
import sys
import time
from typing import Any

from virtwire.errors import CliError
from virtwire.virtio.fuzz import FORMATS, FuzzStats, run_range

NAME = "fuzz"
HELP = "feed random and hostile ring contents to the virtqueue device side"

CHUNK = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=10000, help="number of cases (default 10000)")
    p.add_argument("--ring", choices=["split", "packed", "both"], default="both")
    p.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _chunk(args: tuple[int, int, tuple[str, ...]]) -> FuzzStats:
    start, n, formats = args
    return run_range(range(start, start + n), formats)


def run(args: argparse.Namespace) -> int:
    if args.cases < 1:
        raise CliError("--cases must be at least 1")
    if not 1 <= args.jobs <= 64:
        raise CliError("--jobs must be in 1..64")
    formats = FORMATS if args.ring == "both" else (args.ring,)
    if "packed" in formats:
        try:
            import virtwire.virtio.packed_ring  # noqa: F401
        except ImportError:
            raise CliError("the packed ring is not available in this build") from None
    seeds = max(1, args.cases // len(formats))
    total = seeds * len(formats)
    t0 = time.monotonic()
    stats = FuzzStats()

    def progress(st: FuzzStats) -> None:
        if args.quiet:
            return
        dt = time.monotonic() - t0
        rate = st.cases / dt if dt else 0.0
        eta = (total - st.cases) / rate if rate else 0.0
        sys.stderr.write(
            f"\rfuzz: {st.cases:>9}/{total} cases  {rate:7.0f}/s  "
            f"rejected {st.outcomes['rejected']:>8}  failures {len(st.failures)}  "
            f"eta {eta:5.0f}s "
        )
        sys.stderr.flush()

    if args.jobs == 1:
        stats.merge(run_range(range(args.seed, args.seed + seeds), formats, progress))
    else:
        work = [
            (s, min(CHUNK, args.seed + seeds - s), formats)
            for s in range(args.seed, args.seed + seeds, CHUNK)
        ]
        ctx = multiprocessing.get_context("fork")

        def _term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt  # leaving the ``with`` terminates the workers

        signal.signal(signal.SIGTERM, _term)
        with ctx.Pool(args.jobs, initializer=signal.signal,
                      initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            for part in pool.imap_unordered(_chunk, work):
                stats.merge(part)
                progress(stats)
    progress(stats)
    if not args.quiet:
        sys.stderr.write("\n")
    dt = time.monotonic() - t0
    summary: dict[str, Any] = {
        "command": "virtwire fuzz "
        + f"--cases {args.cases} --ring {args.ring} --seed {args.seed} --jobs {args.jobs}",
        "rings": list(formats),
        "first_seed": args.seed,
        "seconds": round(dt, 2),
        "cases_per_second": round(stats.cases / dt, 1) if dt else None,
        **stats.as_dict(),
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if stats.failures else 0
