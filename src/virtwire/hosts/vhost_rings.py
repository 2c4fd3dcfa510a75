"""The ring and memory state of a vhost-user back end: guest RAM as the front end mapped it, and
each ring as it configured it (size, addresses, base, eventfds), started into a device queue.

``VringTable`` owns both: the memory table (SET_MEM_TABLE, ADD/REM_MEM_REG: regions
reference-counted, since with MQ QEMU adds each region once per queue pair), address
translation (front-end virtual -> guest-physical), and starting/stopping rings -- a started ring
is a ``SplitQueue``/``PackedQueue`` handed to the ``HostedDevice``. The connection and the
messages are ``vhost_user.VhostUserBackend``'s; it tells this table what the front end said.

Restart: see ``vhost_user``'s module docstring; ``packed_position_from_ring`` reads a packed
ring's position back from the descriptor flags.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwire.hosts.vhost_device import HostedDevice, Refused
from virtwire.hosts.vhost_user_proto import MemRegion, MemTable, VringAddr
from virtwire.loop import EventFd, EventLoop, TimerHandle
from virtwire.memory import GuestMemoryError, MmapGuestMemory, RegionMemory
from virtwire.net import native
from virtwire.virtio import spec
from virtwire.virtio.errors import DriverError
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.split_ring import SplitQueue
from virtwire.virtio.traced_queue import wrap_queue

log = logging.getLogger(__name__)

__all__ = ["Vring", "VringTable", "packed_position_from_ring", "MAX_MEM_SLOTS"]

MAX_MEM_SLOTS = 8


@dataclass
class Vring:
    """One ring as the front end configured it, plus our per-ring counters."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: EventFd | None = None
    call: EventFd | None = None
    err: EventFd | None = None
    enabled: bool = False
    started: bool = False
    poll_timer: TimerHandle | None = None
    queue: Any = None
    kicks: int = 0
    interrupts: int = 0
    errors: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            efd = getattr(self, name)
            if efd is not None:
                efd.close()
                setattr(self, name, None)



def packed_position_from_ring(mem: Any, desc: int, n: int) -> int | None:
    """The device's position in a packed ring read back from the descriptor flags, as
    ``idx | wrap << 15`` -- or None when the ring does not say it unambiguously.

    QEMU keeps no used index for a packed ring in shared memory, so after a back-end crash it
    re-sends a stale SET_VRING_BASE. The flags tell the position when every buffer took one slot
    (Linux with INDIRECT_DESC: single-buffer chains, indirect tables for the rest; the caller
    only asks then, and any NEXT flag in the ring answers None): for the device at slot ``p``
    with wrap counter ``W`` (virtio 1.2 §2.8.1), slot ``i`` expects wrap ``e_i = W`` for
    ``i >= p`` and ``!W`` before; each slot is either available for ``e_i`` (AVAIL == e_i != USED)
    or used in the lap before (AVAIL == USED == !e_i), and the available ones run contiguously
    from ``p``. Anything else (multi-slot chains, a ring being written) answers None.
    """
    if n <= 0:
        return None
    avail_bit, used_bit = 1 << 7, 1 << 15
    e: list[int] = []
    avail: list[bool] = []
    for i in range(n):
        f = mem.read_u16(desc + 16 * i + 14)
        if f & spec.VIRTQ_DESC_F_NEXT:
            return None  # multi-slot chains: a used chain's tail looks available
        a, u = int(bool(f & avail_bit)), int(bool(f & used_bit))
        avail.append(a != u)
        e.append(a if a != u else 1 - a)
    changes = [i for i in range(1, n) if e[i] != e[i - 1]]
    if not changes:
        p, w = 0, e[0]
    elif len(changes) == 1 and e[0] != e[changes[0]]:
        p, w = changes[0], e[changes[0]]
    else:
        return None
    order = [avail[(p + k) % n] for k in range(n)]
    first_used = order.index(False) if False in order else n
    if any(order[first_used:]):
        return None  # available slots after used ones: not a single contiguous run
    return p | w << 15




