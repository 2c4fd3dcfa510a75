"""Per-interface counters of a libvirt domain's vhost-user NICs, read from ``virtwire serve``.

``virsh domifstat`` cannot read an ``<interface type='vhostuser'>`` unless Open vSwitch owns the
socket: there is no host netdev to read ``/proc/net/dev`` from. The counters live in the back
end, so ``virtwire libvirt domifstat`` asks the ``virtwire serve`` behind each socket.

Theory of operation
-------------------
1. ``vhostuser_interfaces(root)`` lists each ``<interface type='vhostuser'>`` of a ``<domain>``:
   ``<source path>`` (the socket), ``<target dev>`` if any, ``<alias name>``, ``<mac address>``.
   libvirt 9.0 gives a running vhost-user interface no ``<target dev>`` (no host netdev: ``virsh
   domiflist`` shows ``-``, ``virsh domifstat DOM ua-vw0`` says "not a known interface"; checked
   in tests/system/test_libvirt_domifstat.py), so it is named by its alias, as virtwire's
   ``attach`` always sets one (``ua-vw0``).
2. Their counters come from each serve's control socket: ``PATH.ctl`` (serve makes one for every
   port, a link to its ``--control`` socket), or the control sockets given; each is asked once;
   ``serve.query_stats`` returns ``Server.stats()``: per port, ``vhost_user.path`` and one entry
   per ring with the device's per-queue counters (``frames``, ``bytes``, ``drops``) and the
   back end's (``errors``: guest faults on that ring, each marking it broken, §2.1.2).
3. ``records(ifaces, stats)`` -- pure, no I/O -- maps them to ``virsh domifstat``'s fields.

Directions are the GUEST's, as ``virsh domifstat`` reports a guest interface (libvirt swaps a
TAP's host-side counters the same way). The device's receive queues (even ring index, virtio
1.2 §5.1.2: receiveq1, transmitq1, ...; ``role`` rx0, rx1, ... in the stats) carry frames *to*
the guest; its transmit queues (odd index, tx0, ...) carry frames *from* the guest:

- ``rx_packets``/``rx_bytes``: frames our device wrote into the guest's RX buffers (summed over
  RX queues); bytes are Ethernet frame bytes, the ``virtio_net_hdr`` not counted.
- ``rx_drop``: frames for the guest the device dropped (larger than the guest's buffers,
  truncated or short from the back end, RX chains too small for the header; §5.1.6.3.1).
- ``rx_errs``: guest faults on the RX rings (bad descriptors; the ring needs a reset).
- ``tx_packets``/``tx_bytes``: frames the device took off the guest's TX ring and the back end
  accepted.
- ``tx_drop``: guest frames the device dropped (bad ``virtio_net_hdr``, runt, oversize, no back
  end; §5.1.6.2), and those its back end refused (``tx_errors``: a TAP write error such as the
  link being down; counted in ``tx_packets`` too, as the guest's own driver counts them).
- ``tx_errs``: guest faults on the TX rings.

Frames the guest's own RX filter rejects (``VIRTIO_NET_CTRL_RX``, §5.1.6.5.1) are not drops:
the guest asked for that (``rx_filtered`` in ``virtwire stats``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from virtwire.errors import UserFacingError

__all__ = ["FIELDS", "Interface", "IfStat", "vhostuser_interfaces", "select", "records",
           "collect", "table"]

#: ``virsh domifstat``'s fields, in its order.
FIELDS = ("rx_bytes", "rx_packets", "rx_errs", "rx_drop",
          "tx_bytes", "tx_packets", "tx_errs", "tx_drop")


@dataclass(frozen=True)
class Interface:
    """One ``<interface type='vhostuser'>`` of a domain (``index``: its place among them)."""

    index: int
    path: str | None
    target: str | None = None
    alias: str | None = None
    mac: str | None = None

    @property
    def name(self) -> str:
        """What to call it: the target dev (as virsh does), else the alias, MAC or index."""
        return self.target or self.alias or self.mac or f"vhostuser#{self.index}"

    def matches(self, key: str) -> bool:
        """``virsh domifstat``'s INTERFACE: target dev or MAC; here also the alias or socket."""
        if key in (self.target, self.alias) or (self.mac and key.lower() == self.mac.lower()):
            return True
        return self.path is not None and _same_path(key, self.path)


