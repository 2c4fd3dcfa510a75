"""``virtwire libvirt``: check a domain XML for a vhost-user NIC, print the XML to attach one."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

from virtwire.config import _MAC_RE, PortConfig, parse_port
from virtwire.errors import CliError, UserFacingError

NAME = "libvirt"
HELP = "check a libvirt domain XML for a vhost-user NIC; print the <interface> to attach one"


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


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "libvirt_command", None)
    if cmd == "check":
        return _check(args)
    if cmd == "interface":
        return _interface(args)
    raise CliError("libvirt: give an action: check FILE.xml | interface --path SOCK")


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


def _dumpxml(name: str, uri: str) -> ET.Element:
    """The inactive XML of a defined domain, through ``virsh`` (one-line errors)."""
    virsh = shutil.which("virsh")
    if virsh is None:
        raise UserFacingError(f"libvirt check: {name} is not a file, and virsh (libvirt-clients) "
                              "is not installed to read a domain of that name")
    try:
        r = subprocess.run([virsh, "-c", uri, "dumpxml", "--inactive", "--", name],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise UserFacingError(f"libvirt check: virsh dumpxml {name} timed out") from None
    if r.returncode != 0:
        last = next((ln for ln in reversed(r.stderr.splitlines()) if ln.strip()), "failed")
        raise UserFacingError(f"libvirt check: {name} is not a file, and virsh -c {uri} "
                              f"dumpxml {name}: {last.removeprefix('error: ').strip()}")
    try:
        return ET.fromstring(r.stdout)
    except ET.ParseError as e:
        raise UserFacingError(f"libvirt check: virsh dumpxml {name} is not XML: {e}") from None


def _interface(args: argparse.Namespace) -> int:
    from virtwire.libvirt.check import QEMU_NS, interface_parts, merge_parts, valid_alias

    alias = args.alias if args.alias.startswith("ua-") else "ua-" + args.alias
    if not valid_alias(alias):
        raise CliError(f"libvirt interface --alias {args.alias}: letters, digits, _ and - only")
    if args.port:
        if args.path:
            raise CliError("libvirt interface: give --path or --port, not both")
        cfg = parse_port(args.port)
        args.path, args.queues, args.mac = cfg.path, cfg.queues, cfg.mac
        args.mode = "client" if cfg.server else "server"
    if not args.path:
        raise CliError("libvirt interface: give --path SOCK (or --port vhost-user,path=SOCK,...)")
    if not 1 <= args.queues <= 64:
        raise CliError(f"libvirt interface --queues {args.queues}: expected 1..64")
    if not _MAC_RE.match(args.mac) or int(args.mac[:2], 16) & 1:
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
    out = []
    for key in ("memoryBacking", "acpi", "interface", "qemu:override"):
        ET.indent(parts[key])
    out.append("<!-- in <domain>: guest RAM shared with virtwire -->")
    out.append(ET.tostring(parts["memoryBacking"], encoding="unicode"))
    out.append("<!-- in <features>: else the guest cannot power off -->")
    out.append(ET.tostring(parts["acpi"], encoding="unicode"))
    # (no "--" inside an XML comment: the snippet must stay pasteable XML)
    out.append(f"<!-- in <devices>: the NIC (for virtwire serve, port vhost-user,path={args.path},"
               f"server={'on' if cfg.server else 'off'}"
               + (f",queues={cfg.queues}" if cfg.queues > 1 else "") + ",...) -->")
    out.append(ET.tostring(parts["interface"], encoding="unicode"))
    if not args.kvm:
        out.append(f"<!-- TCG (<domain type='qemu' xmlns:qemu='{QEMU_NS}'>) only, in <domain>: "
                   "no MSI-X on this vhost-user device -->")
        xml = ET.tostring(parts["qemu:override"], encoding="unicode")
        # Standalone, ElementTree declares the namespace on the element; the domain declares it.
        out.append(re.sub(r' xmlns:qemu="[^"]*"', "", xml))
    print("\n".join(out))
    return 0
