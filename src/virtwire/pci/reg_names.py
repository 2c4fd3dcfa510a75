"""Names of PCI configuration-space fields, for trace events ("vendor_id", "cap.common_cfg.bar").

The PCI header (PCI Local Bus 3.0 §6.1) and the virtio capability (virtio 1.2 §4.1.4) field by
field. ``pci.device`` names its BAR registers from its own register tables and uses
``config_name`` for configuration space.
"""

from __future__ import annotations

from collections.abc import Iterable

from virtwire.pci.config_space import PciConfigSpace

__all__ = ["HEADER_FIELDS", "VIRTIO_CAP_FIELDS", "field_name", "config_name"]

HEADER_FIELDS: tuple[tuple[int, int, str], ...] = (
    (0x00, 2, "vendor_id"), (0x02, 2, "device_id"), (0x04, 2, "command"), (0x06, 2, "pci_status"),
    (0x08, 1, "revision_id"), (0x09, 1, "prog_if"), (0x0A, 2, "class"),
    (0x0C, 1, "cache_line_size"), (0x0D, 1, "latency_timer"), (0x0E, 1, "header_type"),
    (0x0F, 1, "bist"), (0x10, 4, "bar0"), (0x14, 4, "bar1"), (0x18, 4, "bar2"), (0x1C, 4, "bar3"),
    (0x20, 4, "bar4"), (0x24, 4, "bar5"), (0x28, 4, "cardbus_cis"),
    (0x2C, 2, "subsystem_vendor_id"), (0x2E, 2, "subsystem_id"), (0x30, 4, "rom_address"),
    (0x34, 1, "cap_ptr"), (0x3C, 1, "interrupt_line"), (0x3D, 1, "interrupt_pin"),
    (0x3E, 1, "min_gnt"), (0x3F, 1, "max_lat"),
)
# virtio 1.2 §4.1.4: struct virtio_pci_cap (+ notify_off_multiplier / pci_cfg_data at 16)
VIRTIO_CAP_FIELDS: tuple[tuple[int, str], ...] = (
    (0, "cap_vndr"), (1, "cap_next"), (2, "cap_len"), (3, "cfg_type"), (4, "bar"), (5, "id"),
    (6, "padding"), (8, "offset"), (12, "length"), (16, "extra"),
)
CFG_TYPE_NAMES = {1: "common_cfg", 2: "notify_cfg", 3: "isr_cfg", 4: "device_cfg",
                  5: "pci_cfg", 8: "shared_memory_cfg", 9: "vendor_cfg"}
CAP_ID_NAMES = {0x01: "pm", 0x05: "msi", 0x09: "vendor", 0x10: "pcie", 0x11: "msix"}
_EXTRA = {"notify_cfg": "notify_off_multiplier", "pci_cfg": "pci_cfg_data"}


def field_name(table: Iterable[tuple[int, str]], off: int) -> str:
    """The field of ``table`` (offset, name) that holds ``off``: "mac", "mac+2", "+0x4"."""
    best = None
    for start, name in table:
        if start <= off:
            best = (start, name)
    if best is None:
        return f"+{off:#x}"
    return best[1] if best[0] == off else f"{best[1]}+{off - best[0]}"


def config_name(pci: PciConfigSpace, off: int, width: int = 1) -> str:
    """Name of config-space offset ``off`` ("vendor_id", "cap.common_cfg.bar", "cap.msix+2");
    a wide access over several header fields names them all ("revision_id|prog_if|class")."""
    if off < 0x40:
        hit = [name if start >= off else f"{name}+{off - start}"
               for start, size, name in HEADER_FIELDS
               if start < off + max(width, 1) and off < start + size]
        return "|".join(hit) if hit else f"header+{off:#x}"
    caps = sorted(pci.capabilities)
    for i, at in enumerate(caps):
        end = caps[i + 1] if i + 1 < len(caps) else 0x100
        if at <= off < end:
            cid = pci.get(at, 1)
            if cid == 0x09:
                kind = CFG_TYPE_NAMES.get(pci.get(at + 3, 1), f"vendor{at:#x}")
                fld = field_name(VIRTIO_CAP_FIELDS, off - at)
                if fld.startswith("extra"):
                    fld = fld.replace("extra", _EXTRA.get(kind, "extra"))
                return f"cap.{kind}.{fld}"
            name = CAP_ID_NAMES.get(cid, f"cap{cid:#x}")
            return f"cap.{name}" + (f"+{off - at}" if off != at else "")
    return f"config+{off:#x}"
