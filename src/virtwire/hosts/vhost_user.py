"""vhost-user back end: our virtio device served to QEMU (or DPDK's virtio-user) over a socket.

Theory of operation
-------------------
QEMU keeps the PCI transport of the guest's virtio-net card and hands its *queues* to us
(docs/interop/vhost-user.rst): guest RAM arrives as memfds (SET_MEM_TABLE) that we mmap, each ring
as a size, three front-end virtual addresses and a start index (SET_VRING_NUM/ADDR/BASE), and two
eventfds per ring -- the kick (guest -> us, SET_VRING_KICK) and the call (us -> guest interrupt,
SET_VRING_CALL). There is no status register: feature negotiation is SET_FEATURES, and a ring
runs between its SET_VRING_KICK ("started") and GET_VRING_BASE ("stopped").

Per ring, the state is (vhost-user.rst "Ring states"):

=========  ==========================================================================
stopped    not processed at all (initial; after GET_VRING_BASE)
started    SET_VRING_KICK received with memory, size and addresses known and valid
enabled    SET_VRING_ENABLE 1, or SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES;
           a started-but-disabled ring is processed without side effects (the device
           discards TX and supplies no RX)
=========  ==========================================================================

Every message is decoded and structurally checked by ``vhost_user_proto`` (the table); this module
adds the semantic checks -- ring index below the number of rings, ring size, addresses that
translate through the memory table, features that were offered -- and refuses violations with one
log line (and a failure REPLY_ACK when asked), closing any fd it does not keep. A request that
expects a reply (a GET) and cannot be answered drops the connection instead, since answering
nothing would hang the front end. The device itself is not trusted to be told anything twice: a
ring is restarted from scratch each time it is started.

The device is hosted through a narrow interface (``HostedDevice``): the back end owns the queue
objects and the eventfds, the device processes queues when asked (``queue_kicked``) and asks for
an interrupt through the ``notify`` callback it was given; the back end coalesces interrupts so a
ring is signalled at most once per loop iteration (``loop.defer``).

Restart. With QEMU's ``reconnect=`` the front end re-sends the whole handshake to a restarted
back end. When QEMU could not read GET_VRING_BASE (we were killed) it restores a split ring's
next-avail index from the used index in guest memory and sends that as SET_VRING_BASE; we also
compare with ``used.idx`` ourselves and resume from it (buffers popped but never used are offered
again; an RX buffer we had taken was never filled, a TX frame may be sent twice -- as DPDK does).
A packed ring has no used index in shared memory, and QEMU re-sends the base it had when the
ring last started; ``packed_position_from_ring`` reads the position back from the descriptor
flags instead (unambiguous when every buffer took one slot, as Linux's with INDIRECT_DESC).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from virtwire import trace as _trace
from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_user_proto import (
    ConfigSpace,
    FramingError,
    MemRegion,
    MemTable,
    Message,
    P,
    ProtocolError,
    VringAddr,
    VringFile,
    VringState,
)
from virtwire.hosts.vhost_user_proto import (
    VhostUserRequest as R,
)
from virtwire.loop import EventFd, EventLoop, TimerHandle
from virtwire.memory import GuestMemoryError, MmapGuestMemory
from virtwire.virtio import spec
from virtwire.virtio.errors import DriverError
from virtwire.virtio.split_ring import SplitQueue

log = logging.getLogger(__name__)

__all__ = [
    "HostedDevice",
    "VhostUserBackend",
    "Vring",
    "Refused",
    "DEFAULT_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
    "VirtioDeviceHost",
    "build_rarp",
    "packed_position_from_ring",
]

VHOST_F_LOG_ALL = 26  # dirty logging for migration (never offered: no LOG_SHMFD)

DEFAULT_PROTOCOL_FEATURES = spec.bit(
    vp.VHOST_USER_PROTOCOL_F_MQ,
    vp.VHOST_USER_PROTOCOL_F_RARP,
    vp.VHOST_USER_PROTOCOL_F_REPLY_ACK,
    vp.VHOST_USER_PROTOCOL_F_NET_MTU,
    vp.VHOST_USER_PROTOCOL_F_CONFIG,
    vp.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
)
MAX_MEM_SLOTS = 8


class Refused(Exception):
    """A request we refuse (the front end's fault); the message is the log line's reason."""


class HostedDevice(Protocol):
    """What the back end needs from the virtio device it hosts.

    Queue ``i``'s object (``SplitQueue``/``PackedQueue``) is owned by the back end and handed over
    in ``queue_started``; ``notify()`` asks for the ring's interrupt. Guest faults raised while
    processing are ``DriverError``s; the device is expected to count and log them itself.
    """

    @property
    def device_features(self) -> int: ...

    @property
    def num_queues(self) -> int:
        """How many rings the device has (virtio-net: 2 x queue pairs, no control queue here)."""

    def config_bytes(self) -> bytes:
        """The device configuration space (virtio 1.2 §5.1.4 for net)."""

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG; raise ``Refused``/``DriverError`` for read-only fields."""

    def set_features(self, features: int) -> int | None:
        """SET_FEATURES (the driver's acked bits, VHOST_USER_F_PROTOCOL_FEATURES removed);
        returns the bits the device took on when it drops some (e.g. QEMU-owned ones)."""

    def queue_started(self, index: int, queue: Any, mem: Any, notify: Callable[[], None]) -> None:
        ...

    def queue_stopped(self, index: int) -> None: ...

    def queue_enabled(self, index: int, enabled: bool) -> None: ...

    def queue_kicked(self, index: int) -> None:
        """Process ring ``index`` (drain it: batch, one publish, at most one ``notify``). It
        may come for a ring stopped after its kick was read: ignored then."""

    def memory_changed(self, mem: Any) -> None: ...

    def send_rarp(self, mac: bytes) -> None: ...

    def set_mtu(self, mtu: int) -> None: ...

    def reset(self) -> None: ...


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


def build_rarp(mac: bytes) -> bytes:
    """A RARP "request reverse" frame announcing ``mac`` (RFC 903), as QEMU's announce sends."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    body = (b"\x00\x01" b"\x08\x00" b"\x06\x04" b"\x00\x03" + mac + b"\x00" * 4 + mac
            + b"\x00" * 4)
    return (eth + body).ljust(60, b"\x00")


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


class VhostUserBackend:
    """The back end of one vhost-user socket (one device), served by ``loop``.

    ``server=True`` listens on ``path`` (QEMU connects with ``-chardev socket,path=...``);
    ``server=False`` connects to QEMU's listening socket (``-chardev socket,server=on``) and
    retries every ``reconnect`` seconds while it is absent or after it went away.
    """

    def __init__(
        self,
        device: HostedDevice,
        loop: EventLoop,
        path: str,
        *,
        server: bool = True,
        name: str = "",
        packed: bool = True,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        queue_pairs: int | None = None,
        max_queue_size: int = spec.VIRTQ_MAX_SIZE,
        reconnect: float = 1.0,
    ) -> None:
        self.device = device
        self.loop = loop
        self.path = path
        self.server = server
        self.name = name or os.path.basename(path)
        self.packed_ok = packed
        self.offered_protocol_features = protocol_features
        self.max_queue_size = max_queue_size
        self.reconnect = reconnect
        nq = device.num_queues
        self.queue_pairs = queue_pairs if queue_pairs is not None else max(1, nq // 2)
        self.vrings = [Vring(i) for i in range(nq)]
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.mem: MmapGuestMemory | None = None
        self.features = 0  # acked virtio features (incl. PROTOCOL_FEATURES bit as sent)
        self.protocol_features = 0
        self.owner = False
        self.mtu: int | None = None
        self.connections = 0
        self.refused = 0
        self.messages = 0
        self._retry: TimerHandle | None = None
        self._closed = False
        self._region_refs: dict[tuple[int, int, int, int], int] = {}

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self.server:
            self._listen()
        else:
            self._try_connect()

    def _listen(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)  # a stale socket of an earlier run
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(self.path)
        except OSError as e:
            s.close()
            raise OSError(e.errno, e.strerror, self.path) from None
        s.listen(2)
        s.setblocking(False)
        self.listener = s
        self.loop.add_reader(s, self._on_accept)
        log.info("%s: listening on %s", self.name, self.path)

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            log.warning("%s: refused a second front end on %s (one is connected)",
                        self.name, self.path)
            conn.close()
            return
        self._attach(conn)

    def _try_connect(self) -> None:
        self._retry = None
        if self._closed or self.conn is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("%s: connect %s: %s", self.name, self.path, e)
            self._retry = self.loop.call_later(self.reconnect, self._try_connect)
            return
        self._attach(s)

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(5.0)  # a message body that never arrives must not hang the loop
        self.conn = conn
        self.connections += 1
        self.loop.add_reader(conn, self._on_readable)
        log.info("%s: front end connected (%d)", self.name, self.connections)

    def disconnect(self, reason: str = "") -> None:
        """Drop the front end: stop every ring, unmap memory, forget negotiated state."""
        if self.conn is None:
            return
        log.info("%s: front end disconnected%s", self.name, f" ({reason})" if reason else "")
        self.loop.remove_reader(self.conn)
        self.conn.close()
        self.conn = None
        self._reset_state()
        if not self.server and not self._closed:
            self._retry = self.loop.call_later(self.reconnect, self._try_connect)

    def _reset_state(self) -> None:
        for vr in self.vrings:
            self._stop_ring(vr)
            vr.close_fds()
            vr.num = vr.base = 0
            vr.addr = None
            vr.enabled = False
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: device reset failed", self.name)
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self._region_refs = {}
        self.features = self.protocol_features = 0
        self.owner = False

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self.conn is not None:
            self.disconnect("closing")
        else:
            self._reset_state()  # messages may have been handled without a socket (tests)
        if self.listener is not None:
            self.loop.remove_reader(self.listener)
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- message pump ---------------------------------------------------------------------------
    def _on_readable(self) -> None:
        assert self.conn is not None
        try:
            msg = vp.recv_message(self.conn)
        except FramingError as e:
            self.refused += 1
            log.warning("%s: unusable message stream: %s", self.name, e)
            self.disconnect("framing error")
            return
        except ProtocolError as e:
            self.refused += 1
            log.warning("%s: refused message: %s", self.name, e)
            return
        except (OSError, TimeoutError) as e:
            self.disconnect(f"socket error: {e}")
            return
        if msg is None:
            self.disconnect("EOF")
            return
        self.handle(msg)

    def handle(self, msg: Message) -> None:
        """Validate, dispatch and answer one message (also the entry point for tests)."""
        self.messages += 1
        try:
            rspec, payload = vp.decode_request(msg)
        except ProtocolError as e:
            msg.close_fds()
            self._refuse(msg, str(e), expects_reply=bool(
                vp.REQUESTS.get(msg.request) and vp.REQUESTS[msg.request].reply))
            return
        if _trace.TRACE is not None:
            _trace.vhost_message(rspec.name, msg.request, len(msg.payload), len(msg.fds),
                                 payload)
        handler = _HANDLERS.get(msg.request)
        try:
            if handler is None:
                raise Refused("not supported by this back end")
            result = handler(self, msg, payload)
        except (Refused, DriverError, GuestMemoryError) as e:
            msg.close_fds()
            self._refuse(msg, f"{rspec.name}: {e}", expects_reply=rspec.reply is not None)
            return
        msg.close_fds()  # whatever the handler did not take
        log.debug("%s: %s %s", self.name, rspec.name, payload if payload is not None else "")
        if rspec.reply is not None:
            self._send(msg.request, vp.encode_payload(rspec.reply, result))
            if _trace.TRACE is not None:
                _trace.vhost_reply(rspec.name, msg.request, result)
        elif msg.need_reply and self._acks():
            self._send(msg.request, vp.encode_payload(P.U64, 0))
            if _trace.TRACE is not None:
                _trace.vhost_reply(rspec.name, msg.request, 0)

    def _acks(self) -> bool:
        return bool(self.protocol_features >> vp.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)

    def _refuse(self, msg: Message, reason: str, *, expects_reply: bool) -> None:
        self.refused += 1
        log.warning("%s: refused %s", self.name, reason if reason.startswith(msg.name)
                    else f"{msg.name}: {reason}")
        if expects_reply:
            self.disconnect(f"cannot answer {msg.name}")
        elif msg.need_reply and self._acks():
            self._send(msg.request, vp.encode_payload(P.U64, 1))

    def _send(self, request: int, payload: bytes) -> None:
        if self.conn is None:
            return
        try:
            vp.send_message(self.conn, vp.encode(request, payload, reply=True))
        except OSError as e:
            self.disconnect(f"send failed: {e}")

    # -- helpers ----------------------------------------------------------------------------------
    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise Refused(f"ring index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    @property
    def offered_features(self) -> int:
        f = self.device.device_features | spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)
        if not self.packed_ok:
            f &= ~spec.bit(spec.VIRTIO_F_RING_PACKED)
        return f

    @property
    def packed(self) -> bool:
        return bool(self.features >> spec.VIRTIO_F_RING_PACKED & 1)

    def _new_queue(self, vr: Vring) -> Any:
        event_idx = bool(self.features >> spec.VIRTIO_F_EVENT_IDX & 1)
        indirect = bool(self.features >> spec.VIRTIO_F_INDIRECT_DESC & 1)
        if self.packed:
            from virtwire.virtio.packed_ring import PackedQueue  # P's module

            return PackedQueue(vr.num, event_idx=event_idx, indirect=indirect)
        return SplitQueue(vr.num, max_size=self.max_queue_size, event_idx=event_idx,
                          indirect=indirect)

    def _translate(self, vr: Vring) -> tuple[int, int, int]:
        """Front-end virtual ring addresses -> guest-physical (through userspace_addr)."""
        assert vr.addr is not None and self.mem is not None
        n = vr.num
        if self.packed:
            sizes = (16 * n, 4, 4)  # descriptor ring, driver event, device event (§2.8.10)
        else:
            sizes = (16 * n, 6 + 2 * n, 6 + 8 * n)
        a = vr.addr
        try:
            return (
                self.mem.uva_to_gpa(a.desc_user_addr, sizes[0]),
                self.mem.uva_to_gpa(a.avail_user_addr, sizes[1]),
                self.mem.uva_to_gpa(a.used_user_addr, sizes[2]),
            )
        except GuestMemoryError as e:
            raise Refused(f"ring {vr.index}: {e}") from None

    def _try_start(self, vr: Vring) -> None:
        """Start ring ``vr`` if everything it needs is known (called at SET_VRING_KICK)."""
        if vr.started:
            self._stop_ring(vr)
        if self.mem is None:
            raise Refused(f"ring {vr.index}: started before SET_MEM_TABLE")
        if vr.addr is None or vr.num == 0:
            raise Refused(f"ring {vr.index}: started before SET_VRING_NUM/ADDR")
        desc, drv, dev = self._translate(vr)
        q = self._new_queue(vr)
        q.set_addresses(desc, drv, dev)
        try:
            q.validate(self.mem)
        except DriverError as e:
            raise Refused(f"ring {vr.index}: {e}") from None
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
            # with what the guest can see (see module docstring, "Restart").
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
        q.ready = True
        q = _trace.wrap_queue(q, vr.index)  # itself unless tracing is on
        vr.queue = q
        vr.started = True
        self.device.queue_started(vr.index, q, self.mem, lambda vr=vr: self._notify(vr))
        self.device.queue_enabled(vr.index, vr.enabled)
        if vr.kick is not None:
            self.loop.add_reader(vr.kick, self._on_kick, vr)
        else:
            vr.poll_timer = self.loop.call_every(0.001, self._kicked, vr)
        log.info("%s: ring %d started (%s, %d entries, base %d, %s)", self.name, vr.index,
                 "packed" if self.packed else "split", vr.num, q.get_base(),
                 "enabled" if vr.enabled else "disabled")
        # Buffers may already be waiting (restart): process once without a kick.
        self.loop.defer(("vring", id(self), vr.index), self._kicked, vr)

    def _stop_ring(self, vr: Vring) -> None:
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

    def _on_kick(self, vr: Vring) -> None:
        if vr.kick is None:
            return
        if vr.kick.read():
            vr.kicks += 1
            tr = _trace.TRACE
            if tr is not None:
                tr.emit("kick", "kick", q=vr.index)
            # Straight to the device (the kick path is short: epoll, this, the device).
            self.loop.defer(("vring", id(self), vr.index), self.device.queue_kicked, vr.index)

    def _kicked(self, vr: Vring) -> None:
        if not vr.started:
            return
        self.device.queue_kicked(vr.index)

    def _notify(self, vr: Vring) -> None:
        self.loop.defer(("call", id(self), vr.index), self._signal_call, vr)

    def _signal_call(self, vr: Vring) -> None:
        if vr.call is not None:
            vr.interrupts += 1
            vr.call.write(1)
            tr = _trace.TRACE
            if tr is not None:
                tr.emit("irq", "irq", q=vr.index, kind="call")

    def kick_ring(self, index: int) -> None:
        """Process ring ``index`` as if kicked (a frame backend has data for an RX ring)."""
        vr = self.vrings[index]
        if vr.started:
            self.loop.defer(("vring", id(self), index), self._kicked, vr)

    def ring_error(self, index: int) -> None:
        """Signal the ring's error eventfd (SET_VRING_ERR) after a guest fault on it."""
        vr = self.vrings[index]
        vr.errors += 1
        if vr.err is not None:
            vr.err.write(1)

    # -- request handlers (one per row of the table we support) --------------------------------
    def _get_features(self, msg: Message, _p: None) -> int:
        return self.offered_features

    def _set_features(self, msg: Message, features: int) -> None:
        extra = features & ~(self.offered_features | spec.bit(VHOST_F_LOG_ALL))
        if extra:
            raise Refused(f"features {spec.feature_names(extra)} were not offered")
        if features & spec.bit(VHOST_F_LOG_ALL):
            raise Refused("dirty logging (VHOST_F_LOG_ALL) is not supported")
        old_packed = self.packed
        self.features = features
        if any(vr.started for vr in self.vrings) and old_packed != self.packed:
            raise Refused("ring format changed while rings run")
        acked = features & ~spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)
        if _trace.TRACE is not None:
            _trace.features_event("ack", acked)
        applied = self.device.set_features(acked)
        if _trace.TRACE is not None:  # no FEATURES_OK over vhost-user: accepted is negotiated
            _trace.features_event("negotiated", applied if isinstance(applied, int) else acked)
        if not features >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for vr in self.vrings:  # without protocol features every ring is enabled
                self._set_enabled(vr, True)
        log.info("%s: features %s", self.name, " ".join(spec.feature_names(features)))

    def _set_owner(self, msg: Message, _p: None) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message, _p: None) -> None:
        # Deprecated; treated as a device reset that keeps the connection (as QEMU expects).
        for vr in self.vrings:
            self._stop_ring(vr)
        self.device.reset()
        self.features = 0
        self.owner = False

    def _reset_device(self, msg: Message, _p: None) -> None:
        for vr in self.vrings:
            self._stop_ring(vr)
            vr.enabled = False
        self.device.reset()
        self.features = 0

    def _get_protocol_features(self, msg: Message, _p: None) -> int:
        return self.offered_protocol_features

    def _set_protocol_features(self, msg: Message, pf: int) -> None:
        extra = pf & ~self.offered_protocol_features
        if extra:
            raise Refused(f"protocol features {vp.protocol_feature_names(extra)} not offered")
        self.protocol_features = pf
        log.info("%s: protocol features %s", self.name,
                 " ".join(vp.protocol_feature_names(pf)) or "none")

    def _get_queue_num(self, msg: Message, _p: None) -> int:
        # virtio-net: queue pairs, the number QEMU's and DPDK's front ends compare `queues=` with.
        return self.queue_pairs

    def _release_views(self) -> None:
        """Before any mapping changes: no ring view may point into memory about to go."""
        for vr in self.vrings:
            if vr.queue is not None:
                vr.queue.release_views()

    def _memory_updated(self) -> None:
        """After the table changed: the device and every running ring follow it (same uvas)."""
        assert self.mem is not None
        self.device.memory_changed(self.mem)
        for vr in self.vrings:
            if vr.started:
                try:
                    vr.queue.set_addresses(*self._translate(vr))
                    vr.queue.validate(self.mem)
                except (Refused, DriverError) as e:
                    log.warning("%s: ring %d stopped: %s after a memory table change",
                                self.name, vr.index, e)
                    self._stop_ring(vr)

    def _map(self, mem: MmapGuestMemory, r: MemRegion) -> None:
        try:
            mem.map_fd(r.fd, r.guest_phys_addr, r.memory_size, r.mmap_offset, r.userspace_addr)
        except GuestMemoryError as e:
            raise Refused(str(e)) from None

    def _set_mem_table(self, msg: Message, table: MemTable) -> None:
        new = MmapGuestMemory()
        try:
            for r in table.regions:
                self._map(new, r)  # mmap keeps its own reference; our fds close afterwards
        except Refused:
            new.close()
            raise
        self._release_views()
        self._region_refs = {self._region_key(r): 1 for r in table.regions}
        old, self.mem = self.mem, new
        if old is not None:
            old.close()
        self._memory_updated()
        log.info("%s: memory table: %s", self.name, ", ".join(
            f"{r.guest_phys_addr:#x}+{r.memory_size:#x}@uva {r.userspace_addr:#x}"
            for r in table.regions))

    def _get_max_mem_slots(self, msg: Message, _p: None) -> int:
        return MAX_MEM_SLOTS

    @staticmethod
    def _region_key(r: MemRegion) -> tuple[int, int, int, int]:
        return (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)

    def _add_mem_reg(self, msg: Message, r: MemRegion) -> None:
        # With MQ, QEMU runs one vhost device per queue pair over this one socket, and each
        # adds every region it knows: the same region arrives once per pair. Regions are
        # reference-counted; an identical one is a no-op, an overlapping different one refused.
        key = self._region_key(r)
        if key in self._region_refs:
            self._region_refs[key] += 1
            return
        if self.mem is None:
            self.mem = MmapGuestMemory()
        if len(self.mem.regions) >= MAX_MEM_SLOTS:
            raise Refused(f"all {MAX_MEM_SLOTS} memory slots in use")
        self._release_views()
        try:
            self._map(self.mem, r)
        finally:
            self._memory_updated()
        self._region_refs[key] = 1
        log.info("%s: added memory region %#x+%#x", self.name, r.guest_phys_addr, r.memory_size)

    def _rem_mem_reg(self, msg: Message, r: MemRegion) -> None:
        if self.mem is None:
            raise Refused("no memory table")
        match = [x for x in self.mem.regions
                 if x.gpa == r.guest_phys_addr and x.size == r.memory_size
                 and x.userspace_addr == r.userspace_addr]
        if not match:
            raise Refused(f"no region {r.guest_phys_addr:#x}+{r.memory_size:#x} to remove")
        key = (match[0].gpa, match[0].size, match[0].userspace_addr, match[0].mmap_offset)
        left = self._region_refs.get(key, 1) - 1
        if left > 0:
            self._region_refs[key] = left
            return
        self._region_refs.pop(key, None)
        self._release_views()
        self.mem.unmap(match[0].gpa)
        self._memory_updated()
        log.info("%s: removed memory region %#x+%#x", self.name, r.guest_phys_addr,
                 r.memory_size)

    def _set_vring_num(self, msg: Message, st: VringState) -> None:
        vr = self._ring(st.index)
        if vr.started:
            raise Refused(f"ring {vr.index} is running")
        n = st.num
        if not 1 <= n <= self.max_queue_size:
            raise Refused(f"ring {vr.index}: size {n} outside 1..{self.max_queue_size}")
        if not self.packed and n & (n - 1):
            raise Refused(f"ring {vr.index}: split ring size {n} is not a power of 2")
        vr.num = n

    def _set_vring_addr(self, msg: Message, a: VringAddr) -> None:
        vr = self._ring(a.index)
        if a.flags & ~spec.bit(vp.VHOST_VRING_F_LOG):
            raise Refused(f"ring {vr.index}: unknown address flags {a.flags:#x}")
        old = vr.addr
        vr.addr = a
        if self.mem is not None and vr.num:
            try:
                self._translate(vr)  # refuse untranslatable addresses now, with a reason
            except Refused:
                vr.addr = old
                raise
        if vr.started:  # a running ring moved (only legal with logging changes): restart it
            self._try_start(vr)

    def _set_vring_base(self, msg: Message, st: VringState) -> None:
        vr = self._ring(st.index)
        if vr.started:
            raise Refused(f"ring {vr.index} is running")
        if not self.packed and st.num > 0xFFFF:
            raise Refused(f"ring {vr.index}: split base {st.num} exceeds 16 bits")
        vr.base = st.num

    def _get_vring_base(self, msg: Message, st: VringState) -> VringState:
        vr = self._ring(st.index)
        self._stop_ring(vr)
        if vr.kick is not None:  # vhost-user.rst: the kick fd is closed with the ring stopped
            vr.kick.close()
            vr.kick = None
        log.info("%s: ring %d stopped at base %d", self.name, vr.index, vr.base)
        return VringState(vr.index, vr.base)

    def _file(self, msg: Message, f: VringFile, what: str) -> tuple[Vring, EventFd | None]:
        vr = self._ring(f.index)
        efd = None
        if f.fd is not None:
            efd = EventFd(msg.take_fd(f.fd))
        old = getattr(vr, what)
        if old is not None:
            if what == "kick" and vr.started:
                self.loop.remove_reader(old)
            old.close()
        setattr(vr, what, efd)
        return vr, efd

    def _set_vring_kick(self, msg: Message, f: VringFile) -> None:
        self._ring(f.index)
        vr, _ = self._file(msg, f, "kick")
        self._try_start(vr)

    def _set_vring_call(self, msg: Message, f: VringFile) -> None:
        self._ring(f.index)
        self._file(msg, f, "call")

    def _set_vring_err(self, msg: Message, f: VringFile) -> None:
        self._ring(f.index)
        self._file(msg, f, "err")

    def _set_enabled(self, vr: Vring, enabled: bool) -> None:
        if vr.enabled == enabled:
            return
        vr.enabled = enabled
        if vr.started:
            self.device.queue_enabled(vr.index, enabled)
            if enabled:
                self.kick_ring(vr.index)

    def _set_vring_enable(self, msg: Message, st: VringState) -> None:
        vr = self._ring(st.index)
        if st.num not in (0, 1):
            raise Refused(f"ring {vr.index}: enable value {st.num} is not 0 or 1")
        changed = vr.enabled != bool(st.num)
        self._set_enabled(vr, bool(st.num))
        (log.info if changed else log.debug)("%s: ring %d %s", self.name, vr.index,
                                              "enabled" if st.num else "disabled")

    def _send_rarp(self, msg: Message, value: int) -> None:
        mac = value.to_bytes(8, "little")[:6]
        self.device.send_rarp(mac)
        log.info("%s: sent RARP for %s", self.name, mac.hex(":"))

    def _net_set_mtu(self, msg: Message, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise Refused(f"MTU {mtu} outside 68..65535")
        self.mtu = mtu
        self.device.set_mtu(mtu)

    def _get_config(self, msg: Message, c: ConfigSpace) -> ConfigSpace:
        cfg = self.device.config_bytes()
        data = cfg[c.offset : c.offset + c.size].ljust(c.size, b"\x00")
        return ConfigSpace(c.offset, c.size, 0, data)

    def _set_config(self, msg: Message, c: ConfigSpace) -> None:
        self.device.write_config(c.offset, c.data)

    # -- counters ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-ring counters (frames/bytes/drops come from the device via ``Vring.counters``)."""
        return {
            "path": self.path,
            "connected": self.conn is not None,
            "connections": self.connections,
            "messages": self.messages,
            "refused": self.refused,
            "features": spec.feature_names(self.features),
            "protocol_features": vp.protocol_feature_names(self.protocol_features),
            "rings": [
                {
                    "index": vr.index,
                    "started": vr.started,
                    "enabled": vr.enabled,
                    "size": vr.num,
                    "kicks": vr.kicks,
                    "interrupts": vr.interrupts,
                    "errors": vr.errors,
                    **vr.counters,
                }
                for vr in self.vrings
            ],
        }


_HANDLERS: dict[int, Callable[[VhostUserBackend, Message, Any], Any]] = {
    R.GET_FEATURES: VhostUserBackend._get_features,
    R.SET_FEATURES: VhostUserBackend._set_features,
    R.SET_OWNER: VhostUserBackend._set_owner,
    R.RESET_OWNER: VhostUserBackend._reset_owner,
    R.RESET_DEVICE: VhostUserBackend._reset_device,
    R.GET_PROTOCOL_FEATURES: VhostUserBackend._get_protocol_features,
    R.SET_PROTOCOL_FEATURES: VhostUserBackend._set_protocol_features,
    R.GET_QUEUE_NUM: VhostUserBackend._get_queue_num,
    R.SET_MEM_TABLE: VhostUserBackend._set_mem_table,
    R.GET_MAX_MEM_SLOTS: VhostUserBackend._get_max_mem_slots,
    R.ADD_MEM_REG: VhostUserBackend._add_mem_reg,
    R.REM_MEM_REG: VhostUserBackend._rem_mem_reg,
    R.SET_VRING_NUM: VhostUserBackend._set_vring_num,
    R.SET_VRING_ADDR: VhostUserBackend._set_vring_addr,
    R.SET_VRING_BASE: VhostUserBackend._set_vring_base,
    R.GET_VRING_BASE: VhostUserBackend._get_vring_base,
    R.SET_VRING_KICK: VhostUserBackend._set_vring_kick,
    R.SET_VRING_CALL: VhostUserBackend._set_vring_call,
    R.SET_VRING_ERR: VhostUserBackend._set_vring_err,
    R.SET_VRING_ENABLE: VhostUserBackend._set_vring_enable,
    R.SEND_RARP: VhostUserBackend._send_rarp,
    R.NET_SET_MTU: VhostUserBackend._net_set_mtu,
    R.GET_CONFIG: VhostUserBackend._get_config,
    R.SET_CONFIG: VhostUserBackend._set_config,
}


class _RingInterrupts:
    """``InterruptSink`` for a hosted ``VirtioDevice``: queue interrupts go to the ring's call
    eventfd; config interrupts have no vhost-user path without BACKEND_REQ (logged)."""

    def __init__(self) -> None:
        self.notify: dict[int, Callable[[], None]] = {}
        self.config_count = 0

    def queue(self, index: int) -> None:
        fn = self.notify.get(index)
        if fn is not None:
            fn()

    def config(self) -> None:
        self.config_count += 1
        log.debug("config interrupt dropped (no back-end channel)")


_CTRL_VQ_DEPENDENTS = spec.bit(*(f for f, deps in spec.NET_FEATURE_REQUIRES.items()
                                  if spec.VIRTIO_NET_F_CTRL_VQ in deps))


class VirtioDeviceHost:
    """Hosts a ``virtio.device.VirtioDevice`` (e.g. ``net.device.VirtioNet``) behind vhost-user.

    vhost-user has no status register, so this walks the device through §3.1.1 itself:
    SET_FEATURES -> ACKNOWLEDGE, DRIVER, features, FEATURES_OK; memory -> DRIVER_OK. Rings arrive
    one at a time (SET_VRING_KICK), so each started ring object is placed straight into
    ``device.queues[i]``. ``num_rings`` excludes rings QEMU keeps for itself (net's control queue).
    Device-specific hooks are optional methods on the device: ``queue_enabled(i, on)``,
    ``send_rarp(mac)``, ``set_mtu(mtu)``.
    """

    def __init__(self, device: Any, num_rings: int | None = None) -> None:
        self.dev = device
        self._num = num_rings if num_rings is not None else device.num_queues
        self.irq = _RingInterrupts()
        self.on_ring_error: Callable[[int], None] | None = None
        self.on_kicked: Callable[[int], None] | None = None  # after each ring service

    @property
    def device_features(self) -> int:
        return int(self.dev.offered_features)

    @property
    def num_queues(self) -> int:
        return self._num

    def config_bytes(self) -> bytes:
        return bytes(self.dev.config)

    def write_config(self, offset: int, data: bytes) -> None:
        cfg = self.dev.config
        if offset + len(data) > len(cfg) or not self.dev.config_write_hook(offset, data):
            raise Refused(f"config write {len(data)}@{offset:#x} is read-only or out of range")

    def set_features(self, features: int) -> int:
        from virtwire.virtio import spec as s

        d = self.dev
        if not features >> s.VIRTIO_NET_F_CTRL_VQ & 1 and getattr(d, "device_id", 0) == 1:
            # QEMU keeps the control queue (and everything built on it) for itself, yet it
            # forwards GUEST_ANNOUNCE in SET_FEATURES: drop what depends on CTRL_VQ here.
            features &= ~_CTRL_VQ_DEPENDENTS
        if d.status & s.VIRTIO_CONFIG_S_FEATURES_OK and d.negotiated == features:
            return features  # repeated SET_FEATURES (QEMU re-sends on start): nothing changes
        d.reset()
        d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE | s.VIRTIO_CONFIG_S_DRIVER)
        d.set_driver_features(features)
        ok = d.write_status(s.VIRTIO_CONFIG_S_ACKNOWLEDGE | s.VIRTIO_CONFIG_S_DRIVER
                            | s.VIRTIO_CONFIG_S_FEATURES_OK)
        if not ok or not d.status & s.VIRTIO_CONFIG_S_FEATURES_OK:
            raise Refused(f"device refused features: {d.last_error}")
        return features

    def _ensure_driver_ok(self, mem: Any) -> None:
        from virtwire.virtio import spec as s

        d = self.dev
        d.attach(mem, self.irq)
        if d.status & s.VIRTIO_CONFIG_S_FEATURES_OK and not d.status & s.VIRTIO_CONFIG_S_DRIVER_OK:
            d.write_status(d.status | s.VIRTIO_CONFIG_S_DRIVER_OK)

    def queue_started(self, index: int, queue: Any, mem: Any, notify: Callable[[], None]) -> None:
        self._ensure_driver_ok(mem)
        self.irq.notify[index] = notify
        self.dev.queues[index] = queue
        hook = getattr(self.dev, "queue_started", None)
        if hook is not None:
            hook(index)

    def queue_stopped(self, index: int) -> None:
        hook = getattr(self.dev, "queue_stopped", None)
        if hook is not None:
            hook(index)
        if index < len(self.dev.queues):
            self.dev.queues[index] = None
        self.irq.notify.pop(index, None)

    def queue_enabled(self, index: int, enabled: bool) -> None:
        hook = getattr(self.dev, "queue_enabled", None)
        if hook is not None:
            hook(index, enabled)

    def queue_kicked(self, index: int) -> None:
        from virtwire.virtio import spec as s

        d = self.dev
        if d.queues[index] is None:
            return  # the ring stopped after the kick was read
        was = d.status & s.VIRTIO_CONFIG_S_NEEDS_RESET
        d.notify(index)
        if d.status & s.VIRTIO_CONFIG_S_NEEDS_RESET and not was and self.on_ring_error:
            self.on_ring_error(index)
        if self.on_kicked is not None:
            self.on_kicked(index)

    def memory_changed(self, mem: Any) -> None:
        self.dev.attach(mem, self.irq)
        for q in self.dev.queues:  # views are rebuilt against the new mapping on next use
            if q is not None:
                q.release_views()

    def send_rarp(self, mac: bytes) -> None:
        hook = getattr(self.dev, "send_rarp", None)
        if hook is None:
            raise Refused("device cannot send frames")
        hook(mac)

    def set_mtu(self, mtu: int) -> None:
        hook = getattr(self.dev, "set_mtu", None)
        if hook is not None:
            hook(mtu)

    def reset(self) -> None:
        self.dev.reset()
        self.irq.notify.clear()
