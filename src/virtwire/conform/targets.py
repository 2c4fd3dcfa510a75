"""Devices the conformance suite can test, behind one small interface.

A ``Target`` hands out fresh drivers for one device (each ``driver()`` call resets the device
and runs the full bring-up again) and a way to exchange frames with the far side:

- ``QemuTarget``: QEMU's virtio-net-pci over qtest (``modern`` = disable-legacy=on, or the
  transitional device driven through its legacy I/O BAR), with a datagram peer; link changes
  through QMP; interrupts observable through the ISR. ``packed`` starts the device with
  ``packed=on`` (a second VM, since QEMU fixes the offer at start).
- ``VhostUserTarget``: any vhost-user back end, reached by our front end: DPDK's testpmd (``io``
  forwarding sends every frame back: a loopback peer), ``virtwire serve`` on a TAP in our netns
  (AF_PACKET peer), or an existing socket path (no peer: data checks are skipped).
"""

from __future__ import annotations

import contextlib
import subprocess
from typing import Any

from virtwire.conform.dpdk import Testpmd
from virtwire.conform.peers import TapPeer, VirtwireServe
from virtwire.drive.qtest import QemuNetHarness, QtestVM, QtestVMConfig
from virtwire.drive.vhost_user_frontend import VhostUserFrontend
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.pci.driver import probe_pci_transport

__all__ = ["Target", "QemuTarget", "VhostUserTarget"]

DST_MAC = bytes.fromhex("020000000002")  # where the suite's frames go (conform.suite.DST)


class Target:
    """Base: a device under test plus its peer (see module docstring)."""

    name = "?"
    description = ""
    kind = "pci"  # or "vhost-user"
    legacy = False
    loopback = False  # frames sent come back to us (testpmd io)
    has_peer = True
    can_set_link = False
    can_packed = True  # a packed-ring variant can be tested
    can_inject_gso = False  # the peer can send frames with a virtio-net header (TAP peers)

    def open(self) -> None: ...

    def close(self) -> None: ...

    def driver(self, cfg: NetDriverConfig | None = None, probe: bool = True) -> VirtioNetDriver:
        raise NotImplementedError

    def packed_variant(self) -> Target | None:
        """A target for packed-ring checks (self when the driver just asks for it)."""
        return self

    def peer_send(self, frame: bytes) -> None:
        raise NotImplementedError

    def peer_recv(self, timeout: float) -> bytes | None:
        raise NotImplementedError

    def peer_drain(self) -> None:
        while self.peer_recv(0.01) is not None:
            pass

    def peer_recv_meta(self, timeout: float) -> tuple[bytes, bool] | None:
        """(frame, kernel marked it CHECKSUM_PARTIAL) -- the flag only TAP peers can see."""
        f = self.peer_recv(timeout)
        return (f, False) if f is not None else None

    def peer_send_gso(self, vnet_hdr: bytes, frame: bytes) -> None:
        raise NotImplementedError

    def set_link(self, up: bool) -> None:
        raise NotImplementedError

    def backend_offered(self) -> int | None:
        """A vhost-user back end's raw feature word (None for PCI devices)."""
        return None

    def __enter__(self) -> Target:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QemuTarget(Target):
    kind = "pci"
    can_set_link = True
    TAP_QUEUES = 2

    def __init__(self, legacy: bool = False, packed: bool = False, tap: bool = False) -> None:
        self.legacy = legacy
        self.packed = packed
        self.tap = tap
        self.name = ("qemu-legacy" if legacy else "qemu") + ("-packed" if packed else "") + (
            "-tap" if tap else "")
        self.description = ("QEMU 7.2 virtio-net-pci " + ("transitional, legacy I/O BAR"
                            if legacy else "modern (disable-legacy=on)")
                            + (", packed=on" if packed else "")
                            + (", mq=on, -netdev tap (vnet_hdr, 2 queues) in our netns" if tap else
                               ", -netdev dgram") + ", qtest")
        self.can_packed = not legacy
        self.can_inject_gso = tap
        self.h: QemuNetHarness | None = None
        self.vm: Any = None
        self.peer: TapPeer | None = None
        self._stack = contextlib.ExitStack()
        self._packed: QemuTarget | None = None

    def open(self) -> None:
        props = "packed=on" if self.packed else ""
        try:
            if not self.tap:
                self.h = self._stack.enter_context(
                    QemuNetHarness(transitional=self.legacy, props=props, name="vwd"))
                self.vm = self.h.vm
                return
            from virtwire.netns import netns, unique_name

            ns = self._stack.enter_context(netns("vwd"))
            tap = unique_name("vwd")
            # a multi-queue TAP: the device offers MQ with 2 queue pairs (§5.1.6.5.5)
            subprocess.run(["ip", "-n", ns.name, "tuntap", "add", "dev", tap, "mode", "tap",
                            "multi_queue"], check=True, capture_output=True)
            ns.run(["ip", "link", "set", tap, "up"])
            ns.run(["sysctl", "-qw", f"net.ipv6.conf.{tap}.disable_ipv6=1"], check=False)
            ns.run(["ip", "link", "set", tap, "mtu", "65521"], check=False)
            dev = "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:12:34:56,mq=on"
            dev += "" if self.legacy else ",disable-legacy=on"
            dev += f",{props}" if props else ""
            netdev = (f"tap,id=n0,ifname={tap},script=no,downscript=no,vnet_hdr=on,"
                      f"queues={self.TAP_QUEUES}")
            self.vm = self._stack.enter_context(QtestVM(QtestVMConfig(
                devices=[dev], netdevs=[netdev], name="vwd", netns=ns.name)))
            self.peer = TapPeer(ns.name, tap, dst=DST_MAC)
            self._stack.callback(self.peer.close)
        except BaseException:
            self._stack.close()
            raise

    def close(self) -> None:
        if self._packed is not None:
            self._packed.close()
            self._packed = None
        self._stack.close()
        self.h = None
        self.vm = None

    def packed_variant(self) -> Target | None:
        if self.legacy:
            return None
        if self.packed:
            return self
        if self._packed is None:
            self._packed = QemuTarget(packed=True, tap=self.tap)
            self._packed.open()
        return self._packed

    MSIX_MAILBOX = 0x80000  # a page of guest RAM below the DMA window

    def driver(self, cfg: NetDriverConfig | None = None, probe: bool = True,
               msix: bool = False) -> VirtioNetDriver:
        t = probe_pci_transport(self.vm.qtest, legacy=self.legacy)
        if msix:
            self.vm.mem.write(self.MSIX_MAILBOX, bytes(4096))
            t.enable_msix(self.MSIX_MAILBOX)  # type: ignore[union-attr]
        elif not self.legacy:
            t.disable_msix()  # type: ignore[union-attr]
        alloc = DmaAllocator(0x100000, self.vm.ram_size - 0x100000)
        drv = VirtioNetDriver(t, self.vm.mem, alloc, cfg or NetDriverConfig())
        self.peer_drain()
        return drv.probe() if probe else drv

    def peer_send(self, frame: bytes) -> None:
        if self.peer is not None:
            self.peer.send(frame)
        else:
            assert self.h is not None
            self.h.send_to_device(frame)

    def peer_recv(self, timeout: float) -> bytes | None:
        got = self.peer_recv_meta(timeout)
        return got[0] if got is not None else None

    def peer_recv_meta(self, timeout: float) -> tuple[bytes, bool] | None:
        if self.peer is not None:
            return self.peer.recv(timeout)
        assert self.h is not None
        f = self.h.recv_from_device(timeout)
        return (f, False) if f is not None else None

    def peer_send_gso(self, vnet_hdr: bytes, frame: bytes) -> None:
        assert self.peer is not None
        self.peer.send_gso(vnet_hdr, frame)

    def set_link(self, up: bool) -> None:
        self.vm.qmp.execute("set_link", name="n0", up=up)

    def qtest(self) -> Any:
        return self.vm.qtest


