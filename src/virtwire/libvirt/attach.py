"""``virtwire libvirt attach``: give a defined domain a vhost-user NIC on virtwire, through libvirt.

Theory of operation
-------------------
``plan_attach`` is pure: it edits a parsed ``<domain>`` (the inactive XML libvirt holds) so a
vhost-user NIC on one ``virtwire serve`` port can work, and says what it changed:

- ``<memoryBacking><source type='memfd'/><access mode='shared'/>``: the back end maps guest RAM
  (vhost-user passes the memory fds; the rings of virtio 1.2 §2.7 live there);
- ``<features><acpi/>``, else the guest cannot power off;
- the ``<interface type='vhostuser'>`` ``virtwire libvirt interface`` prints, with a user alias
  (``ua-vwN``, the first free one unless given). An interface already on the same socket path is
  replaced, so attaching twice leaves one NIC;
- under TCG (``type='qemu'``) the ``<qemu:override>`` setting the device's ``vectors=0`` on that
  alias: QEMU 7.2 under TCG crashes using MSI-X with a vhost-user back end.

The result must pass ``check_domain`` (structure only: the socket may not exist yet, a guest with
``<reconnect>`` waits for it) before ``attach`` hands it to ``virDomainDefineXMLFlags`` with
``VIR_DOMAIN_DEFINE_VALIDATE``, so libvirt checks it against its schema before saving it. A
running domain keeps its NIC set until its next start: guest RAM cannot become shared under a
running guest, so nothing is hot-plugged.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from virtwire.config import PortConfig
from virtwire.errors import UserFacingError
from virtwire.libvirt.check import (
    QEMU_TAG,
    Report,
    check_domain,
    interface_parts,
    merge_parts,
    valid_alias,
)
from virtwire.net.options import MAC_RE

__all__ = ["AttachRefused", "AttachResult", "attach", "open_connection", "plan_attach",
           "port_config", "plan_detach", "detach"]


class AttachRefused(UserFacingError):
    """The edited domain still cannot work (``report`` says why); nothing was saved."""

    def __init__(self, report: Report) -> None:
        errors = [f for f in report.findings if f.status == "error"]
        first = errors[0] if errors else None
        msg = (f"libvirt attach: domain {report.domain!r} still cannot work, nothing saved"
               + (f": {first.element}: {first.message} (fix: {first.fix})" if first else ""))
        super().__init__(msg)
        self.report = report


@dataclass
class AttachResult:
    """What ``attach`` did: the alias used, one line per change, the check and the new XML."""

    domain: str
    alias: str
    changes: list[str]
    report: Report
    active: bool = False
    xml: str = ""
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "alias": self.alias, "changes": self.changes,
                "active": self.active, "notes": self.notes, "check": self.report.to_json()}


def port_config(text: str) -> PortConfig:
    """The port a guest NIC attaches to: a ``--port`` spec as given to ``virtwire serve``
    (``vhost-user,path=SOCK,...``), or the socket path of a running ``virtwire serve`` port, whose
    path, server side, queue pairs and MAC are read from its control socket (``SOCK.ctl``)."""
    from virtwire.config import parse_port

    if text.startswith("vhost-user"):
        return parse_port(text)
    if not text.startswith("/"):
        raise UserFacingError(f"port {text!r}: give a running serve's socket path (absolute) or "
                              "the spec vhost-user,path=SOCK,...")
    ctl = text + ".ctl"
    if not os.path.exists(ctl):
        raise UserFacingError(f"port {text}: no virtwire serve runs there (no {ctl}); start it, "
                              f"or give the spec: vhost-user,path={text},...")
    from virtwire.serve import query_stats

    data = query_stats(ctl, timeout=5.0)
    for p in data.get("ports", []) if isinstance(data, dict) else []:
        att = p.get("attach") if isinstance(p, dict) else None
        if isinstance(att, dict) and os.path.abspath(str(att.get("path"))) == \
                os.path.abspath(text):
            server, queues, mac = att.get("server"), att.get("queues"), att.get("mac")
            # (it came off a socket: only well-formed values reach the XML)
            if isinstance(server, bool) and isinstance(queues, int) and 1 <= queues <= 64 \
                    and isinstance(mac, str) and MAC_RE.match(mac):
                return PortConfig(path=text, server=server, queues=queues, mac=mac.lower())
            break
    raise UserFacingError(f"port {text}: the virtwire serve on {ctl} does not describe that port")


def _free_alias(root: ET.Element) -> str:
    taken = {a.get("name") for a in root.iter("alias")}
    n = 0
    while f"ua-vw{n}" in taken:
        n += 1
    return f"ua-vw{n}"


def _describe_memory(root: ET.Element) -> str:
    mb = root.find("memoryBacking")
    if mb is None:
        return "none"
    src, acc = mb.find("source"), mb.find("access")
    return (f"source={src.get('type') if src is not None else '-'}, "
            f"access={acc.get('mode') if acc is not None else '-'}")


def plan_attach(root: ET.Element, cfg: PortConfig,
                alias: str | None = None) -> tuple[str, list[str]]:
    """Edit ``root`` in place for ``cfg``'s port; return the alias used and the changes made."""
    if root.tag != "domain":
        raise UserFacingError(f"libvirt attach: root element is <{root.tag}>, not <domain>")
    changes: list[str] = []
    devices = root.find("devices")
    replaced: list[str] = []
    if devices is not None:
        for iface in devices.findall("interface[@type='vhostuser']"):
            src = iface.find("source")
            if src is not None and src.get("path") == cfg.path:
                old = iface.find("alias")
                replaced.append(old.get("name", "") if old is not None else "")
                devices.remove(iface)
    ovr = root.find(f"{QEMU_TAG}override")
    if ovr is not None:
        for d in ovr.findall(f"{QEMU_TAG}device"):
            if d.get("alias") in replaced and d.get("alias") != alias:
                ovr.remove(d)
        if not len(ovr):
            root.remove(ovr)
    if alias is None:
        reuse = [a for a in replaced if valid_alias(a)]
        alias = reuse[0] if reuse else _free_alias(root)
    elif not valid_alias(alias):
        raise UserFacingError(f"libvirt attach: alias {alias!r}: 'ua-' then letters, digits, "
                              "'_' or '-'")
    elif any(a.get("name") == alias for a in root.iter("alias")):
        raise UserFacingError(f"libvirt attach: alias {alias!r} is taken by another device")
    before_mem = _describe_memory(root)
    had_acpi = root.find("./features/acpi") is not None
    merge_parts(root, interface_parts(cfg, alias))
    after_mem = _describe_memory(root)
    if after_mem != before_mem:
        changes.append(f"memoryBacking: {after_mem} (was {before_mem})")
    if not had_acpi:
        changes.append("features/acpi: added")
    mode = "client" if cfg.server else "server"
    changes.append(f"devices/interface {alias}: vhostuser {cfg.path} mode='{mode}'"
                   + (", reconnect" if cfg.server else "")
                   + (f", queues={cfg.queues}" if cfg.queues > 1 else "")
                   + f", mac {cfg.mac}" + (" (replaced the one on that socket)"
                                          if replaced else " (added)"))
    if root.get("type") == "qemu":
        changes.append(f"qemu:override {alias}: vectors=0 (TCG: no MSI-X)")
    ET.indent(root)
    return alias, changes


