"""``virtwire stats``: per-queue counters of a running ``virtwire serve``, as JSON."""

from __future__ import annotations

import argparse
import json
import os

from virtwire.errors import CliError

NAME = "stats"
HELP = "print the counters of a running `virtwire serve` (JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", metavar="SOCKET",
                        help="the serve control socket, or a port's vhost-user socket path")
    parser.add_argument("--control", metavar="PATH", help="the serve control socket")
    parser.add_argument("--compact", action="store_true", help="one line of JSON")


def run(args: argparse.Namespace) -> int:
    path = args.control or args.target
    if not path:
        raise CliError("stats: give the control socket (--control PATH)")
    if not path.endswith(".ctl") and os.path.exists(path + ".ctl"):
        path += ".ctl"  # a port's socket path was given
    from virtwire.serve import query_stats

    data = query_stats(path)
    print(json.dumps(data, indent=None if args.compact else 2))
    return 0
