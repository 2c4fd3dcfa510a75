"""``VirtioNet``: the virtio-net device model (virtio 1.2 §5.1) over injected frame backends.

Theory of operation
-------------------
Queues (§5.1.2): ``rx0, tx0, rx1, tx1, ..., rx(N-1), tx(N-1)`` then the control queue. The
control queue's index is ``2N`` with N = max_virtqueue_pairs when MQ is negotiated, and ``2``
otherwise (a driver without MQ sees one pair). Each pair (``pair.QueuePair``) has a
``NetBackend`` (one backend may serve every pair; its RX then arrives through pair 0).

This module is the model: features (§5.1.3), configuration space (§5.1.4), queue roles,
activation and reset, the hooks a host without a status register uses, and ``stats()``. The
data path lives beside it: ``tx.Transmit`` (§5.1.6.2), ``rx.Receive`` (§5.1.6.3-4),
``ctrl.ControlQueue`` with the ``ctrl.RxFilter`` (§5.1.6.5), ``native`` (the C helper's
binding); ``VirtioNet`` combines them.

Stopping a ring (vhost-user GET_VRING_BASE, ``queue_stopped``) publishes what was used and
rewinds the ring over stashed/pending chains (``DeviceQueue.rewind``), so a restarted back end
offers them again.

Driving without a status register (vhost-user): ``VirtioDeviceHost`` (hosts/vhost_device.py) walks
the status machine itself and hands over started rings; the hooks here are ``queue_started``,
``queue_stopped``, ``queue_enabled``, ``send_rarp`` and ``set_mtu``; a backend wake-up is
``backend_ready(pair)``. ``start_direct(features, mem, interrupt)`` does the same walk for an
in-process host (tests, benches).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from virtwire import trace as _trace
from virtwire.memory import GuestMemory, GuestMemoryError
from virtwire.net import native
from virtwire.net.backend import NetBackend
from virtwire.net.counters import NetQueueCounters, RxCounters, TxCounters
from virtwire.net.ctrl import GUEST_OFFLOAD_MASK, MAC_TABLE_MAX, ControlQueue, RxFilter
from virtwire.net.header import TX_DROP_REASONS, VirtioNetHdr, hdr_size
from virtwire.net.options import BOOL, NET_OPTIONS, mac_bytes, parse_options, random_mac
from virtwire.net.pair import QueuePair
from virtwire.net.rx import Receive
from virtwire.net.tx import Transmit
from virtwire.virtio import spec as s
from virtwire.virtio.counters import QueueCounters
from virtwire.virtio.device import VirtioDevice
from virtwire.virtio.errors import DriverError, FeatureError

__all__ = ["VirtioNet", "TX_DROP_REASONS", "CONFIG_SIZE", "MAC_TABLE_MAX"]

log = logging.getLogger(__name__)

_HOST_OFFLOADS = (s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_HOST_TSO6, s.VIRTIO_NET_F_HOST_ECN,
                  s.VIRTIO_NET_F_HOST_UFO)
CONFIG_SIZE = 12  # mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu (§5.1.4)


class VirtioNet(Transmit, Receive, ControlQueue, VirtioDevice):
    """virtio-net device (§5.1) with a ``NetBackend`` per queue pair (see module docstring)."""

    device_id = s.VIRTIO_ID_NET

    def __init__(
        self,
        backend: NetBackend | Sequence[NetBackend] | None = None,
        *,
        options: str | Mapping[str, Any] | None = None,
        mac: str | bytes | None = None,
        queues: int | None = None,
        queue_size: int = 256,
        mtu: int | None = None,
        name: str | None = None,
        legacy: bool = False,
    ) -> None:
        opts = parse_options(options)
        self.options = opts
        pairs = int(opts.get("queues", queues or 1))
        if not 1 <= pairs <= s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(f"queues={pairs}: must be 1..{s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX}")
        self.max_pairs = pairs
        self.rx_filter = RxFilter(mac_bytes(opts["mac"]) if "mac" in opts else (
            mac_bytes(mac) if mac is not None else random_mac()))
        self.perm_mac = self.mac
        mtu_opt = opts.get("host_mtu", opts.get("mtu"))
        self.mtu = int(mtu_opt) if mtu_opt is not None else mtu
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu={self.mtu}: must be 68..65535")
        self.link_up = BOOL.get(opts.get("link", "on"), True)
        self.announce_pending = False
        self.pairs = self._make_pairs(backend, pairs)
        self._features = self._compute_features(opts)
        rxq = int(opts.get("rx_queue_size", opts.get("queue_size", queue_size)))
        txq = int(opts.get("tx_queue_size", opts.get("queue_size", queue_size)))
        sizes = [rxq, txq] * pairs
        if self._features >> s.VIRTIO_NET_F_CTRL_VQ & 1:
            sizes.append(64)
        super().__init__(
            sizes,
            event_idx=BOOL[opts.get("event_idx", "on")],
            indirect=BOOL[opts.get("indirect_desc", "on")],
            packed=BOOL[opts.get("packed", "on")],
            legacy=legacy,
            name=name or "virtio-net",
        )
        self.hdr_len = 12
        self.mrg_rxbuf = False
        self.curr_pairs = 1
        self.guest_offloads = GUEST_OFFLOAD_MASK
        self.budget = 256  # chains per batch
        self.max_batches = 4  # batches per call before yielding (``more_work``)
        self.more_work: Callable[[int], None] | None = None
        self.rx_watch: Callable[[int, bool], None] | None = None
        self.native = True  # use the C TX and RX fast paths when they build (``native``)
        self._native_lib: Any = None
        self.init_rx()
        self.init_ctrl()

    @staticmethod
    def _make_pairs(backend: NetBackend | Sequence[NetBackend] | None,
                    pairs: int) -> list[QueuePair]:
        """One backend per pair, or one shared (its RX then arrives through pair 0)."""
        if backend is None:
            backends: list[NetBackend | None] = [None] * pairs
            shared = False
        elif isinstance(backend, Sequence) and not isinstance(backend, str | bytes):
            if len(backend) != pairs:
                raise ValueError(f"{len(backend)} backends for {pairs} queue pairs")
            backends = list(backend)
            shared = False
        else:
            backends = [backend] * pairs  # type: ignore[list-item]
            shared = pairs > 1
        return [QueuePair(i, b, rx_backend=not shared or i == 0) for i, b in enumerate(backends)]

    @property
    def mac(self) -> bytes:
        """The device's MAC (config space; the receive filter's own address)."""
        return self.rx_filter.mac

    @mac.setter
    def mac(self, value: bytes) -> None:
        self.rx_filter.mac = value

    @property
    def vlans(self) -> set[int]:
        """The VLAN table the driver set (§5.1.6.5.3)."""
        return self.rx_filter.vlans

    def new_queue_counters(self, index: int) -> QueueCounters:
        """Typed counters per direction (``net.counters``); the control queue's are plain."""
        if index < 2 * self.max_pairs:
            return TxCounters() if index & 1 else RxCounters()
        return NetQueueCounters()

    def native_lib(self) -> Any:
        """The C helper, or None (``native.load``: built on first use; None without a
        compiler or with VIRTWIRE_NATIVE=0, and then not tried again)."""
        if self._native_lib is None:
            self._native_lib = native.load() or False
        return self._native_lib or None

    # -- features (§5.1.3) -------------------------------------------------------------------
    def _compute_features(self, opts: Mapping[str, str]) -> int:
        f = s.bit(
            s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_TSO4,
            s.VIRTIO_NET_F_GUEST_TSO6, s.VIRTIO_NET_F_GUEST_ECN, s.VIRTIO_NET_F_MAC,
            s.VIRTIO_NET_F_MRG_RXBUF, s.VIRTIO_NET_F_STATUS, s.VIRTIO_NET_F_CTRL_VQ,
            s.VIRTIO_NET_F_CTRL_RX, s.VIRTIO_NET_F_CTRL_VLAN, s.VIRTIO_NET_F_CTRL_MAC_ADDR,
            s.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, s.VIRTIO_NET_F_GUEST_ANNOUNCE,
        )
        # HOST_* segmentation offloads only when every backend takes them.
        host = None
        for p in self.pairs:
            if p.backend is not None:
                ho = p.backend.host_offloads
                host = ho if host is None else host & ho
        for b in _HOST_OFFLOADS:
            if host is not None and host >> b & 1:
                f |= 1 << b
        if self.max_pairs > 1:
            f |= 1 << s.VIRTIO_NET_F_MQ
        if self.mtu is not None:
            f |= 1 << s.VIRTIO_NET_F_MTU
        for key, bits in NET_OPTIONS.items():
            if key in opts and not BOOL[opts[key]]:
                for b in bits:
                    f &= ~(1 << b)
        # Drop whatever lost a requirement (e.g. csum=off removes HOST_TSO*, ctrl_vq=off MQ).
        changed = True
        while changed:
            changed = False
            for b in range(64):
                if not f >> b & 1:
                    continue
                req = s.NET_FEATURE_REQUIRES.get(b, ())
                anyof = s.NET_FEATURE_REQUIRES_ANY.get(b)
                if any(not f >> r & 1 for r in req) or (anyof and not any(f >> r & 1
                                                                            for r in anyof)):
                    f &= ~(1 << b)
                    changed = True
        if not f >> s.VIRTIO_NET_F_MQ & 1 and self.max_pairs > 1:
            log.warning("virtio-net: %d queue pairs need MQ (and CTRL_VQ); using 1",
                        self.max_pairs)
            self.max_pairs = 1
            self.pairs = self.pairs[:1]
            self.pairs[0].rx_backend = True
        return f

    def device_features(self) -> int:
        return self._features

    def validate_features(self, features: int) -> None:
        """§5.1.3.1 Feature bit requirements (spec.NET_FEATURE_REQUIRES*)."""
        for b in range(64):
            if not features >> b & 1:
                continue
            for r in s.NET_FEATURE_REQUIRES.get(b, ()):
                if not features >> r & 1:
                    raise FeatureError(f"{s.FEATURE_NAMES.get(b, b)} requires "
                                       f"{s.FEATURE_NAMES.get(r, r)}")
            anyof = s.NET_FEATURE_REQUIRES_ANY.get(b)
            if anyof and not any(features >> r & 1 for r in anyof):
                names = " or ".join(s.FEATURE_NAMES.get(r, str(r)) for r in anyof)
                raise FeatureError(f"{s.FEATURE_NAMES.get(b, b)} requires {names}")

    # -- configuration space (§5.1.4) --------------------------------------------------------
    def build_config(self) -> bytes:
        cfg = bytearray(CONFIG_SIZE)
        cfg[0:6] = self.mac
        st = (s.VIRTIO_NET_S_LINK_UP if self.link_up else 0)
        if self.announce_pending:
            st |= s.VIRTIO_NET_S_ANNOUNCE
        cfg[6:8] = st.to_bytes(2, "little")
        cfg[8:10] = self.max_pairs.to_bytes(2, "little")
        cfg[10:12] = (self.mtu or 1500).to_bytes(2, "little")
        return bytes(cfg)

    def config_write_hook(self, offset: int, data: bytes) -> bool:
        """Only the MAC is writable, and only by a legacy driver or one without CTRL_MAC_ADDR
        (§5.1.4 legacy note; Linux writes it when it sets a MAC without the control queue)."""
        if offset + len(data) > 6:
            return False
        if self.has_feature(s.VIRTIO_NET_F_CTRL_MAC_ADDR) and not self.legacy:
            return False
        mac = bytearray(self.mac)
        mac[offset : offset + len(data)] = data
        self.mac = bytes(mac)
        self.config[0:6] = self.mac
        return True

    def set_link(self, up: bool) -> None:
        """Link status change (§5.1.4 status, VIRTIO_NET_S_LINK_UP) with a config interrupt."""
        if up == self.link_up:
            return
        self.link_up = up
        tr = _trace.TRACE
        if tr is not None:
            tr.emit("config", "change", field="status", val=int.from_bytes(
                self.build_config()[6:8], "little"), link="up" if up else "down")
        self.config_changed(self.build_config())

    def announce(self) -> bool:
        """Ask the guest to announce itself (§5.1.6.5.4, GUEST_ANNOUNCE)."""
        if not self.has_feature(s.VIRTIO_NET_F_GUEST_ANNOUNCE):
            return False
        self.announce_pending = True
        self.config_changed(self.build_config())
        return True

    # -- queue roles (§5.1.2) ----------------------------------------------------------------
    def ctrl_index(self) -> int | None:
        """§5.1.2: the control queue is 2N (N = max pairs with MQ, else 1); None if absent."""
        if not self._features >> s.VIRTIO_NET_F_CTRL_VQ & 1:
            return None
        if self.status & (s.VIRTIO_CONFIG_S_FEATURES_OK | s.VIRTIO_CONFIG_S_DRIVER_OK):
            if not self.has_feature(s.VIRTIO_NET_F_CTRL_VQ):
                return None  # e.g. vhost-user: QEMU keeps the control queue for itself
            if not self.has_feature(s.VIRTIO_NET_F_MQ):
                return 2
        return 2 * self.max_pairs

    def queue_role(self, index: int) -> tuple[str, int]:
        """``("rx"|"tx", pair)`` or ``("ctrl", -1)``; ``("none", -1)`` for an unused index."""
        if index == self.ctrl_index():
            return ("ctrl", -1)
        if 0 <= index < 2 * self.max_pairs:
            return ("tx" if index & 1 else "rx", index // 2)
        return ("none", -1)

    # -- activation --------------------------------------------------------------------------
    def on_activate(self) -> None:
        f = self.negotiated
        self.hdr_len = hdr_size(f)
        self.mrg_rxbuf = bool(f >> s.VIRTIO_NET_F_MRG_RXBUF & 1)
        self.curr_pairs = 1 if f >> s.VIRTIO_NET_F_CTRL_VQ & 1 else self.max_pairs
        self.guest_offloads = GUEST_OFFLOAD_MASK
        self.rx_filter.reset()
        self.rx_filter.set_features(bool(f >> s.VIRTIO_NET_F_CTRL_RX & 1),
                                    bool(f >> s.VIRTIO_NET_F_CTRL_VLAN & 1))
        self.configure_backends(f)
        for p in self.pairs:
            p.clear()
            p.enabled = p.index < self.curr_pairs
            if p.backend is not None and p.rx_backend:
                p.backend.set_enabled(p.enabled)

    def configure_backends(self, features: int) -> None:
        seen: set[int] = set()
        for p in self.pairs:
            b = p.backend
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                # GUEST_OFFLOADS_SET may have turned some receive offloads off (§5.1.6.5.6).
                b.configure(features & ~(GUEST_OFFLOAD_MASK & ~self.guest_offloads),
                            self.hdr_len)

    def on_reset(self) -> None:
        for p in self.pairs:
            p.clear()
        self.mac = self.perm_mac
        self.announce_pending = False
        self.config[:] = self.build_config()
        self.guest_offloads = GUEST_OFFLOAD_MASK
        self.rx_filter.reset()

    def attach(self, mem: GuestMemory, interrupt: Any = None) -> None:
        """New guest memory (vhost-user re-sends the table on every map change): views cached
        for stashed RX chains and pending TX frames are rebuilt against it."""
        super().attach(mem, interrupt)
        for p in self.pairs:
            if p.stash:
                p.stash = deque((c, list(c.writable(mem))) for c, _vs in p.stash)
            if p.tx_pending:
                scratch = TxCounters()
                p.tx_pending = [(c, iov) for c, iov in (
                    (c, self.tx_frame(c, mem, scratch, self.negotiated, self.hdr_len,
                                      p.backend)) for c, _old in p.tx_pending)
                    if iov is not None]

    def check_memory(self, mem: GuestMemory) -> None:
        """Raise ``GuestMemoryError`` if a stashed RX chain or pending TX frame would not lie in
        ``mem`` (a memory table change is refused then, before anything changes)."""
        chains = [c for p in self.pairs for c in ([c for c, _ in p.stash]
                                                  + [c for c, _ in p.tx_pending])]
        for c in chains:
            for gpa, n, _w in c.segments:
                if n and not mem.contains(gpa, n):
                    raise GuestMemoryError(f"chain {c.head}: buffer {gpa:#x}+{n:#x} held")

    def start_direct(self, features: int, mem: GuestMemory, interrupt: Any = None) -> None:
        """Walk §3.1.1 without a transport (in-process hosts): features, FEATURES_OK,
        DRIVER_OK. Queue configuration must already be in ``queue_config``; raises
        ``FeatureError`` when the features are refused."""
        saved = [(q.size, q.desc, q.driver, q.device, q.ready) for q in self.queue_config]
        self.reset()
        for q, (size, desc, drv, dev, ready) in zip(self.queue_config, saved):
            q.size, q.desc, q.driver, q.device, q.ready = size, desc, drv, dev, ready
        self.attach(mem, interrupt)
        A, D, F, K = (s.VIRTIO_CONFIG_S_ACKNOWLEDGE, s.VIRTIO_CONFIG_S_DRIVER,
                      s.VIRTIO_CONFIG_S_FEATURES_OK, s.VIRTIO_CONFIG_S_DRIVER_OK)
        self.write_status(A)
        self.write_status(A | D)
        self.set_driver_features(features)
        if not self.write_status(A | D | F) or not self.status & F:
            raise FeatureError(self.last_error or "features refused")
        self.write_status(A | D | F | K)

    # -- vhost-user host hooks (hosts/vhost_device.VirtioDeviceHost) -------------------------
    def queue_started(self, index: int) -> None:
        role, pair = self.queue_role(index)
        if role == "rx":
            self.pairs[pair].clear_rx()
        elif role == "tx":
            self.pairs[pair].tx_pending.clear()

    def queue_stopped(self, index: int) -> None:
        """Publish what was used and give stashed/pending chains back (GET_VRING_BASE)."""
        q = self.queues[index] if 0 <= index < len(self.queues) else None
        role, pair = self.queue_role(index)
        if q is None or role not in ("rx", "tx") or self.mem is None:
            return
        p = self.pairs[pair]
        try:
            q.publish(self.mem)
        except Exception as e:  # guest memory may already be gone
            log.debug("%s: publish at stop of queue %d: %s", self.name, index, e)
        if role == "rx":
            self.rx_spill(p, self.mem)
            q.rewind([c for c, _v in p.stash], self.mem)
            held = p.held  # a frame already read from the backend survives the restart
            p.clear()
            p.held = held
        else:
            q.rewind([c for c, _i in p.tx_pending], self.mem)
            p.tx_pending.clear()

    def queue_enabled(self, index: int, enabled: bool) -> None:
        """vhost-user SET_VRING_ENABLE: a disabled pair discards TX and supplies no RX."""
        role, pair = self.queue_role(index)
        if role in ("rx", "tx"):
            self.pairs[pair].set_enabled(enabled)

    def set_mtu(self, mtu: int) -> None:
        if 68 <= mtu <= 65535:
            self.mtu = mtu
            self.config[10:12] = mtu.to_bytes(2, "little")

    def send_rarp(self, mac: bytes) -> None:
        """vhost-user SEND_RARP: inject a RARP announcement for ``mac`` into the backend."""
        eth = b"\xff" * 6 + bytes(mac) + b"\x80\x35"
        body = (b"\x00\x01\x08\x00\x06\x04\x00\x03" + bytes(mac) + b"\x00" * 4 + bytes(mac)
                + b"\x00" * 4)
        frame = (eth + body).ljust(60, b"\x00")
        b = self.pairs[0].backend
        if b is None:
            return
        if b.vnet_hdr:
            b.send([[memoryview(VirtioNetHdr().pack(self.hdr_len) + frame)]])
        else:
            b.send([[memoryview(frame)]])

    # -- queue dispatch ----------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        role, pair = self.queue_role(index)
        if role == "rx":
            self.process_rx(pair)
        elif role == "tx":
            self.process_tx(pair)
        elif role == "ctrl":
            self.process_ctrl(index)
        else:
            self._refuse(f"notify of unused queue {index}")

    def backend_ready(self, pair: int) -> None:
        """A backend has RX frames (or room for pending TX): serve both directions of ``pair``.

        Guest faults become NEEDS_RESET (``run_guarded``), never exceptions."""
        if not 0 <= pair < len(self.pairs) or not self.active:
            return
        p = self.pairs[pair]
        index = 2 * pair + 1
        try:
            if p.tx_pending:
                self.process_tx(pair)
            index = 2 * pair
            if p.rx_backend:
                self.process_rx(pair)  # it asks whether the pair can receive (``rx_round``)
        except (DriverError, GuestMemoryError) as e:
            self.counters[index].errors += 1
            self.needs_reset(f"queue {index}: {e}")

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        d = super().stats()
        names = []
        for i in range(self.num_queues):
            role, pair = self.queue_role(i)
            names.append(f"{role}{pair}" if pair >= 0 else role)
        for qd, n in zip(d["queues"], names):
            qd["name"] = n
        d["mac"] = ":".join(f"{b:02x}" for b in self.mac)
        d["link"] = "up" if self.link_up else "down"
        d["queue_pairs"] = {"max": self.max_pairs, "current": self.curr_pairs}
        d["hdr_len"] = self.hdr_len
        d["mrg_rxbuf"] = self.mrg_rxbuf
        d["ctrl"] = dict(self.ctrl_counters)
        d["rx_mode"] = self.rx_filter.summary()
        d["backends"] = [
            {"pair": p.index, "name": p.backend.name, **p.backend.stats()}
            if p.backend is not None and p.rx_backend else {"pair": p.index, "name": None}
            for p in self.pairs
        ]
        return d