@dataclass
class IfStat:
    """The ``virsh domifstat`` counters of one interface, or why they could not be read."""

    iface: Interface
    counters: dict[str, int] | None = None
    port: dict[str, Any] = field(default_factory=dict)  # which virtwire serve port, its state
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        i = self.iface
        d: dict[str, Any] = {"interface": i.name, "target": i.target, "alias": i.alias,
                             "mac": i.mac, "path": i.path}
        for k in FIELDS:
            d[k] = self.counters.get(k) if self.counters is not None else None
        d["port"] = self.port or None
        d["error"] = self.error
        return d


def _same_path(a: str, b: str) -> bool:
    if os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)):
        return True
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def vhostuser_interfaces(root: ET.Element) -> list[Interface]:
    """Every ``<devices><interface type='vhostuser'>`` of a ``<domain>`` element, in order."""
    if root.tag != "domain":
        raise UserFacingError(f"libvirt domifstat: root element is <{root.tag}>, not <domain>")
    out = []
    for i, el in enumerate(root.findall("./devices/interface[@type='vhostuser']")):
        src, tgt = el.find("source"), el.find("target")
        alias, mac = el.find("alias"), el.find("mac")
        out.append(Interface(
            index=i,
            path=(src.get("path") or None) if src is not None else None,
            target=(tgt.get("dev") or None) if tgt is not None else None,
            alias=(alias.get("name") or None) if alias is not None else None,
            mac=(mac.get("address") or None) if mac is not None else None,
        ))
    return out


def select(ifaces: list[Interface], key: str | None, domain: str = "the domain") -> list[Interface]:
    """The interfaces ``key`` names (all when None); none is a one-line UserFacingError."""
    if not ifaces:
        raise UserFacingError(f"libvirt domifstat: {domain} has no <interface type='vhostuser'>")
    if key is None:
        return ifaces
    hit = [i for i in ifaces if i.matches(key)]
    if not hit:
        known = ", ".join(i.name for i in ifaces)
        raise UserFacingError(f"libvirt domifstat: {domain} has no vhost-user interface {key!r} "
                              f"(give a target dev, alias, MAC or socket path; it has: {known})")
    return hit


