"""Fuzz target for the device side of both ring formats: hostile ring contents, one seed a case.

Theory of operation
-------------------
Each case is a pure function of ``(seed, ring format)``: a ``random.Random(seed)`` picks a queue
size, the negotiated EVENT_IDX / INDIRECT_DESC, a start index (to cross 16-bit wrap-around), and
one of three ways to make the guest's half of the ring hostile:

- ``random``: the descriptor table and the driver area (split: avail ring; packed: the whole
  descriptor ring and event structure) filled with random bytes, plus a random avail index;
- ``mutate``: the driver model first places valid scatter-gather buffers, then 1-8 field-aware
  mutations overwrite a descriptor field (addr/len/flags/next or id), an avail ring entry or
  index, or point a descriptor at a hostile indirect table, with values biased to the edges
  (0, size-1, size, 0xFFFF, end of RAM, 2^32-1, 2^64-1, nested INDIRECT, ...);
- ``valid``: no mutation at all (the device must then serve every buffer, never raise).

The device then pops in batches and consumes every chain it gets (reads the readable views,
writes into the writable ones, pushes, publishes, decides on notifications, toggles kick
suppression). The allowed outcomes are: success, or a ``DriverError`` (``QueueError``) /
``GuestMemoryError`` raised by ``pop``/``pop_batch``/``validate``. A chain that was accepted must
be sound: segments inside guest RAM, readable before writable, lengths < 2^32, at most
``size`` (or table-size) segments; reading or writing through it must not fail. Anything else --
another exception type, an invariant violation, an accepted valid case that raises -- is a
failure, reported with the case seed (``virtwire fuzz --ring FMT --seed SEED --cases 1``
replays it). One case in eight runs through ``VirtioDevice.notify`` instead, where no exception
may escape at all and a fault must leave NEEDS_RESET set.
"""

from __future__ import annotations

import logging
import random
import re
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from virtwire.memory import GuestMemoryError
from virtwire.virtio.chain import MAX_CHAIN_BYTES
from virtwire.virtio.driver import AllocatorError
from virtwire.virtio.errors import DriverError
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)

__all__ = ["FuzzStats", "run_case", "run_range", "FORMATS"]

FORMATS = ("split", "packed")
ALLOWED = (DriverError, GuestMemoryError)
RING_BASE = 0x10000
_NUM = re.compile(r"0x[0-9a-fA-F]+|\d+")
_DESC = struct.Struct("<QIHH")
_FLAG_BITS = (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
)


class FuzzFailure(Exception):
    """An invariant the device side must keep was broken (a virtwire bug)."""


@dataclass
class FuzzStats:
    """Aggregated outcome of many cases (JSON-ready via ``as_dict``)."""

    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    chains: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, other: FuzzStats) -> None:
        self.cases += other.cases
        self.outcomes.update(other.outcomes)
        self.reasons.update(other.reasons)
        self.chains += other.chains
        self.failures.extend(other.failures)

    def as_dict(self, top: int = 25) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "outcomes": dict(self.outcomes),
            "chains_accepted": self.chains,
            "failures": len(self.failures),
            "failure_details": self.failures[:20],
            "top_rejection_reasons": dict(self.reasons.most_common(top)),
        }


def _edge_u64(rng: random.Random, ram: int) -> int:
    return rng.choice(
        [0, 1, ram - 1, ram, ram - 16, ram + 4096, 2**32 - 1, 2**63, 2**64 - 1, 2**64 - 16,
         rng.randrange(ram), rng.randrange(2**64), RING_BASE]
    )


def _edge_u32(rng: random.Random, ram: int) -> int:
    return rng.choice(
        [0, 1, 15, 16, 17, 32, 4096, ram, 2**31, 2**32 - 1, 2**32 - 16, rng.randrange(2**32),
         rng.randrange(1, 256)]
    )


def _edge_u16(rng: random.Random, size: int) -> int:
    return rng.choice(
        [0, 1, size - 1, size, size + 1, 0x7FFF, 0x8000, 0xFFFF, rng.randrange(0x10000),
         rng.randrange(max(size, 1))]
    ) & 0xFFFF


