"""``VirtioDevice``: the transport-agnostic device model (status, features, config, queues).

Theory of operation
-------------------
A virtio device (virtio 1.2 §2 "Basic Facilities of a Virtio Device") is driven through a small
set of operations that every transport maps its registers onto: PCI's common config (§4.1.4.3)
and legacy I/O BAR (§4.1.4.8), vhost-user messages, the multi-process PCI proxy. This class owns
the state those operations change, and nothing transport-specific (no select registers, no ISR,
no MSI-X vectors):

- **Device status** (§2.1, §3.1.1). The driver walks ACKNOWLEDGE -> DRIVER -> FEATURES_OK ->
  DRIVER_OK, each write keeping the earlier bits; FAILED may be added at any time; writing 0
  resets. NEEDS_RESET is set by the device only. The allowed steps are the table
  ``VALID_TRANSITIONS`` (plus ``LEGACY_TRANSITIONS`` for pre-1.0 drivers, which have no
  FEATURES_OK); any other write is refused: logged, counted, status unchanged.
- **Features** (§2.2). ``offered_features`` = ``device_features()`` (the subclass) + VERSION_1 +
  EVENT_IDX / INDIRECT_DESC / RING_PACKED per options; in legacy mode only the low 32 bits and no
  VERSION_1. Setting FEATURES_OK validates the driver's word (subset of offered, VERSION_1 for a
  modern driver, then ``validate_features`` of the subclass); on failure FEATURES_OK stays clear
  so the driver's re-read sees it (§3.1.1 step 6). Feature writes after FEATURES_OK are refused.
- **Which register is writable in which status** is data too: ``WRITABLE_IN_STATUS``.
- **Queues**. Per-queue configuration (``QueueConfig``: size <= max, addresses, ready) is
  collected before DRIVER_OK. At DRIVER_OK ``activate(mem, interrupt)`` builds one ring per ready
  queue (``SplitQueue``, or ``PackedQueue`` when RING_PACKED was negotiated), validates it, and
  calls ``on_activate``. A notification (``notify(i)``) before DRIVER_OK is refused for a modern
  driver; for a legacy one (which may kick early, §2.1.4 legacy note) it is deferred until
  activation.
- **Guest faults never escape.** ``notify`` runs ``process_queue`` and turns any ``DriverError``
  or ``GuestMemoryError`` into ``needs_reset(reason)``: NEEDS_RESET is set, one log line, a
  counter, and a configuration-change interrupt (§2.1.2: the device MUST notify when it sets
  NEEDS_RESET after DRIVER_OK). Queues then stay idle until the driver resets the device.
- **Config space** (§2.5): ``config`` is the subclass' bytearray; reads out of range return 0
  with a warning; ``config_changed()`` bumps ``config_generation`` and raises a config interrupt.

Subclasses (virtio-net) override: ``device_features``, ``build_config``, ``validate_features``,
``on_activate``, ``on_reset``, ``config_write_hook``, ``process_queue``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from virtwire import trace as _trace
from virtwire.memory import GuestMemory, GuestMemoryError
from virtwire.virtio.counters import QueueCounters
from virtwire.virtio.errors import DriverError, FeatureError, StatusError
from virtwire.virtio.spec import (
    STATUS_NAMES,
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    feature_names,
)
from virtwire.virtio.split_ring import SPLIT_MAX_SIZE, SplitQueue
from virtwire.virtio.traced_queue import wrap_queue

__all__ = [
    "InterruptSink",
    "QueueConfig",
    "VirtioDevice",
    "VALID_TRANSITIONS",
    "LEGACY_TRANSITIONS",
    "WRITABLE_IN_STATUS",
    "status_str",
    "check_transition",
    "NullInterrupt",
    "LEGACY_WRITABLE_IN_STATUS",
]

log = logging.getLogger(__name__)

ACK = VIRTIO_CONFIG_S_ACKNOWLEDGE
DRV = VIRTIO_CONFIG_S_DRIVER
FOK = VIRTIO_CONFIG_S_FEATURES_OK
DOK = VIRTIO_CONFIG_S_DRIVER_OK
NEEDS_RESET = VIRTIO_CONFIG_S_NEEDS_RESET
FAILED = VIRTIO_CONFIG_S_FAILED

# §2.1 / §3.1.1: current progress bits -> the progress bits a driver write may set. FAILED and
# NEEDS_RESET are not progress bits (handled beside the table); writing 0 resets from anywhere.
VALID_TRANSITIONS: dict[int, frozenset[int]] = {
    0: frozenset({0, ACK}),
    ACK: frozenset({ACK, ACK | DRV}),
    ACK | DRV: frozenset({ACK | DRV, ACK | DRV | FOK}),
    ACK | DRV | FOK: frozenset({ACK | DRV | FOK, ACK | DRV | FOK | DOK}),
    ACK | DRV | FOK | DOK: frozenset({ACK | DRV | FOK | DOK}),
}
# §3.1.2 Legacy Interface: Device Initialization -- no FEATURES_OK step.
LEGACY_TRANSITIONS: dict[int, frozenset[int]] = {
    **VALID_TRANSITIONS,
    ACK | DRV: VALID_TRANSITIONS[ACK | DRV] | {ACK | DRV | DOK},
    ACK | DRV | DOK: frozenset({ACK | DRV | DOK}),
}
_PROGRESS = ACK | DRV | FOK | DOK

# Register (operation) -> (status bits required, status bits forbidden), modern then legacy.
# §3.1.1: features are written after DRIVER and before FEATURES_OK; queues are configured
# before DRIVER_OK; notifications need DRIVER_OK; nothing but reset while NEEDS_RESET/FAILED
# (except reads). Per-queue "not while the queue is enabled" is checked in the setters.
WRITABLE_IN_STATUS: dict[str, tuple[int, int]] = {
    "driver_features": (0, FOK | DOK | FAILED),
    "queue_config": (0, DOK | FAILED),
    "queue_enable": (0, DOK | FAILED),
    "queue_notify": (DOK, NEEDS_RESET | FAILED),
    "config_write": (0, FAILED),
}
LEGACY_WRITABLE_IN_STATUS: dict[str, tuple[int, int]] = {
    **WRITABLE_IN_STATUS,
    "driver_features": (0, DOK | FAILED),
    "queue_notify": (0, NEEDS_RESET | FAILED),
}


def status_str(status: int) -> str:
    """``ACKNOWLEDGE|DRIVER|...`` for a status byte (``RESET`` for 0)."""
    if not status:
        return "RESET"
    names = [n for b, n in sorted(STATUS_NAMES.items()) if status & b]
    rest = status & ~sum(STATUS_NAMES)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def render_tables() -> str:
    """The status machine and the register table as Markdown (for docs, like h11's); status
    bits are joined with ``+`` so they do not split table cells."""

    def st(v: int) -> str:
        return status_str(v).replace("|", "+")

    lines = ["| status | driver may write |", "|---|---|"]
    for cur, nxt in VALID_TRANSITIONS.items():
        extra = LEGACY_TRANSITIONS.get(cur, frozenset()) - nxt
        cell = ", ".join(st(n) for n in sorted(nxt))
        if extra:
            cell += " (legacy also: " + ", ".join(st(n) for n in sorted(extra)) + ")"
        lines.append(f"| {st(cur)} | {cell} |")
    lines.append("")
    lines += ["| operation | status bits required | status bits forbidden |", "|---|---|---|"]
    for reg, (req, forbid) in WRITABLE_IN_STATUS.items():
        lines.append(f"| {reg} | {st(req) if req else '-'} | {st(forbid)} |")
    return "\n".join(lines) + "\n"


def check_transition(old: int, new: int, legacy: bool = False) -> None:
    """Raise ``StatusError`` unless a driver may write ``new`` while status is ``old``."""
    if new == 0:
        return
    if new & ~(_PROGRESS | FAILED | NEEDS_RESET) & 0xFF or new > 0xFF:
        raise StatusError(f"status {new:#x} has undefined bits")
    if new & NEEDS_RESET and not old & NEEDS_RESET:
        raise StatusError("the driver may not set NEEDS_RESET")
    if old & FAILED and not new & FAILED:
        raise StatusError("FAILED can only be cleared by reset")
    table = LEGACY_TRANSITIONS if legacy else VALID_TRANSITIONS
    allowed = table.get(old & _PROGRESS)
    if allowed is None or new & _PROGRESS not in allowed:
        if new & FAILED and (new & _PROGRESS) == (old & _PROGRESS):
            return
        raise StatusError(f"status {status_str(old)} -> {status_str(new)} is not allowed")


class InterruptSink(Protocol):
    """Where a device's interrupts go (PCI: ISR + INTx/MSI-X; vhost-user: the call eventfd)."""

    def queue(self, index: int) -> None:
        """A used-buffer notification for queue ``index``."""

    def config(self) -> None:
        """A configuration-change notification."""


class NullInterrupt:
    """An ``InterruptSink`` that drops everything (before a transport attaches one)."""

    def queue(self, index: int) -> None:
        pass

    def config(self) -> None:
        pass


@dataclass
class QueueConfig:
    """One queue's configuration as the driver programs it (before activation)."""

    index: int
    max_size: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    ready: bool = False
    base: int | None = None  # vhost-user SET_VRING_BASE, applied at activation
    extra: dict[str, Any] = field(default_factory=dict)  # transport-owned (msix vector, ...)

    def reset(self) -> None:
        self.size = self.max_size
        self.desc = self.driver = self.device = 0
        self.ready = False
        self.base = None
        self.extra.clear()


class VirtioDevice:
    """Transport-agnostic virtio device state (see module docstring).

    ``queue_sizes`` gives each queue's maximum size; ``legacy`` selects pre-1.0 semantics (the
    transport sets it when the driver uses the legacy interface of a transitional device).
    """

    device_id: int = 0

    def __init__(
        self,
        queue_sizes: list[int] | tuple[int, ...],
        *,
        event_idx: bool = True,
        indirect: bool = True,
        packed: bool = False,
        legacy: bool = False,
        name: str | None = None,
    ) -> None:
        for s in queue_sizes:
            if not 1 <= s <= SPLIT_MAX_SIZE:
                raise ValueError(f"queue max size {s} not in 1..{SPLIT_MAX_SIZE}")
        self.name = name or type(self).__name__
        self.offer_event_idx = event_idx
        self.offer_indirect = indirect
        self.offer_packed = packed
        self.legacy = legacy
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0  # the accepted driver features (valid once FEATURES_OK is set)
        self.queue_config = [QueueConfig(i, s, size=s) for i, s in enumerate(queue_sizes)]
        self.queues: list[Any | None] = [None] * len(queue_sizes)
        self.mem: GuestMemory | None = None
        self.interrupt: InterruptSink = NullInterrupt()
        self.config = bytearray(self.build_config())
        self.config_generation = 0
        self.counters = [self.new_queue_counters(i) for i in range(len(queue_sizes))]
        self.device_counters: dict[str, int] = {
            "status_errors": 0,
            "feature_errors": 0,
            "needs_reset": 0,
            "config_interrupts": 0,
            "refused_writes": 0,
            "resets": 0,
        }
        self.last_error: str | None = None
        self._deferred_kicks: set[int] = set()

    # -- subclass hooks ----------------------------------------------------------------------
    def device_features(self) -> int:
        """Device-type feature bits (virtio-net overrides)."""
        return 0

    def build_config(self) -> bytes:
        """Initial device-specific configuration space (§2.5)."""
        return b""

    def validate_features(self, features: int) -> None:
        """Device-specific dependency checks; raise ``FeatureError`` (e.g. §5.1.3.1)."""

    def on_activate(self) -> None:
        """Called after the queues are built at DRIVER_OK."""

    def on_reset(self) -> None:
        """Called after a device reset (drop backend state)."""

    def config_write_hook(self, offset: int, data: bytes) -> bool:
        """A driver write into config space; return True if accepted (default: read-only)."""
        return False

    def process_queue(self, index: int) -> None:
        """Serve queue ``index`` after a notification (pop, handle, push, publish, interrupt).

        May raise ``DriverError``/``GuestMemoryError``: ``notify`` turns them into NEEDS_RESET.
        """
        log.warning("%s: no handler for queue %d", self.name, index)

    # -- attachments -------------------------------------------------------------------------
    def attach(self, mem: GuestMemory, interrupt: InterruptSink | None = None) -> None:
        """Give the device its guest memory and interrupt sink (the host does this)."""
        self.mem = mem
        if interrupt is not None:
            self.interrupt = interrupt

    @property
    def num_queues(self) -> int:
        return len(self.queue_config)

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    # -- features (§2.2) ---------------------------------------------------------------------
    @property
    def offered_features(self) -> int:
        f = self.device_features()
        if self.offer_event_idx:
            f |= 1 << VIRTIO_F_EVENT_IDX
        if self.offer_indirect:
            f |= 1 << VIRTIO_F_INDIRECT_DESC
        if self.legacy:
            return f & 0xFFFFFFFF
        f |= 1 << VIRTIO_F_VERSION_1
        if self.offer_packed:
            f |= 1 << VIRTIO_F_RING_PACKED
        return f

    def _writable(self, register: str) -> bool:
        table = LEGACY_WRITABLE_IN_STATUS if self.legacy else WRITABLE_IN_STATUS
        req, forbid = table[register]
        return (self.status & req) == req and not self.status & forbid

    def _refuse(self, what: str) -> None:
        n = self.device_counters["refused_writes"] = self.device_counters["refused_writes"] + 1
        self.last_error = f"{what} refused in status {status_str(self.status)}"
        # Rate-limited: a looping guest must not flood the log (1st, 2nd, 4th, 8th, ...).
        if n & (n - 1) == 0:
            log.warning("%s: %s (%d refused so far)", self.name, self.last_error, n)

    def set_driver_features(self, bits: int) -> bool:
        """The driver's feature word (whole 64 bits; transports assemble select/window words).

        Refused (logged, counted, returns False) after FEATURES_OK (§2.2.2: the driver MUST NOT
        change features after FEATURES_OK) or in the wrong status.
        """
        bits &= (1 << 64) - 1
        if self.legacy:
            bits &= 0xFFFFFFFF
        if not self._writable("driver_features"):
            if bits != self.driver_features:
                self.device_counters["feature_errors"] += 1
                self._refuse(f"feature change to {bits:#x}")
            return bits == self.driver_features
        self.driver_features = bits
        if _trace.TRACE is not None:  # the offer it answered, then the answer (conform.drivers)
            _trace.features_event("offer", self.offered_features)
            _trace.features_event("ack", bits)
        if self.legacy:
            # §3.1.2 legacy: no FEATURES_OK; the features are in force as written.
            self.negotiated = bits & self.offered_features
        return True

    def check_features(self, bits: int) -> None:
        """Raise ``FeatureError`` unless ``bits`` is acceptable at FEATURES_OK."""
        extra = bits & ~self.offered_features
        if extra:
            raise FeatureError(f"driver accepted features not offered: {feature_names(extra)}")
        if not self.legacy and not bits >> VIRTIO_F_VERSION_1 & 1:
            raise FeatureError("a modern driver must accept VIRTIO_F_VERSION_1")
        self.validate_features(bits)

    # -- status (§2.1) -----------------------------------------------------------------------
    def read_status(self) -> int:
        return self.status

    def write_status(self, value: int) -> bool:
        """A driver write of the device status byte; returns True if it took effect."""
        value &= 0xFF
        if value == 0:
            if _trace.TRACE is not None:
                _trace.status_change(self.status, 0)
            self.reset()
            return True
        old = self.status
        try:
            check_transition(old, value, self.legacy)
        except StatusError as e:
            self.device_counters["status_errors"] += 1
            self.last_error = str(e)
            log.warning("%s: %s", self.name, e)
            if _trace.TRACE is not None:  # driver conformance records refusals (conform.drivers)
                _trace.TRACE.emit("status", "refused", old=old, new=value, reason=str(e))
            return False
        if value & FOK and not old & FOK:
            try:
                self.check_features(self.driver_features)
            except FeatureError as e:
                # §3.1.1 step 6: FEATURES_OK stays clear; the driver re-reads and gives up.
                self.device_counters["feature_errors"] += 1
                self.last_error = str(e)
                log.warning("%s: FEATURES_OK refused: %s", self.name, e)
                if _trace.TRACE is not None:
                    _trace.TRACE.emit("feature", "refused", reason=str(e))
                self.status = (value & ~FOK) | (old & NEEDS_RESET)
                return False
            self.negotiated = self.driver_features
            if _trace.TRACE is not None:
                _trace.features_event("negotiated", self.negotiated)
        self.status = value | (old & NEEDS_RESET)
        if _trace.TRACE is not None:
            _trace.status_change(old, self.status)
        if value & DOK and not old & DOK:
            if self.legacy and not old & FOK:
                self.negotiated = self.driver_features & self.offered_features
            self._activate_from_status()
        return True

    def _activate_from_status(self) -> None:
        if self.mem is None:
            log.warning("%s: DRIVER_OK without guest memory attached", self.name)
            return
        self.activate(self.mem, self.interrupt)

    # -- queue configuration -----------------------------------------------------------------
    def _queue_cfg(self, index: int) -> QueueConfig | None:
        if 0 <= index < len(self.queue_config):
            return self.queue_config[index]
        log.warning("%s: access to queue %d of %d", self.name, index, len(self.queue_config))
        return None

    def set_queue_size(self, index: int, size: int) -> bool:
        """Driver writes queue_size (§4.1.4.3): 1..max; a power of 2 for split rings (checked
        again at activation, where the format is known)."""
        q = self._queue_cfg(index)
        if q is None:
            return False
        if not self._writable("queue_config") or q.ready:
            self._refuse(f"queue {index} size write")
            return False
        if not 1 <= size <= q.max_size:
            self._refuse(f"queue {index} size {size} (max {q.max_size})")
            return False
        q.size = size
        return True

    def set_queue_addresses(self, index: int, desc: int, driver: int, device: int) -> bool:
        q = self._queue_cfg(index)
        if q is None:
            return False
        if not self._writable("queue_config") or q.ready:
            self._refuse(f"queue {index} address write")
            return False
        q.desc, q.driver, q.device = desc, driver, device
        return True

    def set_queue_ready(self, index: int, ready: bool = True) -> bool:
        """§4.1.4.3 queue_enable: the driver writes 1 (writing 0 is not allowed for modern
        drivers; legacy writes PFN 0 to release the queue)."""
        q = self._queue_cfg(index)
        if q is None:
            return False
        if not self._writable("queue_enable"):
            self._refuse(f"queue {index} enable")
            return False
        q.ready = bool(ready)
        return True

    def set_queue_base(self, index: int, base: int) -> bool:
        q = self._queue_cfg(index)
        if q is None:
            return False
        q.base = base & 0xFFFF
        ring = self.queues[index]
        if ring is not None:
            try:
                ring.set_base(q.base)
            except DriverError as e:  # e.g. a packed base beyond the ring: the driver's fault
                self.needs_reset(f"queue {index}: base {base:#x} refused: {e}")
                return False
        return True

    def make_queue(self, index: int) -> Any:
        """Build (not validate) the ring object for queue ``index`` from its configuration."""
        q = self.queue_config[index]
        event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
        indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)
        if self.has_feature(VIRTIO_F_RING_PACKED):
            packed = importlib.import_module("virtwire.virtio.packed_ring")
            ring = packed.PackedQueue(q.size, event_idx=event_idx, indirect=indirect)
        else:
            ring = SplitQueue(q.size, max_size=q.max_size, event_idx=event_idx, indirect=indirect)
        ring.set_addresses(q.desc, q.driver, q.device)
        if q.base is not None:
            ring.set_base(q.base)
        ring.ready = q.ready
        return ring

    # -- activation, reset -------------------------------------------------------------------
    def activate(self, mem: GuestMemory, interrupt: InterruptSink | None = None) -> bool:
        """§3.1.1 step 8 (DRIVER_OK): build and validate the rings of ready queues.

        A ring that fails validation marks NEEDS_RESET (returns False)."""
        self.mem = mem
        if interrupt is not None:
            self.interrupt = interrupt
        for i, q in enumerate(self.queue_config):
            if not q.ready:
                self.queues[i] = None
                continue
            try:
                ring = self.make_queue(i)
                ring.validate(mem)
            except (DriverError, GuestMemoryError) as e:
                self.needs_reset(f"queue {i}: {e}")
                return False
            if _trace.TRACE is not None:
                ring = wrap_queue(ring, i)
            self.queues[i] = ring
        self.on_activate()
        deferred, self._deferred_kicks = self._deferred_kicks, set()
        for i in sorted(deferred):
            self.notify(i)
        return True

    @property
    def active(self) -> bool:
        return bool(self.status & DOK) and not self.status & (NEEDS_RESET | FAILED)

    def reset(self) -> None:
        """§2.1 / §4.1.4.3: writing 0 to status resets the device (queues, features, status)."""
        if _trace.TRACE is not None:
            _trace.TRACE.emit("status", "reset")
        self.status = 0
        self.driver_features = 0
        self.negotiated = 0
        for q in self.queue_config:
            q.reset()
        for ring in self.queues:
            if ring is not None:
                ring.reset()
        self.queues = [None] * len(self.queue_config)
        self._deferred_kicks.clear()
        self.device_counters["resets"] += 1
        self.on_reset()

    def needs_reset(self, reason: str) -> None:
        """§2.1.2: enter the error state: set NEEDS_RESET, log, count, config interrupt."""
        self.last_error = reason
        self.device_counters["needs_reset"] += 1
        if _trace.TRACE is not None:
            _trace.TRACE.emit("status", "needs_reset", reason=reason)
        if self.status & NEEDS_RESET:
            log.debug("%s: again needs reset: %s", self.name, reason)
            return
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.status |= NEEDS_RESET
        if self.status & DOK:
            self._config_interrupt()

    def new_queue_counters(self, index: int) -> QueueCounters:
        """The counters record of queue ``index`` (a device type returns its own kind)."""
        return QueueCounters()

    # -- notifications -----------------------------------------------------------------------
    def notify(self, index: int) -> None:
        """The driver's available-buffer notification (kick) for queue ``index``."""
        if not 0 <= index < len(self.queue_config):
            self._refuse(f"notify of queue {index}")
            return
        self.counters[index].kicks += 1
        if not self._writable("queue_notify"):
            self._refuse(f"notify of queue {index}")
            return
        if not self.status & DOK:
            # Legacy drivers may kick before DRIVER_OK: served at activation.
            self._deferred_kicks.add(index)
            return
        if self.queues[index] is None:
            self._refuse(f"notify of queue {index} (not enabled)")
            return
        if not self.active:
            return
        try:  # ``run_guarded`` inline: the kick path is the hot path
            self.process_queue(index)
        except (DriverError, GuestMemoryError) as e:
            self.counters[index].errors += 1
            self.needs_reset(f"queue {index}: {e}")

    def run_guarded(self, index: int, fn: Callable[[int], Any]) -> Any:
        """Run ``fn(index)``; a guest fault becomes NEEDS_RESET (counted), never an exception."""
        if not self.active:
            return None
        try:
            return fn(index)
        except (DriverError, GuestMemoryError) as e:
            self.counters[index].errors += 1
            self.needs_reset(f"queue {index}: {e}")
            return None

    def drain_queue(self, index: int, handler: Callable[[Any], int], batch: int = 256,
                    max_chains: int | None = None) -> int:
        """Generic service loop: pop batches, ``written = handler(chain)``, push, publish once per
        batch, interrupt per §2.7.7; re-enable kicks with the re-check race handled. Returns the
        number of chains served. Raises guest faults (call it from ``process_queue``).

        ``max_chains``: a work budget; once that many were served the loop returns with kicks
        still disabled (the caller arranges to be called again)."""
        ring = self.queues[index]
        mem = self.mem
        if ring is None or mem is None:
            return 0
        total = 0
        ctr = self.counters[index]
        while True:
            ring.disable_notifications(mem)
            while True:
                chains = ring.pop_batch(mem, batch)
                if not chains:
                    break
                for c in chains:
                    ring.push(mem, c, handler(c))
                ring.publish(mem)
                total += len(chains)
                ctr.chains += len(chains)
                self.signal_used(index)
                if max_chains is not None and total >= max_chains:
                    return total
            if not ring.enable_notifications(mem):
                return total

    def signal_used(self, index: int) -> bool:
        """After a publish on queue ``index``: interrupt the driver if §2.7.7/§2.8.10 say so."""
        ring = self.queues[index]
        if ring is None or self.mem is None:
            return False
        if ring.needs_notification(self.mem):
            self.counters[index].interrupts += 1
            self.interrupt.queue(index)
            return True
        if _trace.TRACE is not None:
            _trace.TRACE.emit("irq", "suppressed", q=index)
        return False

    def _config_interrupt(self) -> None:
        self.device_counters["config_interrupts"] += 1
        self.interrupt.config()

    # -- configuration space (§2.5) ----------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        """A little-endian read of 1, 2, 4 or 8 bytes; out of range reads as 0 (logged)."""
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > len(self.config):
            log.warning(
                "%s: config read %d@%#x outside %d bytes", self.name, size, offset, len(self.config)
            )
            return 0
        return int.from_bytes(self.config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> bool:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > len(self.config):
            self._refuse(f"config write {size}@{offset:#x}")
            return False
        if not self._writable("config_write"):
            self._refuse("config write")
            return False
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if not self.config_write_hook(offset, data):
            self._refuse(f"config write {size}@{offset:#x} (read-only)")
            return False
        return True

    def config_changed(self, new_config: bytes | None = None) -> None:
        """The device changed its config space: bump the generation (§2.5.1), notify."""
        if new_config is not None:
            self.config[:] = new_config
        self.config_generation = (self.config_generation + 1) & 0xFF
        if self.status & DOK:
            self._config_interrupt()

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and state as a JSON-ready dict."""
        return {
            "device": self.name,
            "status": status_str(self.status),
            "features": feature_names(self.negotiated),
            "last_error": self.last_error,
            "counters": dict(self.device_counters),
            "queues": [c.as_dict() for c in self.counters],
        }
