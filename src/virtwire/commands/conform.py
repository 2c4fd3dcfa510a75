"""``virtwire conform TARGET``: run the virtio-net conformance checks against a device."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from virtwire.errors import UserFacingError

NAME = "conform"
HELP = "run the virtio-net conformance suite against a device (QEMU, DPDK, virtwire, vhost-user)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from virtwire.conform.catalog import TARGET_HELP

    p.add_argument("target", nargs="*", metavar="TARGET", help=TARGET_HELP)
    p.add_argument("--json", action="store_true", help="print the report(s) as JSON")
    p.add_argument("--only", action="append", default=[], metavar="ID",
                   help="run only checks whose id is or starts with ID (repeatable)")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--seed", type=int, default=1, help="random seed for frame contents/sizes")
    p.add_argument("--driver", action="append", default=[], metavar="NAME",
                   help="run the driver suite instead: virtwire's device observes a driver "
                        "(virtwire, linux-pci, linux-vhost-user, dpdk); repeatable")
    p.add_argument("--strict", action="store_true",
                   help="a broken SHOULD clause fails the check instead of warning")
    p.add_argument("--mtu", type=int, default=None, metavar="N",
                   help="the mtu our vhost-user front end reports when the back end has no "
                        "CONFIG protocol feature (default 1500)")


def run(args: argparse.Namespace) -> int:
    from virtwire.conform.catalog import make_target
    from virtwire.conform.suite import CHECKS, run_suite

    if args.list:
        from virtwire.conform.drivers import DRIVER_CHECKS

        for c in CHECKS:
            print(f"{c.id:<26} {c.title}\n{'':<26} {c.clause}")
        print("\ndriver suite (--driver NAME):")
        for cid, title, clause, _fn in DRIVER_CHECKS:
            print(f"{cid:<26} {title}\n{'':<26} {clause}")
        return 0
    if args.driver:
        return _drivers(args)
    if not args.target:
        from virtwire.errors import CliError

        raise CliError("conform: give a TARGET (qemu, qemu-legacy, dpdk, virtwire, "
                       "vhost-user:PATH) or --list")
    # CliError for a bad name, before starting anything
    targets = [make_target(t, args.mtu) for t in args.target]
    reports = []
    for t in targets:
        try:
            t.open()
        except UserFacingError:
            raise
        except Exception as e:  # noqa: BLE001 - cannot even start the target
            raise UserFacingError(f"conform {t.name}: cannot start the target: {e}") from None
        try:
            reports.append(run_suite(t, args.only or None, seed=args.seed, strict=args.strict))
        finally:
            t.close()
        _show(args, reports[-1])
    return _finish(args, reports)


def _drivers(args: argparse.Namespace) -> int:
    from virtwire.conform.driver_targets import DRIVERS, run_driver
    from virtwire.errors import CliError

    bad = [d for d in args.driver if d not in DRIVERS]
    if bad or args.target:
        raise CliError(f"conform --driver: unknown driver {bad[0]!r} (known: "
                       f"{', '.join(DRIVERS)})" if bad else
                       "conform: give either TARGETs (device suite) or --driver (driver suite)")
    reports = []
    for d in args.driver:
        try:
            reports.append(run_driver(d))
        except UserFacingError:
            raise
        except Exception as e:  # noqa: BLE001 - the driver could not be run at all
            raise UserFacingError(f"conform --driver {d}: cannot run it: {e}") from None
        _show(args, reports[-1])
    return _finish(args, reports)


def _show(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """One suite's table as soon as it has run (unless ``--json``)."""
    from virtwire.conform.suite import format_table

    if not args.json:
        print(format_table(report))
        print()
        sys.stdout.flush()


def _finish(args: argparse.Namespace, reports: list[dict[str, Any]]) -> int:
    """The ``--json`` output, and the exit status: 1 when any check failed."""
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 1 if any(r["summary"]["fail"] for r in reports) else 0
