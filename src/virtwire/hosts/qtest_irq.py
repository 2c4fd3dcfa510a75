"""INTx for the PCI proxy under TCG: drive the IOAPIC input through a qtest server beside the guest.

Theory of operation
-------------------
QEMU's ``x-pci-proxy-dev`` delivers the remote's INTx through a KVM irqfd (SET_IRQFD), which does
nothing under TCG. QEMU's qtest command server can run beside a normal guest (``-chardev socket,
id=qt0,path=P,server=on,wait=off -object qtest,id=qt,chardev=qt0,log=/dev/null``) without changing
its behaviour, and ``set_irq_in /machine/i440fx/ioapic unnamed-gpio-in GSI LEVEL`` sets an IOAPIC
input directly. On i440fx the ISA IRQs the firmware routes PCI INTx to (5, 9, 10, 11) are IOAPIC
inputs of the same number, so the GSI is the Interrupt Line the firmware (or the guest) wrote to
configuration offset 0x3C; it is read at every level change, so a re-routing is followed.

``set_irq_in`` bypasses the chipset's wired-OR of devices sharing a line: the device needs a line
of its own (``-nodefaults`` and no other PCI device on that PIRQ).

Level semantics: ``set_level(True)`` when the ISR becomes non-zero, ``set_level(False)`` when the
guest reads it, *before* the BAR read is answered. Each call is one synchronous qtest round trip
(the reply is awaited), so when the guest's vCPU resumes the IOAPIC already holds the new level and
an EOI cannot re-deliver a stale interrupt. The proxy's vCPU thread waits for our RET with QEMU's
main lock released, so the main loop is free to serve the qtest command meanwhile.

A qtest failure (QEMU gone) is logged once and the line goes quiet; it never raises into the
device's event loop.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from virtwire.drive.qtest import QtestClient, QtestError

__all__ = ["QtestIntx", "IOAPIC_PATH", "connect_qtest"]

log = logging.getLogger(__name__)

IOAPIC_PATH = "/machine/i440fx/ioapic"
IOAPIC_PINS = 24


def connect_qtest(path: str | Path, timeout: float = 10.0) -> QtestClient:
    """Connect to QEMU's qtest chardev (server=on,wait=off), retrying until it exists."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return QtestClient(s, timeout=5.0)
        except OSError as e:
            s.close()
            if time.monotonic() > deadline:
                raise QtestError(f"qtest: cannot connect to {path}: {e}") from None
            time.sleep(0.05)


class QtestIntx:
    """An ``IntxLine`` (pci.device) that sets an IOAPIC input over qtest (module docstring)."""

    def __init__(self, client: QtestClient, gsi: Callable[[], int],
                 path: str = IOAPIC_PATH) -> None:
        self.client = client
        self.gsi = gsi
        self.path = path
        self.level = False
        self.raised_gsi: int | None = None
        self.dead = False
        self.round_trips = 0
        self.seconds = 0.0  # time spent in qtest round trips (for the per-access figures)

    def _set(self, gsi: int, level: bool) -> None:
        t0 = time.perf_counter()
        self.client.set_irq_in(self.path, "unnamed-gpio-in", gsi, int(level))
        self.seconds += time.perf_counter() - t0
        self.round_trips += 1

    def set_level(self, level: bool) -> None:
        if self.dead:
            return
        gsi = self.gsi()
        try:
            if level:
                if not 0 < gsi < IOAPIC_PINS:
                    log.warning("qtest INTx: no usable interrupt line (config 0x3c = %d); "
                                "interrupt not delivered", gsi)
                    return
                if self.raised_gsi is not None and self.raised_gsi != gsi:
                    self._set(self.raised_gsi, False)  # the line was re-routed while high
                self._set(gsi, True)
                self.raised_gsi = gsi
            elif self.raised_gsi is not None:
                self._set(self.raised_gsi, False)
                self.raised_gsi = None
            self.level = level
        except QtestError as e:
            self.dead = True
            log.warning("qtest INTx: %s; interrupts stop", e)

    def close(self) -> None:
        self.client.close()