def _edge_flags(rng: random.Random) -> int:
    if rng.random() < 0.2:
        return rng.randrange(0x10000)
    f = 0
    for b in _FLAG_BITS:
        if rng.random() < 0.4:
            f |= b
    return f


def _hostile_table(rng: random.Random, mem: Any, ram: int, at: int, size: int) -> int:
    """Write an indirect table of 1-8 entries with edge values at ``at``; returns its length."""
    n = rng.randint(1, 8)
    for k in range(n):
        if rng.random() < 0.5:  # a plausible entry
            e = (
                rng.randrange(RING_BASE, ram - 64),
                rng.randint(0, 64),
                rng.choice([0, VIRTQ_DESC_F_WRITE])
                | (VIRTQ_DESC_F_NEXT if k + 1 < n else 0),
                k + 1,
            )
        else:
            e = (_edge_u64(rng, ram), _edge_u32(rng, ram), _edge_flags(rng), _edge_u16(rng, n))
        mem.write(at + 16 * k, _DESC.pack(*e))
    return rng.choice([16 * n, 16 * n, 16 * n + rng.randint(1, 15), 0, 16 * (n + 1)])


def _fill_valid(rng: random.Random, rp: Any, count: int) -> int:
    """Let the driver model place ``count`` valid random scatter-gather buffers."""
    added = 0
    for i in range(count):
        n_out = rng.randint(0, 3)
        n_in = rng.randint(0 if n_out else 1, 3)
        try:
            rp.add([bytes(rng.randint(0, 40)) for _ in range(n_out)],
                   [rng.randint(0, 64) for _ in range(n_in)], i)
        except (QueueFull, AllocatorError, ValueError):
            # driver side only: ring full, heap exhausted, or more segments than a small ring
            # without indirect can ever hold -- stop adding
            break
        added += 1
    rp.driver.publish(rp.mem)
    return added


def _mutate_split(rng: random.Random, rp: Any, ram: int) -> None:
    mem, size = rp.mem, rp.size
    desc, avail, _used = rp.driver.layout()
    kind = rng.randrange(8)
    i = rng.randrange(size)
    if kind == 0:
        mem.write_u64(desc + 16 * i, _edge_u64(rng, ram))
    elif kind == 1:
        mem.write_u32(desc + 16 * i + 8, _edge_u32(rng, ram))
    elif kind == 2:
        mem.write_u16(desc + 16 * i + 12, _edge_flags(rng))
    elif kind == 3:
        mem.write_u16(desc + 16 * i + 14, _edge_u16(rng, size))
    elif kind == 4:
        mem.write_u16(avail + 4 + 2 * i, _edge_u16(rng, size))
    elif kind == 5:
        cur = mem.read_u16(avail + 2)
        mem.write_u16(avail + 2, rng.choice([cur + 1, cur - 1, cur + size, cur + size + 1,
                                             _edge_u16(rng, size)]) & 0xFFFF)
    elif kind == 6:  # point a descriptor at a hostile indirect table
        at = rng.randrange(RING_BASE, ram - 256) & ~15
        ln = _hostile_table(rng, mem, ram, at, size)
        mem.write(desc + 16 * i, _DESC.pack(at, ln, VIRTQ_DESC_F_INDIRECT
                                            | rng.choice([0, 0, VIRTQ_DESC_F_NEXT,
                                                          VIRTQ_DESC_F_WRITE]), 0))
    else:  # a loop
        j = rng.randrange(size)
        mem.write_u16(desc + 16 * i + 12, mem.read_u16(desc + 16 * i + 12) | VIRTQ_DESC_F_NEXT)
        mem.write_u16(desc + 16 * i + 14, j)


