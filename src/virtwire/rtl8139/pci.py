"""The RTL8139 as a whole PCI function (``pci.function.PciFunction``) with its frame backend.

- ``Rtl8139Pci`` is what a host (QEMU's PCI proxy, ``hosts.pci_proxy``) drives: configuration
  space 10ec:8139, class 0x020000 (Ethernet), revision 0x10 (classic: Linux binds ``8139too``) or
  0x20 (C+: ``8139cp``); BAR0 the 256-byte register file in I/O space, BAR1 the same registers
  in memory space (what Debian's ``8139too``, built without ``8139TOO_PIO``, uses); INTx pin A.
  Every BAR access goes to the register model (``rtl8139.device.Rtl8139``) and is emitted to the
  ``--trace`` stream as ``pci.bar_read`` / ``pci.bar_write`` with the register's name.
- ``Rtl8139Nic`` joins the model to a ``NetBackend`` (TAP, null, memory, switch port) and offers
  the small hook surface the proxy server wires for virtio-net: ``backend_ready(pair)`` (the
  backend fd is readable), ``rx_watch(pair, on)`` (set by the host: stop/start watching the fd
  while the guest's ring is full or RX is disabled), ``more_work``, ``active``.

The RTL8139 has no virtio_net_hdr: towards a backend that carries one (the TAP opens with
IFF_VNET_HDR) a zeroed header is prepended on TX and stripped on RX; no offloads are enabled, so
the kernel hands the TAP complete frames.

TX is deferred like a virtio kick: the guest's TSD write is answered first, and the frame is sent
when the host calls ``flush`` (the proxy does after each reply; ``pending`` says there is work).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from virtwire import trace as _trace
from virtwire.pci.config_space import PCI_COMMAND, BarKind, PciConfigSpace
from virtwire.pci.function import IntxLine, NoIntxLine
from virtwire.rtl8139.device import MAX_RX_FRAME, Rtl8139
from virtwire.virtio.spec import VIRTIO_NET_F_HOST_TSO4

__all__ = ["Rtl8139Pci", "Rtl8139Nic", "REVISIONS", "RTL8139_VENDOR", "RTL8139_DEVICE"]

log = logging.getLogger(__name__)

RTL8139_VENDOR = 0x10EC
RTL8139_DEVICE = 0x8139
PCI_CLASS_ETHERNET = 0x020000
REVISIONS = (0x10, 0x20)
REG_SIZE = 256
IO_BAR = 0
MEM_BAR = 1
_PCI_COMMAND_INTX_DISABLE = 0x400
RX_BUDGET = 64


class Rtl8139Nic:
    """The model plus its backend: the ``device`` a host wires (see module docstring)."""

    def __init__(self, backend: Any, *, mac: bytes, revision: int = 0x10,
                 name: str = "rtl8139") -> None:
        if revision not in REVISIONS:
            raise ValueError(f"revision {revision:#x}: expected 0x10 (classic) or 0x20 (C+)")
        self.backend = backend
        self.name = name
        if revision >= 0x20:
            from virtwire.rtl8139.cplus import Rtl8139CPlus

            cp = Rtl8139CPlus(mac, revision=revision, name=name, send_frame=self._send)
            if getattr(backend, "vnet_hdr", False) and int(
                    getattr(backend, "host_offloads", 0)) >> VIRTIO_NET_F_HOST_TSO4 & 1:
                cp.offload_tx = self._send_offload
            self.model: Rtl8139 = cp
        else:
            self.model = Rtl8139(mac, revision=revision, name=name, send_frame=self._send)
        self.model.on_rx_space = self._on_rx_space
        self.mac = self.model.mac
        self.rx_watch: Callable[[int, bool], None] | None = None  # set by the host
        self.more_work: Callable[[int], None] | None = None  # set by the host (unused)
        hdr = int(getattr(backend, "hdr_len", 12)) if getattr(backend, "vnet_hdr", False) else 0
        self._hdr = bytes(hdr)
        self._rxbuf = bytearray(hdr + 65536)
        self._rxviews = [memoryview(self._rxbuf)[:hdr], memoryview(self._rxbuf)[hdr:]]
        if not hdr:
            self._rxviews = self._rxviews[1:]
        self.counters: dict[str, int] = {"backend_reads": 0, "rx_parked": 0}

    # -- TX ----------------------------------------------------------------------------------
    def _send_offload(self, frame: bytes, hdr: Any) -> bool:
        """A GSO / partial-checksum frame (C+ TSO) to a backend that takes a virtio_net_hdr."""
        h = hdr.pack(len(self._hdr))
        return self.backend.send([[memoryview(h), memoryview(frame)]]) == 1

    def _send(self, frame: bytes) -> bool:
        if self._hdr:
            return self.backend.send([[memoryview(self._hdr), memoryview(frame)]]) == 1
        return self.backend.send([[memoryview(frame)]]) == 1

    # -- RX ----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Can frames be delivered now (RX enabled, guest RAM known)?"""
        return self.model.rx_enabled and self.model.mem is not None

    def backend_ready(self, pair: int = 0) -> int:
        """Move up to ``RX_BUDGET`` frames from the backend into the guest's ring; returns how
        many were read. When the ring cannot take a full-size frame, reading stops and the host
        stops watching the backend until the guest frees space (CAPR write)."""
        m = self.model
        drain = getattr(self.backend, "drain_wakeup", None)
        if drain is not None:
            drain()
        got = 0
        hdr = len(self._hdr)
        while got < RX_BUDGET:
            if not self.active:
                self._park()
                break
            if not m.rx_room(MAX_RX_FRAME):
                m.rx_starved = True
                self._park()
                m.nudge_rx("full")
                break
            n = self.backend.recv(self._rxviews)
            if n <= 0:
                break
            got += 1
            self.counters["backend_reads"] += 1
            m.receive(memoryview(self._rxbuf)[hdr:n])
        return got

    def _park(self) -> None:
        self.counters["rx_parked"] += 1
        if self.rx_watch is not None:
            self.rx_watch(0, False)

    def _on_rx_space(self) -> None:
        if self.rx_watch is not None:
            self.rx_watch(0, True)

    def set_link(self, up: bool) -> None:
        self.model.set_link(up)

    def stats(self) -> dict[str, Any]:
        return {**self.model.stats(), "nic": dict(self.counters)}


