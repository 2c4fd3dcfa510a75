"""An in-process target: virtwire's own device model (``net.device.VirtioNet``) with a memory
peer, no QEMU, no sockets.

``LocalTarget`` runs the device suite in a second or two, and it is the device the driver
suite's unit tests observe. The peer is a ``MemoryBackend`` with a virtio-net header, so a
frame's ``gso_type`` is visible: with ``enforce_mtu`` (the default, and what a strict device
may do: virtio 1.2 §5.1.4.1) it drops any non-GSO transmit frame larger than mtu plus the
Ethernet header once VIRTIO_NET_F_MTU is negotiated, which is how the suite's own frames are
held to the MTU rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtwire.backends.base import Frame
from virtwire.backends.memory import MemoryBackend
from virtwire.conform.targets import Target
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.net.header import VirtioNetHdr
from virtwire.virtio import spec
from virtwire.virtio.pair import LocalNetTransport, RecordingInterrupt

__all__ = ["LocalTarget", "MtuPeer", "ETH_HLEN"]

ETH_HLEN = 14


class MtuPeer(MemoryBackend):
    """A memory peer that drops (and counts) non-GSO frames above mtu + 14 when MTU was
    negotiated: §5.1.4.1 lets a device do exactly that."""

    def __init__(self, mtu: int | None, enforce: bool = True) -> None:
        super().__init__("conform-peer", vnet_hdr=True, offloads=True)
        self.mtu = mtu
        self.enforce = enforce
        self.oversized: list[int] = []  # lengths of non-GSO frames above the limit

    def send(self, frames: Sequence[Frame]) -> int:
        n = 0
        for f in frames:
            data = b"".join(bytes(v) for v in f)
            if self._oversized(data):
                self.oversized.append(len(data) - self.hdr_len)
                if self.enforce:
                    self.counters["drops"] += 1
                    n += 1
                    continue
            n += super().send([f])
        return n

    def _oversized(self, data: bytes) -> bool:
        if self.mtu is None or not self.features >> spec.VIRTIO_NET_F_MTU & 1:
            return False
        h = VirtioNetHdr.unpack(data, self.hdr_len)
        gso = h.gso_type & ~spec.VIRTIO_NET_HDR_GSO_ECN
        return gso == spec.VIRTIO_NET_HDR_GSO_NONE and len(data) - self.hdr_len > (
            self.mtu + ETH_HLEN)


class _IsrTransport(LocalNetTransport):
    """``LocalNetTransport`` whose ISR shows the queue interrupts the device raised since the
    last read (what a PCI ISR read does), so notification checks can observe them."""

    def __init__(self, dev: VirtioNet, irq: RecordingInterrupt) -> None:
        super().__init__(dev)
        self.irq = irq
        self.seen = len(irq.events)

    def read_isr(self) -> int:
        new = self.irq.events[self.seen:]
        self.seen = len(self.irq.events)
        return (spec.VIRTIO_PCI_ISR_QUEUE if any(k == "queue" for k, _ in new) else 0) | (
            spec.VIRTIO_PCI_ISR_CONFIG if any(k == "config" for k, _ in new) else 0)

    def queue_enabled(self, index: int) -> bool:
        return bool(self.dev.queue_config[index].ready) if index < self.dev.num_queues else False


class LocalTarget(Target):
    """``local[:OPTIONS]``: ``VirtioNet(options)`` driven in process (see module docstring)."""

    kind = "pci"
    legacy = False
    loopback = False
    has_peer = True
    can_set_link = False
    can_packed = True
    can_inject_gso = False

    def __init__(self, options: str = "mtu=1500", enforce_mtu: bool = True,
                 mem_size: int = 64 << 20) -> None:
        self.options = options
        self.name = "local" + (f":{options}" if options else "")
        self.description = (f"virtwire's device model in process ({options or 'defaults'}), "
                            "memory peer" + (", non-GSO frames above the MTU dropped"
                                             if enforce_mtu else ""))
        self.enforce_mtu = enforce_mtu
        VirtioNet(None, options=options)  # ValueError for bad options, before anything runs
        self.mem_size = mem_size
        self.dev: VirtioNet | None = None
        self.peer: MtuPeer | None = None
        self.mem = BytearrayGuestMemory(mem_size)
        self.irq = RecordingInterrupt()

    def open(self) -> None:
        self.peer = MtuPeer(VirtioNet(None, options=self.options).mtu, self.enforce_mtu)
        dev = VirtioNet(self.peer, options=self.options, mac="02:00:00:00:00:02")
        dev.attach(self.mem, self.irq)
        self.peer.on_readable = lambda: dev.backend_ready(0)
        self.dev = dev

    def close(self) -> None:
        self.dev = None

    def driver(self, cfg: NetDriverConfig | None = None, probe: bool = True) -> VirtioNetDriver:
        assert self.dev is not None and self.peer is not None
        self.peer.sent.clear()
        self.peer.rx.clear()
        drv = VirtioNetDriver(_IsrTransport(self.dev, self.irq), self.mem,
                              DmaAllocator(0x10000, self.mem_size - 0x10000),
                              cfg or NetDriverConfig())
        return drv.probe() if probe else drv

    def packed_variant(self) -> LocalTarget:
        return self

    def backend_offered(self) -> int | None:
        return None

    def peer_send(self, frame: bytes) -> None:
        assert self.peer is not None
        self.peer.inject(frame)

    def peer_recv(self, timeout: float) -> bytes | None:
        assert self.peer is not None
        if not self.peer.sent:
            return None
        return self.peer.sent.pop(0)[self.peer.hdr_len :]

    def peer_recv_meta(self, timeout: float) -> tuple[bytes, bool] | None:
        assert self.peer is not None
        if not self.peer.sent:
            return None
        raw = self.peer.sent.pop(0)
        h = VirtioNetHdr.unpack(raw, self.peer.hdr_len)
        return raw[self.peer.hdr_len :], bool(h.flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM)

    def peer_drain(self) -> None:
        if self.peer is not None:
            self.peer.sent.clear()
