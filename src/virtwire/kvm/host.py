"""The device side of ``virtwire kvm``: our virtio-net PCI function and its backends on one loop.

Theory of operation
-------------------
This is the second adapter of the shape ``hosts.pci_proxy.PciProxyServer`` has: a
``pci.device.VirtioPciDevice`` (with ``defer_notify``) over a ``net.device.VirtioNet`` whose frame
backends (TAP, switch port, null) are served by one ``loop.EventLoop``. Here the accesses do not
come over a socket: the vCPU thread decodes them from ``KVM_EXIT_IO``/``KVM_EXIT_MMIO`` and calls
the function directly (``devices.PciHost``), holding ``lock``. A notify write only queues the
queue index; the vCPU thread then pokes ``kick`` (an eventfd) and re-enters the guest at once,
and the loop thread runs ``transport.flush`` (the queue work) under ``lock`` -- what an
ioeventfd does for an in-kernel-accelerated VMM.

Interrupts: ``KvmIntx`` is the function's INTx line, routed to one GSI of the in-kernel PIC and
IOAPIC by ``KVM_IRQ_LINE`` (level). The device raises it after used buffers; it lowers it when
the guest reads the ISR, before the read returns (``VirtioPciDevice.read_isr``), so the guest's
EOI never meets a stale level. MSI-X: the function has no MSI-X capability, so a guest cannot
enable it and ``KVM_SIGNAL_MSI`` is never used (``Vm.signal_msi`` is there for a function that
has one).

Everything about backends and the loop is in this one class (``DevicePump``) so it can move onto
the shared backend pump once ``serve`` and the PCI proxy have one.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from virtwire.loop import EventLoop

__all__ = ["KvmIntx", "DevicePump"]

log = logging.getLogger(__name__)


class KvmIntx:
    """INTx of our function on GSI ``gsi`` of the in-kernel irqchip (``KVM_IRQ_LINE``)."""

    def __init__(self, vm: Any, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.level = False
        self.counters = {"raised": 0, "lowered": 0}

    def set_level(self, level: bool) -> None:
        if level == self.level:
            return
        self.level = level
        self.counters["raised" if level else "lowered"] += 1
        try:
            self.vm.irq_line(self.gsi, level)
        except OSError as e:
            log.warning("kvm: KVM_IRQ_LINE %d=%d failed: %s", self.gsi, level, e)


class DevicePump:
    """The loop thread: deferred notifications, backend RX wake-ups, device hooks (see above)."""

    def __init__(self, transport: Any, backends: list[Any], lock: threading.Lock) -> None:
        self.loop = EventLoop()
        self.transport = transport
        self.device = transport.device
        self.backends = backends
        self.lock = lock
        transport.defer_notify = True
        self._watched: dict[int, bool] = {}
        self._parked: set[int] = set()
        self._kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._kick_fd, self._on_kick)
        self._stop = False
        self.kicks = 0
        self.thread: threading.Thread | None = None
        if hasattr(self.device, "rx_watch"):
            self.device.rx_watch = self._rx_watch
        if hasattr(self.device, "more_work"):
            self.device.more_work = self._more_work
        for pair in range(len(backends)):
            self._rx_watch(pair, True)

    # -- from the vCPU thread -----------------------------------------------------------------
    def kick(self) -> None:
        """After an access: wake the loop if the access queued work (or parked RX may resume)."""
        if self.transport.pending or self._parked:
            os.eventfd_write(self._kick_fd, 1)

    # -- loop thread -------------------------------------------------------------------------
    def _on_kick(self) -> None:
        try:
            os.eventfd_read(self._kick_fd)
        except BlockingIOError:
            pass
        self.kicks += 1
        if self._stop:
            self.loop.stop()
            return
        with self.lock:
            self.transport.flush()
            active = getattr(self.device, "active", False)
        if self._parked and active:
            for pair in list(self._parked):
                self._rx_watch(pair, True)
            self._parked.clear()

    def _on_backend(self, pair: int) -> None:
        ready = getattr(self.device, "backend_ready", None)
        if ready is None or not getattr(self.device, "active", False):
            self._rx_watch(pair, False)  # nothing to deliver to before DRIVER_OK
            self._parked.add(pair)
            return
        self.loop.defer(("kvm-rx", pair), self._locked, ready, pair)

    def _locked(self, fn: Any, *args: Any) -> None:
        with self.lock:
            fn(*args)

    def _rx_watch(self, pair: int, on: bool) -> None:
        if not 0 <= pair < len(self.backends):
            return
        fd = self.backends[pair].fileno()
        if fd is None or fd < 0 or self._watched.get(pair) == on:
            return
        if on:
            self.loop.add_reader(fd, self._on_backend, pair)
        else:
            self.loop.remove_reader(fd)
        self._watched[pair] = on

    def _more_work(self, index: int) -> None:
        dev = self.device
        self.loop.defer(("kvm-more", index), self._locked, dev.run_guarded, index,
                        dev.process_queue)

    # -- running -----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run, name="virtwire-kvm-device",
                                       daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        try:
            os.eventfd_write(self._kick_fd, 1)
        except OSError:
            pass
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        self.stop()
        for pair in list(self._watched):
            self._rx_watch(pair, False)
        self.loop.remove_reader(self._kick_fd)
        os.close(self._kick_fd)
        self.transport.release_memory_views()
        for be in self.backends:
            be.close()
        self.loop.close()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            dev = self.device.stats() if hasattr(self.device, "stats") else {}
            return {"transport": self.transport.stats(), "device": dev, "loop_kicks": self.kicks,
                    "backends": [{"name": getattr(b, "name", "?"), **b.stats()}
                                 for b in self.backends]}
