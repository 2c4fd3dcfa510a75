"""A real trace with nothing to set up: virtwire's driver drives virtwire's device, in process.

``run_pci_session`` wires the driver half (``pci.driver`` enumeration, BAR assignment and
capability walk; ``virtio.driver`` §3.1.1 initialization; ring buffers) to the device half
(``pci.device.VirtioPciDevice`` over ``net.device.VirtioNet`` with an in-memory backend) through
``_Bus``, a host bridge in a few lines: configuration mechanism 1 at 0xCF8/0xCFC for one function
at slot 3, and BAR accesses by absolute address, decoded by the device as QEMU's PCI proxy would
forward them. The "guest" then sends an ARP request and a few ICMP echo requests; the backend
answers each. With tracing on, every step lands in the trace exactly as it does under QEMU, so
``virtwire explain --live`` shows the whole story on any machine in a fraction of a second.

Nothing here is synthetic: the events come from the device's own hook sites.
"""

from __future__ import annotations

from typing import Any

from virtwire.net import frame as fr

__all__ = ["run_pci_session", "GUEST_MAC", "PEER_MAC"]

SLOT = 3
GUEST_MAC, PEER_MAC = "52:54:00:12:34:56", "52:54:00:ab:cd:ef"
GUEST_IP, PEER_IP = "10.9.0.2", "10.9.0.1"


class _Bus:
    """``pci.driver.BusAccess`` in process (see module docstring)."""

    def __init__(self, dev: Any) -> None:
        self.dev, self.addr = dev, 0

    def _cfg(self) -> tuple[bool, int]:
        a = self.addr
        return bool(a & 0x80000000) and (a >> 8) & 0xFFFF == SLOT << 3, a & 0xFC

    def _in(self, port: int, w: int) -> int:
        if port == 0xCF8:
            return self.addr
        if 0xCFC <= port <= 0xCFF:
            ok, reg = self._cfg()
            return self.dev.config_read(reg + port - 0xCFC, w) if ok else (1 << 8 * w) - 1
        v = self.dev.bar_read(port, w, memory=False)
        return (1 << 8 * w) - 1 if v is None else v

    def _out(self, port: int, w: int, v: int) -> None:
        if port == 0xCF8:
            self.addr = v
        elif 0xCFC <= port <= 0xCFF:
            ok, reg = self._cfg()
            if ok:
                self.dev.config_write(reg + port - 0xCFC, w, v)
        else:
            self.dev.bar_write(port, w, v, memory=False)

    def _read(self, a: int, w: int) -> int:
        v = self.dev.bar_read(a, w, memory=True)
        return (1 << 8 * w) - 1 if v is None else v

    def inb(self, p: int) -> int:
        return self._in(p, 1)

    def inw(self, p: int) -> int:
        return self._in(p, 2)

    def inl(self, p: int) -> int:
        return self._in(p, 4)

    def outb(self, p: int, v: int) -> None:
        self._out(p, 1, v)

    def outw(self, p: int, v: int) -> None:
        self._out(p, 2, v)

    def outl(self, p: int, v: int) -> None:
        self._out(p, 4, v)

    def readb(self, a: int) -> int:
        return self._read(a, 1)

    def readw(self, a: int) -> int:
        return self._read(a, 2)

    def readl(self, a: int) -> int:
        return self._read(a, 4)

    def writeb(self, a: int, v: int) -> None:
        self.dev.bar_write(a, 1, v, memory=True)

    def writew(self, a: int, v: int) -> None:
        self.dev.bar_write(a, 2, v, memory=True)

    def writel(self, a: int, v: int) -> None:
        self.dev.bar_write(a, 4, v, memory=True)


class _Line:
    level = False

    def set_level(self, level: bool) -> None:
        self.level = level


def run_pci_session(pings: int = 3, wanted: int | None = None,
                    legacy: bool = False) -> dict[str, Any]:
    """Run the session (trace it by calling ``virtwire.trace.start`` first); returns what the
    driver saw: ``features`` negotiated, ``bar4`` address, ``sent`` frames, the ``device``.

    ``legacy``: a transitional device (0x1000) driven through its legacy I/O BAR (§4.1.4.8)."""
    from virtwire.backends.memory import MemoryBackend
    from virtwire.memory import BytearrayGuestMemory
    from virtwire.net.device import VirtioNet
    from virtwire.net.driver import TransportAdapter
    from virtwire.pci import driver as pdrv
    from virtwire.pci.device import VirtioPciDevice
    from virtwire.virtio import spec
    from virtwire.virtio.driver import GuestAllocator, VirtioDriver

    if wanted is None:
        wanted = spec.bit(spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS,
                          spec.VIRTIO_F_EVENT_IDX, spec.VIRTIO_F_INDIRECT_DESC)
        if not legacy:
            wanted |= spec.bit(spec.VIRTIO_F_VERSION_1)
    be = MemoryBackend()
    pci = VirtioPciDevice(VirtioNet(be, mac=GUEST_MAC, options="mrg_rxbuf=off"),
                          intx=_Line(), transitional=legacy)
    # enumeration, BAR sizing, capability walk
    t = pdrv.probe_pci_transport(_Bus(pci), legacy=legacy)
    mem = BytearrayGuestMemory(0x200000)
    pci.set_memory(mem)
    drv = VirtioDriver(TransportAdapter(t), mem, GuestAllocator(0x10000, 0x1F0000))
    feats = drv.initialize(wanted, 2)
    rxq, txq = drv.queues[0], drv.queues[1]
    for _ in range(8):
        b = drv.allocator.alloc(1538)
        rxq.add(mem, [], [(b, 1538)], ("rx", b))
    drv.kick(0)
    pci.flush()
    exchange = [(fr.arp(1, GUEST_MAC, GUEST_IP, "00:00:00:00:00:00", PEER_IP),
                 fr.arp(2, PEER_MAC, PEER_IP, GUEST_MAC, GUEST_IP))]
    exchange += [(fr.icmp_echo(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, 7, s),
                  fr.icmp_echo(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, 7, s, reply=True))
                 for s in range(1, pings + 1)]
    hl = 10 if legacy else 12  # legacy without MRG_RXBUF: no num_buffers (§5.1.6)
    for out, back in exchange:
        b = drv.allocator.alloc(hl + len(out))
        mem.write(b, bytes(hl) + out)
        txq.add(mem, [(b, hl + len(out))], [], ("tx", b))
        drv.kick(1)
        pci.flush()
        t.read_isr()  # the interrupt handler's ISR read lowers INTx
        be.inject(back)
        pci.device.backend_ready(0)
        t.read_isr()
        while (u := txq.get_used(mem)) is not None:
            drv.allocator.free(u[0][1])
        while (u := rxq.get_used(mem)) is not None:  # recycle RX buffers, as a driver does
            rxq.add(mem, [], [(u[0][1], 1538)], u[0])
        drv.kick(0)
        pci.flush()
    return {"features": feats, "bar4": t.fn.bars[4].address, "sent": list(be.sent),
            "device": pci}
