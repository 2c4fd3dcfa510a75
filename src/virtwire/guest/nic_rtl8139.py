"""The ``rtl8139`` NIC kind: virtwire's emulated RTL8139 behind QEMU's PCI proxy.

``--net rtl8139,backend=tap|null,ifname=T[,revision=0x10|0x20]``

The same path as ``--net pci`` (``guest.nic_pci.build_proxy_nic``: a socketpair to QEMU's
``x-pci-proxy-dev``, the sidecar thread, qtest-driven INTx under TCG), with
``rtl8139.pci.Rtl8139Pci`` as the PCI function instead of the virtio-net one. Revision 0x10 (the
default) is a classic RTL8139, which Linux drives with ``8139too``; 0x20 is a C+ chip
(``8139cp``), what QEMU's own ``-device rtl8139`` reports.
"""

from __future__ import annotations

from typing import Any

from virtwire.errors import CliError
from virtwire.guest.nics import NicContext, NicPlan, NicSpec, check_ifname, register_nic_kind

__all__ = ["build_rtl8139_nic", "parse_rtl8139_options", "RTL8139_KEYS"]

RTL8139_KEYS = frozenset({"backend", "ifname", "revision"})


def parse_rtl8139_options(spec: NicSpec, index: int = 0) -> dict[str, Any]:
    """Validate ``--net rtl8139,...`` (CliError on a bad value); returns the parsed options."""
    from virtwire.rtl8139.pci import REVISIONS

    opts = spec.options
    backend = opts.get("backend", "tap")
    if backend not in ("tap", "null"):
        raise CliError(f"--net rtl8139,backend={backend}: expected tap or null")
    ifname = check_ifname(opts.get("ifname", f"vwtap{index}"))
    text = opts.get("revision", "0x10")
    try:
        revision = int(text, 0)
    except ValueError:
        revision = -1
    if revision not in REVISIONS:
        raise CliError(f"--net rtl8139,revision={text}: expected "
                       + " or ".join(f"{r:#x}" for r in REVISIONS))
    return {"backend": backend, "ifname": ifname, "revision": revision}


def _check(spec: NicSpec) -> None:
    parse_rtl8139_options(spec, spec.index)


def build_rtl8139_nic(spec: NicSpec, ctx: NicContext) -> NicPlan:
    """The ``NicPlan`` for ``--net rtl8139,...`` (module docstring)."""
    from virtwire.guest.nic_pci import build_proxy_nic

    o = parse_rtl8139_options(spec, ctx.index)
    mac = bytes(int(x, 16) for x in ctx.mac.split(":"))

    def make(be: Any) -> Any:
        from virtwire.rtl8139.pci import Rtl8139Nic, Rtl8139Pci

        nic = Rtl8139Nic(be, mac=mac, revision=o["revision"], name=f"rtl8139-{ctx.id}")
        return Rtl8139Pci(nic)

    return build_proxy_nic(ctx, backend=o["backend"], ifname=o["ifname"], make_transport=make)


register_nic_kind("rtl8139", build_rtl8139_nic, keys=RTL8139_KEYS, check=_check,
                  help="virtwire's emulated RTL8139 via QEMU's PCI proxy "
                       "(backend=tap|null, ifname=, revision=0x10 classic / 0x20 C+)")
