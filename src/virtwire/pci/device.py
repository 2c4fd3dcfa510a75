"""virtio over PCI, device side: configuration space and BAR registers over a ``VirtioDevice``.

Theory of operation
-------------------
``VirtioPciDevice`` is the transport of virtio 1.2 §4.1 "Virtio Over PCI Bus". It owns a
``PciConfigSpace`` and the register blocks inside the BARs, and maps every register access onto the
transport-agnostic ``VirtioDevice`` (status, features, queue configuration, notifications, device
configuration). It is pure: no fds, no sockets. A host (``hosts.pci_proxy``; a test bus) feeds it
config and BAR accesses; interrupts leave through ``intx`` (anything with ``set_level(bool)``).

Identity (§4.1.2 PCI Device Discovery): vendor 0x1AF4; device 0x1040 + virtio id (0x1041 for net)
with revision 1 when modern-only, or the transitional id 0x1000 with revision 0 and subsystem
device id = virtio id (1 for net); class 0x020000 (network, ethernet).

BAR layout (all 32-bit BARs: QEMU's proxy sizes 32-bit BARs only)::

    BAR0  I/O, transitional only: the legacy register block (§4.1.4.8), device config at 20
    BAR4  memory, 16 KiB:
          0x0000 common configuration   (§4.1.4.3)  VIRTIO_PCI_COMMON_CFG_SIZE bytes
          0x1000 ISR status             (§4.1.4.5)  1 byte, read-to-clear
          0x2000 device configuration   (§4.1.4.6)  len(device.config) bytes
          0x3000 notifications          (§4.1.4.4)  queue i at i * NOTIFY_OFF_MULTIPLIER

Capabilities (§4.1.4, vendor-specific 0x09, in list order): common, notify (with
``notify_off_multiplier``), ISR, device config, PCI configuration access (§4.1.4.9: the driver
writes bar/offset/length into the capability, then reads or writes ``pci_cfg_data`` to access the
BAR through configuration space).

Registers are decoded flat: per block one table ``offset -> Reg(name,
width, get, set)``, names after spec.py's ``VIRTIO_PCI_COMMON_*`` / legacy ``VIRTIO_PCI_*``. A
driver must use each field's natural width (§4.1.3.1); an unknown offset or a wrong width logs a
warning (rate-limited), reads as zero and writes nothing. Nothing here raises into the host.

Which interface (§4.1.4.8 transitional devices): a transitional device serves both. The first
status or feature access through one interface while the device is reset selects it: the legacy
I/O BAR sets ``device.legacy`` (32-bit features, no VERSION_1, page-frame queue addresses with
4096-byte alignment), the common configuration clears it.

Interrupts (no MSI-X: INTx only, level-triggered). A used-buffer notification sets ISR bit 0, a
configuration change bit 1; either raises the line. Reading the ISR returns and clears it and lowers
the line *before* the read completes, so a guest that EOIs after the read never sees a stale level.
The Command register's INTx Disable bit masks the line; Status bit 3 mirrors the ISR.

Notifications: a write to the notify area (or legacy QUEUE_NOTIFY) calls ``device.notify(i)``;
with ``defer_notify`` set it is queued instead and run by ``flush()``, which the proxy host calls
after it has answered the access, so the vCPU continues while the device works (as with an
ioeventfd).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtwire import trace as _trace
from virtwire.pci.config_space import (
    PCI_CAP_ID_VNDR,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    Bar,
    BarKind,
    PciConfigSpace,
)
from virtwire.pci.function import IntxLine, NoIntxLine
from virtwire.pci.reg_names import config_name, field_name
from virtwire.virtio import spec
from virtwire.virtio.device import VirtioDevice

__all__ = [
    "VirtioPciDevice",
    "IntxLine",
    "Reg",
    "MODERN_BAR",
    "LEGACY_BAR",
    "COMMON_OFFSET",
    "ISR_OFFSET",
    "DEVICE_OFFSET",
    "NOTIFY_OFFSET",
    "NOTIFY_OFF_MULTIPLIER",
    "MODERN_BAR_SIZE",
]

log = logging.getLogger(__name__)

MODERN_BAR = 4
LEGACY_BAR = 0
MODERN_BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
BLOCK_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
PCI_SUBSYSTEM_ID_MODERN = 0x1100  # §4.1.2.1: non-transitional devices SHOULD use >= 0x40

# struct virtio_pci_cap (§4.1.4): cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
# le32 offset, le32 length. The body passed to the config space starts at cap_len.
_CAP_BODY = struct.Struct("<BBBB2xII")
_VIRTIO_PCI_CAP_LEN = 16
_VIRTIO_PCI_NOTIFY_CAP_LEN = 20
_VIRTIO_PCI_CFG_CAP_LEN = 20


@dataclass(frozen=True)
class Reg:
    """One register of a block: its spec name, natural width, getter and setter (None: RO)."""

    name: str
    width: int
    get: Callable[[], int]
    set: Callable[[int], None] | None = None


class VirtioPciDevice:
    """A ``VirtioDevice`` behind virtio-pci registers (see module docstring)."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        transitional: bool = False,
        intx: IntxLine | None = None,
        defer_notify: bool = False,
    ) -> None:
        self.device = device
        self.transitional = transitional
        self.intx: IntxLine = intx or NoIntxLine()
        self.defer_notify = defer_notify
        vid = device.device_id
        self.pci = PciConfigSpace(
            vendor_id=spec.VIRTIO_PCI_VENDOR_ID,
            device_id=0x1000 + vid - 1 if transitional else spec.VIRTIO_PCI_DEVICE_ID_MODERN_BASE
            + vid,
            class_code=spec.PCI_CLASS_NETWORK_ETHERNET if vid == spec.VIRTIO_ID_NET else 0xFF0000,
            revision_id=0 if transitional else 1,
            subsystem_vendor_id=spec.VIRTIO_PCI_SUBSYSTEM_VENDOR_ID,
            subsystem_id=vid if transitional else PCI_SUBSYSTEM_ID_MODERN,
            interrupt_pin=1,
        )
        self.modern_bar: Bar = self.pci.add_bar(MODERN_BAR, MODERN_BAR_SIZE, BarKind.MEM32)
        self.legacy_bar: Bar | None = None
        if transitional:
            need = spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX + len(device.config)
            size = 32
            while size < need:
                size *= 2
            self.legacy_bar = self.pci.add_bar(LEGACY_BAR, size, BarKind.IO)
        self._add_capabilities()
        self.pci.on_write.append(self._config_written)

        self.isr = 0
        self.level = False
        self.queue_select = 0
        self.dfselect = 0
        self.gfselect = 0
        self.legacy_queue_select = 0
        self.pending: list[int] = []
        self.counters: dict[str, int] = {"bad_accesses": 0, "isr_reads": 0, "isr_zero_reads": 0,
                                         "raises": 0, "notifies": 0}
        self._bad_seen: dict[str, int] = {}
        self._common = self._common_table()
        self._legacy = self._legacy_table()
        device.interrupt = self  # InterruptSink: queue() / config()

    @property
    def intx_is_default(self) -> bool:
        """No interrupt route attached yet (a host may supply one, e.g. the proxy's irqfd)."""
        return isinstance(self.intx, NoIntxLine)

    # -- capabilities (§4.1.4) ---------------------------------------------------------------
    def _vcap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"",
              writable: bytes | None = None) -> int:
        cap_len = _VIRTIO_PCI_CAP_LEN + len(extra)
        body = _CAP_BODY.pack(cap_len, cfg_type, MODERN_BAR, 0, offset, length) + extra
        return self.pci.add_capability(PCI_CAP_ID_VNDR, body, writable)

    def _add_capabilities(self) -> None:
        nq = self.device.num_queues
        self.cap_common = self._vcap(spec.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET,
                                     spec.VIRTIO_PCI_COMMON_CFG_SIZE)
        self.cap_notify = self._vcap(spec.VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
                                     max(nq, 1) * NOTIFY_OFF_MULTIPLIER,
                                     struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        self.cap_isr = self._vcap(spec.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1)
        if self.device.config:
            self.cap_device = self._vcap(spec.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET,
                                         len(self.device.config))
        # §4.1.4.9: bar (body byte 2), offset and length (bytes 6..13) and pci_cfg_data are
        # driver-writable; the data window is hooked below.
        wmask = bytes([0, 0, 0xFF, 0, 0, 0]) + b"\xff" * 8 + bytes(4)
        self.cap_pci_cfg = self._vcap(spec.VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4), wmask)
        self.pci.set(self.cap_pci_cfg + 4, 1, 0)  # bar: 0 until the driver writes it
        data = self.cap_pci_cfg + _VIRTIO_PCI_CAP_LEN
        self.pci.add_read_hook(data, data + 4, self._pci_cfg_read)
        self.pci.add_write_hook(data, data + 4, self._pci_cfg_write)

    def _pci_cfg_window(self, off: int, width: int) -> tuple[int, int, int] | None:
        """(bar index, offset in BAR, length) of the access the driver set up, or None."""
        c = self.cap_pci_cfg
        bar = self.pci.get(c + 4, 1)
        offset = self.pci.get(c + 8, 4)
        length = self.pci.get(c + 12, 4)
        data = c + _VIRTIO_PCI_CAP_LEN
        if length == 0:
            return None  # window never set up (e.g. a dump of config space): reads as zero
        if off != data or width < length or length not in (1, 2, 4) or offset % length:
            self._bad(f"PCI cfg access window bar={bar} offset={offset:#x} length={length} "
                      f"via {width}@{off - data}")
            return None
        target = self.pci.bars.get(bar)
        if target is None or offset + length > target.size:
            self._bad(f"PCI cfg access outside BAR {bar}: {offset:#x}+{length}")
            return None
        return bar, offset, length

    def _pci_cfg_read(self, off: int, width: int) -> int:
        win = self._pci_cfg_window(off, width)
        if win is None:
            return 0
        return self._bar_access(*win, None)

    def _pci_cfg_write(self, off: int, width: int, value: int) -> None:
        win = self._pci_cfg_window(off, width)
        if win is not None:
            bar, offset, length = win
            self._bar_access(bar, offset, length, value & ((1 << (8 * length)) - 1))

    # -- config space (PCI) ------------------------------------------------------------------
    def config_read(self, offset: int, width: int) -> int:
        v = self.pci.read(offset, width)
        if _trace.TRACE is not None:
            self._trace_config(offset, width, v, False)
        return v

    def config_write(self, offset: int, width: int, value: int) -> None:
        self.pci.write(offset, width, value)
        if _trace.TRACE is not None:
            self._trace_config(offset, width, value, True)

    def _config_written(self, off: int, width: int, value: int) -> None:
        if off <= PCI_COMMAND + 1 and off + width > PCI_COMMAND:
            self._drive_line()

    # -- BAR access (absolute addresses, as the proxy sends them) -----------------------------
    def bar_read(self, addr: int, width: int, memory: bool) -> int | None:
        hit = self.pci.bar_at(addr, width, memory)
        if hit is None:
            return None
        v = self._bar_access(hit[0].index, hit[1], width, None)
        if _trace.TRACE is not None:
            self._trace_bar(hit[0].index, hit[1], width, v, False)
        return v

    def bar_write(self, addr: int, width: int, value: int, memory: bool) -> bool:
        hit = self.pci.bar_at(addr, width, memory)
        if hit is None:
            return False
        if _trace.TRACE is not None:
            self._trace_bar(hit[0].index, hit[1], width, value, True)
        self._bar_access(hit[0].index, hit[1], width, value)
        if _trace.TRACE is not None:
            self._trace_bar_written(hit[0].index, hit[1], value)
        return True

    # -- register names and trace events -----------------------------------------------------
    def config_reg_name(self, off: int, width: int = 1) -> str:
        """Name of config-space offset ``off`` ("vendor_id", "cap.common_cfg.bar", ...)."""
        return config_name(self.pci, off, width)

    def bar_reg_name(self, bar: int, off: int) -> str:
        """Name of offset ``off`` in BAR ``bar`` ("common_cfg.queue_desc_lo", "notify.q1", "isr",
        "device_cfg.mac+2", "legacy.QUEUE_PFN"), from this device's register tables."""
        if bar == MODERN_BAR:
            block, rel = off & ~(BLOCK_SIZE - 1), off & (BLOCK_SIZE - 1)
            if block == COMMON_OFFSET:
                reg = self._common.get(rel)
                return f"common_cfg.{reg.name}" if reg is not None else f"common_cfg+{rel:#x}"
            if block == ISR_OFFSET:
                return "isr" if rel == 0 else f"isr+{rel:#x}"
            if block == DEVICE_OFFSET:
                return "device_cfg." + field_name(spec.NET_CONFIG_FIELDS, rel)
            if block == NOTIFY_OFFSET:
                q, r = divmod(rel, NOTIFY_OFF_MULTIPLIER)
                return f"notify.q{q}" + (f"+{r}" if r else "")
            return f"bar{bar}+{off:#x}"
        if bar == LEGACY_BAR and self.legacy_bar is not None:
            lreg = self._legacy.get(off)
            if lreg is not None:
                return f"legacy.{lreg.name}"
            cfg = off - spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX  # no MSI-X: config at 20
            if cfg < 0:
                return f"legacy+{off}"
            return "legacy.device_cfg." + field_name(spec.NET_CONFIG_FIELDS, cfg)
        return f"bar{bar}+{off:#x}"

    def _trace_config(self, off: int, width: int, value: int, write: bool) -> None:
        """``pci.cfg_read``/``cfg_write``, plus ``pci.bar_size`` or ``pci.bar_map`` when a write
        sized or placed a BAR (PCI Local Bus 3.0 §6.2.5.1)."""
        tr = _trace.TRACE
        if tr is None:
            return
        tr.emit("pci", "cfg_write" if write else "cfg_read", off=off, size=width, val=value,
                reg=self.config_reg_name(off, width))
        if not write or not 0x10 <= off < 0x28 or width != 4:
            return
        bar = self.pci.bars.get((off - 0x10) // 4)
        if bar is None:
            return
        if value & 0xFFFFFFF0 == 0xFFFFFFF0:
            tr.emit("pci", "bar_size", bar=bar.index, size=bar.size, kind=bar.kind.value)
        elif bar.base:
            tr.emit("pci", "bar_map", bar=bar.index, addr=bar.base, size=bar.size,
                    kind=bar.kind.value)

    def _trace_bar(self, bar: int, off: int, width: int, value: int, write: bool) -> None:
        """``pci.bar_read``/``bar_write`` with the register's name; a read of the device
        features also yields ``feature.offer``."""
        tr = _trace.TRACE
        if tr is None:
            return
        reg = self.bar_reg_name(bar, off)
        tr.emit("pci", "bar_write" if write else "bar_read", bar=bar, off=off, size=width,
                val=value, reg=reg)
        if not write and (reg == "common_cfg.device_feature" and self.dfselect == 0
                          or reg == "legacy.HOST_FEATURES"):
            _trace.features_event("offer", int(self.device.offered_features))

    def _trace_bar_written(self, bar: int, off: int, value: int) -> None:
        """After a BAR write took effect: the feature word it completed (``feature.ack``), or
        the features FEATURES_OK accepted (``feature.negotiated``; legacy: at DRIVER_OK)."""
        reg = self.bar_reg_name(bar, off)
        d = self.device
        if reg in ("common_cfg.driver_feature", "legacy.GUEST_FEATURES"):
            sel = self.gfselect if reg.startswith("common") else 0
            _trace.features_event("ack", int(d.driver_features), sel=sel)
        elif reg in ("common_cfg.device_status", "legacy.STATUS"):
            fok, dok = spec.VIRTIO_CONFIG_S_FEATURES_OK, spec.VIRTIO_CONFIG_S_DRIVER_OK
            status = int(d.status)
            if (not reg.startswith("legacy") and value & fok and not value & dok
                    and status & fok) or (reg.startswith("legacy") and value & dok
                                          and status & dok):
                _trace.features_event("negotiated", int(d.negotiated))

    def _bar_access(self, bar: int, off: int, width: int, value: int | None) -> int:
        """One access at ``off`` inside BAR ``bar``; ``value`` None means a read."""
        if bar == MODERN_BAR:
            block, rel = off & ~(BLOCK_SIZE - 1), off & (BLOCK_SIZE - 1)
            if block == COMMON_OFFSET:
                self._use_interface(legacy=False, rel=rel)
                return self._table_access("common", self._common, rel, width, value)
            if block == NOTIFY_OFFSET:
                return self._notify_access(rel, width, value)
            if block == ISR_OFFSET:
                return self._isr_access(rel, width, value)
            if block == DEVICE_OFFSET:
                return self._device_cfg_access(rel, width, value)
            self._bad(f"BAR{bar} offset {off:#x} is in no register block")
            return 0
        if self.legacy_bar is not None and bar == LEGACY_BAR:
            return self._legacy_access(off, width, value)
        self._bad(f"access to BAR{bar}")
        return 0

    def _table_access(self, block: str, table: dict[int, Reg], off: int, width: int,
                      value: int | None) -> int:
        reg = table.get(off)
        if reg is None:
            self._bad(f"{block} {'read' if value is None else 'write'} at unknown offset {off:#x}")
            return 0
        if width != reg.width:
            self._bad(f"{block} {reg.name}: {width}-byte access to a {reg.width}-byte field")
            return 0
        if value is None:
            return reg.get() & ((1 << (8 * width)) - 1)
        if reg.set is None:
            self._bad(f"{block} {reg.name}: write to a read-only field")
            return 0
        reg.set(value)
        return 0

    def _bad(self, what: str) -> None:
        """Count and log a refused access: each distinct reason on its 1st, 2nd, 4th, 8th...
        occurrence, so a looping guest cannot flood the log (at most 256 reasons tracked)."""
        n = self.counters["bad_accesses"] = self.counters["bad_accesses"] + 1
        seen = self._bad_seen
        k = seen.get(what, 0) + 1
        if len(seen) < 256 or what in seen:
            seen[what] = k
        else:
            k = n
        if k & (k - 1) == 0:
            log.warning("virtio-pci: %s (read as zero; %d bad accesses so far)", what, n)

    def _use_interface(self, legacy: bool, rel: int) -> None:
        """Pick the modern or legacy interface of a transitional device (module docstring)."""
        if not self.transitional or self.device.legacy == legacy or self.device.status:
            return
        if legacy or rel in (spec.VIRTIO_PCI_COMMON_STATUS, spec.VIRTIO_PCI_COMMON_DFSELECT,
                             spec.VIRTIO_PCI_COMMON_DF, spec.VIRTIO_PCI_COMMON_GFSELECT,
                             spec.VIRTIO_PCI_COMMON_GF):
            log.info("virtio-pci: driver uses the %s interface", "legacy" if legacy else "modern")
            self.device.legacy = legacy

    # -- common configuration (§4.1.4.3) -----------------------------------------------------
    def _qcfg(self) -> Any:
        sel = self.queue_select
        if 0 <= sel < self.device.num_queues:
            return self.device.queue_config[sel]
        return None

    # -- common configuration registers (§4.1.4.3) -------------------------------------------
    def _q_get(self, attr: str, shift: int = 0) -> Callable[[], int]:
        def get() -> int:
            q = self._qcfg()
            return (getattr(q, attr) >> shift) & 0xFFFFFFFF if q is not None else 0
        return get

    def _q_addr_set(self, attr: str, hi: bool) -> Callable[[int], None]:
        def set_(v: int) -> None:
            q = self._qcfg()
            if q is None:
                self._bad(f"queue address write for queue {self.queue_select}")
                return
            cur = getattr(q, attr)
            new = (cur & 0xFFFFFFFF) | (v << 32) if hi else (cur & ~0xFFFFFFFF) | v
            addrs = {"desc": q.desc, "driver": q.driver, "device": q.device, attr: new}
            self.device.set_queue_addresses(q.index, addrs["desc"], addrs["driver"],
                                            addrs["device"])
        return set_

    def _ignore(self, name: str) -> Callable[[int], None]:
        def set_(v: int) -> None:
            if v not in (0, spec.VIRTIO_MSI_NO_VECTOR):
                self._bad(f"{name} write of {v:#x} (not supported)")
        return set_

    def _set_dfselect(self, v: int) -> None:
        self.dfselect = v

    def _set_gfselect(self, v: int) -> None:
        self.gfselect = v

    def _get_df(self) -> int:
        return (self.device.offered_features >> (32 * self.dfselect)) & 0xFFFFFFFF \
            if self.dfselect < 2 else 0

    def _get_gf(self) -> int:
        return (self.device.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF \
            if self.gfselect < 2 else 0

    def _set_gf(self, v: int) -> None:
        if self.gfselect >= 2:
            if v:
                self._bad(f"driver_feature word {self.gfselect} = {v:#x}")
            return
        d, sh = self.device, 32 * self.gfselect
        d.set_driver_features((d.driver_features & ~(0xFFFFFFFF << sh)) | (v << sh))

    def _set_status(self, v: int) -> None:
        self.device.write_status(v)
        if v == 0:
            self._transport_reset()

    def _set_qsel(self, v: int) -> None:
        self.queue_select = v

    def _set_qsize(self, v: int) -> None:
        if self._qcfg() is None:
            self._bad(f"queue_size write for queue {self.queue_select}")
            return
        self.device.set_queue_size(self.queue_select, v)

    def _set_qenable(self, v: int) -> None:
        if self._qcfg() is None:
            self._bad(f"queue_enable for queue {self.queue_select}")
            return
        if v != 1:
            self._bad(f"queue_enable write of {v} (only 1 is allowed, §4.1.4.3.2)")
            return
        self.device.set_queue_ready(self.queue_select, True)

    def _common_table(self) -> dict[int, Reg]:
        d = self.device
        q_get, q_addr_set, ignore = self._q_get, self._q_addr_set, self._ignore
        set_dfselect, set_gfselect, get_df = self._set_dfselect, self._set_gfselect, self._get_df
        get_gf, set_gf, set_status = self._get_gf, self._set_gf, self._set_status
        set_qsel, set_qsize, set_qenable = self._set_qsel, self._set_qsize, self._set_qenable
        C = spec
        return {
            C.VIRTIO_PCI_COMMON_DFSELECT: Reg("device_feature_select", 4, lambda: self.dfselect,
                                              set_dfselect),
            C.VIRTIO_PCI_COMMON_DF: Reg("device_feature", 4, get_df),
            C.VIRTIO_PCI_COMMON_GFSELECT: Reg("driver_feature_select", 4, lambda: self.gfselect,
                                              set_gfselect),
            C.VIRTIO_PCI_COMMON_GF: Reg("driver_feature", 4, get_gf, set_gf),
            # No MSI-X capability: vectors read VIRTIO_MSI_NO_VECTOR (a vector write "fails").
            C.VIRTIO_PCI_COMMON_MSIX: Reg("config_msix_vector", 2,
                                          lambda: C.VIRTIO_MSI_NO_VECTOR,
                                          ignore("config_msix_vector")),
            C.VIRTIO_PCI_COMMON_NUMQ: Reg("num_queues", 2, lambda: d.num_queues),
            C.VIRTIO_PCI_COMMON_STATUS: Reg("device_status", 1, d.read_status, set_status),
            C.VIRTIO_PCI_COMMON_CFGGENERATION: Reg("config_generation", 1,
                                                   lambda: d.config_generation),
            C.VIRTIO_PCI_COMMON_Q_SELECT: Reg("queue_select", 2, lambda: self.queue_select,
                                              set_qsel),
            C.VIRTIO_PCI_COMMON_Q_SIZE: Reg("queue_size", 2, q_get("size"), set_qsize),
            C.VIRTIO_PCI_COMMON_Q_MSIX: Reg("queue_msix_vector", 2,
                                            lambda: C.VIRTIO_MSI_NO_VECTOR,
                                            ignore("queue_msix_vector")),
            C.VIRTIO_PCI_COMMON_Q_ENABLE: Reg("queue_enable", 2,
                                              lambda: int(bool(getattr(self._qcfg(), "ready",
                                                                       False))),
                                              set_qenable),
            C.VIRTIO_PCI_COMMON_Q_NOFF: Reg("queue_notify_off", 2,
                                            lambda: self.queue_select
                                            if self._qcfg() is not None else 0),
            C.VIRTIO_PCI_COMMON_Q_DESCLO: Reg("queue_desc_lo", 4, q_get("desc"),
                                              q_addr_set("desc", False)),
            C.VIRTIO_PCI_COMMON_Q_DESCHI: Reg("queue_desc_hi", 4, q_get("desc", 32),
                                              q_addr_set("desc", True)),
            C.VIRTIO_PCI_COMMON_Q_AVAILLO: Reg("queue_driver_lo", 4, q_get("driver"),
                                               q_addr_set("driver", False)),
            C.VIRTIO_PCI_COMMON_Q_AVAILHI: Reg("queue_driver_hi", 4, q_get("driver", 32),
                                               q_addr_set("driver", True)),
            C.VIRTIO_PCI_COMMON_Q_USEDLO: Reg("queue_device_lo", 4, q_get("device"),
                                              q_addr_set("device", False)),
            C.VIRTIO_PCI_COMMON_Q_USEDHI: Reg("queue_device_hi", 4, q_get("device", 32),
                                              q_addr_set("device", True)),
            C.VIRTIO_PCI_COMMON_Q_NDATA: Reg("queue_notif_config_data", 2, lambda: 0),
            C.VIRTIO_PCI_COMMON_Q_RESET: Reg("queue_reset", 2, lambda: 0, ignore("queue_reset")),
        }

    # -- notifications (§4.1.4.4) ------------------------------------------------------------
    def _notify_access(self, rel: int, width: int, value: int | None) -> int:
        if value is None:
            self._bad(f"read of notify area at {rel:#x}")
            return 0
        index, rem = divmod(rel, NOTIFY_OFF_MULTIPLIER)
        if rem or width not in (2, 4) or index >= self.device.num_queues:
            self._bad(f"notify write {width}@{rel:#x}")
            return 0
        self._kick(index)
        return 0

    def _kick(self, index: int) -> None:
        self.counters["notifies"] += 1
        if _trace.TRACE is not None:
            _trace.TRACE.emit("kick", "kick", q=index)
        if self.defer_notify:
            if index not in self.pending:
                self.pending.append(index)
        else:
            self.device.notify(index)

    def flush(self) -> None:
        """Run deferred notifications (the host calls this after answering the access)."""
        while self.pending:
            self.device.notify(self.pending.pop(0))

    # -- ISR (§4.1.4.5) ----------------------------------------------------------------------
    def _isr_access(self, rel: int, width: int, value: int | None) -> int:
        if rel != 0 or width != 1 or value is not None:
            self._bad(f"ISR {'read' if value is None else 'write'} {width}@{rel:#x}")
            return 0
        return self.read_isr()

    def read_isr(self) -> int:
        """Return and clear the ISR; the line goes low before the read completes."""
        v = self.isr
        self.isr = 0
        self.counters["isr_reads"] += 1
        if not v:
            self.counters["isr_zero_reads"] += 1  # shared or spurious interrupt
        self._drive_line()
        return v

    # -- InterruptSink (virtio.device) -------------------------------------------------------
    def queue(self, index: int) -> None:
        self.isr |= spec.VIRTIO_PCI_ISR_QUEUE
        self._drive_line()
        if _trace.TRACE is not None:
            _trace.TRACE.emit("irq", "irq", q=index, kind="intx", level=int(self.level))

    def config(self) -> None:  # type: ignore[override]
        self.isr |= spec.VIRTIO_PCI_ISR_CONFIG
        self._drive_line()
        if _trace.TRACE is not None:
            _trace.TRACE.emit("irq", "irq", q=-1, kind="intx", level=int(self.level))

    def _drive_line(self) -> None:
        want = bool(self.isr) and not self.pci.command & PCI_COMMAND_INTX_DISABLE
        self.pci.set_interrupt_status(bool(self.isr))
        if want != self.level:
            self.level = want
            if want:
                self.counters["raises"] += 1
            self.intx.set_level(want)

    # -- device configuration (§4.1.4.6) -----------------------------------------------------
    def _device_cfg_access(self, rel: int, width: int, value: int | None) -> int:
        if value is None:
            if width not in (1, 2, 4) or rel + width > len(self.device.config):
                self._bad(f"device config read {width}@{rel:#x}")
                return 0
            return self.device.config_read(rel, width)
        if width not in (1, 2, 4):
            self._bad(f"device config write {width}@{rel:#x}")
            return 0
        self.device.config_write(rel, width, value)
        return 0

    # -- legacy I/O BAR (§4.1.4.8) -----------------------------------------------------------
    def _legacy_table(self) -> dict[int, Reg]:
        d = self.device
        L = spec

        def lq() -> Any:
            sel = self.legacy_queue_select
            return d.queue_config[sel] if 0 <= sel < d.num_queues else None

        def set_gf(v: int) -> None:
            d.set_driver_features(v)

        def get_pfn() -> int:
            q = lq()
            return q.desc >> L.VIRTIO_PCI_QUEUE_ADDR_SHIFT if q is not None and q.ready else 0

        def set_pfn(v: int) -> None:
            q = lq()
            if q is None:
                self._bad(f"legacy QUEUE_PFN for queue {self.legacy_queue_select}")
                return
            if v == 0:
                # Legacy drivers release a queue by writing 0 (only while not running).
                d.set_queue_ready(q.index, False)
                return
            desc = v << L.VIRTIO_PCI_QUEUE_ADDR_SHIFT
            size = q.max_size  # legacy queue size is fixed: QUEUE_NUM is read-only
            avail = desc + 16 * size
            used = (avail + 6 + 2 * size + L.VIRTIO_PCI_VRING_ALIGN - 1) & ~(
                L.VIRTIO_PCI_VRING_ALIGN - 1)
            if d.set_queue_addresses(q.index, desc, avail, used):
                d.set_queue_ready(q.index, True)

        def set_sel(v: int) -> None:
            self.legacy_queue_select = v

        def set_notify(v: int) -> None:
            if v >= d.num_queues:
                self._bad(f"legacy QUEUE_NOTIFY of queue {v}")
                return
            self._kick(v)

        def set_status(v: int) -> None:
            d.write_status(v)
            if v == 0:
                self._transport_reset()

        return {
            L.VIRTIO_PCI_HOST_FEATURES: Reg("HOST_FEATURES", 4,
                                            lambda: d.offered_features & 0xFFFFFFFF),
            L.VIRTIO_PCI_GUEST_FEATURES: Reg("GUEST_FEATURES", 4,
                                             lambda: d.driver_features & 0xFFFFFFFF, set_gf),
            L.VIRTIO_PCI_QUEUE_PFN: Reg("QUEUE_PFN", 4, get_pfn, set_pfn),
            L.VIRTIO_PCI_QUEUE_NUM: Reg("QUEUE_NUM", 2,
                                        lambda: q.max_size if (q := lq()) is not None else 0),
            L.VIRTIO_PCI_QUEUE_SEL: Reg("QUEUE_SEL", 2, lambda: self.legacy_queue_select,
                                        set_sel),
            L.VIRTIO_PCI_QUEUE_NOTIFY: Reg("QUEUE_NOTIFY", 2, lambda: 0, set_notify),
            L.VIRTIO_PCI_STATUS: Reg("STATUS", 1, d.read_status, set_status),
            L.VIRTIO_PCI_ISR: Reg("ISR", 1, self.read_isr),
        }

    def _legacy_access(self, off: int, width: int, value: int | None) -> int:
        if off < spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX:
            if off in (spec.VIRTIO_PCI_HOST_FEATURES, spec.VIRTIO_PCI_GUEST_FEATURES,
                       spec.VIRTIO_PCI_STATUS):
                self._use_interface(legacy=True, rel=off)
            return self._table_access("legacy", self._legacy, off, width, value)
        return self._device_cfg_access(off - spec.VIRTIO_PCI_CONFIG_OFF_NOMSIX, width, value)

    # -- resets ------------------------------------------------------------------------------
    def _transport_reset(self) -> None:
        """Device status 0 (§4.1.4.3.1): selectors back to 0, ISR cleared, line lowered."""
        self.queue_select = self.dfselect = self.gfselect = self.legacy_queue_select = 0
        self.pending.clear()
        self.isr = 0
        self._drive_line()

    def reset(self) -> None:
        """PCI function reset (the proxy's DEVICE_RESET, a system reset): device and BARs."""
        self.device.reset()
        self._transport_reset()
        for bar in self.pci.bars.values():
            self.pci.write(0x10 + 4 * bar.index, 4, 0)
        self.pci.write(PCI_COMMAND, 2, 0)
        self.pci.write(0x3C, 1, 0)

    # -- memory (from the host) --------------------------------------------------------------
    def release_memory_views(self) -> None:
        """Guest RAM is about to be remapped: drop every cached view into it."""
        for ring in self.device.queues:
            if ring is not None and hasattr(ring, "release_views"):
                ring.release_views()
        hook = getattr(self.device, "release_memory_views", None)
        if callable(hook):
            hook()

    def set_memory(self, mem: Any) -> None:
        self.device.attach(mem)

    def stats(self) -> dict[str, Any]:
        return {"transport": "virtio-pci", "transitional": self.transitional,
                "interrupt_line": self.pci.interrupt_line, "isr": self.isr,
                "level": self.level, **self.counters}
