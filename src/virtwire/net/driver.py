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

Layout: this module is bring-up, transmit, the control queue and housekeeping; the transport
interface, feature selection and the config/result types are ``net.transport``; receive is
``net.driver_rx``.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from virtwire.memory import GuestMemory
from virtwire.net.driver_rx import DriverReceive
from virtwire.net.header import VirtioNetHdr, hdr_size
from virtwire.net.transport import (
    DEFAULT_NET_FEATURES,
    DMA_GRANULE,
    DeviceFault,
    DmaAllocator,
    NetDriverConfig,
    QueueState,
    RxBuf,
    RxFrame,
    TransportAdapter,
    VirtioTransport,
    resolve_features,
)
from virtwire.virtio import spec
from virtwire.virtio.driver import VirtioDriver
from virtwire.virtio.errors import QueueError
from virtwire.virtio.queue import QueueFull

# The driver's parts live beside it (``transport``, ``driver_rx``); these names stay importable
# from here, where the driver's users have always found them.
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


class VirtioNetDriver(DriverReceive):
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
        self.rxqs: list[QueueState] = []
        self.txqs: list[QueueState] = []
        self.ctrlq: QueueState | None = None
        self.stats = DriverStats()
        self.rx_layout = "small"
        self._rx_partial: dict[int, list[tuple[RxBuf, int]]] = {}
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
            wanted &= ~spec.bit(spec.VIRTIO_F_RING_PACKED)
        try:
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
        self.core.driver_ok()
        for rq in self.rxqs:
            self._kick(rq)
        if want_pairs > 1:
            self.set_queue_pairs(want_pairs)
        return self

    def fail(self) -> None:
        """Give up on the device (§2.1: FAILED), best effort."""
        self.core.mark_failed()

    def _make_queue(self, index: int, size_cap: int | None = None) -> QueueState:
        """§3.1.1 step 7 for queue ``index`` (``VirtioDriver.setup_queue``: size checks, the
        legacy device's fixed size and ring layout), then used-buffer interrupts off unless
        asked for."""
        q = self.core.setup_queue(index, size_cap or self.cfg.queue_size)
        if not self.cfg.interrupts:
            q.disable_callbacks(self.mem)
        return QueueState(index=index, q=q, size=q.size)

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
    def _kick(self, qq: QueueState) -> bool:
        q = qq.q
        q.publish(self.mem)
        if q.kick_needed(self.mem):
            self.t.notify(qq.index)
            qq.kicks += 1
            self.stats.kicks += 1
            return True
        self.stats.kicks_suppressed += 1
        return False

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
    def reset_queue(self, qq: QueueState) -> bool:
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

    def _stall_kick(self, qq: QueueState, now: float) -> None:
        self.t.notify(qq.index)
        qq.last_progress = now
        self.stats.stall_kicks += 1

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