class VhostUserTarget(Target):
    kind = "vhost-user"

    def __init__(self, which: str, path: str = "", listen: bool = False,
                 mtu: int = 1500) -> None:
        self.which = which
        self.path = path
        self.listen = listen  # the back end connects to us (its mode=client)
        self.mtu = mtu  # what the front end's own config space reports
        self.name = which if which != "path" else f"vhost-user:{path}"
        self.loopback = which == "dpdk"
        self.has_peer = which in ("dpdk", "virtwire")
        self.can_inject_gso = which == "virtwire"
        self.description = {
            "dpdk": "DPDK testpmd vhost PMD (net_vhost0, --forward-mode=io), our front end",
            "virtwire": "virtwire serve (vhost-user back end, TAP backend), our front end",
        }.get(which, f"vhost-user back end at {path}, our front end")
        self._stack = contextlib.ExitStack()
        self.fe: VhostUserFrontend | None = None
        self.serve: VirtwireServe | None = None

    def open(self) -> None:
        try:
            if self.which == "dpdk":
                tp = self._stack.enter_context(Testpmd("io", name="vwd"))
                self.path = tp.sock
            elif self.which == "virtwire":
                self.serve = self._stack.enter_context(VirtwireServe(name="vwd"))
                self.path = self.serve.sock_path
            self.fe = VhostUserFrontend(self.path, listen=self.listen, mtu=self.mtu,
                                        connect_timeout=30.0 if self.listen else 10.0)
            self._stack.callback(self._close_fe)
        except BaseException:
            self._stack.close()
            raise

    def _close_fe(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None

    def close(self) -> None:
        self._stack.close()

    def driver(self, cfg: NetDriverConfig | None = None, probe: bool = True) -> VirtioNetDriver:
        assert self.fe is not None
        fe = self.fe
        drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                              cfg or NetDriverConfig())
        if self.has_peer:
            self.peer_drain()
        return drv.probe() if probe else drv

    def backend_offered(self) -> int | None:
        return self.fe.backend_features if self.fe is not None else None

    def peer_send(self, frame: bytes) -> None:
        if self.serve is None:
            raise NotImplementedError
        self.serve.send_to_device(frame)

    def peer_recv(self, timeout: float) -> bytes | None:
        if self.serve is None:
            raise NotImplementedError
        return self.serve.recv_from_device(timeout)

    def peer_drain(self) -> None:
        if self.serve is not None:
            for _ in self.serve.frames():
                pass

    def peer_recv_meta(self, timeout: float) -> tuple[bytes, bool] | None:
        if self.serve is None or self.serve.tap_peer is None:
            return super().peer_recv_meta(timeout)
        return self.serve.tap_peer.recv(timeout)

    def peer_send_gso(self, vnet_hdr: bytes, frame: bytes) -> None:
        if self.serve is None or self.serve.tap_peer is None:
            raise NotImplementedError
        self.serve.tap_peer.send_gso(vnet_hdr, frame)
