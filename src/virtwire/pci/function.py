"""The PCI function interface: what a host sees of a device that plays a whole PCI function.

Every host that puts one of our devices on a PCI bus goes through this interface and nothing
else: QEMU's multi-process PCI proxy (``hosts.pci_proxy``) forwards the guest's config and BAR
accesses over a socket; the KVM host (``virtwire kvm``) decodes them from vCPU exits. The device
side implements it (``pci.device.VirtioPciDevice`` for virtio-net); kvmtool's split between
``pci.c`` and ``virtio/pci.c`` is the model.

- **Configuration space**: ``config_read`` / ``config_write`` at an offset of the function's
  256-byte type-0 header and capability list, with the guest's access width (1, 2 or 4).
- **BARs**: ``bar_read`` / ``bar_write`` at an absolute bus address; the function decodes it
  against the BARs the guest programmed and answers None / False when no BAR claims it.
- **Interrupt line**: ``intx`` is where the level-triggered INTx goes (``IntxLine``); a host
  assigns its own route (an irqfd, a qtest IOAPIC input, ``KVM_IRQ_LINE``).
- **Guest memory and reset**: ``set_memory`` hands the function guest RAM (the same object every
  time it is remapped), ``release_memory_views`` drops views before regions go, ``reset`` is a
  function-level reset.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["IntxLine", "NoIntxLine", "PciFunction"]


@runtime_checkable
class IntxLine(Protocol):
    """Where the INTx level goes (qtest IOAPIC input, KVM irqfd or ``KVM_IRQ_LINE``, a test)."""

    def set_level(self, level: bool) -> None: ...


class NoIntxLine:
    """The INTx line of a function no host has routed yet: levels go nowhere."""

    def set_level(self, level: bool) -> None:
        pass


@runtime_checkable
class PciFunction(Protocol):
    """A whole PCI function as a host drives it (see the module docstring)."""

    intx: IntxLine

    def config_read(self, offset: int, width: int) -> int: ...

    def config_write(self, offset: int, width: int, value: int) -> None: ...

    def bar_read(self, addr: int, width: int, memory: bool) -> int | None:
        """None: no BAR claims ``addr``."""

    def bar_write(self, addr: int, width: int, value: int, memory: bool) -> bool:
        """False: no BAR claims ``addr``."""

    def reset(self) -> None: ...

    def set_memory(self, mem: Any) -> None:
        """Guest RAM is (re)mapped; the same object is passed every time."""

    def release_memory_views(self) -> None:
        """Drop any view of guest memory (called before regions are removed)."""