def _mutate_packed(rng: random.Random, rp: Any, ram: int) -> None:
    mem, size = rp.mem, rp.size
    desc, drv_evt, _dev_evt = rp.driver.layout()
    kind = rng.randrange(8)
    i = rng.randrange(size)
    if kind == 7:  # NEXT on every slot: a list running into unavailable slots or past the ring
        dev = rp.device
        whole_ring = rng.random() < 0.5  # ... and every slot available for the device's lap
        for j in range(size):
            f = mem.read_u16(desc + 16 * j + 14) | VIRTQ_DESC_F_NEXT
            if whole_ring:
                w = dev.avail_wrap ^ (j < dev.next_avail)
                f = f & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) | (
                    VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED)
            mem.write_u16(desc + 16 * j + 14, f)
    elif kind == 0:
        mem.write_u64(desc + 16 * i, _edge_u64(rng, ram))
    elif kind == 1:
        mem.write_u32(desc + 16 * i + 8, _edge_u32(rng, ram))
    elif kind == 2:
        mem.write_u16(desc + 16 * i + 12, _edge_u16(rng, size))  # buffer id
    elif kind == 3:
        mem.write_u16(desc + 16 * i + 14, _edge_flags(rng))
    elif kind == 4:  # make a slot look available for either wrap counter
        f = mem.read_u16(desc + 16 * i + 14) & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
        mem.write_u16(desc + 16 * i + 14, f | rng.choice([VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED,
                                                          0, VIRTQ_DESC_F_AVAIL
                                                          | VIRTQ_DESC_F_USED]))
    elif kind == 5:
        at = rng.randrange(RING_BASE, ram - 256) & ~15
        ln = _hostile_table(rng, mem, ram, at, size)
        mem.write_u64(desc + 16 * i, at)
        mem.write_u32(desc + 16 * i + 8, ln)
        f = mem.read_u16(desc + 16 * i + 14)
        mem.write_u16(desc + 16 * i + 14, f | VIRTQ_DESC_F_INDIRECT)
    else:
        mem.write_u32(drv_evt, rng.randrange(2**32))


def _check_chain(c: Any, mem: Any, size: int) -> None:
    """Invariants of an accepted chain (module docstring)."""
    seen_w = False
    total = 0
    for gpa, n, w in c.segments:
        if n and not mem.contains(gpa, n):
            raise FuzzFailure(f"accepted segment {gpa:#x}+{n:#x} outside RAM")
        if seen_w and not w:
            raise FuzzFailure("accepted readable segment after writable")
        seen_w = seen_w or w
        total += n
    if total > MAX_CHAIN_BYTES or total != c.readable_len + c.writable_len:
        raise FuzzFailure(f"accepted chain length {total} inconsistent or >= 2^32")
    if not c.segments or (len(c.segments) > size and not c.indirect):
        raise FuzzFailure(f"accepted chain of {len(c.segments)} segments on a ring of {size}")


def _device_loop(rng: random.Random, rp: Any, stats: FuzzStats) -> None:
    mem, dev, size = rp.mem, rp.device, rp.size
    for _ in range(rng.randint(1, 3)):
        chains = dev.pop_batch(mem, rng.randint(1, 2 * size + 1))
        for c in chains:
            _check_chain(c, mem, size)
            try:
                data = c.read_all(mem)
                n = c.write(mem, data[: rng.randint(0, len(data))] + b"\xa5" * rng.randint(0, 8))
            except GuestMemoryError as e:
                raise FuzzFailure(f"access through an accepted chain failed: {e}") from None
            dev.push(mem, c, min(n, c.writable_len))
        stats.chains += len(chains)
        dev.publish(mem)
        dev.needs_notification(mem)
        if rng.random() < 0.5:
            dev.disable_notifications(mem)
        else:
            dev.enable_notifications(mem)
        dev.has_available(mem)
        if not chains:
            break