class Rtl8139Pci:
    """The RTL8139 PCI function (see module docstring); implements ``PciFunction``."""

    def __init__(self, nic: Rtl8139Nic, *, intx: IntxLine | None = None,
                 defer_notify: bool = False) -> None:
        self.device = nic
        self.model = nic.model
        self.intx: IntxLine = intx or NoIntxLine()
        self.defer_notify = defer_notify
        self.pci = PciConfigSpace(vendor_id=RTL8139_VENDOR, device_id=RTL8139_DEVICE,
                                  class_code=PCI_CLASS_ETHERNET, revision_id=nic.model.revision,
                                  subsystem_vendor_id=RTL8139_VENDOR,
                                  subsystem_id=RTL8139_DEVICE, interrupt_pin=1)
        self.io_bar = self.pci.add_bar(IO_BAR, REG_SIZE, BarKind.IO)
        self.mem_bar = self.pci.add_bar(MEM_BAR, REG_SIZE, BarKind.MEM32)
        self.pci.on_write.append(self._config_written)
        self.level = False
        self.counters: dict[str, int] = {"raises": 0, "bar_reads": 0, "bar_writes": 0}
        self.model.on_irq = self._on_irq
        self.model.on_tx = self._tx_requested

    @property
    def intx_is_default(self) -> bool:
        return isinstance(self.intx, NoIntxLine)

    # -- configuration space -----------------------------------------------------------------
    def config_read(self, offset: int, width: int) -> int:
        v = self.pci.read(offset, width)
        if _trace.TRACE is not None:
            _trace.TRACE.emit("pci", "cfg_read", off=offset, size=width, val=v)
        return v

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.pci.write(offset, width, value)
        if _trace.TRACE is not None:
            _trace.TRACE.emit("pci", "cfg_write", off=offset, size=width, val=value)

    def _config_written(self, off: int, width: int, value: int) -> None:
        if off <= PCI_COMMAND + 1 and off + width > PCI_COMMAND:
            self._drive_line()

    # -- BARs --------------------------------------------------------------------------------
    def bar_read(self, addr: int, width: int, memory: bool) -> int | None:
        hit = self.pci.bar_at(addr, width, memory)
        if hit is None:
            return None
        bar, off = hit
        self.counters["bar_reads"] += 1
        v = self.model.read(off, width)
        if _trace.TRACE is not None:
            _trace.TRACE.emit("pci", "bar_read", bar=bar.index, off=off, size=width, val=v,
                              reg=self.model.reg_name(off))
        return v

    def bar_write(self, addr: int, width: int, value: int, memory: bool) -> bool:
        hit = self.pci.bar_at(addr, width, memory)
        if hit is None:
            return False
        bar, off = hit
        self.counters["bar_writes"] += 1
        if _trace.TRACE is not None:
            _trace.TRACE.emit("pci", "bar_write", bar=bar.index, off=off, size=width, val=value,
                              reg=self.model.reg_name(off))
        self.model.write(off, width, value)
        return True

    # -- TX deferral -------------------------------------------------------------------------
    def _tx_requested(self, i: int) -> None:
        if _trace.TRACE is not None:
            _trace.TRACE.emit("kick", "kick", q=1, desc=i, reg=f"TSD{i}")
        if not self.defer_notify:
            self.flush()

    @property
    def pending(self) -> bool:
        return self.model.tx_pending

    def flush(self) -> None:
        n = self.model.run_tx()
        if n and _trace.TRACE is not None:
            _trace.TRACE.emit("used", "tx", q=1, frames=n)

    # -- interrupts --------------------------------------------------------------------------
    def _on_irq(self, level: bool) -> None:
        self._drive_line()
        if level and _trace.TRACE is not None:
            _trace.TRACE.emit("irq", "irq", q=-1, kind="intx", level=1,
                              isr=self.model.isr, imr=self.model.imr)

    def _drive_line(self) -> None:
        asserted = self.model.level
        want = asserted and not self.pci.command & _PCI_COMMAND_INTX_DISABLE
        self.pci.set_interrupt_status(asserted)
        if want != self.level:
            self.level = want
            if want:
                self.counters["raises"] += 1
            self.intx.set_level(want)

    # -- host side ---------------------------------------------------------------------------
    def reset(self) -> None:
        """PCI function reset: the chip, the BARs, the Command register."""
        self.model.reset()
        for bar in self.pci.bars.values():
            self.pci.write(0x10 + 4 * bar.index, 4, 0)
        self.pci.write(PCI_COMMAND, 2, 0)
        self.pci.write(0x3C, 1, 0)
        self._drive_line()

    def set_memory(self, mem: Any) -> None:
        self.model.attach(mem)

    def release_memory_views(self) -> None:
        self.model.release_memory_views()

    def stats(self) -> dict[str, Any]:
        return {"transport": "rtl8139-pci", "revision": self.model.revision,
                "interrupt_line": self.pci.interrupt_line, "level": self.level,
                "bad_accesses": self.model.counters["unknown_accesses"], **self.counters}
