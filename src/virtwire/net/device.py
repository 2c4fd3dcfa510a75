"""``VirtioNet``: the virtio-net device model (virtio 1.2 §5.1) over injected frame backends.

Theory of operation
-------------------
Queues (§5.1.2): ``rx0, tx0, rx1, tx1, ..., rx(N-1), tx(N-1)`` then the control queue. The
control queue's index is ``2N`` with N = max_virtqueue_pairs when MQ is negotiated, and ``2``
otherwise (a driver without MQ sees one pair). Each pair has a ``NetBackend`` (one backend may
serve every pair; its RX then arrives through pair 0).

TX (one call per kick, batch-shaped): pop every available chain (up to ``budget``), check each
guest header (``header.check_tx_header``: a bad one drops *that frame*, counted by reason), and
hand the whole batch to the backend as iovec lists of zero-copy guest views -- with the header
when the backend takes it (TAP), without it otherwise. Partial checksums for a backend without
CSUM are finished in software on a private copy (the device must not write TX buffers). Then one
``push`` per chain, one ``publish``, one interrupt decision. Frames the backend did not take
(back-pressure) stay pending with their chains un-used and go first on the next call.

Native fast path: for split rings and a backend with ``native_tx_fd`` (TAP: writev on its fd;
null: discard), a small C function (``virtwire._native``, built on first use) consumes each run
of chains it can take whole -- readable, inside guest RAM, header acceptable -- and stops at the
first it cannot; that chain goes through the Python checks right away, then C resumes, so
frames leave in ring order and every drop is decided and counted in one place. Without a C
compiler (or while frames are traced) the pure-Python path does everything; tests run both.
RX has one too, for split and packed rings with MRG_RXBUF and a TAP-shaped backend
(``native_tx_fd``, frame length unknown), not while frames are traced:
``vw_split_rx_burst``/``vw_packed_rx_burst`` is a step-by-step mirror of the Python loop below
(stash refills in 64-chain batches, window read plus overflow area, filter, num_buffers) that
reads every frame the fd has into the guest's buffers and stages their used elements; Python
then publishes once and keeps the notification decisions. At a batch with anything unusual in
it, or a frame whose tail needs buffers the guest has not given, C stops and hands its stash
(and that frame) to the Python path, which goes on from exactly there -- same used ring, same
counters, checked by the hostile-ring property tests.

RX: the backend is read only once buffers for a frame exist, so no frame is lost while the guest
has none -- the device then enables notifications and waits for the RX kick (``rx_watch(pair,
False)`` tells a host's event loop to stop watching the backend fd meanwhile, and ``True``
again once buffers came). Chains popped for a frame but not consumed stay in a per-pair *stash*
(in ring order) for the next frame. Buffers needed: with MRG_RXBUF (§5.1.6.4) as many chains as
the frame needs, ``num_buffers`` written into the first; without it one chain must hold the
whole frame (a frame that does not fit is dropped, counted ``rx_drop_too_big``, the chain kept).
A backend that cannot tell the next frame's length (TAP) is read into the buffers of a typical
frame plus a private overflow area; a bigger (GSO) frame's tail is then copied into further
mergeable buffers, or, when the guest has too few, the frame is kept aside (``held``) until it
has enough -- never truncated, never lost.

Stopping a ring (vhost-user GET_VRING_BASE, ``queue_stopped``) publishes what was used and
rewinds the ring over stashed/pending chains, so a restarted back end offers them again.

Control queue (§5.1.6.5): ``{u8 class, u8 command, data}`` readable, ``u8 ack`` writable; a
table maps (class, command) to a handler returning VIRTIO_NET_OK/ERR. A malformed command is an
ERR, a chain without room for the ack is returned with length 0; neither resets the device.

RX filtering follows the control state (promiscuous, all-multi, MAC tables, VLAN table) when
CTRL_RX/CTRL_VLAN were negotiated; a filtered frame is counted ``rx_filtered`` and its buffers
reused.

Driving without a status register (vhost-user): ``VirtioDeviceHost`` (hosts/vhost_user.py) walks
the status machine itself and hands over started rings; the hooks here are ``queue_started``,
``queue_stopped``, ``queue_enabled``, ``send_rarp`` and ``set_mtu``; a backend wake-up is
``backend_ready(pair)``. ``start_direct(features, mem, interrupt)`` does the same walk for an
in-process host (tests, benches).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from virtwire import trace as _trace
from virtwire.backends.base import NetBackend
from virtwire.memory import GuestMemory
from virtwire.net.header import (
    ETH_HLEN,
    MAX_FRAME,
    NUM_BUFFERS_OFFSET,
    TX_DROP_REASONS,
    VirtioNetHdr,
    check_tx_header,
    finish_checksum,
    gather,
    hdr_size,
    scatter,
    skip,
)
from virtwire.net.options import BOOL, NET_OPTIONS, mac_bytes, parse_options, random_mac
from virtwire.virtio import spec as s
from virtwire.virtio.chain import DescriptorChain
from virtwire.virtio.device import VirtioDevice
from virtwire.virtio.errors import FeatureError
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.split_ring import SplitQueue

__all__ = ["VirtioNet"]

log = logging.getLogger(__name__)

_HOST_OFFLOADS = (s.VIRTIO_NET_F_HOST_TSO4, s.VIRTIO_NET_F_HOST_TSO6, s.VIRTIO_NET_F_HOST_ECN,
                  s.VIRTIO_NET_F_HOST_UFO)
_GUEST_OFFLOAD_MASK = s.bit(s.VIRTIO_NET_F_GUEST_CSUM, s.VIRTIO_NET_F_GUEST_TSO4,
                            s.VIRTIO_NET_F_GUEST_TSO6, s.VIRTIO_NET_F_GUEST_ECN,
                            s.VIRTIO_NET_F_GUEST_UFO)
_GSO_RX_MASK = s.bit(s.VIRTIO_NET_F_GUEST_TSO4, s.VIRTIO_NET_F_GUEST_TSO6,
                     s.VIRTIO_NET_F_GUEST_UFO)
_ZERO_HDR10 = bytes(10)
CONFIG_SIZE = 12  # mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu (§5.1.4)
MAC_TABLE_MAX = 64  # entries per table kept; more means "accept all" of that kind (as QEMU)


_CTRL_CLASS_NAMES = {s.VIRTIO_NET_CTRL_RX: "RX", s.VIRTIO_NET_CTRL_MAC: "MAC",
                     s.VIRTIO_NET_CTRL_VLAN: "VLAN", s.VIRTIO_NET_CTRL_ANNOUNCE: "ANNOUNCE",
                     s.VIRTIO_NET_CTRL_MQ: "MQ",
                     s.VIRTIO_NET_CTRL_GUEST_OFFLOADS: "GUEST_OFFLOADS"}
_CTRL_CMD_NAMES = {
    s.VIRTIO_NET_CTRL_RX: ("PROMISC", "ALLMULTI", "ALLUNI", "NOMULTI", "NOUNI", "NOBCAST"),
    s.VIRTIO_NET_CTRL_MAC: ("TABLE_SET", "ADDR_SET"),
    s.VIRTIO_NET_CTRL_VLAN: ("ADD", "DEL"),
    s.VIRTIO_NET_CTRL_ANNOUNCE: ("ACK",),
    s.VIRTIO_NET_CTRL_MQ: ("VQ_PAIRS_SET",),
    s.VIRTIO_NET_CTRL_GUEST_OFFLOADS: ("SET",),
}


def _ctrl_cmd_name(cls: int, cmd: int) -> str:
    names = _CTRL_CMD_NAMES.get(cls, ())
    return names[cmd] if 0 <= cmd < len(names) else str(cmd)


def _rewind(q: Any, chains: Sequence[DescriptorChain], mem: GuestMemory | None = None) -> None:
    """Give ``chains`` (popped, none used) back to the ring: move next-avail back over them.

    That is only right when they are exactly the last ones popped, in order -- the usual case.
    A split ring is checked against its avail entries; when a chain popped in between was
    already used (a guest's too-small RX buffer, a dropped TX frame), the chains are returned
    as used with length 0 instead (§2.7.8: a device may return a buffer unwritten).
    Split rings count chains (§2.7.13); packed rings count descriptors and may cross a wrap.
    """
    if not chains:
        return
    if hasattr(q, "get_used_base"):
        used = q.get_used_base()
        base = q.get_base()
        idx, wrap = base & 0x7FFF, base >> 15 & 1
        idx -= sum(c.ring_descs for c in chains)
        while idx < 0:
            idx += q.size
            wrap ^= 1
        q.set_base(idx | wrap << 15)
        q.set_used_base(used)
        return
    n = len(chains)
    start = (q.get_base() - n) & 0xFFFF
    contiguous = (start - q.next_used) & 0xFFFF == 0
    if contiguous and mem is not None:
        try:
            for k, c in enumerate(chains):
                slot = (start + k) & (q.size - 1)
                if mem.read_u16(q.avail_addr + 4 + 2 * slot) != c.head:
                    contiguous = False
                    break
        except Exception:  # noqa: BLE001 - memory already gone: give back by count
            pass
    if contiguous:
        q.set_base(start)
        return
    for c in chains:
        q.push(mem, c, 0)
    q.publish(mem)


class _Pair:
    """Per-queue-pair data-path state."""

    __slots__ = ("index", "backend", "rx_backend", "stash", "stash_cap", "tx_pending",
                 "rx_waiting", "enabled", "held", "cstash", "cring")

    def __init__(self, index: int, backend: NetBackend | None, rx_backend: bool) -> None:
        self.index = index
        self.backend = backend
        self.rx_backend = rx_backend  # False: shared backend whose RX goes via pair 0
        # RX chains popped but not yet used, with their writable views (ring order).
        self.stash: deque[tuple[DescriptorChain, list[memoryview]]] = deque()
        self.stash_cap = 0
        # TX frames the backend did not take yet: (chain, iovec).
        self.tx_pending: list[tuple[DescriptorChain, list[Any]]] = []
        self.rx_waiting = False
        self.enabled = True
        self.held: bytes | None = None  # a frame read aside, waiting for buffers
        # The native RX path's stash (``_native.VwRxStash``); at most one of the two stashes
        # holds chains at any time (``VirtioNet._rx_spill`` / ``_rx_load`` move them).
        self.cstash: Any = None
        # The native RX path's ring struct for the current guest view and ring addresses:
        # ``(view, desc, avail, used, size, struct)`` (the view held, so identity is exact).
        self.cring: tuple[Any, ...] | None = None

    def clear(self) -> None:
        for _c, views in self.stash:
            for v in views:
                v.release()
        self.stash.clear()
        self.stash_cap = 0
        self.clear_cstash()
        self.tx_pending.clear()
        self.rx_waiting = False
        self.held = None

    def clear_cstash(self) -> None:
        st = self.cstash
        if st is not None:
            st.c_start = st.c_count = st.s_start = st.s_count = st.cap = 0


def _qcounters() -> dict[str, int]:
    return {"frames": 0, "bytes": 0, "drops": 0}


class VirtioNet(VirtioDevice):
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
        self.mac = mac_bytes(opts["mac"]) if "mac" in opts else (
            mac_bytes(mac) if mac is not None else random_mac())
        self.perm_mac = self.mac
        mtu_opt = opts.get("host_mtu", opts.get("mtu"))
        self.mtu = int(mtu_opt) if mtu_opt is not None else mtu
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu={self.mtu}: must be 68..65535")
        self.link_up = BOOL.get(opts.get("link", "on"), True)
        self.announce_pending = False
        # Backends: one per pair, or one shared.
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
        self.pairs = [_Pair(i, b, rx_backend=not shared or i == 0)
                      for i, b in enumerate(backends)]
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
        for c in self.counters:
            c.update(_qcounters())
        self.hdr_len = 12
        self.mrg_rxbuf = False
        self.curr_pairs = 1
        self.budget = 256  # chains per batch
        self.max_batches = 4  # batches per call before yielding (``more_work``)
        self.more_work: Callable[[int], None] | None = None
        self.rx_watch: Callable[[int, bool], None] | None = None
        self._bounce: bytearray | None = None
        self.native = True  # use the C TX and RX fast paths when they build (``_native``)
        self._native_lib: Any = None
        self._rx_nat: Any = None  # the native RX path's ctypes objects (``_rx_native``)
        self._reset_ctrl_state()
        self._ctrl_table: dict[tuple[int, int], Callable[[bytes], int]] = {
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_PROMISC): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_ALLMULTI): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_ALLUNI): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_NOMULTI): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_NOUNI): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_NOBCAST): self._ctrl_rx_mode,
            (s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_TABLE_SET): self._ctrl_mac_table,
            (s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_ADDR_SET): self._ctrl_mac_addr,
            (s.VIRTIO_NET_CTRL_VLAN, s.VIRTIO_NET_CTRL_VLAN_ADD): self._ctrl_vlan,
            (s.VIRTIO_NET_CTRL_VLAN, s.VIRTIO_NET_CTRL_VLAN_DEL): self._ctrl_vlan,
            (s.VIRTIO_NET_CTRL_ANNOUNCE, s.VIRTIO_NET_CTRL_ANNOUNCE_ACK): self._ctrl_announce,
            (s.VIRTIO_NET_CTRL_MQ, s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET): self._ctrl_mq,
            (s.VIRTIO_NET_CTRL_GUEST_OFFLOADS, s.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET):
                self._ctrl_offloads,
        }
        self.ctrl_counters = {"commands": 0, "ok": 0, "err": 0, "bad_chains": 0}

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
        self._reset_ctrl_state()
        self._update_filter()  # with CTRL_VLAN, tagged frames need their VLAN added (as QEMU)
        self._configure_backends(f)
        for p in self.pairs:
            p.clear()
            p.enabled = p.index < self.curr_pairs
            if p.backend is not None and p.rx_backend:
                p.backend.set_enabled(p.enabled)

    def _configure_backends(self, features: int) -> None:
        seen: set[int] = set()
        for p in self.pairs:
            b = p.backend
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                # GUEST_OFFLOADS_SET may have turned some receive offloads off (§5.1.6.5.6).
                b.configure(features & ~(_GUEST_OFFLOAD_MASK & ~self.guest_offloads),
                            self.hdr_len)

    def on_reset(self) -> None:
        for p in self.pairs:
            p.clear()
        self.mac = self.perm_mac
        self.announce_pending = False
        self.config[:] = self.build_config()
        self._reset_ctrl_state()

    def attach(self, mem: GuestMemory, interrupt: Any = None) -> None:
        """New guest memory (vhost-user re-sends the table on every map change): views cached
        for stashed RX chains and pending TX frames are rebuilt against it."""
        super().attach(mem, interrupt)
        for p in self.pairs:
            if p.stash:
                p.stash = deque((c, list(c.writable(mem))) for c, _vs in p.stash)
            if p.tx_pending:
                scratch: dict[str, int] = {"drops": 0}
                p.tx_pending = [(c, iov) for c, iov in (
                    (c, self._tx_frame(c, mem, scratch, self.negotiated, self.hdr_len,
                                       p.backend)) for c, _old in p.tx_pending)
                    if iov is not None]

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

    # -- vhost-user host hooks (hosts/vhost_user.VirtioDeviceHost) ---------------------------
    def queue_started(self, index: int) -> None:
        role, pair = self.queue_role(index)
        if role in ("rx", "tx"):
            p = self.pairs[pair]
            if role == "rx":
                p.stash.clear()
                p.stash_cap = 0
                p.clear_cstash()
                p.rx_waiting = False
            else:
                p.tx_pending.clear()

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
            self._rx_spill(p, self.mem)
            _rewind(q, [c for c, _v in p.stash], self.mem)
            held = p.held  # a frame already read from the backend survives the restart
            p.clear()
            p.held = held
        else:
            _rewind(q, [c for c, _i in p.tx_pending], self.mem)
            p.tx_pending.clear()

    def queue_enabled(self, index: int, enabled: bool) -> None:
        """vhost-user SET_VRING_ENABLE: a disabled pair discards TX and supplies no RX."""
        role, pair = self.queue_role(index)
        if role in ("rx", "tx"):
            p = self.pairs[pair]
            p.enabled = enabled
            if p.backend is not None and p.rx_backend:
                p.backend.set_enabled(enabled)

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
        if p.tx_pending and self.queues[2 * pair + 1] is not None:
            self.run_guarded(2 * pair + 1, lambda i: self.process_tx(pair))
        if p.rx_backend and self.queues[2 * pair] is not None:
            self.run_guarded(2 * pair, lambda i: self.process_rx(pair))

    # -- TX (§5.1.6.2) -----------------------------------------------------------------------
    def process_tx(self, pair: int) -> bool:
        """Drain the TX queue of ``pair`` in batches; returns True when work was left over."""
        qi = 2 * pair + 1
        q = self.queues[qi]
        mem = self.mem
        if q is None or mem is None:
            return False
        p = self.pairs[pair]
        cnt = self.counters[qi]
        be = p.backend
        budget = self.budget
        take_hdr = be is not None and be.vnet_hdr
        # The C path sees no individual frames: off while frames are traced or captured.
        native_fd = (self._native_tx_fd(be, q) if self.native and _trace.FRAMES is None
                     else None)
        # Without a ``more_work`` hook nobody would call again: drain completely.
        for _ in range(self.max_batches if self.more_work is not None else 1 << 62):
            q.disable_notifications(mem)
            n_chains = 0
            if native_fd is not None and not p.tx_pending and p.enabled:
                # C takes each run of simple chains; the chain it stops at goes through the
                # Python checks right away, so frames leave in ring order.
                while n_chains < budget:
                    k, stop = self._tx_native(q, mem, native_fd, take_hdr, cnt, be)
                    n_chains += k
                    if stop != 1:
                        break
                    c = q.pop(mem)
                    if c is None:
                        break
                    n_chains += 1
                    self._tx_chains(q, mem, p, cnt, [c], qi)
                    q.publish(mem)  # C writes used slots from next_used: nothing may be staged
                    if p.tx_pending:
                        break
            room = budget - n_chains - len(p.tx_pending)
            chains = q.pop_batch(mem, room) if room > 0 and not (
                native_fd is not None and p.tx_pending) else []
            self._tx_chains(q, mem, p, cnt, chains, qi)
            n_chains += len(chains)
            if q.publish(mem) or n_chains:  # C and in-loop publishes count too
                self.signal_used(qi)
            if p.tx_pending:
                return True  # the backend is full: retried on its wake-up or the next kick
            if n_chains < budget:
                if not q.enable_notifications(mem):
                    return False
        if self.more_work is not None:
            self.more_work(qi)
        return True

    def _tx_chains(self, q: Any, mem: GuestMemory, p: _Pair, cnt: dict[str, int],
                   chains: list[DescriptorChain], qi: int) -> None:
        """Check ``chains`` (after any pending frames), send them as one batch, push used."""
        be = p.backend
        hl = self.hdr_len
        take_hdr = be is not None and be.vnet_hdr
        view = mem.view
        batch = p.tx_pending
        p.tx_pending = []
        dropped: list[DescriptorChain] = []
        for c in chains:
            segs = c.segments
            if len(segs) == 1:
                # Fast path: one readable buffer, header without offload fields.
                gpa, n, w = segs[0]
                if not w and hl + ETH_HLEN <= n <= hl + MAX_FRAME:
                    v = view(gpa, n)
                    if not (v[0] or v[1]):
                        batch.append((c, [v] if take_hdr else [v[hl:]]))
                        continue
            iov = self._tx_frame(c, mem, cnt, self.negotiated, hl, be)
            if iov is None:
                dropped.append(c)
            else:
                batch.append((c, iov))
        for c in dropped:
            q.push(mem, c, 0)
        cnt["chains"] += len(chains)
        if not batch:
            return
        if be is None or not p.enabled:
            taken = len(batch)
            cnt["drops"] += taken
            cnt["tx_drop_no_backend"] = cnt.get("tx_drop_no_backend", 0) + taken
        else:
            taken = be.send([iov for _c, iov in batch])
            while 0 < taken < len(batch):  # partial take: offer the rest while it moves
                more = be.send([iov for _c, iov in batch[taken:]])
                if not more:
                    break
                taken += more
            cnt["frames"] += taken
            cnt["bytes"] += sum(c.readable_len for c, _i in batch[:taken]) - hl * taken
            fh = _trace.FRAMES
            if fh is not None:
                for _c, iov in batch[:taken]:
                    fh("tx", list(iov), qi, hl if take_hdr else 0)
        for c, _i in batch[:taken]:
            q.push(mem, c, 0)
        if taken < len(batch):
            p.tx_pending = batch[taken:]
            cnt["tx_backpressure"] = cnt.get("tx_backpressure", 0) + 1

    def _native_ready(self) -> bool:
        """Whether the C helper is loaded (``_native``: built on first use; False without a
        compiler or with VIRTWIRE_NATIVE=0, and then not tried again)."""
        if self._native_lib is None:
            from virtwire import _native

            self._native_lib = _native.load() or False
        return bool(self._native_lib)

    def _native_tx_fd(self, be: NetBackend | None, q: Any) -> int | None:
        """The fd for the native TX fast path (-1: discard), or None when it does not apply."""
        if be is None or not isinstance(q, SplitQueue | PackedQueue):
            return None
        fd_of = getattr(be, "native_tx_fd", None)
        if fd_of is None or not self._native_ready():
            return None
        fd: int | None = fd_of()
        return fd

    def _tx_native(self, q: SplitQueue, mem: GuestMemory, fd: int, keep_hdr: bool,
                   cnt: dict[str, int], be: Any) -> tuple[int, int]:
        """Consume the simple TX chains in C (``_native/vwnet.c``); the rest stays for Python."""
        if isinstance(q, PackedQueue):
            return self._tx_native_packed(q, mem, fd, keep_hdr, cnt, be)
        if q.in_flight or not q.has_available(mem):
            return 0, 0
        from virtwire._native import VwResult, VwSplit, guest_view

        gv, own = guest_view(mem)
        try:
            size = q.size
            ring = VwSplit(gv.host(q.desc_addr, 16 * size), gv.host(q.avail_addr, 6 + 2 * size),
                           gv.host(q.used_addr, 6 + 8 * size), size, q.next_avail, q.next_used)
            res = VwResult()
            import ctypes

            # Offloads pass through in C only to a backend that keeps the header and takes
            # every negotiated HOST_* offload; otherwise such frames are left to Python.
            feats = self.negotiated & be.host_offloads if keep_hdr else 0
            n = self._native_lib.vw_split_tx_burst(ctypes.byref(ring), gv.table, gv.n,
                                                   self.hdr_len, fd, int(keep_hdr),
                                                   self.budget, feats, int(q.indirect),
                                                   ctypes.byref(res))
        except ValueError:
            return 0, 0
        finally:
            if own:
                gv.release()
        if n:
            q.next_avail = ring.next_avail
            q.next_used = ring.next_used
            self._tx_native_count(n, res, keep_hdr, cnt, be)
        return n, res.stop

    def _tx_native_packed(self, q: PackedQueue, mem: GuestMemory, fd: int, keep_hdr: bool,
                          cnt: dict[str, int], be: Any) -> tuple[int, int]:
        """Packed rings: C pops, checks and sends; the used side goes through the ring object
        (``push_batch``; ``publish`` follows in ``process_tx``)."""
        if not q.has_available(mem):
            return 0, 0
        import ctypes

        from virtwire._native import VwPacked, VwResult, guest_view

        lim = self.budget
        ids = (ctypes.c_uint16 * lim)()
        nds = (ctypes.c_uint16 * lim)()
        gv, own = guest_view(mem)
        try:
            ring = VwPacked(gv.host(q.desc_addr, 16 * q.size), q.size, q.next_avail,
                            q.avail_wrap, q.inflight)
            res = VwResult()
            feats = self.negotiated & be.host_offloads if keep_hdr else 0
            n = self._native_lib.vw_packed_tx_pop(ctypes.byref(ring), gv.table, gv.n,
                                                  self.hdr_len, fd, int(keep_hdr), lim, feats,
                                                  int(q.indirect), ids, nds, ctypes.byref(res))
        except ValueError:
            return 0, 0
        finally:
            if own:
                gv.release()
        if n:
            q.next_avail, q.avail_wrap, q.inflight = (ring.next_avail, ring.avail_wrap,
                                                      ring.inflight)
            q.push_batch(mem, [(DescriptorChain(head=ids[i], ring_descs=nds[i]), 0)
                               for i in range(n)])
            # Visible now: a malformed chain met next must not strand these (NEEDS_RESET).
            q.publish(mem)
            self._tx_native_count(n, res, keep_hdr, cnt, be)
        return n, res.stop

    def _tx_native_count(self, n: int, res: Any, keep_hdr: bool, cnt: dict[str, int],
                         be: Any) -> None:
        cnt["frames"] += res.frames
        cnt["bytes"] += res.bytes
        cnt["chains"] += n
        cnt["tx_native"] = cnt.get("tx_native", 0) + n
        if res.gso:
            cnt["tx_gso"] = cnt.get("tx_gso", 0) + res.gso
        bc = getattr(be, "counters", None)
        if bc is not None:
            bc["tx_frames"] = bc.get("tx_frames", 0) + res.frames - res.errors
            bc["tx_bytes"] = bc.get("tx_bytes", 0) + res.bytes + (
                self.hdr_len * res.frames if keep_hdr else 0)
            if res.errors:
                bc["tx_errors"] = bc.get("tx_errors", 0) + res.errors

    def _tx_frame(self, c: DescriptorChain, mem: GuestMemory, cnt: dict[str, int],
                  features: int, hl: int, be: NetBackend | None) -> list[Any] | None:
        """The iovec to hand the backend for chain ``c``, or None (dropped, counted)."""
        views = list(c.readable(mem))
        reason = None
        if c.readable_len < hl:
            reason = "short_header"
            hdr = None
        else:
            v0 = views[0]
            hb = v0[:hl] if len(v0) >= hl else gather(views, hl)
            hdr = None
            if hb[0] or hb[1]:  # flags or gso_type: the slow path with full checks
                hdr = VirtioNetHdr.unpack(hb, hl)
                reason = check_tx_header(hdr, c.readable_len - hl, features)
            elif c.readable_len - hl < ETH_HLEN:
                reason = "runt"
            elif c.readable_len - hl > MAX_FRAME:
                reason = "oversize"
        if reason is not None:
            key = "tx_drop_" + reason
            cnt[key] = cnt.get(key, 0) + 1
            cnt["drops"] += 1
            n = cnt[key]
            if n & (n - 1) == 0:
                log.warning("%s: TX frame dropped: %s (%d so far)", self.name, reason, n)
            return None
        take_hdr = be is not None and be.vnet_hdr
        if hdr is not None and hdr.gso_type:
            cnt["tx_gso"] = cnt.get("tx_gso", 0) + 1
        if hdr is not None and hdr.needs_csum and (not take_hdr or not be.host_offloads >>
                                                   s.VIRTIO_NET_F_CSUM & 1):
            # Finish the checksum on a private copy (TX buffers are read-only to the device).
            frame = bytearray(b"".join(skip(views, hl)))
            finish_checksum(frame, hdr.csum_start, hdr.csum_offset)
            cnt["tx_sw_csum"] = cnt.get("tx_sw_csum", 0) + 1
            if take_hdr:
                h = VirtioNetHdr(gso_type=hdr.gso_type, hdr_len=hdr.hdr_len,
                                 gso_size=hdr.gso_size)
                return [memoryview(h.pack(hl)), memoryview(frame)]
            return [memoryview(frame)]
        if take_hdr:
            return views
        return skip(views, hl)

    # -- RX (§5.1.6.3, §5.1.6.4) -------------------------------------------------------------
    def _max_rx_len(self) -> int:
        """Buffers to prepare when the backend cannot tell the frame length."""
        if self.negotiated & _GSO_RX_MASK & (self.guest_offloads | ~_GUEST_OFFLOAD_MASK):
            return self.hdr_len + MAX_FRAME
        return self.hdr_len + max(self.mtu or 1500, 1500) + ETH_HLEN + 4

    def process_rx(self, pair: int) -> bool:
        """Move frames from the backend into the guest's RX buffers (see module docstring).

        Returns True when frames may be left in the backend (budget or buffers ran out)."""
        for _ in range(64):
            state = self._rx_round(pair)
            if state != "retry":
                return state == "more"
        return True

    def _rx_round(self, pair: int) -> str:
        """One RX pass: "done" (backend empty), "more" (waiting or budget), "retry"."""
        qi = 2 * pair
        q = self.queues[qi]
        mem = self.mem
        p = self.pairs[pair]
        be = p.backend
        if q is None or mem is None or be is None or not p.rx_backend or not p.enabled:
            return "done"
        cnt = self.counters[qi]
        hl = self.hdr_len
        mrg = self.mrg_rxbuf
        vnet = be.vnet_hdr
        stash = p.stash
        filt = self._filter_active
        clear_flags = vnet and not self.has_feature(s.VIRTIO_NET_F_GUEST_CSUM)
        drain = getattr(be, "drain_wakeup", None)
        if drain is not None:
            drain()
        # RX kicks are only wanted while we wait for buffers (re-enabled when starved below).
        q.disable_notifications(mem)
        frames = 0
        starved = False
        limit = self.budget * self.max_batches if self.more_work is not None else 1 << 62
        preread = 0  # a frame the C path read and left to finish here (its length)
        native_stop = -1
        if (mrg and vnet and hl == 12 and p.held is None and self.native
                and _trace.FRAMES is None and isinstance(q, SplitQueue | PackedQueue)):
            fd = self._native_rx_fd(be)
            if fd is not None:
                k, native_stop, preread = self._rx_native(q, mem, p, cnt, be, fd, clear_flags,
                                                          limit)
                frames += k
                starved = native_stop == 2
        # C stopped at an empty backend (0), no buffers (2) or the limit (3): nothing left here.
        while native_stop not in (0, 2, 3) and frames < limit:
            held = p.held
            want = len(held) if held is not None else be.pending_len()
            if want == 0:
                break
            need = (self._max_rx_len() if want is None else
                    (want if vnet else want + hl))
            # Collect buffers: enough for ``need`` (mergeable) or one chain (not mergeable).
            if mrg and want is None:
                # A TAP: the length is known only after the read. Read into the buffers of a
                # typical frame plus a private overflow area; a bigger frame's tail is copied
                # into further buffers afterwards (no need to hold 64 KiB of buffers per read).
                got = self._rx_unknown_mrg(q, mem, p, cnt, be, hl, vnet, preread)
                preread = 0
                if got is None:
                    starved = True
                    break
                views, cap, n = got
                if n == 0:
                    break
                if n < 0:
                    continue  # dropped, or read aside until buffers suffice
            elif mrg:
                if p.stash_cap < need:
                    self._stash_more(q, mem, p, cnt, hl, need)
                cap = p.stash_cap
                if cap < need and (want is not None or cap < hl + ETH_HLEN):
                    starved = True
                    break
            else:
                if not stash and not self._stash_more(q, mem, p, cnt, hl, 1):
                    starved = True
                    break
                cap = stash[0][0].writable_len
                if want is not None and cap < need:
                    # §5.1.6.3: without MRG_RXBUF one buffer must hold the frame.
                    if held is not None:
                        p.held = None
                        self._count_rx_drop(cnt, "too_big")
                    else:
                        self._drop_rx(be, cnt, "too_big")
                    continue
            if not (mrg and want is None) and cap < need:
                # Unknown length and fewer buffers than the largest frame: read it aside (one
                # copy) so its length is known; it waits there until buffers suffice.
                if self._bounce is None:
                    self._bounce = bytearray(hl + MAX_FRAME + 64)
                n = be.recv([memoryview(self._bounce)])
                if n == 0:
                    break
                p.held = bytes(self._bounce[:n])
                cnt["rx_held"] = cnt.get("rx_held", 0) + 1
                continue
            if mrg and want is None:
                pass  # views, cap and n come from _rx_unknown_mrg
            elif mrg and stash[0][0].writable_len < need:
                # The chains this frame needs (a TAP's unknown length: all of them).
                views = []
                acc = 0
                for c, vs in stash:
                    views.extend(vs)
                    acc += c.writable_len
                    if acc >= need:
                        break
                cap = acc
            elif mrg:
                c0, views = stash[0]
                cap = c0.writable_len
            else:
                views = stash[0][1]
            if not (mrg and want is None):
                target = views if vnet else skip(views, hl)
                if held is not None:
                    p.held = None
                    n = scatter(target, held)
                else:
                    n = be.recv(target)
                if n == 0:
                    break
            total = n if vnet else n + hl
            if total > cap:
                # tun reports the whole frame length even when our buffers cut it short.
                self._count_rx_drop(cnt, "truncated")
                continue
            if vnet and n < hl:
                self._count_rx_drop(cnt, "short")
                continue
            if filt and not self._rx_accept(gather(views, 18, hl)):
                cnt["rx_filtered"] = cnt.get("rx_filtered", 0) + 1
                continue
            first = views
            v0 = first[0]
            if vnet:
                if len(v0) >= 2 and v0[1]:
                    cnt["rx_gso"] = cnt.get("rx_gso", 0) + 1
                if clear_flags:
                    v0[0] = 0
            # Hand the chains over: mergeable may span several (§5.1.6.4).
            used = 0
            left = total
            while stash and (left > 0 or used == 0):
                c, _vs = stash.popleft()
                w = min(c.writable_len, left)
                q.push(mem, c, w)
                p.stash_cap -= c.writable_len
                left -= w
                used += 1
                if not mrg:
                    break
            if not vnet:
                # A plain backend: our own header (no offloads), num_buffers included.
                hb = _ZERO_HDR10 + used.to_bytes(2, "little") if hl == 12 else _ZERO_HDR10
                if len(v0) >= hl:
                    v0[:hl] = hb
                else:
                    scatter(first, hb)
            elif hl == 12:
                if len(v0) >= 12:
                    v0[10] = used & 0xFF
                    v0[11] = used >> 8
                else:
                    scatter(first, used.to_bytes(2, "little"), NUM_BUFFERS_OFFSET)
            frames += 1
            fh = _trace.FRAMES
            if fh is not None:
                fh("rx", list(first), qi, hl, total - hl)
            cnt["chains"] += used
            cnt["frames"] += 1
            cnt["bytes"] += total - hl
        if q.publish(mem):  # frames, and chains returned unused (too small for a header)
            self.signal_used(qi)
        if starved:
            cnt["rx_wait_buffers"] = cnt.get("rx_wait_buffers", 0) + 1
            if q.enable_notifications(mem):
                return "retry"  # buffers arrived between our last pop and the re-enable
            if not p.rx_waiting:
                p.rx_waiting = True
                if self.rx_watch is not None:
                    self.rx_watch(pair, False)
            return "more"
        if p.rx_waiting:
            p.rx_waiting = False
            if self.rx_watch is not None:
                self.rx_watch(pair, True)
        if frames >= limit:
            if self.more_work is not None:
                self.more_work(qi)
            return "more"
        return "done"

    def _count_rx_drop(self, cnt: dict[str, int], reason: str) -> None:
        key = "rx_drop_" + reason
        cnt[key] = cnt.get(key, 0) + 1
        cnt["drops"] += 1
        if cnt[key] & (cnt[key] - 1) == 0:
            log.warning("%s: RX frame dropped: %s (%d so far)", self.name, reason, cnt[key])

    def _rx_unknown_mrg(self, q: Any, mem: GuestMemory, p: _Pair, cnt: dict[str, int],
                        be: NetBackend, hl: int, vnet: bool, preread: int = 0
                        ) -> tuple[list[memoryview], int, int] | None:
        """Read one frame of unknown length (mergeable buffers): ``(views, capacity, n)``;
        n == 0 nothing pending, n < 0 frame dropped or held; None: no buffers at all.

        ``preread``: the native path already read a frame of that length into the stash's
        buffers and the overflow area (it stops there when the tail needs more chains)."""
        window = hl + ETH_HLEN + 4 + max(self.mtu or 1500, 1500)
        if not preread:
            if p.stash_cap < window:
                self._stash_more(q, mem, p, cnt, hl, window)
            if p.stash_cap < hl + ETH_HLEN:
                return None
        stash = p.stash
        views: list[memoryview] = []
        acc = 0
        k = 0
        for c, vs in stash:
            views.extend(vs)
            acc += c.writable_len
            k += 1
            if acc >= window:
                break
        if self._bounce is None:
            self._bounce = bytearray(hl + MAX_FRAME + 64)
        bounce = memoryview(self._bounce)
        n = preread or be.recv([*(views if vnet else skip(views, hl)), bounce])
        if n == 0:
            return views, acc, 0
        total = n if vnet else n + hl
        if total <= acc:
            return views, acc, n
        over = total - acc
        if over > len(bounce):
            self._count_rx_drop(cnt, "truncated")
            return views, acc, -1
        cnt["rx_overflow"] = cnt.get("rx_overflow", 0) + 1
        if p.stash_cap < total and not self._stash_more(q, mem, p, cnt, hl, total):
            # Not enough buffers for the whole frame yet: keep it aside (backend format).
            off = 0 if vnet else hl
            p.held = gather(views, acc - off, off) + bytes(bounce[:over])
            cnt["rx_held"] = cnt.get("rx_held", 0) + 1
            return views, acc, -1
        extra: list[memoryview] = []
        for i in range(k, len(stash)):
            c, vs = stash[i]
            extra.extend(vs)
            acc += c.writable_len
            if acc >= total:
                break
        scatter(extra, bounce[:over])
        return views + extra, acc, n

    # -- native RX (``_native/vwnet.c`` vw_split_rx_burst) ------------------------------------
    def _native_rx_fd(self, be: NetBackend) -> int | None:
        """The fd the C RX path reads frames from (a TAP: one read, one frame with its
        virtio_net_hdr), or None when it does not apply (no fd, lengths known, no compiler)."""
        fd_of = getattr(be, "native_tx_fd", None)
        if fd_of is None or be.pending_len() is not None or not self._native_ready():
            return None
        fd: int | None = fd_of()
        return fd if fd is not None and fd >= 0 else None

    def _rx_native(self, q: SplitQueue | PackedQueue, mem: GuestMemory, p: _Pair,
                   cnt: dict[str, int], be: Any, fd: int, clear_flags: bool, limit: int
                   ) -> tuple[int, int, int]:
        """Frames from ``fd`` into mergeable RX chains in C, mirroring the Python path (see
        vwnet.c). Returns ``(frames, stop, preread)``; on stop 1 (a chain C leaves to Python)
        and 4 (frame ``preread`` bytes long read, to finish in Python) the stash is moved to
        Python, which goes on from exactly where C stopped."""
        nat = self._rx_nat
        if nat is None:
            import ctypes

            from virtwire import _native

            if self._bounce is None:
                self._bounce = bytearray(self.hdr_len + MAX_FRAME + 64)
            # SAFETY: the overflow area is exported to C for the device's life; the bytearray
            # is never resized (``_bounce`` is created once and only written into).
            bounce = (ctypes.c_char * len(self._bounce)).from_buffer(self._bounce)
            res = _native.VwRxResult()
            nat = self._rx_nat = (_native, ctypes.byref, res, ctypes.byref(res),
                                  ctypes.addressof(bounce), len(self._bounce), bounce)
        _n, byref, res, res_ref, bounce_addr, bounce_len, _keep = nat
        if p.cstash is None:
            p.cstash = _n.VwRxStash()
        if p.stash and not self._rx_load(p):
            return 0, 1, 0
        hl = self.hdr_len
        window = hl + ETH_HLEN + 4 + max(self.mtu or 1500, 1500)
        packed = isinstance(q, PackedQueue)
        gv, own = _n.guest_view(mem)
        try:
            size = q.size
            # SAFETY: the guest regions stay exported while the region set lasts (``guest_view``).
            if packed:
                pring = _n.VwPackedRx(gv.host(q.desc_addr, 16 * size), size, q.next_avail,
                                      q.avail_wrap, q.next_used, q.used_wrap, q.inflight,
                                      int(q._staged_first is not None), 0, 0)
                self._native_lib.vw_packed_rx_burst(
                    byref(pring), gv.table, gv.n, byref(p.cstash), fd, hl, window, bounce_addr,
                    bounce_len, int(clear_flags), min(limit, 1 << 30),
                    byref(self._rx_cfilter()), res_ref)
            else:
                cr = p.cring
                if cr is not None and cr[0] is gv and cr[1:5] == (q.desc_addr, q.avail_addr,
                                                                   q.used_addr, size):
                    ring = cr[5]
                    ring.next_avail, ring.next_used = q.next_avail, q.next_used
                else:
                    ring = _n.VwSplit(gv.host(q.desc_addr, 16 * size),
                                      gv.host(q.avail_addr, 6 + 2 * size),
                                      gv.host(q.used_addr, 6 + 8 * size), size, q.next_avail,
                                      q.next_used)
                    # (kept only with a view kept per region set, never one released below)
                    p.cring = None if own else (gv, q.desc_addr, q.avail_addr, q.used_addr,
                                                size, ring)
                self._native_lib.vw_split_rx_burst(
                    byref(ring), gv.table, gv.n, byref(p.cstash), fd, hl, window, bounce_addr,
                    bounce_len, int(clear_flags), min(limit, 1 << 30), q._staged,
                    byref(self._rx_cfilter()), res_ref)
        except ValueError:  # a ring outside guest RAM: the Python path reports it
            self._rx_spill(p, mem)
            return 0, 1, 0
        finally:
            if own:
                gv.release()
        # The C code popped ``popped`` chains and wrote ``staged`` used elements after the
        # ones already staged, exactly as pop_batch/push would; the ring object publishes
        # them (packed: the first element's flags, held back, are stored by publish).
        if packed:
            q.next_avail, q.avail_wrap, q.inflight = (pring.next_avail, pring.avail_wrap,
                                                      pring.inflight)
            q.next_used, q.used_wrap = pring.next_used, pring.used_wrap
            if pring.have_first and q._staged_first is None:
                q._staged_first = (pring.first_slot, pring.first_flags)
        else:
            q.next_avail = ring.next_avail
            q._in_flight += res.popped - res.staged
        q._staged += res.staged
        if res.frames:
            cnt["frames"] += res.frames
            cnt["bytes"] += res.bytes
            cnt["chains"] += res.chains
            cnt["rx_native"] = cnt.get("rx_native", 0) + res.frames
        for key, v in (("rx_gso", res.gso), ("rx_overflow", res.overflow),
                       ("rx_filtered", res.filtered)):
            if v:
                cnt[key] = cnt.get(key, 0) + v
        for _ in range(res.truncated):
            self._count_rx_drop(cnt, "truncated")
        for _ in range(res.runt):
            self._count_rx_drop(cnt, "short")
        bc = getattr(be, "counters", None)
        if bc is not None:
            bc["rx_frames"] = bc.get("rx_frames", 0) + res.reads
            bc["rx_bytes"] = bc.get("rx_bytes", 0) + res.read_bytes
            if res.errors:
                bc["rx_errors"] = bc.get("rx_errors", 0) + res.errors
        if res.errors:
            log.warning("%s: read failed: %s", getattr(be, "name", "backend"),
                        os.strerror(res.err))
        if res.stop in (1, 4):
            self._rx_spill(p, mem)
        return res.frames, res.stop, res.pending if res.stop == 4 else 0

    def _rx_cfilter(self) -> Any:
        """The receive filter as the C path takes it (``_rx_accept``'s state), kept until a
        control command, a reset or a MAC change."""
        key = (self._filter_gen, self.mac, self.negotiated, self._filter_active)
        if self._cfilter is not None and self._cfilter[0] == key:
            return self._cfilter[1]
        from virtwire._native import RX_MAC_MAX, VwRxFilter

        f = VwRxFilter()
        f.active = int(self._filter_active)
        f.vlan = int(self.has_feature(s.VIRTIO_NET_F_CTRL_VLAN))
        f.mac_check = int(not self.promisc and self.has_feature(s.VIRTIO_NET_F_CTRL_RX))
        f.nobcast, f.nomulti, f.nouni = int(self.nobcast), int(self.nomulti), int(self.nouni)
        f.multi_all = int(self.allmulti or self.mc_overflow)
        f.uni_all = int(self.alluni or self.uc_overflow)
        f.mac[:] = list(self.mac)
        for table, arr, n in ((self.uc_table, f.uc, "n_uc"), (self.mc_table, f.mc, "n_mc")):
            macs = sorted(table)[:RX_MAC_MAX]  # the Python tables hold at most MAC_TABLE_MAX
            setattr(f, n, len(macs))
            for i, m in enumerate(macs):
                arr[6 * i : 6 * i + 6] = list(m)
        for vid in self.vlans:
            if 0 <= vid < 4096:
                f.vlans[vid >> 3] |= 1 << (vid & 7)
        self._cfilter = (key, f)
        return f

    def _rx_spill(self, p: _Pair, mem: GuestMemory | None) -> None:
        """Move the C stash's chains (already popped, in ring order) to the Python stash."""
        st = p.cstash
        if st is None or not st.c_count:
            return
        from virtwire._native import RX_MAXC, RX_MAXS

        for i in range(st.c_count):
            ci = (st.c_start + i) & (RX_MAXC - 1)
            s0 = st.seg0[ci]
            segs = [(st.gpa[(s0 + j) & (RX_MAXS - 1)], st.len[(s0 + j) & (RX_MAXS - 1)], True)
                    for j in range(st.nseg[ci])]
            c = DescriptorChain(head=st.head[ci], segments=segs, writable_len=st.ccap[ci],
                                ring_descs=st.ndesc[ci])
            p.stash.append((c, list(c.writable(mem)) if mem is not None else []))
            p.stash_cap += st.ccap[ci]
        p.clear_cstash()

    def _rx_load(self, p: _Pair) -> bool:
        """Move the Python stash to the C stash when every chain is plain (writable segments
        only, within the C stash's room); False leaves it where it is."""
        from virtwire._native import RX_MAXC, RX_MAXS

        st = p.cstash
        stash = p.stash
        if st.c_count or len(stash) > RX_MAXC:
            return False
        nsegs = 0
        for c, _vs in stash:
            for _g, n, w in c.segments:
                if not w:
                    return False
                nsegs += n > 0
        if nsegs > RX_MAXS:
            return False
        k = 0
        for i, (c, vs) in enumerate(stash):
            st.head[i] = c.head
            st.seg0[i] = k
            st.ccap[i] = c.writable_len
            st.ndesc[i] = c.ring_descs
            for g, n, _w in c.segments:
                if n:
                    st.gpa[k] = g
                    st.len[k] = n
                    k += 1
            st.nseg[i] = k - st.seg0[i]
            for v in vs:
                v.release()
        st.c_start = st.s_start = 0
        st.c_count = len(stash)
        st.s_count = k
        st.cap = p.stash_cap
        stash.clear()
        p.stash_cap = 0
        return True

    def _stash_more(self, q: Any, mem: GuestMemory, p: _Pair, cnt: dict[str, int], hl: int,
                    need: int) -> bool:
        """Pop RX chains (in batches) until the stash holds ``need`` bytes; False if the ring
        ran dry first. Chains too small for the header (§5.1.6.3.1) are returned unused."""
        while p.stash_cap < need:
            chains = q.pop_batch(mem, 64)
            if not chains:
                return False
            for c in chains:
                if c.writable_len < hl:
                    q.push(mem, c, 0)
                    cnt["drops"] += 1
                    cnt["rx_bad_chain"] = cnt.get("rx_bad_chain", 0) + 1
                    continue
                p.stash.append((c, list(c.writable(mem))))
                p.stash_cap += c.writable_len
        return True

    def _drop_rx(self, be: NetBackend, cnt: dict[str, int], reason: str) -> None:
        if self._bounce is None:
            self._bounce = bytearray(self.hdr_len + MAX_FRAME + 64)
        be.recv([memoryview(self._bounce)])
        self._count_rx_drop(cnt, reason)

    # -- RX filter (§5.1.6.5.1, §5.1.6.5.2, §5.1.6.5.3) --------------------------------------
    def _reset_ctrl_state(self) -> None:
        self.promisc = True  # §5.1.6.5.1: promiscuous until the driver says otherwise
        self.allmulti = False
        self.alluni = False
        self.nomulti = False
        self.nouni = False
        self.nobcast = False
        self.uc_table: set[bytes] = set()
        self.mc_table: set[bytes] = set()
        self.uc_overflow = False
        self.mc_overflow = False
        self.vlans: set[int] = set()
        self.guest_offloads = _GUEST_OFFLOAD_MASK
        self._filter_active = False
        self._filter_gen = getattr(self, "_filter_gen", 0) + 1  # the native RX filter copy
        self._cfilter: tuple[Any, Any] | None = None

    def _update_filter(self) -> None:
        self._filter_active = (
            (self.has_feature(s.VIRTIO_NET_F_CTRL_RX) and not self.promisc)
            or self.has_feature(s.VIRTIO_NET_F_CTRL_VLAN)
        )

    def _rx_accept(self, head: bytes) -> bool:
        """Would the guest's filter state accept a frame starting with ``head`` (18 bytes)?"""
        if len(head) < ETH_HLEN:
            return False
        if self.has_feature(s.VIRTIO_NET_F_CTRL_VLAN) and head[12:14] == b"\x81\x00" \
                and len(head) >= 16:
            vid = int.from_bytes(head[14:16], "big") & 0x0FFF
            if vid not in self.vlans:
                return False
        if self.promisc or not self.has_feature(s.VIRTIO_NET_F_CTRL_RX):
            return True
        dst = head[0:6]
        if dst == b"\xff" * 6:
            return not self.nobcast
        if dst[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.mc_overflow or dst in self.mc_table
        if self.nouni:
            return False
        return self.alluni or self.uc_overflow or dst == self.mac or dst in self.uc_table

    # -- control queue (§5.1.6.5) ------------------------------------------------------------
    def process_ctrl(self, index: int) -> None:
        """§5.1.6.5: serve every control command, then re-arm kicks (``drain_queue`` moves
        avail_event / clears NO_NOTIFY, so with EVENT_IDX the driver's next command is kicked)."""
        mem = self.mem
        if self.queues[index] is None or mem is None:
            return

        def handle(c: Any) -> int:
            if c.writable_len < 1 or c.readable_len < 2:
                self.ctrl_counters["bad_chains"] += 1
                log.warning("%s: control chain without class/command or ack byte", self.name)
                return 0
            data = gather(list(c.readable(mem)), min(c.readable_len, 4 + 2 * (
                4 + 6 * (MAC_TABLE_MAX * 64))))
            ack = self.control_command(data[0], data[1], data[2:])
            c.write(mem, bytes([ack]))
            return 1

        self.drain_queue(index, handle, batch=64)

    def control_command(self, cls: int, cmd: int, data: bytes) -> int:
        """Run one control command; VIRTIO_NET_OK or VIRTIO_NET_ERR (never raises)."""
        self.ctrl_counters["commands"] += 1
        handler = self._ctrl_table.get((cls, cmd))
        try:
            ok = handler is not None and handler(bytes([cls, cmd]) + data)
        except (ValueError, IndexError) as e:
            log.warning("%s: control command %d/%d: %s", self.name, cls, cmd, e)
            ok = False
        self._filter_gen += 1  # filter tables may have changed: the native copy is rebuilt
        tr = _trace.TRACE
        if tr is not None:
            tr.emit("ctrl", "cmd", **{"class": cls, "cmd": cmd,
                                      "class_name": _CTRL_CLASS_NAMES.get(cls, str(cls)),
                                      "cmd_name": _ctrl_cmd_name(cls, cmd),
                                      "ack": s.VIRTIO_NET_OK if ok else s.VIRTIO_NET_ERR})
        if ok:
            self.ctrl_counters["ok"] += 1
            return s.VIRTIO_NET_OK
        self.ctrl_counters["err"] += 1
        log.info("%s: control command class %d cmd %d -> ERR", self.name, cls, cmd)
        return s.VIRTIO_NET_ERR

    def _ctrl_rx_mode(self, d: bytes) -> bool:
        cmd = d[1]
        if not self.has_feature(s.VIRTIO_NET_F_CTRL_RX) or len(d) != 3:
            return False
        if cmd > s.VIRTIO_NET_CTRL_RX_ALLMULTI and not self.has_feature(
                s.VIRTIO_NET_F_CTRL_RX_EXTRA):
            return False
        on = bool(d[2])
        attr = {s.VIRTIO_NET_CTRL_RX_PROMISC: "promisc", s.VIRTIO_NET_CTRL_RX_ALLMULTI:
                "allmulti", s.VIRTIO_NET_CTRL_RX_ALLUNI: "alluni", s.VIRTIO_NET_CTRL_RX_NOMULTI:
                "nomulti", s.VIRTIO_NET_CTRL_RX_NOUNI: "nouni",
                s.VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast"}[cmd]
        setattr(self, attr, on)
        self._update_filter()
        return True

    def _ctrl_mac_table(self, d: bytes) -> bool:
        """§5.1.6.5.2: two ``{le32 entries; u8 macs[entries][6]}``: unicast, then multicast."""
        if not self.has_feature(s.VIRTIO_NET_F_CTRL_RX):
            return False
        off = 2
        tables: list[list[bytes]] = []
        for _ in range(2):
            if off + 4 > len(d):
                return False
            n = int.from_bytes(d[off : off + 4], "little")
            off += 4
            if n > (len(d) - off) // 6:
                return False
            tables.append([d[off + 6 * i : off + 6 * i + 6] for i in range(n)])
            off += 6 * n
        if off != len(d):
            return False
        uc, mc = tables
        self.uc_overflow = len(uc) > MAC_TABLE_MAX
        self.mc_overflow = len(mc) > MAC_TABLE_MAX
        self.uc_table = set(uc[:MAC_TABLE_MAX])
        self.mc_table = set(mc[:MAC_TABLE_MAX])
        self._update_filter()
        return True

    def _ctrl_mac_addr(self, d: bytes) -> bool:
        if not self.has_feature(s.VIRTIO_NET_F_CTRL_MAC_ADDR) or len(d) != 8:
            return False
        self.mac = bytes(d[2:8])
        self.config[0:6] = self.mac
        return True

    def _ctrl_vlan(self, d: bytes) -> bool:
        if not self.has_feature(s.VIRTIO_NET_F_CTRL_VLAN) or len(d) != 4:
            return False
        vid = int.from_bytes(d[2:4], "little")
        if vid >= 4096:
            return False
        if d[1] == s.VIRTIO_NET_CTRL_VLAN_ADD:
            self.vlans.add(vid)
        else:
            self.vlans.discard(vid)
        self._update_filter()
        return True

    def _ctrl_announce(self, d: bytes) -> bool:
        if not self.has_feature(s.VIRTIO_NET_F_GUEST_ANNOUNCE) or len(d) != 2:
            return False
        if self.announce_pending:
            self.announce_pending = False
            self.config[6:8] = (s.VIRTIO_NET_S_LINK_UP if self.link_up else 0).to_bytes(
                2, "little")
        return True

    def _ctrl_mq(self, d: bytes) -> bool:
        """§5.1.6.5.5: use queue pairs 0..n-1 (1 <= n <= max_virtqueue_pairs)."""
        if not self.has_feature(s.VIRTIO_NET_F_MQ) or len(d) != 4:
            return False
        n = int.from_bytes(d[2:4], "little")
        if not 1 <= n <= self.max_pairs:
            return False
        self.curr_pairs = n
        for p in self.pairs:
            en = p.index < n
            if en != p.enabled:
                p.enabled = en
                if p.backend is not None and p.rx_backend:
                    p.backend.set_enabled(en)
        return True

    def _ctrl_offloads(self, d: bytes) -> bool:
        """§5.1.6.5.6: GUEST_OFFLOADS_SET: a subset of the negotiated GUEST_* offloads."""
        if not self.has_feature(s.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) or len(d) != 10:
            return False
        bits = int.from_bytes(d[2:10], "little")
        allowed = self.negotiated & _GUEST_OFFLOAD_MASK
        if bits & ~allowed:
            return False
        self.guest_offloads = bits
        self._configure_backends(self.negotiated)
        return True

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
        d["rx_mode"] = {"promisc": self.promisc, "allmulti": self.allmulti,
                        "uc_table": len(self.uc_table), "mc_table": len(self.mc_table),
                        "vlans": sorted(self.vlans)}
        d["backends"] = [
            {"pair": p.index, "name": p.backend.name, **p.backend.stats()}
            if p.backend is not None and p.rx_backend else {"pair": p.index, "name": None}
            for p in self.pairs
        ]
        return d


__all__ += ["TX_DROP_REASONS"]
