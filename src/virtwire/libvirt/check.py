"""Check a libvirt domain XML for what a vhost-user NIC on virtwire needs, and write the parts.

Theory of operation
-------------------
A vhost-user NIC whose domain XML cannot work usually fails silently: the guest boots with a
dead NIC. The reasons are few and all visible in the XML, so ``check_domain`` walks it with
``xml.etree`` (no libvirt needed) and returns one ``Finding`` per element, each ``ok``, ``warn``
or ``error`` with the fix:

- guest RAM must be shared with the back end (vhost-user passes its fds, virtio 1.2 §5.1 rings
  live in guest memory): ``<memoryBacking><source type='memfd'/><access mode='shared'/>`` (or a
  file/hugepages source), or every NUMA ``<cell memAccess='shared'>``;
- ``<features><acpi/>``: without it the guest cannot power off;
- each ``<interface type='vhostuser'>``: ``<source type='unix' path=.. mode=..>`` (``mode`` is
  QEMU's role: ``client`` when the back end - virtwire's default - listens, which then needs the
  socket to exist and ``<reconnect enabled='yes'>``), ``<model type='virtio'/>``, ``<driver
  queues>``;
- under TCG (``<domain type='qemu'>``) QEMU 7.2 crashes using MSI-X with vhost-user, so the
  device needs property ``vectors=0``, set through ``<qemu:override>`` on the interface's user
  alias (``<alias name='ua-...'>``).

``interface_parts`` builds the elements ``virtwire libvirt interface`` prints (the interface
element comes from ``virtwire.serve.libvirt_xml``), and ``merge_parts`` puts them into a domain.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

from virtwire.config import PortConfig
from virtwire.errors import UserFacingError

__all__ = ["Finding", "Report", "check_domain", "check_file", "interface_parts", "merge_parts",
           "interface_snippet", "QEMU_NS", "valid_alias"]

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
QEMU_TAG = f"{{{QEMU_NS}}}"
_ALIAS_RE = re.compile(r"^ua-[A-Za-z0-9_-]+$")

ET.register_namespace("qemu", QEMU_NS)


@dataclass
class Finding:
    """One checked element: ``status`` is ``ok``, ``warn`` or ``error``; ``fix`` says what to do."""

    element: str
    status: str
    message: str
    fix: str = ""


@dataclass
class Report:
    """All findings for one domain; ``ok`` is False when the vhost-user NIC cannot work."""

    domain: str
    domain_type: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.status == "error" for f in self.findings)

    def add(self, element: str, status: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding(element, status, message, fix))

    def to_json(self) -> dict:
        return {"domain": self.domain, "type": self.domain_type, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings]}

    def table(self) -> str:
        """A tidy table for people: status, element, what; the fix indented below."""
        w = max([len(f.element) for f in self.findings] + [7])
        lines = [f"domain {self.domain!r} (type={self.domain_type})",
                 f"{'STATUS':6}  {'ELEMENT':{w}}  FINDING"]
        for f in self.findings:
            lines.append(f"{f.status.upper():6}  {f.element:{w}}  {f.message}")
            if f.fix and f.status != "ok":
                lines.append(f"{'':6}  {'':{w}}  fix: {f.fix}")
        n_err = sum(f.status == "error" for f in self.findings)
        n_warn = sum(f.status == "warn" for f in self.findings)
        lines.append("result: " + ("OK" if self.ok else "CANNOT WORK")
                     + f" ({n_err} error(s), {n_warn} warning(s))")
        return "\n".join(lines)


def valid_alias(name: str) -> bool:
    """libvirt user aliases: ``ua-`` then letters, digits, ``_`` or ``-``."""
    return bool(_ALIAS_RE.match(name))


# -- checking ------------------------------------------------------------------------------------
def check_file(path: str, *, check_paths: bool = True) -> Report:
    """Read and check a domain XML file; a missing or unparseable file is a UserFacingError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserFacingError(f"libvirt check: cannot read {path}: {e.strerror or e}") from None
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise UserFacingError(f"libvirt check: {path} is not XML: {e}") from None
    return check_domain(root, check_paths=check_paths)


