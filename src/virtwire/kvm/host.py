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

The backends are watched by the shared ``hosts.pump.BackendPump`` (as for ``serve`` and the PCI
proxy); ``DeviceHost`` is the rest of this host's loop: the kick eventfd, the device lock (the
pump serves a pair through ``LockedDevice``, which takes it) and the hand-over of the device's
``rx_watch`` calls made on the vCPU thread (an RTL8139 CAPR write that frees ring space) to the
loop thread, where the pump's watches live. The function is either ``VirtioPciDevice`` or
``rtl8139.pci.Rtl8139Pci``: both have ``pending``/``flush``/``defer_notify`` and a ``device``
with ``active``, ``backend_ready`` and the ``rx_watch`` hook.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from virtwire.hosts.pump import RING, BackendPump
from virtwire.loop import EventLoop

__all__ = ["KvmIntx", "DeviceHost", "LockedDevice"]

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


class LockedDevice:
    """The device as ``BackendPump`` sees it: serving a pair takes the device lock; the pump's
    ``rx_watch`` hook is installed on the real device behind ``DeviceHost.rx_watch``, which
    carries calls from the vCPU thread over to the loop thread."""

    def __init__(self, device: Any, lock: threading.Lock, host: DeviceHost) -> None:
        self.device = device
        self.lock = lock
        self.host = host
        self.hook: Callable[[int, bool], None] | None = None

    @property
    def active(self) -> bool:
        return bool(getattr(self.device, "active", False))

    @property
    def rx_watch(self) -> Callable[[int, bool], None] | None:
        return self.hook

    @rx_watch.setter
    def rx_watch(self, fn: Callable[[int, bool], None]) -> None:
        self.hook = fn
        self.device.rx_watch = self.host.rx_watch

    def backend_ready(self, pair: int) -> Any:
        with self.lock:
            return self.device.backend_ready(pair)


class DeviceHost:
    """The loop thread: deferred notifications, the backend pump, device hooks (see above)."""

    def __init__(self, transport: Any, backends: list[Any], lock: threading.Lock) -> None:
        self.loop = EventLoop()
        self.transport = transport
        self.device = transport.device
        self.backends = backends
        self.lock = lock
        transport.defer_notify = True
        self._loop_thread: int | None = None
        self._posted: deque[tuple[int, bool]] = deque()
        self._kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._kick_fd, self._on_kick)
        self._stop = False
        self.kicks = 0
        self.thread: threading.Thread | None = None
        self.pump = BackendPump(self.loop, LockedDevice(self.device, lock, self),
                                backends, ready=lambda pair: bool(
                                    getattr(self.device, "active", False)))
        if hasattr(self.device, "run_guarded"):
            self.device.more_work = self._more_work

    # -- from the vCPU thread -----------------------------------------------------------------
    def kick(self) -> None:
        """After an access: wake the loop if the access queued work, handed over an
        ``rx_watch`` call, or may have made the device active (a paused pair may resume)."""
        if self.transport.pending or self._posted or self.pump.waiting(RING):
            os.eventfd_write(self._kick_fd, 1)

    def rx_watch(self, pair: int, on: bool) -> None:
        """The device's ``rx_watch`` hook, from either thread (module docstring)."""
        if threading.get_ident() == self._loop_thread:
            self.pump.rx_watch(pair, on)
        else:
            self._posted.append((pair, on))
            os.eventfd_write(self._kick_fd, 1)

    # -- loop thread -------------------------------------------------------------------------
    def _on_kick(self) -> None:
        self._loop_thread = threading.get_ident()
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
        while self._posted:
            self.pump.rx_watch(*self._posted.popleft())
        if active and self.pump.waiting(RING):
            self.pump.resume_all(RING)

    def _locked(self, fn: Any, *args: Any) -> None:
        with self.lock:
            fn(*args)

    def _more_work(self, index: int) -> None:
        dev = self.device
        self.loop.defer(("kvm-more", index), self._locked, dev.run_guarded, index,
                        dev.process_queue)

    # -- running -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._loop_thread = threading.get_ident()
        self.loop.run()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="virtwire-kvm-device",
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
        self.pump.close()
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
                    "pump": dict(self.pump.counters),
                    "backends": [{"name": getattr(b, "name", "?"), **b.stats()}
                                 for b in self.backends]}
