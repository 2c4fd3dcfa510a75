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

The device is hosted through a narrow interface (``vhost_device.HostedDevice``): the back end
owns the queue objects and the eventfds, the device processes queues when asked
(``queue_kicked``) and asks for an interrupt through the ``notify`` callback it was given; the
back end coalesces interrupts so a ring is signalled at most once per loop iteration
(``loop.defer``). This module is the connection and the messages; the memory table and the
rings' state are ``vhost_rings.VringTable``.

Hostile front ends (issue 14). The socket is read without blocking (``vhost_user_conn``): a
message must arrive whole within ``MESSAGE_DEADLINE`` and a new connection must send one within
``SocketAccess.handshake``, replies queue instead of blocking, ring fds must be eventfds, memory
fds sealed or SIGBUS-guarded files (``memory.MmapGuestMemory``), and any unexpected failure in a
message or a ring drops this front end, never the process. Refusals are logged rate-limited.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtwire import trace as _trace
from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_device import HostedDevice, Refused
from virtwire.hosts.vhost_rings import MAX_MEM_SLOTS, Vring, VringTable
from virtwire.hosts.vhost_user_conn import (
    MESSAGE_DEADLINE,
    MessageReader,
    RateLimit,
    ReplyQueue,
    is_eventfd,
    peer_uid,
)
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

log = logging.getLogger(__name__)

