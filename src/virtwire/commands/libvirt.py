"""``virtwire libvirt``: libvirt guests on virtwire — attach/detach a vhost-user NIC through the
libvirt API, check a domain XML, print the parts, a domain for the default guest image, and the
per-interface counters ``virsh domifstat`` cannot read."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

from virtwire.config import PortConfig, parse_port
from virtwire.errors import CliError, UserFacingError
from virtwire.net.options import is_unicast_mac

NAME = "libvirt"
HELP = ("libvirt guests on virtwire: attach/detach a vhost-user NIC, check a domain XML, "
        "interface parts, domifstat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="libvirt_command", metavar="ACTION",
                                parser_class=type(parser))
    c = sub.add_parser("check", help="report, element by element, what a vhost-user NIC needs "
                                     "and what is wrong (exit 1 when it cannot work)")
    c.add_argument("file", metavar="FILE.xml|DOMAIN",
                   help="a domain XML (virsh dumpxml output), or a defined domain's name "
                        "(read with virsh dumpxml --inactive)")
    c.add_argument("--connect", "-c", default="qemu:///system", metavar="URI",
                   help="libvirt URI for a DOMAIN name (default qemu:///system)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--no-path-check", action="store_true",
                   help="do not look at the socket paths on this host")
    i = sub.add_parser("interface", help="print the <interface type='vhostuser'> element and the "
                                         "domain-level parts it needs")
    i.add_argument("sock", nargs="?", metavar="PORT",
                   help="a running virtwire serve port's socket: queues, MAC and mode are read "
                        "from it")
    i.add_argument("--path", metavar="SOCK", help="the vhost-user socket path")
    i.add_argument("--port", metavar="vhost-user,path=SOCK,...",
                   help="instead of --path/--queues/--mode/--mac: the --port given to "
                        "virtwire serve (server=on -> mode client, queues, mac)")
    i.add_argument("--queues", type=int, default=1, metavar="N", help="queue pairs (default 1)")
    i.add_argument("--alias", default="ua-vw0", metavar="NAME",
                   help="the interface's user alias (ua- is prepended if missing; default ua-vw0)")
    i.add_argument("--mode", choices=("client", "server"), default="client",
                   help="QEMU's role on the socket: client (default; virtwire serve listens) or "
                        "server (virtwire serve ...,server=off)")
    i.add_argument("--mac", default="52:54:00:12:34:56",
                   help="the guest MAC (default 52:54:00:12:34:56, virtwire serve's default)")
    i.add_argument("--kvm", action="store_true",
                   help="the domain is type='kvm': no <qemu:override> (MSI-X works)")
    i.add_argument("--into", metavar="FILE.xml",
                   help="print this domain XML with the parts merged in instead")
    _add_attach_domain(sub)
    from virtwire.libvirt.stats import add_domifstat_parser

    add_domifstat_parser(sub)


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "libvirt_command", None)
    if cmd == "check":
        return _check(args)
    if cmd == "interface":
        return _interface(args)
    if cmd == "attach":
        return _attach(args)
    if cmd == "domain":
        return _domain(args)
    if cmd == "detach":
        from virtwire.libvirt.attach import detach

        changes = detach(args.connect, args.domain, args.which)
        print(f"domain {args.domain!r}: NIC {args.which} removed (libvirt validated it)")
        for line in changes:
            print(f"  {line}")
        return 0
    if cmd == "domifstat":
        from virtwire.libvirt.stats import domifstat

        return domifstat(args, lambda name, uri: _dumpxml(name, uri, inactive=False,
                                                          what="libvirt domifstat"))
    raise CliError("libvirt: give an action: check FILE.xml | interface --path SOCK | "
                   "attach DOMAIN --port SPEC | domain NAME")


def _check(args: argparse.Namespace) -> int:
    from virtwire.libvirt.check import check_file

    name = args.file
    if not os.path.exists(name) and "/" not in name and not name.endswith(".xml"):
        from virtwire.libvirt.check import check_domain

        root = _dumpxml(name, args.connect)
        rep = check_domain(root, check_paths=not args.no_path_check)
    else:
        rep = check_file(name, check_paths=not args.no_path_check)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        print(rep.table())
    return 0 if rep.ok else 1


def _dumpxml(name: str, uri: str, *, inactive: bool = True,
             what: str = "libvirt check") -> ET.Element:
    """The inactive (else the live) XML of a domain, through ``virsh`` (one-line errors)."""
    virsh = shutil.which("virsh")
    if virsh is None:
        raise UserFacingError(f"{what}: {name} is not a file, and virsh (libvirt-clients) "
                              "is not installed to read a domain of that name")
    try:
        r = subprocess.run([virsh, "-c", uri, "dumpxml", *(["--inactive"] if inactive else []),
                            "--", name],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise UserFacingError(f"{what}: virsh dumpxml {name} timed out") from None
    if r.returncode != 0:
        last = next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), "failed")
        raise UserFacingError(f"{what}: {name} is not a file, and virsh -c {uri} "
                              f"dumpxml {name}: {last.removeprefix('error: ').strip()}")
    try:
        return ET.fromstring(r.stdout)
    except ET.ParseError as e:
        raise UserFacingError(f"{what}: virsh dumpxml {name} is not XML: {e}") from None


def _interface(args: argparse.Namespace) -> int:
    from virtwire.libvirt.check import (
        interface_parts,
        interface_snippet,
        merge_parts,
        valid_alias,
    )

    alias = args.alias if args.alias.startswith("ua-") else "ua-" + args.alias
    if not valid_alias(alias):
        raise CliError(f"libvirt interface --alias {args.alias}: letters, digits, _ and - only")
    if args.sock:
        if args.path or args.port:
            raise CliError("libvirt interface: give PORT, --path or --port, one of them")
        from virtwire.libvirt.attach import port_config

        cfg = port_config(args.sock)
        args.path, args.queues, args.mac = cfg.path, cfg.queues, cfg.mac
        args.mode = "client" if cfg.server else "server"
    elif args.port:
        if args.path:
            raise CliError("libvirt interface: give --path or --port, not both")
        cfg = parse_port(args.port)
        args.path, args.queues, args.mac = cfg.path, cfg.queues, cfg.mac
        args.mode = "client" if cfg.server else "server"
    if not args.path:
        raise CliError("libvirt interface: give --path SOCK (or --port vhost-user,path=SOCK,...)")
    if not 1 <= args.queues <= 64:
        raise CliError(f"libvirt interface --queues {args.queues}: expected 1..64")
    if not is_unicast_mac(args.mac):
        raise CliError(f"libvirt interface --mac {args.mac}: expected a unicast MAC")
    if not args.path or "'" in args.path or '"' in args.path or "<" in args.path \
            or "&" in args.path:
        raise CliError(f"libvirt interface --path {args.path!r}: no quotes, '<' or '&'")
    cfg = PortConfig(path=args.path, server=args.mode == "client", queues=args.queues,
                     mac=args.mac.lower())
    parts = interface_parts(cfg, alias)
    if args.into:
        try:
            tree = ET.parse(args.into)
        except OSError as e:
            raise UserFacingError(f"libvirt interface: cannot read {args.into}: "
                                  f"{e.strerror or e}") from None
        except ET.ParseError as e:
            raise UserFacingError(f"libvirt interface: {args.into} is not XML: {e}") from None
        root = tree.getroot()
        if root.tag != "domain":
            raise UserFacingError(f"libvirt interface: {args.into} is not a <domain>")
        if args.kvm:
            root.set("type", "kvm")
        merge_parts(root, parts)
        ET.indent(root)
        sys.stdout.write(ET.tostring(root, encoding="unicode") + "\n")
        return 0
    print(interface_snippet(cfg, alias, kvm=args.kvm))
    return 0


# -- attach and domain ---------------------------------------------------------------------------
def _add_attach_domain(sub: Any) -> None:  # argparse's sub-parser action
    a = sub.add_parser("attach", help="give a defined domain a vhost-user NIC on a virtwire serve "
                                      "port, through the libvirt API (validated before saving)")
    a.add_argument("domain", metavar="DOMAIN", help="a defined domain's name")
    a.add_argument("--port", required=True, metavar="SOCK|vhost-user,path=SOCK,...",
                   help="a running virtwire serve port's socket (its settings are read from it), "
                        "or the --port given to virtwire serve (path, server, queues, mac)")
    a.add_argument("--alias", metavar="NAME",
                   help="the interface's user alias (ua- is prepended if missing; default: the "
                        "one on the same socket, else the first free ua-vwN)")
    a.add_argument("--connect", "-c", default="qemu:///system", metavar="URI",
                   help="libvirt URI (default qemu:///system)")
    a.add_argument("--json", action="store_true", help="print what was done as JSON")
    x = sub.add_parser("detach", help="remove a vhost-user NIC (and its override) from a defined "
                                      "domain, through the libvirt API")
    x.add_argument("domain", metavar="DOMAIN", help="a defined domain's name")
    x.add_argument("which", metavar="SOCK|ALIAS|MAC", help="the NIC: its socket path, alias or MAC")
    x.add_argument("--connect", "-c", default="qemu:///system", metavar="URI",
                   help="libvirt URI (default qemu:///system)")
    d = sub.add_parser("domain", help="print (or define) a domain booting virtwire's default guest "
                                      "image, no NIC yet (for attach)")
    d.add_argument("name", metavar="NAME", help="the domain name")
    d.add_argument("--ip", metavar="ADDR/LEN", help="the guest's eth0 address, e.g. 10.0.0.2/24")
    d.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
    d.add_argument("--kvm", action="store_true",
                   help="type='kvm' (needs hardware virtualisation; default TCG, type='qemu')")
    d.add_argument("--console-socket", metavar="PATH",
                   help="serial console on a UNIX socket QEMU connects to (default: a pty, "
                        "virsh console NAME)")
    d.add_argument("--define", action="store_true",
                   help="define it in libvirt (validated) instead of printing it")
    d.add_argument("--connect", "-c", default="qemu:///system", metavar="URI",
                   help="libvirt URI for --define (default qemu:///system)")


def _attach(args: argparse.Namespace) -> int:
    from virtwire.libvirt.attach import AttachRefused, attach, port_config

    cfg = port_config(args.port)
    alias = None
    if args.alias:
        alias = args.alias if args.alias.startswith("ua-") else "ua-" + args.alias
    try:
        res = attach(args.connect, args.domain, cfg, alias)
    except AttachRefused as e:
        if args.json:
            print(json.dumps({"domain": args.domain, "saved": False,
                              "check": e.report.to_json()}, indent=2))
        else:
            print(e.report.table())
            print(f"nothing saved: {args.domain} would still not work (see above)")
        return 1
    if args.json:
        print(json.dumps({**res.to_json(), "saved": True}, indent=2))
        return 0
    print(f"domain {res.domain!r}: NIC {res.alias} on {cfg.path} saved (libvirt validated it)")
    for c in res.changes:
        print(f"  {c}")
    for n in res.notes:
        print(f"note: {n}")
    return 0


def _domain(args: argparse.Namespace) -> int:
    from virtwire.guest.image import load_image
    from virtwire.guest.qemu import find_qemu, parse_memory
    from virtwire.libvirt.domain import guest_domain

    mib = parse_memory(args.memory)
    image = load_image()
    root = guest_domain(args.name, image.kernel, image.initramfs, memory_mib=mib, kvm=args.kvm,
                        ip=args.ip, console_socket=args.console_socket, emulator=find_qemu())
    ET.indent(root)
    xml = ET.tostring(root, encoding="unicode")
    if not args.define:
        print(xml)
        return 0
    from virtwire.libvirt.attach import open_connection

    conn = open_connection(args.connect)  # one clear line when the binding or daemon is missing
    import libvirt

    try:
        conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except libvirt.libvirtError as e:
        raise UserFacingError(f"libvirt domain: cannot define {args.name}: "
                              f"{e.get_error_message()}") from None
    finally:
        conn.close()
    print(f"domain {args.name!r} defined ({'KVM' if args.kvm else 'TCG'}, {mib} MiB, no NIC); "
          f"next: virtwire libvirt attach {args.name} --port vhost-user,path=SOCK")
    return 0
