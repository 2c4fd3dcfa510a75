"""``virtwire compare``: emulated versus paravirtual NICs, same guest, same workloads, one table.

Rows (``--only``): qemu-rtl8139, qemu-e1000, qemu-virtio, virtwire-rtl8139, virtwire-rtl8139cp,
virtwire-virtio-pci, virtwire-vhost-user. See ``virtwire.rtl8139.compare`` for what is measured
and how. Needs root (network namespaces, TAPs) and QEMU; takes minutes (progress on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from virtwire.errors import CliError

NAME = "compare"
HELP = "boot one guest on each NIC in turn and compare throughput, RTT, traps and interrupts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", metavar="ROW,...",
                        help="run only these rows (default: all; see `virtwire compare --list`)")
    parser.add_argument("--seconds", type=int, default=10, metavar="N",
                        help="length of each iperf3 throughput run (default 10)")
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                        help="QEMU accelerator (default tcg)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--html", metavar="FILE", help="also write an HTML report with charts")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")


def run(args: argparse.Namespace) -> int:
    from virtwire.rtl8139 import report
    from virtwire.rtl8139.compare import ROWS, parse_only, run_compare

    if args.list:
        for name, spec in ROWS.items():
            print(f"{name:22} {spec.label}")
        return 0
    rows = parse_only(args.only)
    if not 1 <= args.seconds <= 3600:
        raise CliError(f"--seconds {args.seconds}: expected 1..3600")
    if args.html:
        parent = Path(args.html).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise CliError(f"--html {args.html}: directory {parent} is not writable")
    if os.geteuid() != 0:
        raise CliError("compare needs root (network namespaces and TAPs)")
    t0 = time.time()
    results = run_compare(rows, seconds=args.seconds, accel=args.accel)
    meta = {"seconds": args.seconds, "accel": args.accel, "host": os.uname().nodename,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
            "cpus": os.cpu_count()}
    if args.json:
        print(report.to_json(results, meta))
    else:
        print(report.format_table(results))
    if args.html:
        Path(args.html).write_text(report.to_html(results, meta))
        print(f"compare: wrote {args.html}", file=sys.stderr)
    return 1 if all(r.get("error") for r in results) else 0
