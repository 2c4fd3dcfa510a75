"""The ``pci`` NIC kind: the whole virtio-net PCI device in virtwire, behind QEMU's PCI proxy.

``--net pci,backend=tap,ifname=T[,transitional=on][,queue_size=N][,<virtio-net switch>=on|off]``

Wiring (this module is the builder for one such NIC; see ``guest.nics`` for the registry):

- a ``socketpair``: QEMU inherits one end and gets ``-device x-pci-proxy-dev,fd=N``; the other end
  is served by ``hosts.pci_proxy.PciProxyServer`` in a sidecar thread running the event loop;
- the device is ``net.device.VirtioNet`` behind ``pci.device.VirtioPciDevice`` (modern 0x1041, or
  transitional 0x1000 with the legacy I/O BAR), its frame backend a TAP (opened inside the VM's
  network namespace when the VM has one, so ``netns_with_tap`` works as for ``qemu-tap``) or
  ``null``;
- under TCG, interrupts go through QEMU's qtest server beside the guest (``needs_qtest``): once
  QEMU is up, ``hosts.qtest_irq.QtestIntx`` drives the IOAPIC input named by the Interrupt Line
  the firmware programmed. Under KVM the proxy's own irqfd (SET_IRQFD) is used.

The sidecar starts before QEMU (QEMU's proxy talks to it while it realizes the device) and stops
after QEMU has exited; both ends and the TAP are closed then.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from virtwire.errors import CliError, UserFacingError
from virtwire.guest.nics import NicContext, NicPlan, NicSpec, check_ifname, register_nic_kind
from virtwire.keyvals import parse_on_off
from virtwire.net.options import SWITCHES
from virtwire.netns import run_in_netns

__all__ = ["build_pci_nic", "build_proxy_nic", "check_pci_nic", "parse_pci_options",
           "PCI_NIC_KEYS"]

log = logging.getLogger(__name__)

PCI_NIC_KEYS = frozenset({"backend", "ifname", "transitional", "queue_size", *SWITCHES})


def parse_pci_options(spec: NicSpec, index: int = 0) -> dict[str, Any]:
    """Validate ``--net pci,...`` options (CliError on a bad value); returns them parsed."""
    opts = dict(spec.options)
    opts.pop("ip", None)
    opts.pop("mac", None)
    backend = opts.pop("backend", "tap")
    if backend not in ("tap", "null"):
        raise CliError(f"--net pci,backend={backend}: expected tap or null")
    ifname = check_ifname(opts.pop("ifname", f"vwtap{index}"))
    transitional = parse_on_off("--net pci,", "transitional", opts.pop("transitional", "off"))
    queue_size = opts.pop("queue_size", "256")
    if not queue_size.isdigit() or not 1 <= int(queue_size) <= 32768:
        raise CliError(f"--net pci,queue_size={queue_size}: expected 1..32768")
    switches = {k: ("on" if parse_on_off("--net pci,", k, v) else "off") for k, v in opts.items()}
    return {"backend": backend, "ifname": ifname, "transitional": transitional,
            "queue_size": int(queue_size), "switches": switches}


def check_pci_nic(spec: NicSpec) -> None:
    parse_pci_options(spec, spec.index)


def build_pci_nic(spec: NicSpec, ctx: NicContext) -> NicPlan:
    """The ``NicPlan`` for ``--net pci,...`` (module docstring)."""
    o = parse_pci_options(spec, ctx.index)
    transitional, queue_size, switches = o["transitional"], o["queue_size"], o["switches"]

    def make(be: Any) -> Any:
        from virtwire.net.device import VirtioNet
        from virtwire.pci.device import VirtioPciDevice

        net = VirtioNet(be, mac=ctx.mac, queue_size=queue_size,
                        options=switches or None, name=f"pci-{ctx.id}")
        return VirtioPciDevice(net, transitional=transitional)

    return build_proxy_nic(ctx, backend=o["backend"], ifname=o["ifname"], make_transport=make)


def build_proxy_nic(ctx: NicContext, *, backend: str, ifname: str,
                    make_transport: Callable[[Any], Any]) -> NicPlan:
    """A ``NicPlan`` serving any ``PciFunction`` through QEMU's PCI proxy: ``make_transport(be)``
    builds the function (with a ``device`` attribute the proxy server wires) over backend ``be``
    (a TAP opened in the VM's netns, or null). Shared by the ``pci`` and ``rtl8139`` kinds."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    os.set_inheritable(theirs.fileno(), True)
    state: dict[str, Any] = {}

    def start() -> None:
        from virtwire.hosts.pci_proxy import PciProxyServer

        if backend == "tap":
            from virtwire.backends.tap import TapBackend

            be: Any = run_in_netns(ctx.netns, lambda: TapBackend(ifname), UserFacingError)
        else:
            from virtwire.backends.null import NullBackend

            be = NullBackend(f"null:{ctx.id}")
        try:
            pci = make_transport(be)
            server = PciProxyServer(ours, pci, [be])
        except BaseException:
            be.close()
            raise
        server.start_thread(f"virtwire-pci-{ctx.id}")
        state.update(server=server, pci=pci, device=pci.device)

    def after_launch(vm: Any) -> None:
        theirs.close()  # QEMU holds its copy: our proxy end sees EOF when QEMU exits
        if ctx.accel == "tcg":
            from virtwire.hosts.qtest_irq import QtestIntx

            pci = state["pci"]
            pci.intx = QtestIntx.connect(ctx.qtest_path, lambda: pci.pci.interrupt_line)
        vm.pci_proxy = state.get("server")  # for tests and stats: the sidecar of this NIC

    def stop() -> None:
        server = state.get("server")
        if server is not None:
            server.stop()
            server.close()
        for s in (ours, theirs):
            try:
                s.close()
            except OSError:
                pass

    return NicPlan(
        qemu_args=["-device", f"x-pci-proxy-dev,id={ctx.id},fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()],
        start=start,
        stop=stop,
        needs_qtest=ctx.accel == "tcg",
        after_launch=after_launch,
    )


register_nic_kind("pci", build_pci_nic, check=check_pci_nic, keys=PCI_NIC_KEYS,
                  help="virtwire's whole virtio-net PCI device via QEMU's PCI proxy "
                       "(backend=tap|null, ifname=, transitional=on)")