def open_connection(uri: str) -> Any:
    """A libvirt connection (libvirt-python), with libvirt's own stderr error printing off."""
    try:
        import libvirt
    except ImportError:
        raise UserFacingError("libvirt attach needs the libvirt Python binding: pip install "
                              "'virtwire[libvirt]' (it builds against libvirt-dev)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        msg = e.get_error_message()
        hint = " (is libvirtd running? libvirtd -d starts it)" if "connect socket" in msg else ""
        raise UserFacingError(f"libvirt: cannot connect to {uri}: {msg}{hint}") from None


def attach(uri: str, name: str, cfg: PortConfig, alias: str | None = None) -> AttachResult:
    """Edit defined domain ``name`` through libvirt's API; validated before it is saved."""
    import libvirt

    conn = open_connection(uri)
    try:
        try:
            dom = conn.lookupByName(name)
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError as e:
            raise UserFacingError(f"libvirt attach: {e.get_error_message()}") from None
        root = ET.fromstring(xml)
        alias, changes = plan_attach(root, cfg, alias)
        report = check_domain(root, check_paths=False)
        if not report.ok:
            raise AttachRefused(report)
        new = ET.tostring(root, encoding="unicode")
        try:
            conn.defineXMLFlags(new, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            active = bool(dom.isActive())
        except libvirt.libvirtError as e:
            raise UserFacingError(f"libvirt attach: libvirt refused the new domain XML, nothing "
                                  f"saved: {e.get_error_message()}") from None
    finally:
        conn.close()
    res = AttachResult(name, alias, changes, report, active, new)
    if active:
        res.notes.append(f"{name} is running: the NIC appears at its next start "
                         f"(virsh shutdown {name}; virsh start {name})")
    return res


def plan_detach(root: ET.Element, which: str) -> list[str]:
    """Remove the vhost-user interface(s) on socket path, alias or MAC ``which`` and their
    ``<qemu:override>`` entries; shared memory and ACPI stay. Returns the changes made."""
    devices = root.find("devices")
    gone: list[str] = []
    changes: list[str] = []
    for iface in devices.findall("interface[@type='vhostuser']") if devices is not None else []:
        src, al, mac = iface.find("source"), iface.find("alias"), iface.find("mac")
        keys = {src.get("path") if src is not None else None,
                al.get("name") if al is not None else None,
                (mac.get("address") or "").lower() if mac is not None else None}
        if which in keys or which.lower() in keys:
            alias = al.get("name", "") if al is not None else ""
            devices.remove(iface)
            gone.append(alias)
            changes.append(f"devices/interface {alias or '(no alias)'}: removed "
                           f"({src.get('path') if src is not None else 'no source'})")
    if not gone:
        raise UserFacingError(f"libvirt detach: no vhostuser interface with socket, alias or MAC "
                              f"{which!r} in {root.findtext('name') or 'the domain'}")
    ovr = root.find(f"{QEMU_TAG}override")
    if ovr is not None:
        for d in ovr.findall(f"{QEMU_TAG}device"):
            if d.get("alias") and d.get("alias") in gone:
                ovr.remove(d)
                changes.append(f"qemu:override {d.get('alias')}: removed")
        if not len(ovr):
            root.remove(ovr)
    ET.indent(root)
    return changes


def detach(uri: str, name: str, which: str) -> list[str]:
    """Remove a vhost-user NIC from defined domain ``name`` through libvirt (validated save)."""
    import libvirt

    conn = open_connection(uri)
    try:
        try:
            dom = conn.lookupByName(name)
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError as e:
            raise UserFacingError(f"libvirt detach: {e.get_error_message()}") from None
        changes = plan_detach(root, which)
        try:
            conn.defineXMLFlags(ET.tostring(root, encoding="unicode"),
                                libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as e:
            raise UserFacingError(f"libvirt detach: libvirt refused the new domain XML, nothing "
                                  f"saved: {e.get_error_message()}") from None
    finally:
        conn.close()
    return changes
