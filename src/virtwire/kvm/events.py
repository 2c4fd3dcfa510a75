"""``kvm`` trace events and register names for vCPU exits.

Theory of operation
-------------------
With tracing on, ``traced(handler, ...)`` wraps a port or MMIO handler so that each exit becomes
one event before it is dispatched::

    {"cat": "kvm", "ev": "exit", "exit": "KVM_EXIT_MMIO" | "KVM_EXIT_IO", "dir": "in"|"out",
     "port": N | "addr": N, "size": n, "data": value, "reg": "common_cfg.queue_select"}

and, for the answer of a read, ``data`` is the value handed back. With tracing off nothing is
wrapped: the run loop's cost is unchanged. ``register_name`` names a port or guest-physical
address: fixed ports by device ("uart.thr", "pci.config_address"), configuration data by the
latched function register ("pci.cfg 00:03.0 bar4"), BAR addresses by the virtio-pci register
(spec names: ``common_cfg.queue_desc_lo``, ``notify.q1``, ``isr``, ``device_cfg+0``,
``legacy.QUEUE_PFN``), using only the function's public ``pci.bar_at``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from virtwire import trace as _trace
from virtwire.virtio import spec

__all__ = ["register_name", "traced", "exit_table", "PORT_NAMES"]

PORT_NAMES: dict[int, str] = {
    0x3F8: "uart.thr", 0x3F9: "uart.ier", 0x3FA: "uart.iir", 0x3FB: "uart.lcr",
    0x3FC: "uart.mcr", 0x3FD: "uart.lsr", 0x3FE: "uart.msr", 0x3FF: "uart.scr",
    0xCF8: "pci.config_address", 0x501: "exit", 0x502: "bench",
    **{p: f"pci.config_data+{p - 0xCFC}" if p != 0xCFC else "pci.config_data"
       for p in range(0xCFC, 0xD00)},
}

# struct virtio_pci_common_cfg field names (virtio 1.2 §4.1.4.3), by offset
_COMMON = dict(zip(
    (spec.VIRTIO_PCI_COMMON_DFSELECT, spec.VIRTIO_PCI_COMMON_DF, spec.VIRTIO_PCI_COMMON_GFSELECT,
     spec.VIRTIO_PCI_COMMON_GF, spec.VIRTIO_PCI_COMMON_MSIX, spec.VIRTIO_PCI_COMMON_NUMQ,
     spec.VIRTIO_PCI_COMMON_STATUS, spec.VIRTIO_PCI_COMMON_CFGGENERATION,
     spec.VIRTIO_PCI_COMMON_Q_SELECT, spec.VIRTIO_PCI_COMMON_Q_SIZE,
     spec.VIRTIO_PCI_COMMON_Q_MSIX, spec.VIRTIO_PCI_COMMON_Q_ENABLE,
     spec.VIRTIO_PCI_COMMON_Q_NOFF, spec.VIRTIO_PCI_COMMON_Q_DESCLO,
     spec.VIRTIO_PCI_COMMON_Q_DESCHI, spec.VIRTIO_PCI_COMMON_Q_AVAILLO,
     spec.VIRTIO_PCI_COMMON_Q_AVAILHI, spec.VIRTIO_PCI_COMMON_Q_USEDLO,
     spec.VIRTIO_PCI_COMMON_Q_USEDHI, spec.VIRTIO_PCI_COMMON_Q_NDATA,
     spec.VIRTIO_PCI_COMMON_Q_RESET),
    ("device_feature_select", "device_feature", "driver_feature_select", "driver_feature",
     "config_msix_vector", "num_queues", "device_status", "config_generation", "queue_select",
     "queue_size", "queue_msix_vector", "queue_enable", "queue_notify_off", "queue_desc_lo",
     "queue_desc_hi", "queue_driver_lo", "queue_driver_hi", "queue_device_lo",
     "queue_device_hi", "queue_notif_config_data", "queue_reset")))
_LEGACY = {getattr(spec, "VIRTIO_PCI_" + n): n for n in (
    "HOST_FEATURES", "GUEST_FEATURES", "QUEUE_PFN", "QUEUE_NUM", "QUEUE_SEL", "QUEUE_NOTIFY",
    "STATUS", "ISR")}
# the modern BAR's blocks (pci.device's layout: common 0, ISR 0x1000, device 0x2000, notify)
_BLOCKS = ((0x0000, "common_cfg"), (0x1000, "isr"), (0x2000, "device_cfg"), (0x3000, "notify"))
_NOTIFY_MULT = 4


def bar_register(fn: Any, addr: int, size: int, memory: bool) -> str | None:
    """The register of ``fn`` at absolute ``addr`` (None if no BAR claims it)."""
    pci = getattr(fn, "pci", None)
    hit = pci.bar_at(addr, size, memory) if pci is not None else None
    if hit is None:
        return None
    bar, off = hit
    reg_name = getattr(getattr(fn, "model", None), "reg_name", None)
    if reg_name is not None:  # the RTL8139: its register file, by datasheet name
        return f"rtl8139.{reg_name(off)}"
    if not memory:
        if off in _LEGACY:
            return f"legacy.{_LEGACY[off]}"
        cfg = off - spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX
        return f"legacy.device_cfg+{cfg}" if cfg >= 0 else f"bar{bar.index}+{off:#x}"
    block, rel = off & ~0xFFF, off & 0xFFF
    name = dict(_BLOCKS).get(block, f"bar{bar.index}+{block:#x}")
    if name == "common_cfg":
        return f"common_cfg.{_COMMON.get(rel, f'+{rel:#x}')}"
    if name == "notify":
        return f"notify.q{rel // _NOTIFY_MULT}"
    if name == "isr":
        return "isr" if rel == 0 else f"isr+{rel}"
    return f"{name}+{rel}"


def register_name(kind: str, addr: int, size: int, pci_host: Any) -> str:
    """Name of the register an exit hit (module docstring); "-" when nothing claims it."""
    if kind == "io" and addr in PORT_NAMES:
        name = PORT_NAMES[addr]
        if name.startswith("pci.config_data") and pci_host is not None:
            hit = pci_host.target()
            if hit is not None:
                a = pci_host.address
                reg = hit[1] + (addr - 0xCFC)
                name += f" {(a >> 11) & 0x1f:02x}.{(a >> 8) & 7}:{reg:#04x}"
        return name
    for fn in getattr(pci_host, "slots", {}).values():
        name = bar_register(fn, addr, size, kind == "mmio")
        if name is not None:
            return name
    return "-"


Handler = Callable[[int, int, "int | None"], "int | None"]


def traced(handler: Handler, kind: str, pci_host: Any) -> Handler:
    """``handler`` emitting one ``kvm.exit`` event per call (module docstring)."""
    exit_name = "KVM_EXIT_IO" if kind == "io" else "KVM_EXIT_MMIO"
    key = "port" if kind == "io" else "addr"

    def wrapper(addr: int, size: int, value: int | None) -> int | None:
        # a write is traced before it takes effect (its exit comes first), a read after (the
        # value handed back is known then)
        reg = register_name(kind, addr, size, pci_host)
        tr = _trace.TRACE
        if tr is not None and value is not None:
            tr.emit("kvm", "exit", exit=exit_name, dir="out", **{key: addr}, size=size,
                    data=value, reg=reg)
        r = handler(addr, size, value)
        if tr is not None and value is None:
            tr.emit("kvm", "exit", exit=exit_name, dir="in", **{key: addr}, size=size,
                    data=r, reg=reg)
        return r

    return wrapper


def stop_event(kind: str, message: str, status: int, exits: int) -> None:
    tr = _trace.TRACE
    if tr is not None:
        tr.emit("kvm", "stop", kind=kind, message=message, status=status, exits=exits)


def start_event(**fields: Any) -> None:
    tr = _trace.TRACE
    if tr is not None:
        tr.emit("kvm", "start", **fields)


def exit_table(counts: dict[tuple[str, int], int], pci_host: Any) -> list[dict[str, Any]]:
    """Rows (kind, port/address, register, count), most frequent first."""
    rows = []
    for (kind, addr), n in counts.items():
        rows.append({"kind": kind, "addr": addr, "reg": register_name(kind, addr, 4, pci_host)
                     if kind == "mmio" else register_name(kind, addr, 1, pci_host)
                     .split(" ")[0], "count": n})
    rows.sort(key=lambda r: (-r["count"], r["kind"], r["addr"]))
    return rows
