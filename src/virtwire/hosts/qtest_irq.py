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

Level semantics and ordering. QEMU serves qtest commands in order, on its main loop thread.

- *Lowering* happens when the guest reads the ISR, on the vCPU thread's BAR read, and must be in
  effect before that read is answered (otherwise the guest's EOI re-delivers a stale level). So a
  lower waits for its ``OK``. QEMU's proxy waits for our answer with its main lock released, so
  the main loop is free to serve the command meanwhile.
- *Raising* happens from the device's own work (a used buffer), and is sent without waiting for
  the ``OK`` (collected later, in order). Waiting there could deadlock: if QEMU's main thread is
  itself blocked on a proxy request to us (a DEVICE_RESET at system reset), it cannot serve qtest.

The wait for a lower's ``OK`` is bounded (``LOWER_TIMEOUT``): past it the read is answered anyway
and the late ``OK`` is consumed with the next command, so a main thread that happens to be blocked
on the proxy at that moment costs a delay, never a deadlock. A broken qtest connection (QEMU gone)
is logged once and the line goes quiet; nothing here raises into the device's event loop.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

__all__ = ["QtestIntx", "QtestIrqError", "IOAPIC_PATH", "connect_qtest_socket"]

log = logging.getLogger(__name__)

IOAPIC_PATH = "/machine/i440fx/ioapic"
IOAPIC_PINS = 24
LOWER_TIMEOUT = 1.0


class QtestIrqError(Exception):
    """The qtest connection failed or QEMU refused a command."""


def connect_qtest_socket(path: str | Path, timeout: float = 10.0) -> socket.socket:
    """Connect to QEMU's qtest chardev (server=on,wait=off), retrying until it exists."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(path))
            return s
        except OSError as e:
            s.close()
            if time.monotonic() > deadline:
                raise QtestIrqError(f"qtest: cannot connect to {path}: {e}") from None
            time.sleep(0.05)


class QtestIntx:
    """An ``IntxLine`` (pci.function) that sets an IOAPIC input over qtest (module docstring)."""

    def __init__(self, sock: socket.socket, gsi: Callable[[], int],
                 path: str = IOAPIC_PATH, wait_lower: bool = True) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.gsi = gsi
        self.path = path
        self.wait_lower = wait_lower
        self.level = False
        self.raised_gsi: int | None = None
        self.dead = False
        self.outstanding = 0  # commands whose OK has not been read yet
        self._buf = bytearray()
        self.counters = {"raises": 0, "lowers": 0, "lower_timeouts": 0, "round_trips": 0}
        self.lower_seconds = 0.0  # total time spent waiting for lowers (per-access figures)
        self.lower_samples: deque[float] = deque(maxlen=4096)  # recent lower round trips, s

    @classmethod
    def connect(cls, path: str | Path, gsi: Callable[[], int], timeout: float = 10.0
                ) -> QtestIntx:
        return cls(connect_qtest_socket(path, timeout), gsi)

    # -- the line protocol -------------------------------------------------------------------
    def _send(self, gsi: int, level: bool) -> None:
        line = f"set_irq_in {self.path} unnamed-gpio-in {gsi} {int(level)}\n"
        self.sock.sendall(line.encode("ascii"))
        self.outstanding += 1
        self.counters["round_trips"] += 1

    def _collect(self, wait_all: bool, timeout: float = LOWER_TIMEOUT) -> bool:
        """Consume replies: all outstanding (``wait_all``, bounded) or just what has arrived."""
        deadline = time.monotonic() + timeout
        while self.outstanding:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i]).strip()
                del self._buf[: i + 1]
                if line.startswith(b"OK"):
                    self.outstanding -= 1
                elif not line.startswith(b"IRQ"):
                    raise QtestIrqError(f"qtest refused set_irq_in: {line[:80]!r}")
                continue
            left = deadline - time.monotonic() if wait_all else 0.0
            if wait_all and left <= 0:
                return False
            self.sock.settimeout(left if wait_all else 0.0)
            try:
                chunk = self.sock.recv(4096)
            except (BlockingIOError, TimeoutError):
                if not wait_all:
                    return True
                continue
            finally:
                self.sock.settimeout(None)
            if not chunk:
                raise QtestIrqError("qtest: QEMU closed the connection")
            self._buf += chunk
        return True

    # -- IntxLine ----------------------------------------------------------------------------
    def set_level(self, level: bool) -> None:
        if self.dead:
            return
        try:
            self._collect(wait_all=False)
            if level:
                gsi = self.gsi()
                if not 0 < gsi < IOAPIC_PINS:
                    log.warning("qtest INTx: no usable interrupt line (config 0x3c = %d); "
                                "interrupt not delivered", gsi)
                    return
                if self.raised_gsi is not None and self.raised_gsi != gsi:
                    self._send(self.raised_gsi, False)  # re-routed while high
                self._send(gsi, True)
                self.raised_gsi = gsi
                self.counters["raises"] += 1
            elif self.raised_gsi is not None:
                t0 = time.perf_counter()
                self._send(self.raised_gsi, False)
                self.raised_gsi = None
                if self.wait_lower and not self._collect(wait_all=True):
                    self.counters["lower_timeouts"] += 1
                    log.warning("qtest INTx: no answer to a lower within %.1f s; going on",
                                LOWER_TIMEOUT)
                dt = time.perf_counter() - t0
                self.lower_seconds += dt
                self.lower_samples.append(dt)
                self.counters["lowers"] += 1
            self.level = level
        except (OSError, QtestIrqError) as e:
            self.dead = True
            log.warning("qtest INTx: %s; interrupts stop", e)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