def _via_device(rp: Any) -> None:
    """Serve the ring through ``VirtioDevice.notify``: nothing may escape."""
    from virtwire.virtio.pair import LoopbackDevice

    d = LoopbackDevice([rp.size], packed=rp.fmt == "packed")
    d.mem = rp.mem
    d.queue_config[0].ready = True
    d.queues[0] = rp.device
    d.status = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
    d.notify(0)
    if d.counters[0]["errors"] and not d.status & VIRTIO_CONFIG_S_NEEDS_RESET:
        raise FuzzFailure("a guest fault did not set NEEDS_RESET")
    if d.counters[0]["errors"]:
        raise DriverError(d.last_error or "needs reset")


def run_case(seed: int, fmt: str, stats: FuzzStats | None = None) -> str:
    """Run one case; returns its outcome and records it (see module docstring)."""
    from virtwire.virtio.pair import make_ring_pair

    st = stats if stats is not None else FuzzStats()
    rng = random.Random(seed)
    if fmt == "split":
        size = 1 << rng.randint(0, 8)
        start = rng.choice([0, 0xFFFF, 0xFFFF - rng.randrange(size + 1), rng.randrange(0x10000)])
    else:
        size = rng.randint(1, 256)
        start = rng.randrange(size) | rng.randint(0, 1) << 15
    event_idx = rng.random() < 0.5
    indirect = rng.random() < 0.5
    # packed driver queues reserve their indirect tables up front: give them more room
    ram = rng.choice([0x40000, 0x80000]) * (4 if fmt == "packed" else 1)
    mode = rng.choices(["random", "mutate", "valid"], [3, 6, 1])[0]
    st.cases += 1
    try:
        rp = make_ring_pair(fmt, size, event_idx=event_idx, indirect=indirect, start=start,
                            mem_size=ram)
        mem = rp.mem
        if mode == "random":
            desc, drv, _ = rp.driver.layout()
            n = 16 * size
            mem.write(desc, rng.randbytes(n))
            if fmt == "split":
                mem.write(drv, rng.randbytes(6 + 2 * size))
                if rng.random() < 0.7:  # keep the index plausible, so heads get read
                    mem.write_u16(drv + 2, (start + rng.randint(0, size)) & 0xFFFF)
            else:
                mem.write(drv, rng.randbytes(4))
        else:
            _fill_valid(rng, rp, rng.randint(1, size))
            if mode == "mutate":
                mutate = _mutate_split if fmt == "split" else _mutate_packed
                for _ in range(rng.randint(1, 8)):
                    mutate(rng, rp, ram)
        if rng.random() < 0.125:
            _via_device(rp)
        else:
            _device_loop(rng, rp, st)
    except ALLOWED as e:
        if mode == "valid":
            return _fail(st, seed, fmt, e, "valid ring rejected")
        st.outcomes["rejected"] += 1
        st.reasons[_NUM.sub("N", str(e))[:90]] += 1
        return "rejected"
    except Exception as e:  # noqa: BLE001 - the point of a fuzzer: any other exception is a bug
        return _fail(st, seed, fmt, e, "unexpected exception")
    st.outcomes["accepted"] += 1
    return "accepted"


def _fail(st: FuzzStats, seed: int, fmt: str, e: BaseException, what: str) -> str:
    st.outcomes["failure"] += 1
    st.failures.append(
        {
            "seed": seed,
            "ring": fmt,
            "what": what,
            "exception": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exception(e)[-3:],
            "reproduce": f"virtwire fuzz --ring {fmt} --seed {seed} --cases 1",
        }
    )
    return "failure"


def run_range(
    seeds: Iterable[int],
    formats: tuple[str, ...],
    progress: Callable[[FuzzStats], None] | None = None,
    every: float = 2.0,
) -> FuzzStats:
    """Run one case per (seed, format); ``progress`` is called at most every ``every`` s."""
    st = FuzzStats()
    last = time.monotonic()
    # Every rejected case logs a NEEDS_RESET warning by design; keep the fuzzer's output tidy.
    logger = logging.getLogger("virtwire")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for s in seeds:
            for fmt in formats:
                run_case(s, fmt, st)
            if progress is not None and time.monotonic() - last >= every:
                progress(st)
                last = time.monotonic()
    finally:
        logger.setLevel(level)
    return st
