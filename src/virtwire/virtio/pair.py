"""An in-process virtio driver/device pair over one guest memory (h11's ConnectionPair idea).

Theory of operation
-------------------
Both halves of a virtqueue live in this process and share one ``BytearrayGuestMemory``: the
driver model (``SplitDriverQueue``/``PackedDriverQueue``, driven by ``VirtioDriver``) on one side,
a ``VirtioDevice`` (or a bare device queue) on the other. ``LocalTransport`` maps the driver's
``DriverTransport`` calls straight onto ``VirtioDevice`` methods, so the full §3.1.1 init sequence,
feature negotiation, queue activation and kicks run exactly as over a real transport. A
``RecordingInterrupt`` records every used-buffer and config interrupt.

Two levels:

- ``RingPair`` / ``make_ring_pair(fmt, size, ...)``: just a driver queue and a device queue of
  one ring format over shared memory, with buffer helpers. ``virtwire bench``, ``virtwire fuzz``
  and the property tests use it.
- ``DevicePair``: a ``VirtioDevice`` (default ``LoopbackDevice``, which copies each chain's
  readable bytes into its writable part) plus a ``VirtioDriver`` over ``LocalTransport``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virtwire.memory import BytearrayGuestMemory, GuestMemory
from virtwire.virtio.chain import DescriptorChain
from virtwire.virtio.device import VirtioDevice
from virtwire.virtio.driver import GuestAllocator, VirtioDriver, make_driver_queue
from virtwire.virtio.split_ring import SplitQueue

__all__ = [
    "RecordingInterrupt",
    "LocalTransport",
    "LoopbackDevice",
    "RingPair",
    "make_ring_pair",
    "make_device_queue",
    "DevicePair",
    "LocalNetTransport",
]

RING_BASE = 0x10000  # leave page 0 unused: a zero address is then always a bad one


class RecordingInterrupt:
    """An ``InterruptSink`` that records what was raised (``events``, ``queue_counts``)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.queue_counts: Counter[int] = Counter()
        self.config_count = 0

    def queue(self, index: int) -> None:
        self.events.append(("queue", index))
        self.queue_counts[index] += 1

    def config(self) -> None:
        self.events.append(("config", -1))
        self.config_count += 1

    def take(self) -> list[tuple[str, int]]:
        ev, self.events = self.events, []
        return ev


def make_device_queue(
    fmt: str,
    mem: GuestMemory,
    size: int,
    layout: tuple[int, int, int],
    *,
    event_idx: bool = False,
    indirect: bool = False,
    start: int | None = None,
) -> Any:
    """A validated, ready device queue of format ``fmt`` over the areas in ``layout``."""
    if fmt == "split":
        q: Any = SplitQueue(size, event_idx=event_idx, indirect=indirect)
    elif fmt == "packed":
        from virtwire.virtio.packed_ring import PackedQueue

        q = PackedQueue(size, event_idx=event_idx, indirect=indirect)
    else:
        raise ValueError(f"unknown ring format {fmt!r}")
    q.set_addresses(*layout)
    if start is not None:
        q.set_base(start)
    q.ready = True
    q.validate(mem)
    return q


