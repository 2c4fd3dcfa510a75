"""virtwire's whole PCI device as a device-suite target: QEMU's ``x-pci-proxy-dev`` forwards
config space and BAR accesses to ``hosts.pci_proxy.PciProxyServer`` (a thread of this process)
serving ``pci.device.VirtioPciDevice`` around ``net.device.VirtioNet``; our driver runs over
qtest exactly as for QEMU's own device (``targets.QemuTarget``). ``transitional`` exposes the
0x1000 device and drives its legacy I/O BAR. The peer is an in-process memory backend
(``targets_local.MtuPeer``), so frames and their virtio-net headers are seen directly.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

from virtwire.conform.targets import QemuTarget
from virtwire.conform.targets_local import MtuPeer
from virtwire.drive.qtest import QtestVM, QtestVMConfig
from virtwire.net.header import VirtioNetHdr
from virtwire.virtio import spec

__all__ = ["PciProxyTarget"]


class PciProxyTarget(QemuTarget):
    """``virtwire-pci`` / ``virtwire-pci-legacy`` (module docstring)."""

    def __init__(self, legacy: bool = False, options: str = "") -> None:
        super().__init__(legacy=legacy)
        self.options = options
        self.name = "virtwire-pci" + ("-legacy" if legacy else "")
        self.description = ("virtwire's PCI device (" + ("transitional, legacy I/O BAR" if legacy
                            else "modern") + ") behind QEMU's x-pci-proxy-dev, qtest, "
                            "memory peer")
        self.can_set_link = True
        self.net: Any = None
        self.can_packed = not legacy
        self.can_inject_gso = False
        self.peer_be: MtuPeer | None = None
        self.server: Any = None

    def open(self) -> None:
        from virtwire.hosts.pci_proxy import PciProxyServer
        from virtwire.net.device import VirtioNet
        from virtwire.pci.device import VirtioPciDevice

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._stack.callback(ours.close)
        try:
            os.set_inheritable(theirs.fileno(), True)
            net = VirtioNet(None, options=self.options or None)
            self.peer_be = MtuPeer(net.mtu, enforce=True)
            net = VirtioNet(self.peer_be, options=self.options or None, mac="52:54:00:12:34:56",
                            name="conform-pci")
            self.net = net
            pci = VirtioPciDevice(net, transitional=self.legacy)
            self.server = PciProxyServer(ours, pci, [self.peer_be])
            self.server.start_thread("virtwire-conform-pci")
            self._stack.callback(self._stop_server)
            self.vm = self._stack.enter_context(QtestVM(QtestVMConfig(
                devices=[f"x-pci-proxy-dev,id=vwp0,fd={theirs.fileno()}"], name="vwd",
                pass_fds=[theirs.fileno()])))
        except BaseException:
            theirs.close()
            self._stack.close()
            raise
        theirs.close()  # QEMU holds its copy

    def _stop_server(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
                self.server.close()
            self.server = None

    def packed_variant(self) -> PciProxyTarget | None:
        return None if self.legacy else self

    def peer_send(self, frame: bytes) -> None:
        assert self.peer_be is not None
        self.peer_be.inject(frame)

    def peer_recv_meta(self, timeout: float) -> tuple[bytes, bool] | None:
        import time

        assert self.peer_be is not None
        deadline = time.monotonic() + timeout
        while not self.peer_be.sent:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.0005)
        raw = self.peer_be.sent.pop(0)
        hl = self.peer_be.hdr_len
        h = VirtioNetHdr.unpack(raw, hl)
        return raw[hl:], bool(h.flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM)

    def peer_drain(self) -> None:
        if self.peer_be is not None:
            self.peer_be.sent.clear()

    def set_link(self, up: bool) -> None:
        """Flip the link as ``virtwire ctl`` would (config change: status, generation, ISR)."""
        self.net.set_link(up)
