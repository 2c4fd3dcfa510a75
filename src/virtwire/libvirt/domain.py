"""A libvirt domain XML that boots virtwire's default guest image (direct kernel boot, no disk).

``virtwire libvirt domain NAME`` prints (or defines) it, so ``virtwire libvirt attach`` has a
domain to work on without bringing one's own VM; the tests boot it under their own libvirtd. It
is the same guest ``virtwire vm`` starts: the image's kernel and initramfs, ``console=ttyS0``,
the ``vw.*`` arguments the image's ``/init`` reads (see ``virtwire/guest/init.sh``), no NIC yet.

The serial console is a pty (``virsh console NAME``) or, with ``console_socket``, a UNIX socket
QEMU connects to (``<source mode='connect'>``), which a program listening there reads and types
into, as ``GuestVM`` does with its own QEMU. ``<on_poweroff>destroy`` and ``panic=-1``: a guest
that powers off or panics stops instead of rebooting.
"""

from __future__ import annotations

import re
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path

from virtwire.errors import CliError

__all__ = ["guest_domain", "DOMAIN_NAME_RE"]

#: Names we accept for a domain (libvirt allows more; these never need quoting anywhere).
DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")


def guest_domain(name: str, kernel: str | Path, initrd: str | Path, *, memory_mib: int = 256,
                 vcpus: int = 1, kvm: bool = False, ip: str | None = None,
                 cmdline_extra: str = "", console_socket: str | Path | None = None,
                 emulator: str | None = None, uuid: str | None = None) -> ET.Element:
    """The ``<domain>`` element; ``kvm`` picks ``type='kvm'`` instead of TCG's ``'qemu'``."""
    if not DOMAIN_NAME_RE.match(name):
        raise CliError(f"bad domain name {name!r} (letters, digits, '_', '.', '-'; max 64)")
    if not 64 <= memory_mib <= 1 << 20:
        raise CliError(f"bad guest memory {memory_mib} MiB (expected 64 MiB..1 TiB)")
    if not 1 <= vcpus <= 64:
        raise CliError(f"bad CPU count {vcpus} (expected 1..64)")
    for what, p in (("kernel", kernel), ("initrd", initrd), ("console socket", console_socket),
                    ("emulator", emulator)):
        if p is not None and not _PATH_RE.match(str(p)):
            raise CliError(f"bad {what} path {str(p)!r} (absolute, no spaces or quotes)")
    args = ["console=ttyS0", "panic=-1", "quiet"]
    if ip:
        if not re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}", ip):
            raise CliError(f"bad guest address {ip!r} (expected A.B.C.D/LEN)")
        args.append(f"vw.ip={ip}")
    if cmdline_extra:
        if any(c in cmdline_extra for c in "<>&'\"\n"):
            raise CliError(f"bad kernel arguments {cmdline_extra!r}")
        args.append(cmdline_extra)

    dom = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid or str(uuid_mod.uuid4())
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(initrd)
    ET.SubElement(os_el, "cmdline").text = " ".join(args)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    dev = ET.SubElement(dom, "devices")
    if emulator:
        ET.SubElement(dev, "emulator").text = emulator
    if console_socket is not None:
        serial = ET.SubElement(dev, "serial", type="unix")
        ET.SubElement(serial, "source", mode="connect", path=str(console_socket))
        ET.SubElement(serial, "target", port="0")
    else:
        serial = ET.SubElement(dev, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        con = ET.SubElement(dev, "console", type="pty")
        ET.SubElement(con, "target", type="serial", port="0")
    ET.SubElement(dev, "memballoon", model="none")
    return dom
