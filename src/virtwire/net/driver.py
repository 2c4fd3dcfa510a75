"""The virtio-net driver model: what Linux's virtio_net.c does, over any transport.

Theory of operation
-------------------
``VirtioNetDriver`` is the guest's half of a virtio-net link. It owns nothing but guest memory
(through a ``GuestMemory`` and a ``DmaAllocator``, which is ``virtio.driver.GuestAllocator``)
and talks to the device through a ``VirtioTransport``: status, features, queue programming,
notifications and the device-specific configuration. Three transports implement it -- modern
virtio-pci and the legacy I/O BAR over qtest (``pci.driver``) and the vhost-user front end
(``drive.vhost_user_frontend``) -- so the same code brings up QEMU's device, DPDK's vhost PMD
and virtwire's own backend.

Initialisation (virtio 1.2 §3.1.1 Driver Requirements: Device Initialization) is the generic
``virtio.driver.VirtioDriver`` over a ``TransportAdapter``, with the net-specific steps between:
reset -> ACKNOWLEDGE -> DRIVER -> read device features -> choose a subset that obeys §5.1.3.1
(``resolve_features``) -> write it -> FEATURES_OK and read it back (modern only; legacy has no
FEATURES_OK, §3.1.2) -> read config (MAC, status, MTU, max pairs; §5.1.4) -> program receiveq0,
transmitq0 and the controlq (at index 2 * max_virtqueue_pairs when MQ, else 2; §5.1.2) ->
post receive buffers -> DRIVER_OK. A status that shows NEEDS_RESET at any step, refused
FEATURES_OK, a missing VERSION_1, an impossible queue size or a DRIVER_OK that does not stick
writes FAILED and raises ``DeviceFault``.

Packet buffers are allocated in whole ``DMA_GRANULE`` (64-byte) units, 64-byte aligned: with
first-fit allocation, odd-sized buffers would leave small gaps that every later allocation has
to walk past.

Receive buffers follow Linux's three layouts (§5.1.6.3, "Setting Up Receive Buffers"):

- *mergeable* (MRG_RXBUF): one writable descriptor of ``mrg_buf_len`` per buffer; the header's
  ``num_buffers`` says how many used buffers one frame spans (§5.1.6.4).
- *big* (no MRG_RXBUF but GUEST_TSO4/TSO6/UFO, or an MTU above 1500): a chain of the header then
  pages covering 65562+ bytes, so any GSO frame fits one buffer.
- *small*: header plus 1518 bytes (ETH_HLEN + VLAN + 1500, or the device MTU), one descriptor when
  the header may share it (VERSION_1 or ANY_LAYOUT, §5.1.6.6 legacy framing), else two.

Transmit writes ``virtio_net_hdr`` + frame into one buffer (two descriptors on a legacy device
without ANY_LAYOUT). Kicks follow the device's wishes: after each batch ``publish`` then
``kick_needed`` (EVENT_IDX's avail_event or the NO_NOTIFY flag) decides. The driver polls used
rings (it is a user-space poll-mode driver, like DPDK's virtio PMD); it disables used-buffer
interrupts unless asked to keep them (``interrupts=True``), and the conformance suite uses that to
check the device honours suppression.

Everything the device writes is checked before use: used lengths (by the queue), ``num_buffers``
(at least 1, at most what is posted), and config values. A device fault raises ``DeviceFault``
(the device under test broke the spec; for the conformance suite that is a finding, not a crash).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from virtwire.memory import GuestMemory
from virtwire.net.header import VirtioNetHdr, hdr_size
from virtwire.virtio import spec
from virtwire.virtio.driver import DeviceError, GuestAllocator, VirtioDriver
from virtwire.virtio.errors import QueueError
from virtwire.virtio.queue import QueueFull
from virtwire.virtio.spec import bit

__all__ = [
    "VirtioTransport",
    "TransportAdapter",
    "DmaAllocator",
    "NetDriverConfig",
    "VirtioNetDriver",
    "RxFrame",
    "DeviceFault",
    "resolve_features",
    "DEFAULT_NET_FEATURES",
]

log = logging.getLogger(__name__)


class DeviceFault(Exception):
    """The device broke the spec (bad used element, refused FEATURES_OK, bogus config)."""


class VirtioTransport(Protocol):
    """How a virtio driver reaches its device (virtio 1.2 §4: PCI, and vhost-user's equivalent)."""

    legacy: bool

    def reset(self) -> None: ...
    def get_status(self) -> int: ...
    def set_status(self, status: int) -> None: ...
    def device_features(self) -> int: ...
    def set_driver_features(self, features: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def queue_ring_align(self) -> int: ...
    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None: ...
    def notify(self, index: int) -> None: ...
    def read_config(self, off: int, n: int) -> bytes: ...
    def config_generation(self) -> int: ...
    def read_isr(self) -> int: ...


class TransportAdapter:
    """``virtio.driver.DriverTransport`` over a ``VirtioTransport``, so ``VirtioDriver`` runs
    the §3.1.1 sequence on every net transport (virtio-pci modern/legacy, vhost-user).

    Writing status 0 is a reset (§2.4): it goes to the transport's ``reset``, which also waits
    for status 0 and drops the transport's per-queue state (notify offsets, MSI-X vectors,
    vhost-user rings). ``VirtioTransport.setup_queue`` programs size, addresses and enable in
    one call, so size and addresses are held until ``enable_queue``; a legacy device's size is
    its own (§4.1.4.8: read-only), read back from ``queue_max_size``.
    """

    def __init__(self, t: VirtioTransport) -> None:
        self.t = t
        self.legacy = bool(getattr(t, "legacy", False))
        self._size: dict[int, int] = {}
        self._addr: dict[int, tuple[int, int, int]] = {}

    def read_status(self) -> int:
        return self.t.get_status()

    def write_status(self, value: int) -> None:
        if value == 0:
            self.t.reset()
        else:
            self.t.set_status(value)

    def read_device_features(self) -> int:
        return self.t.device_features()

    def write_driver_features(self, features: int) -> None:
        self.t.set_driver_features(features)

    def num_queues(self) -> int:
        return self.t.num_queues()

    def queue_max_size(self, index: int) -> int:
        return self.t.queue_max_size(index)

    def set_queue_size(self, index: int, size: int) -> None:
        self._size[index] = size

    def set_queue_addresses(self, index: int, desc: int, driver: int, device: int) -> None:
        self._addr[index] = (desc, driver, device)

    def enable_queue(self, index: int) -> None:
        size = self._size.pop(index, None)
        if size is None:
            size = self.t.queue_max_size(index)
        self.t.setup_queue(index, size, *self._addr.pop(index))

    def notify(self, index: int) -> None:
        self.t.notify(index)


@contextmanager
def _device_faults() -> Iterator[None]:
    """``VirtioDriver``'s ``DeviceError`` surfaces as this module's ``DeviceFault``."""
    try:
        yield
    except DeviceError as e:
        raise DeviceFault(str(e)) from None


# ------------------------------------------------------------------------------------------------
# DMA memory
# ------------------------------------------------------------------------------------------------

# The driver's memory comes from the one driver-side allocator (first fit, coalescing frees).
DmaAllocator = GuestAllocator

DMA_GRANULE = 64  # packet buffers are whole cache lines: no odd gaps fragment the free list


# ------------------------------------------------------------------------------------------------
# Feature selection (§5.1.3.1)
# ------------------------------------------------------------------------------------------------

DEFAULT_NET_FEATURES = bit(
    spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_NET_F_GUEST_CSUM, spec.VIRTIO_NET_F_MTU,
    spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_GUEST_TSO4, spec.VIRTIO_NET_F_GUEST_TSO6,
    spec.VIRTIO_NET_F_GUEST_ECN, spec.VIRTIO_NET_F_HOST_TSO4, spec.VIRTIO_NET_F_HOST_TSO6,
    spec.VIRTIO_NET_F_HOST_ECN, spec.VIRTIO_NET_F_MRG_RXBUF, spec.VIRTIO_NET_F_STATUS,
    spec.VIRTIO_NET_F_CTRL_VQ, spec.VIRTIO_NET_F_CTRL_RX, spec.VIRTIO_NET_F_CTRL_VLAN,
    spec.VIRTIO_NET_F_CTRL_RX_EXTRA, spec.VIRTIO_NET_F_GUEST_ANNOUNCE,
    spec.VIRTIO_NET_F_CTRL_MAC_ADDR, spec.VIRTIO_NET_F_MQ,
    spec.VIRTIO_F_ANY_LAYOUT, spec.VIRTIO_F_INDIRECT_DESC, spec.VIRTIO_F_EVENT_IDX,
    spec.VIRTIO_F_VERSION_1, spec.VIRTIO_F_RING_PACKED, spec.VIRTIO_F_RING_RESET,
)


def resolve_features(offered: int, wanted: int, legacy: bool = False) -> int:
    """The subset of ``offered & wanted`` that satisfies §5.1.3.1 (drop bits whose
    dependencies are missing, repeatedly), without bits a legacy interface cannot carry."""
    f = offered & wanted
    if legacy:
        f &= 0xFFFFFFFF
        f &= ~bit(spec.VIRTIO_F_BAD_FEATURE)
    changed = True
    while changed:
        changed = False
        for feat, reqs in spec.NET_FEATURE_REQUIRES.items():
            if f >> feat & 1 and any(not f >> r & 1 for r in reqs):
                f &= ~bit(feat)
                changed = True
        for feat, anyof in spec.NET_FEATURE_REQUIRES_ANY.items():
            if f >> feat & 1 and not any(f >> r & 1 for r in anyof):
                f &= ~bit(feat)
                changed = True
    return f


# ------------------------------------------------------------------------------------------------
# virtio_net_hdr (§5.1.6)
# ------------------------------------------------------------------------------------------------


@dataclass
class RxFrame:
    """One received frame: the header fields the device wrote and the frame bytes."""

    data: bytes
    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1
    queue: int = 0


@dataclass
class NetDriverConfig:
    """What the driver asks for (features are intersected with the device's offer)."""

    features: int = DEFAULT_NET_FEATURES
    queue_size: int = 256  # capped by the device's maximum; legacy uses the device's size
    packed: bool = False  # use VIRTIO_F_RING_PACKED when offered
    mrg_buf_len: int = 2048
    rx_fill: int | None = None  # buffers to post per receive queue (default: as many as fit)
    interrupts: bool = False
    pairs: int = 1  # queue pairs to bring up (MQ)
    ctrl_timeout: float = 2.0
    stall_kick_after: float = 0.05  # re-notify a queue whose buffers sit unconsumed this long
    rx_layout: str | None = None  # force "mergeable" | "big" | "small" (default: as Linux picks)


@dataclass
class _RxBuf:
    segs: tuple[tuple[int, int], ...]  # (gpa, len) writable segments; segs[0] starts with hdr
    capacity: int


@dataclass
class _Queue:
    index: int
    q: Any  # SplitDriverQueue | PackedDriverQueue
    size: int
    kicks: int = 0
    posted: int = 0
    last_progress: float = 0.0


@dataclass
class DriverStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    kicks: int = 0
    kicks_suppressed: int = 0
    tx_full: int = 0
    rx_errors: int = 0
    ctrl_cmds: int = 0
    used_len_without_write: int = 0
    stall_kicks: int = 0
    tx_used_len_nonzero: int = 0
    rx_idle_kicks: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class VirtioNetDriver:
    """A poll-mode virtio-net driver (see module docstring)."""

    def __init__(
        self,
        transport: VirtioTransport,
        mem: GuestMemory,
        allocator: DmaAllocator,
        config: NetDriverConfig | None = None,
    ) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = allocator
        self.cfg = config or NetDriverConfig()
        self.core = VirtioDriver(TransportAdapter(transport), mem, allocator)
        self.legacy = self.core.transport.legacy
        self.offered = 0
        self.features = 0
        self.hdr_len = spec.VIRTIO_NET_HDR_LEN
        self.mac = b"\0" * 6
        self.status = spec.VIRTIO_NET_S_LINK_UP
        self.mtu = 0
        self.max_pairs = 1
        self.pairs = 1
        self.rxqs: list[_Queue] = []
        self.txqs: list[_Queue] = []
        self.ctrlq: _Queue | None = None
        self.stats = DriverStats()
        self.rx_layout = "small"
        self._rx_partial: dict[int, list[tuple[_RxBuf, int]]] = {}
        self._rx_need: dict[int, int] = {}
        self._ctrl_buf = 0

    # -- helpers -----------------------------------------------------------------------------
    def has(self, feature: int) -> bool:
        return bool(self.features >> feature & 1)

    def _dma(self, n: int) -> int:
        """A packet buffer of ``n`` bytes, in whole ``DMA_GRANULE`` units (see the module
        docstring)."""
        return self.alloc.alloc(-(-max(n, 1) // DMA_GRANULE) * DMA_GRANULE, DMA_GRANULE)

    # -- bring-up (§3.1.1) ---------------------------------------------------------------------
    def probe(self) -> VirtioNetDriver:
        """Run the full initialisation sequence; returns self. Raises ``DeviceFault``.

        The generic steps (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK re-read, queue
        setup, DRIVER_OK, NEEDS_RESET/FAILED handling) are ``virtio.driver.VirtioDriver``'s;
        this adds what is virtio-net's: §5.1.3.1 feature selection, config, queue layout.
        """
        wanted = self.cfg.features
        if not self.cfg.packed or self.legacy:
            wanted &= ~bit(spec.VIRTIO_F_RING_PACKED)
        try:
            with _device_faults():
                self.features = self.core.negotiate(
                    wanted, select=lambda offered: resolve_features(offered, wanted, self.legacy))
        finally:
            self.offered = self.core.device_features
        self.hdr_len = hdr_size(self.features)
        self.read_config()
        if self.has(spec.VIRTIO_NET_F_MRG_RXBUF):
            self.rx_layout = "mergeable"
        elif (self.has(spec.VIRTIO_NET_F_GUEST_TSO4) or self.has(spec.VIRTIO_NET_F_GUEST_TSO6)
              or self.has(spec.VIRTIO_NET_F_GUEST_UFO) or self.mtu > 1500):
            self.rx_layout = "big"
        else:
            self.rx_layout = "small"
        if self.cfg.rx_layout in ("big", "small"):
            self.rx_layout = self.cfg.rx_layout
        want_pairs = 1
        if self.has(spec.VIRTIO_NET_F_MQ):
            want_pairs = max(1, min(self.cfg.pairs, self.max_pairs))
        for p in range(want_pairs):
            self.rxqs.append(self._make_queue(2 * p))
            self.txqs.append(self._make_queue(2 * p + 1))
        if self.has(spec.VIRTIO_NET_F_CTRL_VQ):
            ctrl_index = 2 * self.max_pairs if self.has(spec.VIRTIO_NET_F_MQ) else 2
            self.ctrlq = self._make_queue(ctrl_index, size_cap=64)
            self._ctrl_buf = self.alloc.alloc(4096, 64)
        for rq in self.rxqs:
            self.refill(rq, kick=False)  # no notification before DRIVER_OK (§3.1.1)
        with _device_faults():
            self.core.driver_ok()
        for rq in self.rxqs:
            self._kick(rq)
        if want_pairs > 1:
            self.set_queue_pairs(want_pairs)
        return self

    def fail(self) -> None:
        """Give up on the device (§2.1: FAILED), best effort."""
        self.core.mark_failed()

    def _make_queue(self, index: int, size_cap: int | None = None) -> _Queue:
        """§3.1.1 step 7 for queue ``index`` (``VirtioDriver.setup_queue``: size checks, the
        legacy device's fixed size and ring layout), then used-buffer interrupts off unless
        asked for."""
        with _device_faults():
            q = self.core.setup_queue(index, size_cap or self.cfg.queue_size)
        if not self.cfg.interrupts:
            q.disable_callbacks(self.mem)
        return _Queue(index=index, q=q, size=q.size)

    def read_config(self) -> None:
        """§5.1.4: MAC, status, max pairs, MTU, read under the config generation (§2.5.1).

        Each field is read at its own width and only when its feature says it exists: a device
        sizes its config space by the offered features, and a read crossing its end returns
        all-ones (QEMU) -- so a 4-byte read spanning max_virtqueue_pairs and an absent mtu
        would corrupt max_virtqueue_pairs.
        """
        t = self.t
        for _ in range(10):
            gen = t.config_generation()
            mac = t.read_config(0, 6) if self.has(spec.VIRTIO_NET_F_MAC) else None
            status = (int.from_bytes(t.read_config(6, 2), "little")
                      if self.has(spec.VIRTIO_NET_F_STATUS) else None)
            pairs = (int.from_bytes(t.read_config(8, 2), "little")
                     if self.has(spec.VIRTIO_NET_F_MQ) else None)
            mtu = (int.from_bytes(t.read_config(10, 2), "little")
                   if self.has(spec.VIRTIO_NET_F_MTU) else None)
            if t.config_generation() == gen:
                break
        else:
            raise DeviceFault("config generation never stable")
        if mac is not None:
            self.mac = mac
        if status is not None:
            self.status = status
        if pairs is not None:
            lo, hi = spec.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN, spec.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX
            if not lo <= pairs <= hi:
                raise DeviceFault(f"max_virtqueue_pairs {pairs} outside 1..0x8000 (§5.1.4.1)")
            self.max_pairs = pairs
        if mtu is not None:
            self.mtu = mtu

    @property
    def link_up(self) -> bool:
        """§5.1.4: VIRTIO_NET_S_LINK_UP (always up without VIRTIO_NET_F_STATUS)."""
        if not self.has(spec.VIRTIO_NET_F_STATUS):
            return True
        raw = self.t.read_config(spec.VIRTIO_NET_CONFIG_STATUS, 2)
        self.status = int.from_bytes(raw, "little")
        return bool(self.status & spec.VIRTIO_NET_S_LINK_UP)

    # -- notifications -------------------------------------------------------------------------
    def _kick(self, qq: _Queue) -> bool:
        q = qq.q
        q.publish(self.mem)
        if q.kick_needed(self.mem):
            self.t.notify(qq.index)
            qq.kicks += 1
            self.stats.kicks += 1
            return True
        self.stats.kicks_suppressed += 1
        return False

    # -- receive (§5.1.6.3 / §5.1.6.4) ---------------------------------------------------------
    def _rx_geometry(self) -> list[int]:
        """Writable segment lengths of one receive buffer for the negotiated layout."""
        h = self.hdr_len
        if self.rx_layout == "mergeable":
            return [max(self.cfg.mrg_buf_len, h + 64)]
        if self.rx_layout == "big":
            return [h] + [4096] * 17  # header, then pages: 69632 bytes of frame room
        frame_room = 14 + 4 + max(self.mtu, 1500)
        any_layout = self.has(spec.VIRTIO_F_VERSION_1) or self.has(spec.VIRTIO_F_ANY_LAYOUT)
        return [h + frame_room] if any_layout else [h, frame_room]

    def refill(self, rq: _Queue, limit: int | None = None, kick: bool = True) -> int:
        """Post receive buffers until the queue is full (or ``limit``); publish + kick."""
        geom = self._rx_geometry()
        want = self.cfg.rx_fill if self.cfg.rx_fill is not None else rq.size
        n = 0
        while rq.posted < want and (limit is None or n < limit):
            segs = []
            for ln in geom:
                segs.append((self._dma(ln), ln))
            buf = _RxBuf(tuple(segs), sum(ln for _, ln in segs))
            try:
                rq.q.add(self.mem, (), segs, buf)
            except QueueFull:
                for gpa, _ in segs:
                    self.alloc.free(gpa)
                break
            rq.posted += 1
            n += 1
        if n and kick:
            self._kick(rq)
        return n

    def _get_used(self, qq: _Queue) -> tuple[Any, int] | None:
        """``get_used``, tolerant as Linux is of a packed-ring device that omits WRITE.

        §2.8.4: a used descriptor's length is reserved unless VIRTQ_DESC_F_WRITE is set, so the
        packed queue reports 0 for one without it. QEMU 7.2 never sets WRITE in used
        descriptors, and Linux reads the length regardless; so do we, bounded by what the
        buffer offered, and count each case (``stats.used_len_without_write``) for ``conform``.
        """
        q = qq.q
        if not self.has(spec.VIRTIO_F_RING_PACKED):
            return q.get_used(self.mem)
        at = q.desc_addr + q.last_used * spec.VIRTQ_PACKED_DESC_SIZE
        raw_len = self.mem.read_u32(at + 8)
        flags = self.mem.read_u16(at + 14)
        got = q.get_used(self.mem)
        if got is not None and not flags & spec.VIRTQ_DESC_F_WRITE and raw_len:
            buf = got[0]
            if isinstance(buf, _RxBuf):
                if raw_len > buf.capacity:
                    raise QueueError(f"used len {raw_len} > {buf.capacity} writable")
                self.stats.used_len_without_write += 1
                return buf, raw_len
        return got

    def _read_buf(self, buf: _RxBuf, length: int) -> bytes:
        out = bytearray()
        left = length
        for gpa, ln in buf.segs:
            if left <= 0:
                break
            k = min(ln, left)
            out += self.mem.view(gpa, k)
            left -= k
        return bytes(out)

    def _free_buf(self, buf: _RxBuf) -> None:
        for gpa, _ in buf.segs:
            self.alloc.free(gpa)

    def receive(self, max_frames: int = 1 << 30, queue: int = 0) -> list[RxFrame]:
        """Reap used receive buffers into frames, then refill. Raises ``DeviceFault``."""
        rq = self.rxqs[queue]
        frames: list[RxFrame] = []
        h = self.hdr_len
        while len(frames) < max_frames:
            try:
                got = self._get_used(rq)
            except QueueError as e:
                raise DeviceFault(f"receiveq{queue}: {e}") from None
            if got is None:
                break
            buf, length = got
            rq.posted -= 1
            partial = self._rx_partial.get(queue)
            if partial is not None:
                partial.append((buf, length))
                if len(partial) < self._rx_need[queue]:
                    continue
                del self._rx_partial[queue]
                frames.append(self._assemble(partial, queue))
                continue
            if length < h:
                self._free_buf(buf)
                self.stats.rx_errors += 1
                raise DeviceFault(f"receiveq{queue}: used length {length} < header {h}")
            nb = 1
            if self.rx_layout == "mergeable":
                nb = int.from_bytes(self.mem.read(buf.segs[0][0] + 10, 2), "little")
                if nb < 1 or nb > rq.size:
                    self._free_buf(buf)
                    self.stats.rx_errors += 1
                    raise DeviceFault(f"receiveq{queue}: num_buffers {nb} (§5.1.6.4)")
            if nb == 1:
                frames.append(self._assemble([(buf, length)], queue))
            else:
                self._rx_partial[queue] = [(buf, length)]
                self._rx_need[queue] = nb
        if frames or rq.posted < rq.size // 2:
            self.refill(rq)
        return frames

    def _assemble(self, parts: list[tuple[_RxBuf, int]], queue: int) -> RxFrame:
        h = self.hdr_len
        first, flen = parts[0]
        raw = self._read_buf(first, flen)
        hd = VirtioNetHdr.unpack(raw, h)
        data = bytearray(raw[h:])
        for buf, ln in parts[1:]:
            data += self._read_buf(buf, ln)
        for buf, _ in parts:
            self._free_buf(buf)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(data)
        return RxFrame(bytes(data), hd.flags, hd.gso_type, hd.hdr_len, hd.gso_size, hd.csum_start,
                       hd.csum_offset, len(parts), queue)

    # -- transmit (§5.1.6.2) ---------------------------------------------------------------------
    def reap_tx(self, queue: int = 0) -> int:
        tq = self.txqs[queue]
        n = 0
        while True:
            try:
                got = tq.q.get_used(self.mem)
            except QueueError as e:
                raise DeviceFault(f"transmitq{queue}: {e}") from None
            if got is None:
                return n
            if got[1]:
                self.stats.tx_used_len_nonzero += 1  # §2.7.8: nothing was written
            for gpa in got[0]:
                self.alloc.free(gpa)
            tq.posted -= 1
            tq.last_progress = time.monotonic()
            n += 1

    def send(
        self,
        frames: Iterable[bytes | bytearray | memoryview],
        queue: int = 0,
        *,
        flags: int = 0,
        gso_type: int = spec.VIRTIO_NET_HDR_GSO_NONE,
        hdr_len: int = 0,
        gso_size: int = 0,
        csum_start: int = 0,
        csum_offset: int = 0,
    ) -> int:
        """Queue ``frames`` with one header each, publish once, kick if the device wants it.

        Offload fields are only allowed when negotiated (CSUM for NEEDS_CSUM, HOST_TSO*/UFO for
        GSO, §5.1.6.2). Returns how many frames were queued (fewer when the ring is full).
        """
        if flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.has(spec.VIRTIO_NET_F_CSUM):
            raise ValueError("NEEDS_CSUM without VIRTIO_NET_F_CSUM")
        gso_feat = {spec.VIRTIO_NET_HDR_GSO_TCPV4: spec.VIRTIO_NET_F_HOST_TSO4,
                    spec.VIRTIO_NET_HDR_GSO_TCPV6: spec.VIRTIO_NET_F_HOST_TSO6,
                    spec.VIRTIO_NET_HDR_GSO_UDP: spec.VIRTIO_NET_F_HOST_UFO,
                    spec.VIRTIO_NET_HDR_GSO_UDP_L4: spec.VIRTIO_NET_F_HOST_USO}
        base_gso = gso_type & ~spec.VIRTIO_NET_HDR_GSO_ECN
        if base_gso and not self.has(gso_feat.get(base_gso, 63)):
            raise ValueError(f"GSO type {gso_type} not negotiated")
        tq = self.txqs[queue]
        self.reap_tx(queue)
        h = self.hdr_len
        hdr = VirtioNetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset).pack(h)
        split_hdr = not (self.has(spec.VIRTIO_F_VERSION_1) or self.has(spec.VIRTIO_F_ANY_LAYOUT))
        n = 0
        for fr in frames:
            ln = len(fr) if not isinstance(fr, memoryview) else fr.nbytes
            if split_hdr:
                hg = self._dma(h)
                dg = self._dma(ln)  # a 0-byte frame still gets its own buffer
                self.mem.write(hg, hdr)
                self.mem.write(dg, fr)
                out = [(hg, h), (dg, ln)]
                token: tuple[int, ...] = (hg, dg)
            else:
                g = self._dma(h + ln)
                v = self.mem.view(g, h + ln)
                v[:h] = hdr
                v[h:] = fr
                out = [(g, h + ln)]
                token = (g,)
            try:
                tq.q.add(self.mem, out, (), token)
            except QueueFull:
                for gpa in token:
                    self.alloc.free(gpa)
                self.stats.tx_full += 1
                break
            tq.posted += 1
            n += 1
            self.stats.tx_frames += 1
            self.stats.tx_bytes += ln
        if n:
            if not tq.posted - n:
                tq.last_progress = time.monotonic()
            self._kick(tq)
        return n

    # -- control queue (§5.1.6.5) ----------------------------------------------------------------
    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        """Send one control command; returns the device's ack (VIRTIO_NET_OK / _ERR)."""
        if self.ctrlq is None:
            raise DeviceFault("no control virtqueue (VIRTIO_NET_F_CTRL_VQ not negotiated)")
        if len(data) > 4000:
            raise ValueError("control command payload too large")
        cq = self.ctrlq
        g = self._ctrl_buf
        self.mem.write(g, bytes([cls, cmd]) + data)
        ack = g + 4095
        self.mem.write(ack, b"\xff")
        cq.q.add(self.mem, [(g, 2 + len(data))], [(ack, 1)], "ctrl")
        cq.q.publish(self.mem)
        # As Linux's virtnet_send_command: virtqueue_kick() honours EVENT_IDX / NO_NOTIFY, so a
        # device that never re-arms avail_event after a command leaves the next one unkicked.
        if cq.q.kick_needed(self.mem):
            self.t.notify(cq.index)
        self.stats.ctrl_cmds += 1
        deadline = time.monotonic() + self.cfg.ctrl_timeout
        while True:
            try:
                got = cq.q.get_used(self.mem)
            except QueueError as e:
                raise DeviceFault(f"controlq: {e}") from None
            if got is not None:
                return self.mem.read(ack, 1)[0]
            if time.monotonic() > deadline:
                raise DeviceFault(f"controlq: no answer to class {cls} cmd {cmd}")
            time.sleep(0.0002)

    def set_promisc(self, on: bool) -> int:
        return self.ctrl(spec.VIRTIO_NET_CTRL_RX, spec.VIRTIO_NET_CTRL_RX_PROMISC, bytes([on]))

    def set_allmulti(self, on: bool) -> int:
        return self.ctrl(spec.VIRTIO_NET_CTRL_RX, spec.VIRTIO_NET_CTRL_RX_ALLMULTI, bytes([on]))

    def set_mac(self, mac: bytes) -> int:
        """VIRTIO_NET_CTRL_MAC_ADDR_SET (needs CTRL_MAC_ADDR)."""
        if len(mac) != 6:
            raise ValueError("MAC must be 6 bytes")
        r = self.ctrl(spec.VIRTIO_NET_CTRL_MAC, spec.VIRTIO_NET_CTRL_MAC_ADDR_SET, mac)
        if r == spec.VIRTIO_NET_OK:
            self.mac = bytes(mac)
        return r

    def set_mac_table(self, unicast: Sequence[bytes], multicast: Sequence[bytes]) -> int:
        data = struct.pack("<I", len(unicast)) + b"".join(unicast)
        data += struct.pack("<I", len(multicast)) + b"".join(multicast)
        return self.ctrl(spec.VIRTIO_NET_CTRL_MAC, spec.VIRTIO_NET_CTRL_MAC_TABLE_SET, data)

    def vlan(self, vid: int, add: bool = True) -> int:
        cmd = spec.VIRTIO_NET_CTRL_VLAN_ADD if add else spec.VIRTIO_NET_CTRL_VLAN_DEL
        return self.ctrl(spec.VIRTIO_NET_CTRL_VLAN, cmd, struct.pack("<H", vid))

    def set_queue_pairs(self, n: int) -> int:
        r = self.ctrl(spec.VIRTIO_NET_CTRL_MQ, spec.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                      struct.pack("<H", n))
        if r == spec.VIRTIO_NET_OK:
            self.pairs = n
        return r

    def announce_ack(self) -> int:
        return self.ctrl(spec.VIRTIO_NET_CTRL_ANNOUNCE, spec.VIRTIO_NET_CTRL_ANNOUNCE_ACK)

    # -- single-queue reset (VIRTIO_F_RING_RESET, §2.6.1 / §4.1.4.3.2) ---------------------------
    def reset_queue(self, qq: _Queue) -> bool:
        """Reset one queue, then re-enable it on fresh rings (a receive queue is refilled).

        Returns False when the device did not acknowledge the reset. In-flight buffers of the old
        rings are dropped (their memory is not reused: the device might still write it).
        """
        reset = getattr(self.t, "reset_queue", None)
        if reset is None or not self.has(spec.VIRTIO_F_RING_RESET):
            raise DeviceFault("VIRTIO_F_RING_RESET not negotiated (or no transport support)")
        if not reset(qq.index):
            return False
        new = self._make_queue(qq.index, size_cap=qq.size)
        for lst in (self.rxqs, self.txqs):
            for i, q in enumerate(lst):
                if q is qq:
                    lst[i] = new
                    if lst is self.rxqs:
                        self._rx_partial.pop(i, None)
                        self.refill(new)
        return True

    # -- polling helpers -------------------------------------------------------------------------
    def service(self) -> None:
        """Reap transmit completions; re-notify a queue that made no progress for a while.

        A spec-following device asks for every notification it needs (EVENT_IDX / NO_NOTIFY),
        so the driver kicks only when asked. A device that publishes a stale event position
        stalls such a driver forever (seen: QEMU 7.2's packed ring after an asynchronous TX
        completion leaves the device event offset behind what it consumed). A notification
        is always allowed (§2.7.10 / §2.8.10 only let the driver *omit* it), so after
        ``stall_kick_after`` seconds without progress we notify anyway and count it in
        ``stats.stall_kicks``; ``conform`` reports any such kick as a device finding.
        """
        now = time.monotonic()
        # Patient until the device has shown it stalls (a loaded host can delay a correct
        # device for a while); after three confirmed stalls, quick.
        wait = self.cfg.stall_kick_after
        if self.stats.stall_kicks >= 3:
            wait = min(wait, 0.02)
        for i, tq in enumerate(self.txqs):
            if self.reap_tx(i):
                tq.last_progress = now
            elif tq.posted and now - tq.last_progress > wait:
                self._stall_kick(tq, now)

    def _stall_kick(self, qq: _Queue, now: float) -> None:
        self.t.notify(qq.index)
        qq.last_progress = now
        self.stats.stall_kicks += 1

    def poll_receive(self, want: int, timeout: float, queue: int = 0) -> list[RxFrame]:
        """Receive until ``want`` frames arrived or ``timeout`` seconds passed."""
        out: list[RxFrame] = []
        deadline = time.monotonic() + timeout
        idle = 0
        while len(out) < want:
            got = self.receive(want - len(out), queue)
            if got:
                out += got
                idle = 0
                self.rxqs[queue].last_progress = time.monotonic()
                continue
            now = time.monotonic()
            if now > deadline:
                break
            self.service()
            rq = self.rxqs[queue]
            if now - rq.last_progress > max(self.cfg.stall_kick_after, 0.2):
                # nothing arrived for a while: a (harmless) notification in case the device
                # is holding frames back waiting for a kick it never asked for
                self._stall_kick(rq, now)
                self.stats.stall_kicks -= 1  # idle receive is normal, not a finding
                self.stats.rx_idle_kicks += 1
            idle += 1
            time.sleep(0 if idle < 50 else 0.0002)
        return out

    def send_all(self, frames: Sequence[bytes], timeout: float = 5.0, queue: int = 0,
                 **hdr: Any) -> int:
        """Send every frame, waiting for ring space as the device consumes."""
        i = 0
        deadline = time.monotonic() + timeout
        while i < len(frames):
            k = self.send(frames[i:], queue, **hdr)
            i += k
            if k == 0:
                if time.monotonic() > deadline:
                    break
                self.service()
                time.sleep(0.0002)
        return i

    def shutdown(self) -> None:
        """Reset the device (§3.3.1: the driver resets it before freeing its memory)."""
        self.t.reset()