def check_domain(root: ET.Element, *, check_paths: bool = True) -> Report:
    """Check a parsed ``<domain>`` element (see the module docstring for what is checked)."""
    if root.tag != "domain":
        raise UserFacingError(f"libvirt check: root element is <{root.tag}>, not <domain>")
    dtype = root.get("type", "")
    rep = Report(domain=root.findtext("name") or "?", domain_type=dtype or "?")
    tcg = dtype == "qemu"
    if dtype not in ("qemu", "kvm"):
        rep.add("domain", "error", f"type={dtype!r}: vhost-user needs a QEMU domain",
                "<domain type='kvm'> (or type='qemu' for TCG)")
    else:
        rep.add("domain", "ok", f"type={dtype!r} ({'TCG' if tcg else 'KVM'})")
    _check_memory(root, rep)
    _check_acpi(root, rep)
    ifaces = root.findall("./devices/interface[@type='vhostuser']")
    if not ifaces:
        rep.add("devices/interface", "error", "no <interface type='vhostuser'>",
                "add one: virtwire libvirt interface --path SOCKET")
    overrides = _vectors_overrides(root)
    for i, iface in enumerate(ifaces):
        _check_interface(iface, i, rep, tcg=tcg, overrides=overrides, check_paths=check_paths)
    return rep


def _check_memory(root: ET.Element, rep: Report) -> None:
    mb = root.find("memoryBacking")
    cells = root.findall("./cpu/numa/cell")
    cell_access = [c.get("memAccess") for c in cells]
    access = mb.find("access") if mb is not None else None
    mode = access.get("mode") if access is not None else None
    want = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
    if cells and all(a == "shared" for a in cell_access):
        rep.add("cpu/numa/cell", "ok", f"all {len(cells)} NUMA cell(s) memAccess='shared'")
        shared = True
    elif mode == "shared" and "private" not in cell_access:
        rep.add("memoryBacking/access", "ok", "mode='shared'")
        shared = True
    else:
        shared = False
        if mode == "shared":
            rep.add("cpu/numa/cell", "error",
                    "a NUMA cell has memAccess='private' overriding <access mode='shared'/>",
                    "memAccess='shared' on every <cell> (or drop memAccess)")
        else:
            what = "no memoryBacking" if mb is None else (
                "no <access>" if access is None else f"<access mode='{mode}'>")
            rep.add("memoryBacking/access", "error",
                    f"{what}: guest RAM is not shared, the back end cannot read the rings",
                    want)
    if mb is None:
        return
    src = mb.find("source")
    stype = src.get("type") if src is not None else None
    hugepages = mb.find("hugepages") is not None
    if stype in ("memfd", "file"):
        rep.add("memoryBacking/source", "ok", f"type='{stype}' (an fd QEMU can pass)")
    elif hugepages:
        rep.add("memoryBacking/hugepages", "ok", "hugepages (file backed)")
    elif stype == "anonymous":
        rep.add("memoryBacking/source", "error",
                "type='anonymous': no fd to hand to the back end", "<source type='memfd'/>")
    elif shared:
        rep.add("memoryBacking/source", "warn",
                "no <source>: libvirt backs shared RAM with a file under memory_backing_dir",
                "<source type='memfd'/> (no files, no qemu.conf dependence)")


def _check_acpi(root: ET.Element, rep: Report) -> None:
    if root.find("./features/acpi") is not None:
        rep.add("features/acpi", "ok", "present")
    else:
        rep.add("features/acpi", "error",
                "missing: the guest cannot power off (virsh shutdown does nothing)",
                "<features><acpi/></features>")


def _vectors_overrides(root: ET.Element) -> dict[str, str]:
    """``{alias: value}`` of each ``<qemu:override>`` frontend property ``vectors``."""
    found: dict[str, str] = {}
    for dev in root.findall(f"./{QEMU_TAG}override/{QEMU_TAG}device"):
        for prop in dev.findall(f"./{QEMU_TAG}frontend/{QEMU_TAG}property"):
            if prop.get("name") == "vectors":
                found[dev.get("alias", "")] = prop.get("value", "")
    return found


