"""The small devices of ``virtwire kvm``: PCI host bridge (config mechanism #1), 16550 UART, and
the guest's exit port.

Theory of operation
-------------------
Each device is a handful of port handlers ``handler(port, size, value) -> int`` (``value`` None
for a read) registered in ``Vm.ports``; the run loop calls them straight from a ``KVM_EXIT_IO``.

``PciHost`` is configuration mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): a dword write to 0xCF8
latches enable bit 31, bus, device, function and register; accesses to 0xCFC-0xCFF of any width
then reach that function's configuration space at ``register + (port - 0xCFC)``. Bus 0 holds a
host bridge at 00:00.0 and the functions added with ``add`` (each a ``pci.function.PciFunction``);
absent functions read all ones. BAR accesses are found by asking each function (``bar_read`` /
``bar_write`` decode absolute addresses against the BARs the guest programmed).

The guest owns the BARs: a hostile guest may place one over RAM (KVM then serves the accesses
from RAM; the device never sees them) or over a fixed port. ``PciHost`` notices such placements
when the BAR is written and records a warning for the final diagnosis.

``Uart16550`` is the console: THR writes go to a byte sink (stdout), LSR always says "transmitter
empty", the rest reads as written (scratch, IER, LCR, MCR) so probing drivers are satisfied.
``ExitPort``: a dword write ``0x5657SSSS`` to 0x501 ends the run with guest status ``SS``; other
writes are counted as garbage.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["PciHost", "Uart16550", "ExitPort", "HostBridge", "BAR_WARNINGS_MAX"]

log = logging.getLogger(__name__)

BAR_WARNINGS_MAX = 16
_NULL_LOCK = threading.Lock()


class HostBridge:
    """A read-only type-0 header: vendor 0x8086, device 0x29C0, class 06/00/00 (host bridge)."""

    def __init__(self) -> None:
        cfg = bytearray(256)
        struct.pack_into("<HHHH", cfg, 0, 0x8086, 0x29C0, 0x0006, 0x0000)
        cfg[0x0B], cfg[0x0A], cfg[0x09] = 0x06, 0x00, 0x00
        self.cfg = bytes(cfg)

    def config_read(self, offset: int, width: int) -> int:
        return int.from_bytes(self.cfg[offset:offset + width], "little")

    def config_write(self, offset: int, width: int, value: int) -> None:
        pass

    def bar_read(self, addr: int, width: int, memory: bool) -> int | None:
        return None

    def bar_write(self, addr: int, width: int, value: int, memory: bool) -> bool:
        return False


class PciHost:
    """Bus 0 behind 0xCF8/0xCFC (module docstring). ``lock`` guards every function access (the
    device is shared with the event-loop thread)."""

    def __init__(self, ram_end: int, fixed_ports: Callable[[int], bool],
                 lock: Any = None) -> None:
        self.address = 0
        self.slots: dict[int, Any] = {0: HostBridge()}
        self.ram_end = ram_end
        self.fixed_ports = fixed_ports
        self.lock = lock or _NULL_LOCK
        self.warnings: list[str] = []
        self.config_accesses = 0
        self.after_write: list[Callable[[], None]] = []

    def add(self, slot: int, function: Any) -> None:
        if not 0 < slot < 32 or slot in self.slots:
            raise ValueError(f"PCI slot {slot} is taken or out of range")
        self.slots[slot] = function

    def ports(self) -> dict[int, Callable[[int, int, int | None], int]]:
        table: dict[int, Callable[[int, int, int | None], int]] = {}
        for p in range(0xCF8, 0xCFC):
            table[p] = self._addr_port
        for p in range(0xCFC, 0xD00):
            table[p] = self._data_port
        return table

    def _addr_port(self, port: int, size: int, value: int | None) -> int:
        if port != 0xCF8 or size != 4:
            return 0xFFFFFFFF if value is None else 0  # only dword CF8 is the address
        if value is None:
            return self.address
        self.address = value & 0x80FFFFFC
        return 0

    def target(self) -> tuple[Any, int] | None:
        """(function, register) the latched address selects, or None."""
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF or (a >> 8) & 7:
            return None
        fn = self.slots.get((a >> 11) & 0x1F)
        return (fn, a & 0xFC) if fn is not None else None

    def _data_port(self, port: int, size: int, value: int | None) -> int:
        self.config_accesses += 1
        hit = self.target()
        off = port - 0xCFC
        if hit is None or off + size > 4:
            return (1 << (8 * size)) - 1 if value is None else 0
        fn, reg = hit
        with self.lock:
            if value is None:
                return fn.config_read(reg + off, size)
            fn.config_write(reg + off, size, value)
        if value is not None and (0x10 <= reg < 0x28 or reg == 0x04):
            self._check_bars(fn)
        for cb in self.after_write:
            cb()
        return 0

    def _check_bars(self, fn: Any) -> None:
        """Note BARs a guest placed where the device cannot see them (module docstring)."""
        pci = getattr(fn, "pci", None)
        command = getattr(pci, "command", 0)
        for bar in getattr(pci, "bars", {}).values():
            io = getattr(getattr(bar, "kind", None), "value", "") == "io"
            if len(self.warnings) >= BAR_WARNINGS_MAX or not command & (1 if io else 2):
                continue
            base, what = bar.base, None
            if not io and base < self.ram_end:
                what = (f"BAR{bar.index} placed at {base:#x} over guest RAM "
                        "(the device cannot see accesses there)")
            elif io and any(self.fixed_ports(p) for p in range(base, base + bar.size)):
                what = f"BAR{bar.index} placed at port {base:#x} over another device's ports"
            if what and what not in self.warnings:
                self.warnings.append(what)
                log.warning("kvm: guest %s", what)

    # -- BARs (any function) --------------------------------------------------------------------
    def mmio(self, addr: int, size: int, value: int | None) -> int | None:
        with self.lock:
            for fn in self.slots.values():
                if value is None:
                    r = fn.bar_read(addr, size, True)
                    if r is not None:
                        return r
                elif fn.bar_write(addr, size, value, True):
                    return 0
        return None

    def io(self, port: int, size: int, value: int | None) -> int | None:
        with self.lock:
            for fn in self.slots.values():
                if value is None:
                    r = fn.bar_read(port, size, False)
                    if r is not None:
                        return r
                elif fn.bar_write(port, size, value, False):
                    return 0
        return None


class Uart16550:
    """COM1 at 0x3F8 (module docstring); ``sink`` gets each transmitted byte."""

    LSR_THRE_TEMT = 0x60

    def __init__(self, sink: Callable[[bytes], None], base: int = 0x3F8) -> None:
        self.base = base
        self.sink = sink
        self.regs = bytearray(8)
        self.bytes_out = 0

    def ports(self) -> dict[int, Callable[[int, int, int | None], int]]:
        return {self.base + i: self.access for i in range(8)}

    def access(self, port: int, size: int, value: int | None) -> int:
        off = port - self.base
        dlab = self.regs[3] & 0x80
        if value is None:
            if off == 5:
                return self.LSR_THRE_TEMT
            if off == 6:
                return 0xB0  # MSR: CTS, DSR, DCD
            if off == 2:
                return 0x01  # IIR: no interrupt pending
            return 0 if off == 0 and not dlab else self.regs[off]
        if off == 0 and not dlab:
            self.bytes_out += 1
            self.sink(bytes((value & 0xFF,)))
        else:
            self.regs[off] = value & 0xFF
        return 0


class ExitPort:
    """Port 0x501: the guest's exit status (module docstring)."""

    def __init__(self, on_exit: Callable[[int], None], tag: int = 0x5657) -> None:
        self.on_exit = on_exit
        self.tag = tag
        self.garbage = 0

    def access(self, port: int, size: int, value: int | None) -> int:
        if value is None:
            return 0
        if size == 4 and value >> 16 == self.tag:
            self.on_exit(value & 0xFF)
        else:
            self.garbage += 1
        return 0
