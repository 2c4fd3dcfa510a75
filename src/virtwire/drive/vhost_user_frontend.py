"""The front-end side of vhost-user: our driver drives any vhost-user back end.

Theory of operation
-------------------
In vhost-user (QEMU docs/interop/vhost-user.rst) the *front end* owns guest memory and the
virtqueues' placement; the *back end* (DPDK's vhost PMD, virtwire's own ``hosts.vhost_user``)
processes the rings. Here the front end is ``VhostUserFrontend``, which implements the driver's
``VirtioTransport`` so ``net.driver.VirtioNetDriver`` runs unchanged on top of it:

- Guest memory is one memfd (``memfd_create``) mapped into this process (``MmapGuestMemory``)
  and shared with the back end by SET_MEM_TABLE. Guest-physical addresses start at 0; the
  "userspace addresses" we announce are ``USERSPACE_BASE + gpa`` (a back end only uses them to
  translate SET_VRING_ADDR, whose addresses are in that space).
- Handshake (what QEMU sends, in order): GET_FEATURES; if VHOST_USER_F_PROTOCOL_FEATURES is
  offered, GET_PROTOCOL_FEATURES and SET_PROTOCOL_FEATURES (we accept MQ, REPLY_ACK, CONFIG,
  STATUS when offered); GET_QUEUE_NUM when MQ; SET_OWNER.
- The virtio *device* the driver sees is the back end's datapath plus what QEMU's virtio-net
  emulates itself: the config space (MAC, status, max pairs; GET_CONFIG when the back end offers
  CONFIG), and the device status byte (SET_STATUS when offered). The control queue is QEMU's,
  not the back end's, so CTRL_VQ and its dependants are not offered here.
- When the driver sets DRIVER_OK the front end starts the device as QEMU's ``vhost_dev_start``
  does: SET_FEATURES, SET_MEM_TABLE, then per ring SET_VRING_NUM, SET_VRING_BASE,
  SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, and SET_VRING_ENABLE(1) when protocol features
  were negotiated (rings start disabled then). ``reset`` stops the rings with GET_VRING_BASE.
- A notification is an 8-byte write to the ring's kick eventfd; the back end's used-buffer
  notifications arrive on call eventfds, which ``read_isr`` drains (bit 0 like a PCI ISR).

Every reply is checked by the shared codec (``hosts.vhost_user_proto.decode_reply``); a back
end that answers wrongly raises ``VhostUserFrontendError`` with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass

from virtwire.hosts import vhost_user_proto as vu
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R
from virtwire.memory import MmapGuestMemory
from virtwire.virtio import spec
from virtwire.virtio.spec import bit

__all__ = ["VhostUserFrontend", "VhostUserFrontendError", "USERSPACE_BASE"]

log = logging.getLogger(__name__)

USERSPACE_BASE = 0x7F0000000000

# Features QEMU's virtio-net emulates itself in front of a vhost-user back end.
EMULATED_FEATURES = bit(spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS)
VHOST_F_LOG_ALL = 26  # vhost protocol: the back end can log dirty pages (migration)
VHOST_ONLY_BITS = bit(spec.VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL)
LEGACY_ONLY_BITS = bit(spec.VIRTIO_NET_F_GSO, spec.VIRTIO_F_NOTIFY_ON_EMPTY,
                       spec.VIRTIO_F_ANY_LAYOUT, 41, 42)  # 41/42: GUEST_RSC4/6 (legacy)
# Never passed to a vhost-user back end (the control queue lives in the front end).
NOT_FOR_BACKEND = bit(
    spec.VIRTIO_NET_F_CTRL_VQ, spec.VIRTIO_NET_F_CTRL_RX, spec.VIRTIO_NET_F_CTRL_VLAN,
    spec.VIRTIO_NET_F_CTRL_RX_EXTRA, spec.VIRTIO_NET_F_GUEST_ANNOUNCE,
    spec.VIRTIO_NET_F_CTRL_MAC_ADDR, spec.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    spec.VIRTIO_NET_F_MQ, spec.VIRTIO_NET_F_RSS, spec.VIRTIO_NET_F_HASH_REPORT,
)
WANTED_PROTOCOL = bit(
    vu.VHOST_USER_PROTOCOL_F_MQ, vu.VHOST_USER_PROTOCOL_F_REPLY_ACK,
    vu.VHOST_USER_PROTOCOL_F_CONFIG, vu.VHOST_USER_PROTOCOL_F_STATUS,
)


class VhostUserFrontendError(Exception):
    """The back end refused a request, answered wrongly, or went away."""


@dataclass
class _Ring:
    index: int
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    started: bool = False


class VhostUserFrontend:
    """One vhost-user connection, seen by the driver as a virtio transport (module docstring)."""

    legacy = False

    def __init__(
        self,
        path: str,
        mem_size: int = 64 << 20,
        mac: bytes = b"\x52\x54\x00\x00\x00\x01",
        connect_timeout: float = 10.0,
        timeout: float = 5.0,
        max_queue_size: int = 1024,
        listen: bool = False,
        mtu: int = 1500,
    ) -> None:
        if len(mac) != 6:
            raise ValueError("MAC must be 6 bytes")
        self.path = path
        self.mac = bytes(mac)
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu}: must be 68..65535")
        self.mtu = mtu  # reported by our own config space when the back end has no CONFIG
        self.timeout = timeout
        self.max_queue_size = max_queue_size
        self.mem_size = mem_size
        self.sock = self._open(path, connect_timeout, listen)
        self.memfd = os.memfd_create("vwd-frontend-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, mem_size)
        # Sealed against resizing, as QEMU's memfd backend does (back ends may require it).
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mem = MmapGuestMemory()
        self.mem.map_fd(self.memfd, 0, mem_size, userspace_addr=USERSPACE_BASE)
        self.status = 0
        self.features = 0  # what the driver wrote
        self.backend_features = 0
        self.protocol_features = 0
        self.queue_num = 2
        self.rings: dict[int, _Ring] = {}
        self.started = False
        self.messages = 0
        self.log: list[str] = []  # request names in order, for tests and conform
        self._handshake()

    # -- socket ----------------------------------------------------------------------------------
    @staticmethod
    def _open(path: str, timeout: float, listen: bool) -> socket.socket:
        if listen:
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            srv.bind(path)
            srv.listen(1)
            srv.settimeout(timeout)
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError) as e:
                raise VhostUserFrontendError(f"no back end connected to {path}: {e}") from None
            finally:
                srv.close()
            return conn
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return s
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise VhostUserFrontendError(f"cannot connect to {path}: {e}") from None
                time.sleep(0.05)

    def _send(self, req: R, payload: bytes = b"", fds: tuple[int, ...] = (),
              need_reply: bool = False) -> None:
        self.sock.settimeout(self.timeout)
        try:
            vu.send_message(self.sock, vu.encode(req, payload, need_reply=need_reply), fds)
        except OSError as e:
            raise VhostUserFrontendError(f"{req.name}: send failed: {e}") from None
        self.messages += 1
        self.log.append(req.name)

    def _reply(self, req: R) -> object:
        self.sock.settimeout(self.timeout)
        try:
            msg = vu.recv_message(self.sock)
        except (OSError, vu.ProtocolError) as e:
            raise VhostUserFrontendError(f"{req.name}: no valid reply: {e}") from None
        if msg is None:
            raise VhostUserFrontendError(f"{req.name}: back end closed the connection")
        try:
            return vu.decode_reply(req, msg)
        except vu.ProtocolError as e:
            msg.close_fds()
            raise VhostUserFrontendError(str(e)) from None

    def _get_u64(self, req: R) -> int:
        self._send(req)
        v = self._reply(req)
        if not isinstance(v, int):
            raise VhostUserFrontendError(f"{req.name}: reply is not a u64")
        return v

    def _set(self, req: R, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        """A SET request; with REPLY_ACK negotiated, ask for and check the ack."""
        ack = bool(self.protocol_features >> vu.VHOST_USER_PROTOCOL_F_REPLY_ACK & 1)
        self._send(req, payload, fds, need_reply=ack)
        if ack:
            v = self._reply(req)
            if v != 0:
                raise VhostUserFrontendError(f"{req.name}: back end answered failure ({v})")

    def _handshake(self) -> None:
        self.backend_features = self._get_u64(R.GET_FEATURES)
        if self.backend_features >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = self._get_u64(R.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & WANTED_PROTOCOL
            self._send(R.SET_PROTOCOL_FEATURES, vu.encode_payload(vu.P.U64,
                                                                  self.protocol_features))
            if self.protocol_features >> vu.VHOST_USER_PROTOCOL_F_MQ & 1:
                n = self._get_u64(R.GET_QUEUE_NUM)
                if not 1 <= n <= 256:
                    raise VhostUserFrontendError(f"GET_QUEUE_NUM answered {n}")
                self.queue_num = 2 * int(n)  # GET_QUEUE_NUM counts queue pairs (as QEMU uses it)
        self._set(R.SET_OWNER)

    # -- VirtioTransport -------------------------------------------------------------------------
    def device_features(self) -> int:
        """What the driver is offered: the back end's word without the vhost protocol bits
        (VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL: they are the front end's business,
        as in QEMU) and, on a modern offer, without legacy-only bits (§5.1.3.2, §6.3)."""
        f = self.backend_features & ~VHOST_ONLY_BITS
        if f >> spec.VIRTIO_F_VERSION_1 & 1:
            f &= ~LEGACY_ONLY_BITS
        f &= ~NOT_FOR_BACKEND
        return f | EMULATED_FEATURES

    def set_driver_features(self, features: int) -> None:
        if self.status & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            raise VhostUserFrontendError("features written after FEATURES_OK")
        self.features = features

    def driver_features(self) -> int:
        return self.features

    def _backend_features(self) -> int:
        f = self.features & self.backend_features & ~EMULATED_FEATURES & ~NOT_FOR_BACKEND
        if self.backend_features >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            f |= bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)
        return f

    def get_status(self) -> int:
        return self.status

    def set_status(self, status: int) -> None:
        if status == 0:
            self.reset()
            return
        new = status & ~self.status
        if new & spec.VIRTIO_CONFIG_S_FEATURES_OK:
            offered = self.device_features()
            if self.features & ~offered:
                status &= ~spec.VIRTIO_CONFIG_S_FEATURES_OK  # refuse, as a device would
        self.status = status
        if new & spec.VIRTIO_CONFIG_S_DRIVER_OK and not self.started:
            self._start()
        if self.protocol_features >> vu.VHOST_USER_PROTOCOL_F_STATUS & 1:
            self._set(R.SET_STATUS, vu.encode_payload(vu.P.U64, status))

    def reset(self) -> None:
        if self.started:
            self._stop()
        if self.status and self.protocol_features >> vu.VHOST_USER_PROTOCOL_F_STATUS & 1:
            self._set(R.SET_STATUS, vu.encode_payload(vu.P.U64, 0))
        self.status = 0
        self.features = 0
        for r in self.rings.values():
            self._close_ring_fds(r)
        self.rings.clear()

    def num_queues(self) -> int:
        return self.queue_num

    def queue_max_size(self, index: int) -> int:
        return self.max_queue_size if 0 <= index < self.queue_num else 0

    def queue_ring_align(self) -> int:
        return 0

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int) -> None:
        if not 0 <= index < self.queue_num:
            raise VhostUserFrontendError(f"queue {index} beyond {self.queue_num}")
        r = self.rings.get(index) or _Ring(index)
        r.size, r.desc, r.driver, r.device = size, desc, driver, device
        if r.kick_fd < 0:
            r.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            r.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.rings[index] = r
        if self.started:
            self._start_ring(r)

    def notify(self, index: int) -> None:
        r = self.rings.get(index)
        if r is None or r.kick_fd < 0:
            raise VhostUserFrontendError(f"queue {index} is not set up")
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(r.kick_fd, 1)

    def read_isr(self) -> int:
        """Drain every call eventfd; bit 0 set if the back end signalled any ring."""
        isr = 0
        for r in self.rings.values():
            if r.call_fd >= 0:
                try:
                    if os.eventfd_read(r.call_fd):
                        isr |= spec.VIRTIO_PCI_ISR_QUEUE
                except BlockingIOError:
                    pass
        return isr

    def config_generation(self) -> int:
        return 0

    def read_config(self, off: int, n: int) -> bytes:
        if self.protocol_features >> vu.VHOST_USER_PROTOCOL_F_CONFIG & 1:
            try:
                return self._get_config(off, n)
            except VhostUserFrontendError as e:
                log.info("GET_CONFIG failed (%s); using the front end's config", e)
        cfg = bytearray(self.mac)
        cfg += spec.VIRTIO_NET_S_LINK_UP.to_bytes(2, "little")
        cfg += max(1, self.queue_num // 2).to_bytes(2, "little")
        cfg += self.mtu.to_bytes(2, "little")
        cfg = cfg.ljust(off + n, b"\0")
        return bytes(cfg[off : off + n])

    def _get_config(self, off: int, n: int) -> bytes:
        payload = vu.encode_payload(vu.P.CONFIG, vu.ConfigSpace(off, n, 0, bytes(n)))
        self._send(R.GET_CONFIG, payload)
        v = self._reply(R.GET_CONFIG)
        if not isinstance(v, vu.ConfigSpace) or v.size != n or len(v.data) < n:
            raise VhostUserFrontendError("GET_CONFIG: reply of the wrong size")
        return bytes(v.data[:n])

    # -- start / stop --------------------------------------------------------------------------
    def _start(self) -> None:
        self._set(R.SET_FEATURES, vu.encode_payload(vu.P.U64, self._backend_features()))
        region = vu.MemRegion(0, self.mem_size, USERSPACE_BASE, 0)
        self._set(R.SET_MEM_TABLE, vu.encode_payload(vu.P.MEMTABLE, vu.MemTable((region,))),
                  (self.memfd,))
        self.started = True
        for r in sorted(self.rings.values(), key=lambda r: r.index):
            self._start_ring(r)

    def _start_ring(self, r: _Ring) -> None:
        i = r.index
        self._set(R.SET_VRING_NUM, vu.encode_payload(vu.P.STATE, vu.VringState(i, r.size)))
        base = 0
        if self.features >> spec.VIRTIO_F_RING_PACKED & 1:
            base = 1 << 15  # avail wrap counter 1, slot 0
        self._set(R.SET_VRING_BASE, vu.encode_payload(vu.P.STATE, vu.VringState(i, base)))
        addr = vu.VringAddr(i, 0, USERSPACE_BASE + r.desc, USERSPACE_BASE + r.device,
                            USERSPACE_BASE + r.driver, 0)
        self._set(R.SET_VRING_ADDR, vu.encode_payload(vu.P.ADDR, addr))
        self._set(R.SET_VRING_KICK, vu.encode_payload(vu.P.FILE, vu.VringFile(i, r.kick_fd)),
                  (r.kick_fd,))
        self._set(R.SET_VRING_CALL, vu.encode_payload(vu.P.FILE, vu.VringFile(i, r.call_fd)),
                  (r.call_fd,))
        if self.backend_features >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            self._set(R.SET_VRING_ENABLE, vu.encode_payload(vu.P.STATE, vu.VringState(i, 1)))
        r.started = True

    def _stop(self) -> None:
        """Stop every ring (GET_VRING_BASE, as QEMU's vhost_dev_stop); returns nothing."""
        self.stopped_bases: dict[int, int] = {}
        for r in sorted(self.rings.values(), key=lambda r: r.index):
            if not r.started:
                continue
            if self.backend_features >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1:
                self._set(R.SET_VRING_ENABLE, vu.encode_payload(vu.P.STATE,
                                                                vu.VringState(r.index, 0)))
            self._send(R.GET_VRING_BASE, vu.encode_payload(vu.P.STATE,
                                                           vu.VringState(r.index, 0)))
            v = self._reply(R.GET_VRING_BASE)
            if isinstance(v, vu.VringState):
                self.stopped_bases[r.index] = v.num
            r.started = False
        self.started = False

    @staticmethod
    def _close_ring_fds(r: _Ring) -> None:
        for fd in (r.kick_fd, r.call_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        r.kick_fd = r.call_fd = -1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        for r in self.rings.values():
            self._close_ring_fds(r)
        self.mem.close()
        with contextlib.suppress(OSError):
            os.close(self.memfd)
        self.memfd = -1

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