@dataclass
class RingPair:
    """One driver queue and one device queue of the same format over shared guest memory."""

    fmt: str
    size: int
    mem: BytearrayGuestMemory
    alloc: GuestAllocator
    driver: Any
    device: Any
    event_idx: bool = False
    indirect: bool = False

    def buffer(self, data: bytes | int) -> tuple[int, int]:
        """Allocate a driver buffer: ``bytes`` are copied in; an ``int`` is a zeroed length."""
        n = data if isinstance(data, int) else len(data)
        gpa = self.alloc.alloc(max(n, 1), 8)
        if not isinstance(data, int):
            self.mem.write(gpa, data)
        return gpa, n

    def free_buffers(self, bufs: Sequence[tuple[int, int]]) -> None:
        for gpa, _ in bufs:
            self.alloc.free(gpa)

    def add(self, out: Sequence[bytes], in_lens: Sequence[int], token: Any) -> tuple[list, list]:
        """Driver: allocate and add one buffer of ``out`` segments and ``in_lens`` writables."""
        ob = [self.buffer(d) for d in out]
        ib = [self.buffer(n) for n in in_lens]
        self.driver.add(self.mem, ob, ib, token)
        return ob, ib

    def serve(self, limit: int = 1 << 30, echo: bool = True) -> list[DescriptorChain]:
        """Device: pop everything available, echo readable bytes into writable ones (or write
        nothing), push, publish once. Returns the chains served."""
        mem = self.mem
        chains = self.device.pop_batch(mem, limit)
        for c in chains:
            n = c.write(mem, c.read_all(mem)) if echo else 0
            self.device.push(mem, c, n)
        self.device.publish(mem)
        return chains

    def collect(self) -> list[tuple[Any, int]]:
        """Driver: every used (token, len) now available."""
        out = []
        while (u := self.driver.get_used(self.mem)) is not None:
            out.append(u)
        return out


def make_ring_pair(
    fmt: str = "split",
    size: int = 256,
    *,
    event_idx: bool = False,
    indirect: bool = False,
    start: int | None = None,
    mem_size: int | None = None,
) -> RingPair:
    """A ``RingPair`` with rings at ``RING_BASE`` and a buffer heap after them."""
    if mem_size is None:
        ring_bytes = size * (16 + 2 + 8) + 64
        if fmt == "packed" and indirect:
            ring_bytes += size * 64 * 16  # the packed driver reserves a table per buffer id
        mem_size = RING_BASE + ring_bytes + 16 * 4096 + size * 512
        mem_size = (mem_size + 0xFFFF) & ~0xFFFF
    mem = BytearrayGuestMemory(mem_size)
    alloc = GuestAllocator(RING_BASE, mem_size - RING_BASE)
    drv = make_driver_queue(
        fmt,
        mem,
        alloc,
        size,
        event_idx=event_idx,
        indirect=indirect,
        start=start,
    )
    dev = make_device_queue(
        fmt, mem, size, drv.layout(), event_idx=event_idx, indirect=indirect, start=start
    )
    return RingPair(fmt, size, mem, alloc, drv, dev, event_idx, indirect)


class LoopbackDevice(VirtioDevice):
    """A test device: each chain's readable bytes are copied into its writable part."""

    device_id = 0x7F

    def __init__(self, queue_sizes: Sequence[int] = (256,), **kw: Any) -> None:
        super().__init__(list(queue_sizes), **kw)
        self.served: Counter[int] = Counter()

    def process_queue(self, index: int) -> None:
        mem = self.mem
        assert mem is not None

        def echo(c: DescriptorChain) -> int:
            return c.write(mem, c.read_all(mem))

        self.served[index] += self.drain_queue(index, echo)


class LocalTransport:
    """``DriverTransport`` over an in-process ``VirtioDevice`` (what PCI registers would do)."""

    def __init__(self, device: VirtioDevice, legacy: bool = False) -> None:
        self.device = device
        self.legacy = legacy
        device.legacy = legacy

    def read_status(self) -> int:
        return self.device.read_status()

    def write_status(self, value: int) -> None:
        self.device.write_status(value)

    def read_device_features(self) -> int:
        return self.device.offered_features

    def write_driver_features(self, features: int) -> None:
        self.device.set_driver_features(features)

    def num_queues(self) -> int:
        return self.device.num_queues

    def queue_max_size(self, index: int) -> int:
        if 0 <= index < self.device.num_queues:
            return self.device.queue_config[index].max_size
        return 0

    def set_queue_size(self, index: int, size: int) -> None:
        self.device.set_queue_size(index, size)

    def set_queue_addresses(self, index: int, desc: int, driver: int, device: int) -> None:
        self.device.set_queue_addresses(index, desc, driver, device)

    def enable_queue(self, index: int) -> None:
        self.device.set_queue_ready(index, True)

    def notify(self, index: int) -> None:
        self.device.notify(index)


