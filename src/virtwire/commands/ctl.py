"""``virtwire ctl``: change a running ``virtwire serve`` (impairments, rate limits, VLANs).

    virtwire ctl PATH port/set NAME tx.loss=1% rx.rate=100mbit
    virtwire ctl PATH port/get NAME

PATH is the serve control socket or any port's vhost-user socket (its ``.ctl`` link is used).
A refused change prints one line, exits non-zero and leaves the old settings in force.
"""

from __future__ import annotations

import argparse
import json
import os

from virtwire.errors import CliError, UserFacingError

NAME = "ctl"
HELP = "change a running `virtwire serve` port: impairments, rate limits, VLANs (port/set)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="the control socket or a port's socket")
    parser.add_argument("request", metavar="REQUEST", choices=("port/set", "port/get"),
                        help="port/set or port/get")
    parser.add_argument("port", metavar="NAME", help="the port's name (--port ...,name=)")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                        help="tx.loss=1%% tx.delay=50ms rx.rate=100mbit vlan=10 ... "
                             "(KEY= resets a key)")
    parser.add_argument("--compact", action="store_true", help="one line of JSON")


def run(args: argparse.Namespace) -> int:
    path = args.path
    if not path.endswith(".ctl") and os.path.exists(path + ".ctl"):
        path += ".ctl"
    req: dict[str, object] = {"cmd": args.request, "port": args.port}
    if args.request == "port/set":
        changes: dict[str, str] = {}
        for item in args.settings:
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise CliError(f"ctl: expected KEY=VALUE, got {item!r}")
            if k in changes:
                raise CliError(f"ctl: key {k!r} given twice")
            changes[k] = v
        if not changes:
            raise CliError("ctl port/set: give at least one KEY=VALUE")
        req["set"] = changes
    elif args.settings:
        raise CliError("ctl port/get takes no KEY=VALUE")
    from virtwire.netlab.control import request

    try:
        reply = request(path, req)
    except OSError as e:
        raise UserFacingError(f"ctl: cannot reach {path}: {e.strerror or e}") from None
    except ValueError:
        raise UserFacingError(f"ctl: {path} did not answer with JSON") from None
    if not reply.get("ok"):
        raise UserFacingError(f"ctl: {reply.get('error', 'refused')}")
    print(json.dumps(reply, indent=None if args.compact else 2))
    return 0