__all__ = [
    "VhostUserBackend",
    "SocketAccess",
    "DEFAULT_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
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


@dataclass
class SocketAccess:
    """Who may use a port's socket: its mode and group (libvirt runs QEMU as another user),
    the uids allowed to connect (``SO_PEERCRED``; None: anyone who can open the socket), and
    how long a new connection may stay silent before it gives the port's slot back."""

    mode: int = 0o600
    gid: int | None = None
    allow_uids: frozenset[int] | None = None
    handshake: float = 5.0


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
        access: SocketAccess | None = None,
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
        self.rings = VringTable(device, loop, nq, name=self.name, max_queue_size=max_queue_size,
                                on_kick=self._on_kick, service=self._service,
                                notify=self._notify)
        self.vrings = self.rings.vrings
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.protocol_features = 0
        self.owner = False
        self.mtu: int | None = None
        self.connections = 0
        self.refused = 0
        self.messages = 0
        self._retry: TimerHandle | None = None
        self._closed = False
        self.access = access or SocketAccess()
        self._reader = MessageReader()
        self._replies: ReplyQueue | None = None
        self._hs_timer: TimerHandle | None = None
        self._msg_timer: TimerHandle | None = None
        self._mem_timer: TimerHandle | None = None
        self._handshake_at = 0
        self._ratelimit = RateLimit()
        self.dropped = 0  # connections dropped for misbehaving (deadlines, errors)

    @property
    def mem(self) -> MmapGuestMemory | None:
        """Guest RAM as the front end mapped it (``VringTable.mem``)."""
        return self.rings.mem

    @property
    def features(self) -> int:
        """Acked virtio features (incl. the PROTOCOL_FEATURES bit as sent)."""
        return self.rings.features

    @features.setter
    def features(self, value: int) -> None:
        self.rings.features = value

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
        old_umask = os.umask(0o177)  # never a moment with a wider mode than asked
        try:
            s.bind(self.path)
            os.chmod(self.path, self.access.mode)
            if self.access.gid is not None:
                os.chown(self.path, -1, self.access.gid)
        except OSError as e:
            s.close()
            raise OSError(e.errno, e.strerror, self.path) from None
        finally:
            os.umask(old_umask)
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
            self._warn("second", "refused a second front end on %s (one is connected)",
                       self.path)
            conn.close()
            return
        if not self._peer_allowed(conn):
            conn.close()
            return
        self._attach(conn)

    def _warn(self, key: str, fmt: str, *args: Any) -> None:
        """A rate-limited warning (peers can make us refuse things as fast as they like)."""
        dropped = self._ratelimit(key)
        if dropped is not None:
            log.warning("%s: " + fmt + (f" (+{dropped} similar)" if dropped else ""),
                        self.name, *args)

    def _peer_allowed(self, conn: socket.socket) -> bool:
        if self.access.allow_uids is None:
            return True
        try:
            _pid, uid, _gid = peer_uid(conn)
        except OSError:
            uid = -1
        if uid in self.access.allow_uids:
            return True
        self.refused += 1
        self._warn("uid", "refused a front end of uid %d on %s (allow-uid)", uid, self.path)
        return False

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
        if not self._peer_allowed(s):
            s.close()
            self._retry = self.loop.call_later(self.reconnect, self._try_connect)
            return
        self._attach(s)

    def _attach(self, conn: socket.socket) -> None:
        conn.setblocking(False)  # never block the loop: vhost_user_conn's docstring
        self.conn = conn
        self.connections += 1
        self._reader = MessageReader()
        self._replies = ReplyQueue(self.loop, conn, self._drop)
        self._handshake_at = self.messages
        self._hs_timer = self.loop.call_later(self.access.handshake, self._check_handshake)
        self._mem_timer = self.loop.call_every(0.2, self._check_memory)
        self.loop.add_reader(conn, self._on_readable)
        log.info("%s: front end connected (%d)", self.name, self.connections)

    def _check_memory(self) -> None:
        """The peer shrank a guarded memory file under our mapping (a SIGBUS was absorbed)."""
        mem = self.rings.mem
        if mem is not None and mem.faulted():
            self.refused += 1
            self._drop("guest memory shrank under its mapping")

    def _check_handshake(self) -> None:
        """A connection that sent no complete message in time gives the port's slot back."""
        self._hs_timer = None
        if self.conn is not None and self.messages == self._handshake_at:
            self._drop(f"no message within {self.access.handshake:g} s")

    def _check_message(self, started: float) -> None:
        self._msg_timer = None
        now_started = self._reader.started
        if self.conn is None or now_started is None:
            return
        if now_started == started:
            self._drop(f"message not complete within {MESSAGE_DEADLINE:g} s")
        else:  # another message is under way: its own deadline
            self._msg_timer = self.loop.call_later(
                max(0.0, now_started + MESSAGE_DEADLINE - time.monotonic()),
                self._check_message, now_started)

    def _drop(self, reason: str) -> None:
        """Drop a misbehaving front end (counted, rate-limited log)."""
        self.dropped += 1
        self._warn("drop", "dropping front end: %s", reason)
        self.disconnect(reason)

    def disconnect(self, reason: str = "") -> None:
        """Drop the front end: stop every ring, unmap memory, forget negotiated state."""
        if self.conn is None:
            return
        log.info("%s: front end disconnected%s", self.name, f" ({reason})" if reason else "")
        self.loop.remove_reader(self.conn)
        self.conn.close()
        self.conn = None
        self._reader.reset()
        if self._replies is not None:
            self._replies.close()
            self._replies = None
        for t in (self._hs_timer, self._msg_timer, self._mem_timer):
            if t is not None:
                t.cancel()
        self._hs_timer = self._msg_timer = self._mem_timer = None
        self._reset_state()
        if not self.server and not self._closed:
            self._retry = self.loop.call_later(self.reconnect, self._try_connect)

    def _reset_state(self) -> None:
        for vr in self.vrings:
            self.rings.stop(vr)
            vr.close_fds()
            vr.num = vr.base = 0
            vr.addr = None
            vr.enabled = False
        try:
            self.device.reset()
        except Exception:
            log.exception("%s: device reset failed", self.name)
        self.rings.close_memory()
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
        """Read what arrived; handle at most a few complete messages (other ports wait)."""
        for _ in range(16):
            if self.conn is None:
                return
            try:
                msg = self._reader.read(self.conn)
            except FramingError as e:
                self.refused += 1
                self._drop(f"unusable message stream: {e}")
                return
            except ProtocolError as e:
                self.refused += 1
                self._warn("refused", "refused message: %s", e)
                continue
            except EOFError:
                self.disconnect("EOF")
                return
            except OSError as e:
                self.disconnect(f"socket error: {e}")
                return
            if msg is None:
                started = self._reader.started
                if started is not None and self._msg_timer is None:
                    self._msg_timer = self.loop.call_later(
                        MESSAGE_DEADLINE, self._check_message, started)
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
        except Exception as e:  # a bug or an fd we could not use: this peer, never the process
            msg.close_fds()
            self.refused += 1
            log.debug("%s: %s failed", self.name, rspec.name, exc_info=True)
            self._drop(f"{rspec.name} failed: {type(e).__name__}: {e}")
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
        text = reason if reason.startswith(msg.name) else f"{msg.name}: {reason}"
        # One line per kind of refusal per second (the key: the reason without its numbers).
        self._warn("refused:" + "".join(c for c in text if c.isalpha()), "refused %s", text)
        if expects_reply:
            self.disconnect(f"cannot answer {msg.name}")
        elif msg.need_reply and self._acks():
            self._send(msg.request, vp.encode_payload(P.U64, 1))

    def _send(self, request: int, payload: bytes) -> None:
        if self._replies is not None:
            self._replies.send(vp.encode(request, payload, reply=True))

    # -- helpers ----------------------------------------------------------------------------------
    def _ring(self, index: int) -> Vring:
        return self.rings.ring(index)

    @property
    def offered_features(self) -> int:
        f = self.device.device_features | spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)
        if not self.packed_ok:
            f &= ~spec.bit(spec.VIRTIO_F_RING_PACKED)
        return f

    @property
    def packed(self) -> bool:
        return self.rings.packed

    def _on_kick(self, vr: Vring) -> None:
        if vr.kick is None:
            return
        if vr.kick.read():
            vr.kicks += 1
            tr = _trace.TRACE
            if tr is not None:
                tr.emit("kick", "kick", q=vr.index)
            # Straight to the device (the kick path is short: epoll, this, the device).
            self.loop.defer(("vring", id(self.rings), vr.index), self._service, vr.index)

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
        if self.vrings[index].started:
            self.loop.defer(("vring", id(self.rings), index), self._service, index)

    def _service(self, index: int) -> None:
        """Run ring ``index``; whatever goes wrong drops this front end, never the process."""
        if not self.vrings[index].started:
            return
        try:
            self.device.queue_kicked(index)
            self._check_memory()
        except Exception as e:
            log.debug("%s: ring %d failed", self.name, index, exc_info=True)
            self.refused += 1
            if self.conn is not None:
                self._drop(f"ring {index} failed: {type(e).__name__}: {e}")
            else:
                self.rings.stop(self.vrings[index])

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
        packed = bool(features >> spec.VIRTIO_F_RING_PACKED & 1)
        if any(vr.started for vr in self.vrings) and packed != self.packed:
            raise Refused("ring format changed while rings run")  # before storing anything
        self.features = features
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
            self.rings.stop(vr)
        self.device.reset()
        self.features = 0
        self.owner = False

    def _reset_device(self, msg: Message, _p: None) -> None:
        for vr in self.vrings:
            self.rings.stop(vr)
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

    def _set_mem_table(self, msg: Message, table: MemTable) -> None:
        self.rings.set_table(table)

    def _get_max_mem_slots(self, msg: Message, _p: None) -> int:
        return MAX_MEM_SLOTS

    def _add_mem_reg(self, msg: Message, r: MemRegion) -> None:
        self.rings.add_region(r)

    def _rem_mem_reg(self, msg: Message, r: MemRegion) -> None:
        self.rings.remove_region(r)

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
                self.rings.translate(vr)  # refuse untranslatable addresses now, with a reason
            except Refused:
                vr.addr = old
                raise
        if vr.started:  # a running ring moved (only legal with logging changes): restart it
            self.rings.start(vr)

    def _set_vring_base(self, msg: Message, st: VringState) -> None:
        vr = self._ring(st.index)
        if vr.started:
            raise Refused(f"ring {vr.index} is running")
        if not self.packed and st.num > 0xFFFF:
            raise Refused(f"ring {vr.index}: split base {st.num} exceeds 16 bits")
        vr.base = st.num

    def _get_vring_base(self, msg: Message, st: VringState) -> VringState:
        vr = self._ring(st.index)
        self.rings.stop(vr)
        if vr.kick is not None:  # vhost-user.rst: the kick fd is closed with the ring stopped
            vr.kick.close()
            vr.kick = None
        log.info("%s: ring %d stopped at base %d", self.name, vr.index, vr.base)
        return VringState(vr.index, vr.base)

    def _file(self, msg: Message, f: VringFile, what: str) -> tuple[Vring, EventFd | None]:
        vr = self._ring(f.index)
        efd = None
        if f.fd is not None:
            if not is_eventfd(f.fd):
                raise Refused(f"ring {vr.index}: {what} fd is not an eventfd")
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
        self.rings.start(vr)

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
