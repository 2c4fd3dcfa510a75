"""The ``virtwire`` command line: one subcommand per module under ``virtwire.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
A ``CliError`` (or any ``UserFacingError``) raised by a command prints one clear line and exits
non-zero, with no traceback; anything else is a virtwire bug and is reported as one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from virtwire.errors import UserFacingError

# Subcommands, in the order ``virtwire --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "virtwire.commands.image",
    "virtwire.commands.vm",
    "virtwire.commands.serve",
    "virtwire.commands.stats",
    "virtwire.commands.ctl",
    "virtwire.commands.conform",
    "virtwire.commands.fuzz",
    "virtwire.commands.bench",
    "virtwire.commands.explain",
    "virtwire.commands.libvirt",
    "virtwire.commands.compare",
    "virtwire.commands.kvm",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"virtwire: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="virtwire", description="Both halves of a virtio-net link, in Python.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for modname in COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:
                continue  # not written yet
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(command_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not getattr(args, "command_run", None):
        parser.print_help()
        return 2
    try:
        return int(args.command_run(args) or 0)
    except UserFacingError as e:
        sys.stderr.write(f"virtwire: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("virtwire: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
