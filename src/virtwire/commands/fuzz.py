"""``virtwire fuzz``: hostile inputs against the device side.

``--target rings`` (default): hostile ring contents against both ring formats (below).
``--target vhost-user``: hostile message sequences with real memfds and started rings against the
vhost-user back end, coverage-guided (``hosts.vhost_fuzz``); ``--target pci-proxy``: hostile
message streams against the PCI proxy server (``hosts.proxy_fuzz``); ``--target net``: TX through
the C and Python paths compared, plus hostile control commands (``net.fuzz``); ``--seconds``
bounds all.

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
    p.add_argument("--target", choices=["rings", "vhost-user", "pci-proxy", "net"],
                   default="rings",
                   help="what to fuzz (default rings)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this many seconds (default: when --cases are done)")


def _chunk(args: tuple[int, int, tuple[str, ...]]) -> FuzzStats:
    start, n, formats = args
    return run_range(range(start, start + n), formats)


def _run_net(args: argparse.Namespace) -> int:
    from virtwire.net.fuzz import fuzz

    report = fuzz(args.cases, args.seconds if args.seconds is not None else float("inf"),
                  seed=args.seed)
    summary = {"command": f"virtwire fuzz --target net --cases {args.cases} --seed {args.seed}",
               "target": "net", **report.as_dict()}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if report.failures else 0


def _run_coverage_target(args: argparse.Namespace) -> int:
    if args.target == "vhost-user":
        from virtwire.hosts.vhost_fuzz import fuzz
    else:
        from virtwire.hosts.proxy_fuzz import fuzz

    def progress(r: Any) -> None:
        if not args.quiet:
            sys.stderr.write(f"\rfuzz {args.target}: {r.cases:>8} cases  lines {r.lines:>5}  "
                             f"corpus {r.corpus:>4}  failures {len(r.failures)} ")
            sys.stderr.flush()

    report = fuzz(args.cases, args.seconds if args.seconds is not None else float("inf"),
                  seed=args.seed, progress=progress)
    if not args.quiet:
        sys.stderr.write("\n")
    summary = {"command": f"virtwire fuzz --target {args.target} --cases {args.cases} "
                          f"--seed {args.seed}", "target": args.target, **report.as_dict()}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 1 if report.failures else 0


def run(args: argparse.Namespace) -> int:
    if args.cases < 1:
        raise CliError("--cases must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        raise CliError("--seconds must be positive")
    if args.target == "net":
        return _run_net(args)
    if args.target != "rings":
        return _run_coverage_target(args)
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

    if args.jobs == 1 and args.seconds is not None:
        step = 200  # run in slices so --seconds can stop between them
        for s in range(args.seed, args.seed + seeds, step):
            stats.merge(run_range(range(s, min(s + step, args.seed + seeds)), formats, progress))
            if time.monotonic() - t0 >= args.seconds:
                break
    elif args.jobs == 1:
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