def _check_interface(iface: ET.Element, i: int, rep: Report, *, tcg: bool,
                     overrides: dict[str, str], check_paths: bool) -> None:
    alias_el = iface.find("alias")
    alias = alias_el.get("name", "") if alias_el is not None else ""
    tag = f"interface[{i}]" + (f"({alias})" if alias else "")
    src = iface.find("source")
    if src is None:
        rep.add(f"{tag}/source", "error", "no <source>",
                "<source type='unix' path='/run/vw0.sock' mode='client'/>")
        mode = None
    else:
        _check_source(src, tag, rep, check_paths=check_paths)
        mode = src.get("mode")
        if check_paths and mode == "client" and src.get("path"):
            _check_against_serve(src.get("path", ""), iface, tag, rep)
    model = iface.find("model")
    mtype = model.get("type") if model is not None else None
    if mtype == "virtio":
        rep.add(f"{tag}/model", "ok", "type='virtio'")
    else:
        rep.add(f"{tag}/model", "error",
                f"model {mtype!r}: vhost-user drives only a virtio-net device",
                "<model type='virtio'/>")
    drv = iface.find("driver")
    q = drv.get("queues") if drv is not None else None
    if q is None:
        rep.add(f"{tag}/driver", "ok", "1 queue pair (virtwire serve queues=1)")
    elif not q.isdigit() or not 1 <= int(q) <= 64:
        rep.add(f"{tag}/driver", "error", f"queues={q!r}: expected 1..64",
                "<driver queues='N'/> matching virtwire serve ...,queues=N")
    else:
        rep.add(f"{tag}/driver", "ok",
                f"{q} queue pair(s): virtwire serve needs ...,queues={q}")
    if mode == "client":
        rc = src.find("reconnect") if src is not None else None
        if rc is not None and rc.get("enabled") == "yes":
            rep.add(f"{tag}/source/reconnect", "ok", "enabled='yes'")
        else:
            rep.add(f"{tag}/source/reconnect", "warn",
                    "no reconnect: a guest started before virtwire serve, or across its "
                    "restart, keeps a dead NIC",
                    "<reconnect enabled='yes' timeout='1'/> inside <source>")
    if tcg:
        _check_vectors(tag, alias, rep, overrides)


def _check_source(src: ET.Element, tag: str, rep: Report, *, check_paths: bool) -> None:
    stype, path, mode = src.get("type"), src.get("path"), src.get("mode")
    el = f"{tag}/source"
    if stype != "unix":
        rep.add(el, "error", f"type={stype!r}", "<source type='unix' .../>")
    if not path:
        rep.add(el, "error", "no path=", "path='SOCKET' of virtwire serve --port vhost-user,path=")
        return
    if mode not in ("client", "server"):
        rep.add(el, "error", f"mode={mode!r}",
                "mode='client' (virtwire serve listens, its default) or mode='server' "
                "(virtwire serve ...,server=off)")
        return
    rep.add(el, "ok", f"unix {path} mode='{mode}' (QEMU is the {mode})")
    if not check_paths:
        return
    listening = _is_listening(path)
    if mode == "client":
        try:
            st = os.stat(path)
        except OSError:
            rep.add(f"{el}/path", "error",
                    f"{path} does not exist: QEMU (client) has nothing to connect to",
                    f"start it first: virtwire serve --port vhost-user,path={path},... "
                    "(or use mode='server' with ...,server=off)")
            return
        if not stat.S_ISSOCK(st.st_mode):
            rep.add(f"{el}/path", "error", f"{path} is not a socket",
                    "point path= at virtwire serve's socket (--port vhost-user,path=...)")
        elif not listening:
            rep.add(f"{el}/path", "warn", f"{path} is a socket but nothing listens on it",
                    f"(re)start virtwire serve --port vhost-user,path={path},...")
        else:
            rep.add(f"{el}/path", "ok", "a back end listens there")
    else:  # QEMU listens; virtwire must connect (server=off)
        if listening:
            rep.add(f"{el}/path", "error",
                    f"wrong mode: a back end already listens on {path}, QEMU cannot also be "
                    "the server",
                    "mode='client' plus <reconnect enabled='yes' timeout='1'/>")
        elif os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
            rep.add(f"{el}/path", "error", f"{path} exists and is not a socket",
                    "choose a free path for QEMU to create")
        elif not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            rep.add(f"{el}/path", "error",
                    f"directory {os.path.dirname(os.path.abspath(path))} does not exist",
                    "create it, or choose a path in an existing directory")
        else:
            rep.add(f"{el}/path", "ok",
                    f"QEMU creates it; run virtwire serve --port vhost-user,path={path},"
                    "server=off")