def _ports(stats: Any) -> list[dict[str, Any]]:
    """The ports of a ``Server.stats()`` answer (whatever its shape: it came off a socket)."""
    ports = stats.get("ports") if isinstance(stats, dict) else None
    return [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def _vu(port: dict[str, Any]) -> dict[str, Any]:
    vu = port.get("vhost_user")
    return vu if isinstance(vu, dict) else {}


def _find_port(stats: dict[str, Any], path: str) -> dict[str, Any] | None:
    for p in _ports(stats):
        pp = _vu(p).get("path")
        if isinstance(pp, str) and _same_path(pp, path):
            return p
    return None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def port_counters(port: dict[str, Any]) -> dict[str, int]:
    """``virsh domifstat``'s fields (guest's view) from one port of ``Server.stats()``."""
    c = dict.fromkeys(FIELDS, 0)
    rings = _vu(port).get("rings", [])
    for r in rings if isinstance(rings, list) else []:
        if not isinstance(r, dict):
            continue
        role = r.get("role")
        idx = r.get("index")
        if isinstance(role, str) and role[:2] in ("rx", "tx"):
            d = role[:2]
        elif isinstance(idx, int):
            d = "rx" if idx % 2 == 0 else "tx"  # receiveqN at 2N, transmitqN at 2N+1 (§5.1.2)
        else:
            continue
        c[d + "_packets"] += _int(r.get("frames"))
        c[d + "_bytes"] += _int(r.get("bytes"))
        c[d + "_drop"] += _int(r.get("drops"))
        c[d + "_errs"] += _int(r.get("errors"))
    # Frames a back end refused (a TAP write error, e.g. its link is down): the device took
    # them off the guest's TX ring (so tx_packets has them, as the guest's own count does), then
    # they were lost: dropped on the guest's way out.
    bes = port.get("backends")
    for b in bes if isinstance(bes, list) else []:
        if isinstance(b, dict):
            c["tx_drop"] += _int(b.get("tx_errors"))
    return c


def _port_info(port: dict[str, Any], control: str) -> dict[str, Any]:
    return {"name": port.get("name"), "config": port.get("config"), "control": control,
            "connected": _vu(port).get("connected")}


def records(ifaces: Iterable[Interface], stats: dict[str, dict[str, Any] | str]) -> list[IfStat]:
    """Map interfaces to counters. ``stats``: control socket -> ``Server.stats()`` of the serve
    there, or the error met reading it. Each interface is looked up in every serve (those on its
    own ``PATH.ctl`` first); one no serve knows gets an ``error``, never an exception."""
    out = []
    for i in ifaces:
        if i.path is None:
            out.append(IfStat(i, error=f"{i.name}: no <source path=...> (not a UNIX socket)"))
            continue
        own = i.path + ".ctl"
        order = sorted(stats, key=lambda ctl: not _same_path(ctl, own))
        found = None
        for ctl in order:
            st = stats[ctl]
            if isinstance(st, dict):
                p = _find_port(st, i.path)
                if p is not None:
                    found = (ctl, p)
                    break
        if found is not None:
            ctl, p = found
            out.append(IfStat(i, port_counters(p), _port_info(p, ctl)))
            continue
        mine = next((ctl for ctl in order if _same_path(ctl, own)), None)
        others = [ctl for ctl in order if ctl != mine]
        if mine is not None and isinstance(stats[mine], str):
            why = f"{stats[mine]} (is virtwire serve running for it?)"
        elif mine is not None:
            ports = [str(_vu(p).get("path")) for p in _ports(stats[mine])]
            why = (f"the virtwire serve on {mine} has no port on it (its ports: "
                   f"{', '.join(ports) or 'none'})")
        else:
            why = (f"no control socket {own}: is virtwire serve running for it? (else give "
                   "its control socket with --control PATH)")
        if others:
            why += "; not on " + ", ".join(
                ctl if isinstance(stats[ctl], dict) else f"{ctl} ({stats[ctl]})" for ctl in others)
        out.append(IfStat(i, error=f"{i.name}: no counters for {i.path}: {why}"))
    return out


def collect(ifaces: list[Interface], controls: Iterable[str] = (),
            query: Callable[[str], dict[str, Any]] | None = None) -> list[IfStat]:
    """Read each serve once (each interface's ``PATH.ctl`` that exists, plus ``controls``) and
    map (``records``). ``query`` defaults to ``serve.query_stats``."""
    if query is None:
        from virtwire.serve import query_stats

        def query(ctl: str) -> dict[str, Any]:
            return query_stats(ctl, timeout=5.0)

    controls = list(controls)
    wanted = list(controls)
    for i in ifaces:
        if i.path is not None and (i.path + ".ctl") not in wanted:
            wanted.append(i.path + ".ctl")
    stats: dict[str, dict[str, Any] | str] = {}
    seen: dict[str, str] = {}  # real path -> the name it was asked by (PATH.ctl may be a link)
    for ctl in wanted:
        if ctl in stats:
            continue
        explicit = ctl in controls
        if not explicit and not os.path.exists(ctl):
            continue  # records() says which socket is missing
        real = os.path.realpath(ctl)
        if real in seen:
            stats[ctl] = stats[seen[real]]
            continue
        seen[real] = ctl
        try:
            data = query(ctl)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            stats[ctl] = data
        except UserFacingError as e:
            stats[ctl] = str(e)
        except ValueError as e:
            stats[ctl] = f"{ctl} answered no counters ({e})"
    return records(ifaces, stats)


def table(recs: list[IfStat]) -> str:
    """``virsh domifstat``'s lines (``NAME FIELD VALUE``) per interface, a blank line between,
    each block headed by a ``#`` line naming the virtwire serve port."""
    blocks = []
    for r in recs:
        if r.counters is None:
            continue
        name = r.iface.name
        head = f"# {name}: {r.iface.path}"
        extra = [x for x in (r.iface.alias, r.iface.mac) if x and x != name]
        if extra:
            head += f" ({', '.join(extra)})"
        if r.port.get("config"):
            head += f" -> virtwire serve {r.port.get('name')}: {r.port['config']}"
        if r.port.get("connected") is False:
            head += " [no front end connected]"
        w = max(len(k) for k in FIELDS)
        lines = [head] + [f"{name} {k:<{w}} {r.counters[k]}" for k in FIELDS]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# -- the command (``virtwire libvirt domifstat``; registered by commands/libvirt.py) -------------
def add_domifstat_parser(sub: Any) -> None:
    """Add the ``domifstat`` action to ``virtwire libvirt``'s sub-parsers."""
    d = sub.add_parser("domifstat", help="per-interface counters of a domain's vhost-user NICs "
                                         "from virtwire serve (what virsh domifstat cannot read)")
    d.add_argument("domain", metavar="DOMAIN|FILE.xml",
                   help="a running domain's name (its live XML, virsh dumpxml) or a domain XML")
    d.add_argument("interface", nargs="?", metavar="INTERFACE",
                   help="only this interface: alias (e.g. ua-vw0), MAC, socket path or a "
                        "target dev where libvirt sets one (default: every vhost-user interface)")
    d.add_argument("--connect", "-c", default="qemu:///system", metavar="URI",
                   help="libvirt URI for a DOMAIN name (default qemu:///system)")
    d.add_argument("--control", action="append", default=[], metavar="PATH",
                   help="also ask the virtwire serve on this control socket (repeatable; each "
                        "socket's own PATH.ctl is always asked)")
    d.add_argument("--json", action="store_true", help="print a JSON list of records")


def read_domain_xml(name: str) -> ET.Element | None:
    """``name`` parsed when it is a domain XML file; None when it names a domain instead."""
    if not os.path.exists(name) and "/" not in name and not name.endswith(".xml"):
        return None
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserFacingError(f"libvirt domifstat: cannot read {name}: {e.strerror or e}") \
            from None
    try:
        return ET.fromstring(data)
    except ET.ParseError as e:
        raise UserFacingError(f"libvirt domifstat: {name} is not XML: {e}") from None


def domifstat(args: Any, dumpxml: Callable[[str, str], ET.Element]) -> int:
    """Run ``virtwire libvirt domifstat``; ``dumpxml(name, uri)`` reads a live domain XML.
    Exit 1 when some selected interface's counters could not be read (one line each)."""
    import json
    import sys

    root = read_domain_xml(args.domain)
    if root is None:
        root = dumpxml(args.domain, args.connect)
    label = root.findtext("name") or args.domain if root.tag == "domain" else args.domain
    ifaces = select(vhostuser_interfaces(root), args.interface, f"domain {label!r}")
    recs = collect(ifaces, args.control)
    if args.json:
        print(json.dumps([r.to_json() for r in recs], indent=2))
    else:
        text = table(recs)
        if text:
            print(text)
    bad = [r for r in recs if r.error is not None]
    for r in bad:
        sys.stderr.write(f"virtwire libvirt domifstat: {r.error}\n")
    return 1 if bad else 0