class VringTable:
    """Guest memory and the rings of one vhost-user device (see module docstring).

    ``on_kick(vr)`` is watched on a started ring's kick eventfd, ``service(index)`` runs the ring
    (without a kick fd: polled every millisecond; and once at start), ``notify(vr)`` is the
    device's interrupt request for it."""

    def __init__(self, device: HostedDevice, loop: EventLoop, num: int, *, name: str,
                 max_queue_size: int, on_kick: Callable[[Vring], None],
                 service: Callable[[int], None], notify: Callable[[Vring], None]) -> None:
        self.device = device
        self.loop = loop
        self.name = name
        self.max_queue_size = max_queue_size
        self.vrings = [Vring(i) for i in range(num)]
        self.mem: MmapGuestMemory | None = None
        self.features = 0  # acked virtio features: ring format, EVENT_IDX, INDIRECT_DESC
        self.region_refs: dict[tuple[int, int, int, int], int] = {}
        self.on_kick = on_kick
        self.service = service
        self.notify = notify

    def ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise Refused(f"ring index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    @property
    def packed(self) -> bool:
        return bool(self.features >> spec.VIRTIO_F_RING_PACKED & 1)

    # -- rings ---------------------------------------------------------------------------------
    def _new_queue(self, vr: Vring) -> Any:
        event_idx = bool(self.features >> spec.VIRTIO_F_EVENT_IDX & 1)
        indirect = bool(self.features >> spec.VIRTIO_F_INDIRECT_DESC & 1)
        if self.packed:
            return PackedQueue(vr.num, event_idx=event_idx, indirect=indirect)
        return SplitQueue(vr.num, max_size=self.max_queue_size, event_idx=event_idx,
                          indirect=indirect)

    def translate(self, vr: Vring, mem: RegionMemory | None = None) -> tuple[int, int, int]:
        """Front-end virtual ring addresses -> guest-physical (through userspace_addr), in
        ``mem`` (default: the current table)."""
        mem = mem if mem is not None else self.mem
        assert vr.addr is not None and mem is not None
        n = vr.num
        if self.packed:
            sizes = (16 * n, 4, 4)  # descriptor ring, driver event, device event (§2.8.10)
        else:
            sizes = (16 * n, 6 + 2 * n, 6 + 8 * n)
        a = vr.addr
        try:
            return (
                mem.uva_to_gpa(a.desc_user_addr, sizes[0]),
                mem.uva_to_gpa(a.avail_user_addr, sizes[1]),
                mem.uva_to_gpa(a.used_user_addr, sizes[2]),
            )
        except GuestMemoryError as e:
            raise Refused(f"ring {vr.index}: {e}") from None

    def start(self, vr: Vring) -> None:
        """Start ring ``vr`` if everything it needs is known (called at SET_VRING_KICK)."""
        if vr.started:
            self.stop(vr)
        if self.mem is None:
            raise Refused(f"ring {vr.index}: started before SET_MEM_TABLE")
        if vr.addr is None or vr.num == 0:
            raise Refused(f"ring {vr.index}: started before SET_VRING_NUM/ADDR")
        desc, drv, dev = self.translate(vr)
        q = self._new_queue(vr)
        q.set_addresses(desc, drv, dev)
        try:
            q.validate(self.mem)
        except DriverError as e:
            raise Refused(f"ring {vr.index}: {e}") from None
        self._resume_position(vr, q, desc, dev)
        q.ready = True
        q = wrap_queue(q, vr.index)  # itself unless tracing is on
        vr.queue = q
        vr.started = True
        self.device.queue_started(vr.index, q, self.mem, lambda vr=vr: self.notify(vr))
        self.device.queue_enabled(vr.index, vr.enabled)
        if vr.kick is not None:
            self.loop.add_reader(vr.kick, self.on_kick, vr)
        else:
            vr.poll_timer = self.loop.call_every(0.001, self.service, vr.index)
        log.info("%s: ring %d started (%s, %d entries, base %d, %s)", self.name, vr.index,
                 "packed" if self.packed else "split", vr.num, q.get_base(),
                 "enabled" if vr.enabled else "disabled")
        # Buffers may already be waiting (restart): process once without a kick.
        self.loop.defer(("vring", id(self), vr.index), self.service, vr.index)

    def _resume_position(self, vr: Vring, q: Any, desc: int, dev: int) -> None:
        """Set the ring's start position from the base the front end sent (and, after a back
        end crash, from what the guest can see)."""
        assert self.mem is not None
        try:
            if self.packed:
                # QEMU's packed base: avail (idx | wrap << 15), used the same in bits 16-31.
                q.set_base(vr.base & 0xFFFF)
                if vr.base >> 16:
                    q.set_used_base(vr.base >> 16)
            else:
                q.set_base(vr.base)
        except DriverError as e:
            raise Refused(f"ring {vr.index}: {e}") from None
        if not self.packed:
            # After a back-end crash QEMU restores next-avail from used.idx; keep both in step
            # with what the guest can see (see vhost_user's module docstring, "Restart").
            used_idx = self.mem.read_u16(dev + 2)
            if used_idx != vr.base & 0xFFFF:
                log.info("%s: ring %d: base %d but used.idx %d; resuming from used.idx",
                         self.name, vr.index, vr.base & 0xFFFF, used_idx)
                q.set_base(used_idx)
        elif self.features >> spec.VIRTIO_F_INDIRECT_DESC & 1:
            found = packed_position_from_ring(self.mem, desc, vr.num)
            if found is not None and found != q.get_base():
                log.info("%s: ring %d: base %#x but the ring says %#x; resuming from the ring",
                         self.name, vr.index, q.get_base(), found)
                q.set_base(found)

    def stop(self, vr: Vring) -> None:
        if not vr.started:
            return
        if vr.kick is not None:
            self.loop.remove_reader(vr.kick)
        if vr.poll_timer is not None:
            vr.poll_timer.cancel()
            vr.poll_timer = None
        try:
            self.device.queue_stopped(vr.index)
        except Exception:
            log.exception("%s: device failed to stop ring %d", self.name, vr.index)
        if vr.queue is not None:
            q = vr.queue
            vr.base = q.get_vring_base32() if hasattr(q, "get_vring_base32") else q.get_base()
            q.release_views()
        vr.started = False

    # -- memory ----------------------------------------------------------------------------------
    def release_views(self) -> None:
        """Before any mapping changes: no ring view may point into memory about to go."""
        for vr in self.vrings:
            if vr.queue is not None:
                vr.queue.release_views()

    def memory_updated(self) -> None:
        """After the table changed: the device and every running ring follow it (same uvas)."""
        assert self.mem is not None
        self.device.memory_changed(self.mem)
        for vr in self.vrings:
            if vr.started:
                try:
                    vr.queue.set_addresses(*self.translate(vr))
                    vr.queue.validate(self.mem)
                except (Refused, DriverError) as e:
                    log.warning("%s: ring %d stopped: %s after a memory table change",
                                self.name, vr.index, e)
                    self.stop(vr)

    def _check(self, mem: RegionMemory) -> None:
        """Refuse a new table unless every running ring and every buffer the device holds
        (stashed RX chains, pending TX frames) still lies in it: a table change is all or
        nothing (issue 14, defect 7)."""
        for vr in self.vrings:
            if vr.started:
                q = self._new_queue(vr)
                q.set_addresses(*self.translate(vr, mem))
                try:
                    q.validate(mem)
                except DriverError as e:
                    raise Refused(f"ring {vr.index} would not fit the new table: {e}") from None
        check = getattr(self.device, "check_memory", None)
        if check is not None:
            try:
                check(mem)
            except (GuestMemoryError, DriverError) as e:
                raise Refused(f"buffers the device holds would not fit the new table: {e}") \
                    from None

    @staticmethod
    def new_memory() -> MmapGuestMemory:
        """A peer's memory: sealed or guarded fds only (``MmapGuestMemory``, untrusted)."""
        return MmapGuestMemory(untrusted=True, guard=native.sigbus_guard())

    @staticmethod
    def _map(mem: MmapGuestMemory, r: MemRegion) -> None:
        try:
            mem.map_fd(r.fd, r.guest_phys_addr, r.memory_size, r.mmap_offset, r.userspace_addr)
        except GuestMemoryError as e:
            raise Refused(str(e)) from None

    @staticmethod
    def region_key(r: MemRegion) -> tuple[int, int, int, int]:
        return (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)

    def set_table(self, table: MemTable) -> None:
        new = self.new_memory()
        try:
            for r in table.regions:
                self._map(new, r)  # mmap keeps its own reference; our fds close afterwards
            self._check(new)
        except Refused:
            new.close()
            raise
        self.release_views()
        self.region_refs = {self.region_key(r): 1 for r in table.regions}
        old, self.mem = self.mem, new
        if old is not None:
            old.close()
        self.memory_updated()
        log.info("%s: memory table: %s", self.name, ", ".join(
            f"{r.guest_phys_addr:#x}+{r.memory_size:#x}@uva {r.userspace_addr:#x}"
            for r in table.regions))

    def add_region(self, r: MemRegion) -> None:
        # With MQ, QEMU runs one vhost device per queue pair over this one socket, and each
        # adds every region it knows: the same region arrives once per pair. Regions are
        # reference-counted; an identical one is a no-op, an overlapping different one refused.
        key = self.region_key(r)
        if key in self.region_refs:
            self.region_refs[key] += 1
            return
        if self.mem is None:
            self.mem = self.new_memory()
        if len(self.mem.regions) >= MAX_MEM_SLOTS:
            raise Refused(f"all {MAX_MEM_SLOTS} memory slots in use")
        self.release_views()
        try:
            self._map(self.mem, r)
        finally:
            self.memory_updated()
        self.region_refs[key] = 1
        log.info("%s: added memory region %#x+%#x", self.name, r.guest_phys_addr, r.memory_size)

    def remove_region(self, r: MemRegion) -> None:
        if self.mem is None:
            raise Refused("no memory table")
        match = [x for x in self.mem.regions
                 if x.gpa == r.guest_phys_addr and x.size == r.memory_size
                 and x.userspace_addr == r.userspace_addr]
        if not match:
            raise Refused(f"no region {r.guest_phys_addr:#x}+{r.memory_size:#x} to remove")
        key = (match[0].gpa, match[0].size, match[0].userspace_addr, match[0].mmap_offset)
        left = self.region_refs.get(key, 1) - 1
        if left > 0:
            self.region_refs[key] = left
            return
        self._check(RegionMemory([x for x in self.mem.regions if x is not match[0]]))
        self.region_refs.pop(key, None)
        self.release_views()
        self.mem.unmap(match[0].gpa)
        self.memory_updated()
        log.info("%s: removed memory region %#x+%#x", self.name, r.guest_phys_addr,
                 r.memory_size)

    def close_memory(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.region_refs = {}