def _check_against_serve(path: str, iface: ET.Element, tag: str, rep: Report) -> None:
    """Compare with the running ``virtwire serve`` on ``path`` (its ``PATH.ctl`` counters)."""
    if not os.path.exists(path + ".ctl"):
        return
    from virtwire.serve import query_stats

    try:
        data = query_stats(path + ".ctl", timeout=2.0)
    except (UserFacingError, ValueError):
        return
    ports = [p for p in data.get("ports", []) if isinstance(p, dict)
             and os.path.abspath(str(p.get("vhost_user", {}).get("path", ""))) ==
             os.path.abspath(path)]
    if not ports:
        return
    vu = ports[0]["vhost_user"]
    pairs = len(vu.get("rings", [])) // 2
    drv = iface.find("driver")
    q = drv.get("queues", "1") if drv is not None else "1"
    if q.isdigit() and pairs and int(q) != pairs:
        rep.add(f"{tag}/driver", "error",
                f"queues={q} but virtwire serve on {path} serves {pairs} queue pair(s)",
                f"<driver queues='{pairs}'/> (or serve ...,queues={q})")
    if vu.get("connected"):
        rep.add(f"{tag}/source/path", "warn",
                f"virtwire serve on {path} already has a front end; it refuses a second one",
                "one guest per port: give this guest its own --port")


def _is_listening(path: str) -> bool:
    """Whether a process listens on the UNIX socket ``path``.

    Read from /proc/net/unix (flag __SO_ACCEPTCON) so a running ``virtwire serve`` never sees a
    probe connection; only a socket not listed there (another network namespace) is probed.
    """
    listed = _proc_listening_paths()
    if listed is not None and os.path.abspath(path) in listed:
        return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _proc_listening_paths() -> set[str] | None:
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    out = set()
    for line in lines:
        cols = line.split(None, 7)
        if len(cols) == 8 and int(cols[3], 16) & 0x10000 and cols[7].startswith("/"):
            out.add(os.path.abspath(cols[7]))
    return out


def _check_vectors(tag: str, alias: str, rep: Report, overrides: dict[str, str]) -> None:
    fix_ovr = ("<qemu:override><qemu:device alias='ALIAS'><qemu:frontend><qemu:property "
               "name='vectors' type='unsigned' value='0'/></qemu:frontend></qemu:device>"
               f"</qemu:override> (xmlns:qemu='{QEMU_NS}' on <domain>)")
    if not alias:
        rep.add(f"{tag}/alias", "error",
                "no <alias name='ua-...'>: under TCG the override setting vectors=0 needs one",
                "<alias name='ua-vw0'/> inside the <interface>")
        return
    if not valid_alias(alias):
        rep.add(f"{tag}/alias", "error",
                f"alias {alias!r}: libvirt keeps only user aliases starting 'ua-'",
                f"<alias name='ua-{re.sub(r'[^A-Za-z0-9_-]', '-', alias)}'/>")
        return
    rep.add(f"{tag}/alias", "ok", f"name='{alias}'")
    val = overrides.get(alias)
    if val == "0":
        rep.add(f"{tag}/qemu:override", "ok", "vectors=0 (no MSI-X under TCG)")
    elif val is None:
        rep.add(f"{tag}/qemu:override", "error",
                "TCG without vectors=0: QEMU 7.2 crashes using MSI-X with vhost-user",
                fix_ovr.replace("ALIAS", alias))
    else:
        rep.add(f"{tag}/qemu:override", "error", f"vectors={val!r}, must be 0 under TCG",
                fix_ovr.replace("ALIAS", alias))