class LocalNetTransport:
    """``net.driver.VirtioTransport`` mapped straight onto an in-process ``VirtioDevice`` (what
    PCI registers would do), for ``VirtioNetDriver`` against ``VirtioNet`` without QEMU."""

    def __init__(self, dev: VirtioDevice) -> None:
        self.dev = dev

    def reset(self) -> None:
        self.dev.write_status(0)

    def get_status(self) -> int:
        return self.dev.read_status()

    def set_status(self, status: int) -> None:
        self.dev.write_status(status)

    def device_features(self) -> int:
        return self.dev.offered_features

    def set_driver_features(self, features: int) -> None:
        self.dev.set_driver_features(features)

    def num_queues(self) -> int:
        return self.dev.num_queues

    def queue_max_size(self, index: int) -> int:
        if 0 <= index < self.dev.num_queues:
            return self.dev.queue_config[index].max_size
        return 0

    def queue_ring_align(self) -> int:
        return 0

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        self.dev.set_queue_size(index, size)
        self.dev.set_queue_addresses(index, desc, driver, device)
        self.dev.set_queue_ready(index, True)

    def notify(self, index: int) -> None:
        self.dev.notify(index)

    def read_config(self, off: int, n: int) -> bytes:
        return bytes(self.dev.config[off:off + n]).ljust(n, b"\0")

    def config_generation(self) -> int:
        return self.dev.config_generation

    def read_isr(self) -> int:
        return 0


@dataclass
class DevicePair:
    """A ``VirtioDevice`` and a ``VirtioDriver`` wired through ``LocalTransport``."""

    device: VirtioDevice = field(default_factory=LoopbackDevice)
    mem_size: int = 8 << 20
    legacy: bool = False

    def __post_init__(self) -> None:
        self.mem = BytearrayGuestMemory(self.mem_size)
        self.alloc = GuestAllocator(RING_BASE, self.mem_size - RING_BASE)
        self.interrupts = RecordingInterrupt()
        self.device.attach(self.mem, self.interrupts)
        self.transport = LocalTransport(self.device, legacy=self.legacy)
        self.driver = VirtioDriver(self.transport, self.mem, self.alloc)

    def start(self, wanted: int = ~0, queues: int | None = None, size: int | None = None) -> int:
        """Run the §3.1.1 init sequence for all (or ``queues``) queues; returns features."""
        n = self.device.num_queues if queues is None else queues
        return self.driver.initialize(wanted & ((1 << 64) - 1), n, size)

    def send(self, index: int, out: Sequence[bytes], in_lens: Sequence[int], token: Any) -> bool:
        """Add one buffer to queue ``index`` and kick if needed; True if the device was kicked."""
        q = self.driver.queues[index]
        ob = [self._buf(d) for d in out]
        ib = [self._buf(n) for n in in_lens]
        try:
            q.add(self.mem, ob, ib, (token, ob, ib))
        except Exception:
            for g, _ in ob + ib:
                self.alloc.free(g)
            raise
        return self.driver.kick(index)

    def _buf(self, data: bytes | int) -> tuple[int, int]:
        n = data if isinstance(data, int) else len(data)
        gpa = self.alloc.alloc(max(n, 1), 8)
        if not isinstance(data, int):
            self.mem.write(gpa, data)
        return gpa, n

    def receive(self, index: int) -> list[tuple[Any, bytes]]:
        """Collect used buffers of queue ``index``: (token, bytes the device wrote)."""
        q = self.driver.queues[index]
        out = []
        while (u := q.get_used(self.mem)) is not None:
            (token, ob, ib), n = u
            data = b"".join(self.mem.read(g, ln) for g, ln in ib)[:n]
            for g, _ in ob + ib:
                self.alloc.free(g)
            out.append((token, data))
        return out
