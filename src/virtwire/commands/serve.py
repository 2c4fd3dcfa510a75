"""``virtwire serve``: serve virtio-net devices to QEMU guests (or DPDK) over vhost-user."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from virtwire.config import parse_port
from virtwire.errors import CliError, UserFacingError

NAME = "serve"
HELP = "serve virtio-net devices over vhost-user (prints the QEMU/libvirt snippets to attach)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", action="append", default=[], metavar="vhost-user,path=SOCK,...",
        help="a device: vhost-user,path=SOCK[,server=on|off][,backend=tap|switch|null|memory]"
             "[,ifname=TAP][,switch=NAME][,uplink=TAP][,queues=N][,mac=..][,mtu=..]"
             "[,mrg_rxbuf=off,packed=off,csum=off,...] (repeatable)")
    parser.add_argument("--control", metavar="PATH",
                        help="control socket for `virtwire stats` (default: FIRST_PORT_PATH.ctl)")
    parser.add_argument("--user", metavar="NAME",
                        help="drop root privileges to this user once TAPs and sockets are open "
                             "(the port sockets are handed to it)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="do not print the QEMU/libvirt attachment snippets")
    parser.add_argument("--kvm", action="store_true",
                        help="print QEMU arguments for KVM (MSI-X) instead of TCG (vectors=0)")
    parser.add_argument("--json", action="store_true",
                        help="print the attachment snippets as one JSON object")
    from virtwire.commands.trace_options import add_trace_arguments

    add_trace_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not args.port:
        raise CliError("serve: give at least one --port vhost-user,path=SOCKET,...")
    configs = [parse_port(text, i) for i, text in enumerate(args.port)]
    paths = [c.path for c in configs]
    if len(set(paths)) != len(paths):
        raise CliError("serve: two ports share one socket path")
    from virtwire import serve, trace
    from virtwire.commands.trace_options import configure_from_args

    control = args.control or configs[0].path + ".ctl"
    user = _lookup_user(args.user) if args.user else None
    tracer = configure_from_args(args)
    from virtwire.backends.base import BackendError

    try:
        srv = serve.build(configs)
    except BackendError as e:  # a TapError too: our side, one clear line
        raise UserFacingError(f"serve: cannot set up the ports: {e}") from None
    except UserFacingError:
        raise
    except Exception as e:  # OSError...: our side, one clear line
        raise UserFacingError(f"serve: cannot set up the ports: {e}") from None
    try:
        try:
            srv.start(control)
        except OSError as e:
            raise UserFacingError(f"serve: cannot listen on {e.filename or 'a socket'}: "
                                  f"{e.strerror or e}") from None
        if user is not None:
            _drop_privileges(user, [c.path for c in configs if c.server] + [control])
        if not args.quiet:
            _print_snippets(configs, control, args.kvm, args.json, serve)
        if os.environ.get("VIRTWIRE_SERVE_READY_FD"):
            # Tests and sidecars: one byte on this fd once every socket is listening.
            fd = int(os.environ["VIRTWIRE_SERVE_READY_FD"])
            os.write(fd, b"1")
            os.close(fd)
        logging.getLogger("virtwire.serve").info("serving %d port(s)", len(configs))
        if tracer is not None:
            tracer.emit("host", "start", kind="vhost-user",
                        ports=[c.describe() for c in configs])
        srv.run()
    finally:
        srv.close()
        if tracer is not None:
            tracer.emit("host", "stop", kind="vhost-user")
        trace.stop()
    return 0


def _lookup_user(name: str) -> Any:
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise CliError(f"serve --user {name}: no such user") from None


def _drop_privileges(user: Any, paths: list[str]) -> None:
    """Become ``user`` for good (issue 14): TAPs are open and sockets listen already; the
    sockets are handed to the user so a restarted front end of that user can still connect,
    and the native helper is loaded first (its cache is root's)."""
    from virtwire.net import native

    native.load()
    try:
        for path in paths:
            if os.path.exists(path):
                os.chown(path, user.pw_uid, -1, follow_symlinks=False)
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    except OSError as e:
        raise UserFacingError(f"serve --user {user.pw_name}: cannot drop privileges: "
                              f"{e.strerror or e}") from None
    logging.getLogger("virtwire.serve").info("running as %s (uid %d)", user.pw_name,
                                             user.pw_uid)


def _attach_spec(c) -> str:  # noqa: ANN001
    """The ``--port`` ``virtwire libvirt attach`` needs for this port (what the NIC sees)."""
    return (f"vhost-user,path={c.path}" + ("" if c.server else ",server=off")
            + (f",queues={c.queues}" if c.queues > 1 else "")
            + (f",mac={c.mac}" if c.mac != "52:54:00:12:34:56" else ""))


def _print_snippets(configs, control, kvm, as_json, serve) -> None:  # noqa: ANN001
    # The same text `virtwire libvirt interface --port ... --alias vwN` prints (alias, override).
    from virtwire.libvirt.check import interface_snippet

    if as_json:
        print(json.dumps({
            "control": control,
            "ports": [{"path": c.path, "describe": c.describe(),
                       "qemu_args": serve.qemu_args(c, i, tcg=not kvm),
                       "libvirt": interface_snippet(c, f"ua-vw{i}", kvm=kvm)}
                      for i, c in enumerate(configs)],
        }), flush=True)
        return
    out = sys.stdout
    for i, c in enumerate(configs):
        out.write(f"# port {i}: {c.describe()}\n")
        out.write("# QEMU arguments:\n  " + " ".join(serve.qemu_args(c, i, tcg=not kvm)) + "\n")
        out.write(f"# libvirt (or: virtwire libvirt attach DOMAIN --port {_attach_spec(c)}):\n"
                  + interface_snippet(c, f"ua-vw{i}", kvm=kvm) + "\n")
    out.write(f"# counters: virtwire stats --control {control}   (or kill -USR1 {os.getpid()})\n")
    out.flush()