# -- writing -------------------------------------------------------------------------------------
def interface_parts(cfg: PortConfig, alias: str) -> dict[str, ET.Element]:
    """The elements a domain needs for one port: memoryBacking, acpi, interface, override."""
    from virtwire.serve import libvirt_xml

    mb = ET.Element("memoryBacking")
    ET.SubElement(mb, "source", type="memfd")
    ET.SubElement(mb, "access", mode="shared")
    ovr = ET.Element(f"{QEMU_TAG}override")
    dev = ET.SubElement(ovr, f"{QEMU_TAG}device", alias=alias)
    fe = ET.SubElement(dev, f"{QEMU_TAG}frontend")
    ET.SubElement(fe, f"{QEMU_TAG}property", name="vectors", type="unsigned", value="0")
    return {"memoryBacking": mb, "acpi": ET.Element("acpi"),
            "interface": ET.fromstring(libvirt_xml(cfg, alias=alias)), "qemu:override": ovr}


def interface_snippet(cfg: PortConfig, alias: str = "ua-vw0", *, kvm: bool = False) -> str:
    """The pasteable parts for a person: each element with a comment saying where it goes.

    ``virtwire libvirt interface`` and ``virtwire serve`` print this; ``kvm`` leaves out the
    ``<qemu:override>`` (MSI-X works under KVM).
    """
    parts = interface_parts(cfg, alias)
    for key in ("memoryBacking", "acpi", "interface", "qemu:override"):
        ET.indent(parts[key])
    out = ["<!-- in <domain>: guest RAM shared with virtwire -->",
           ET.tostring(parts["memoryBacking"], encoding="unicode"),
           "<!-- in <features>: else the guest cannot power off -->",
           ET.tostring(parts["acpi"], encoding="unicode")]
    # (no "--" inside an XML comment: the snippet must stay pasteable XML)
    out.append(f"<!-- in <devices>: the NIC (for virtwire serve, port vhost-user,path={cfg.path},"
               f"server={'on' if cfg.server else 'off'}"
               + (f",queues={cfg.queues}" if cfg.queues > 1 else "") + ",...) -->")
    out.append(ET.tostring(parts["interface"], encoding="unicode"))
    if not kvm:
        out.append(f"<!-- TCG (<domain type='qemu' xmlns:qemu='{QEMU_NS}'>) only, in <domain>: "
                   "no MSI-X on this vhost-user device -->")
        xml = ET.tostring(parts["qemu:override"], encoding="unicode")
        # Standalone, ElementTree declares the namespace on the element; the domain declares it.
        out.append(re.sub(r' xmlns:qemu="[^"]*"', "", xml))
    return "\n".join(out)


def merge_parts(root: ET.Element, parts: dict[str, ET.Element]) -> ET.Element:
    """Put ``interface_parts`` into a ``<domain>`` in place (override only under TCG)."""
    old = root.find("memoryBacking")
    if old is not None:
        for child in list(old):
            if child.tag in ("source", "access"):
                old.remove(child)
        old.extend(list(parts["memoryBacking"]))
    else:
        root.insert(_after(root, ("memory", "currentMemory", "maxMemory", "name", "uuid")),
                    parts["memoryBacking"])
    feats = root.find("features")
    if feats is None:
        feats = ET.Element("features")
        root.insert(_after(root, ("os", "memoryBacking", "vcpu", "memory")), feats)
    if feats.find("acpi") is None:
        feats.insert(0, parts["acpi"])
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    devices.append(parts["interface"])
    if root.get("type") == "qemu":
        alias = parts["qemu:override"].find(f"{QEMU_TAG}device").get("alias")
        ovr = root.find(f"{QEMU_TAG}override")
        if ovr is None:
            root.append(parts["qemu:override"])
        else:
            for d in ovr.findall(f"{QEMU_TAG}device"):
                if d.get("alias") == alias:
                    ovr.remove(d)
            ovr.extend(list(parts["qemu:override"]))
    return root


def _after(root: ET.Element, tags: tuple[str, ...]) -> int:
    """Index just after the last child with one of ``tags`` (libvirt orders these loosely)."""
    idx = 0
    for i, child in enumerate(root):
        if child.tag in tags:
            idx = i + 1
    return idx
