"""A deliberately misbehaving vhost-user front end, for tests against a real ``virtwire serve``.

``HostileFrontend`` speaks the wire format (``hosts.vhost_user_proto``) but does what the test
asks: trickle bytes, never read replies, send pipes as kick fds, shrink its memfd under a
started ring. ``start_ring`` brings one split ring up the way QEMU does, in guest memory it
owns (one memfd at guest-physical 0, front-end addresses ``UVA + gpa``).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import time

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R
from virtwire.virtio import spec

__all__ = ["HostileFrontend", "UVA", "fd_count", "rss_kib", "memfd"]

UVA = 0x7F0000000000


def memfd(size: int, *, seal: str = "sealed") -> int:
    """A memfd of ``size`` bytes: ``sealed`` against resizing (QEMU's way), ``sealable`` (not
    sealed, sealing allowed) or ``unsealable`` (created without MFD_ALLOW_SEALING, as DPDK's
    --no-huge memory)."""
    flags = os.MFD_CLOEXEC | (0 if seal == "unsealable" else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create("vw-hostile", flags)
    os.ftruncate(fd, size)
    if seal == "sealed":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class HostileFrontend:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.mem_fd = -1
        self.mem: mmap.mmap | None = None
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- wire ------------------------------------------------------------------------------
    def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        vp.send_message(self.sock, vp.encode(req, payload, need_reply=need_reply), fds)

    def reply(self) -> object:
        msg = vp.recv_message(self.sock)
        if msg is None:
            raise EOFError("back end closed the connection")
        msg.close_fds()
        return struct.unpack("<Q", msg.payload[:8])[0] if len(msg.payload) >= 8 else msg.payload

    def ack(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        """Send with NEED_REPLY; the REPLY_ACK value (0 success)."""
        self.send(req, payload, fds, need_reply=True)
        v = self.reply()
        assert isinstance(v, int)
        return v

    def alive(self) -> bool:
        """The connection still answers GET_FEATURES."""
        try:
            self.send(R.GET_FEATURES)
            return isinstance(self.reply(), int)
        except (OSError, EOFError, vp.ProtocolError):
            return False

    # -- a ring, QEMU's way ----------------------------------------------------------------
    def handshake(self, features: int | None = None) -> None:
        offered = self.ack_get(R.GET_FEATURES)
        ack = 1 << vp.VHOST_USER_PROTOCOL_F_REPLY_ACK
        self.send(R.SET_PROTOCOL_FEATURES, vp.encode_payload(vp.P.U64, ack))
        want = offered & ~(1 << spec.VIRTIO_F_RING_PACKED) if features is None else features
        assert self.ack(R.SET_FEATURES, vp.encode_payload(vp.P.U64, want)) == 0

    def ack_get(self, req: int) -> int:
        self.send(req)
        v = self.reply()
        assert isinstance(v, int)
        return v

    def set_mem(self, size: int = 1 << 20, *, seal: str = "sealed") -> int:
        self.mem_fd = memfd(size, seal=seal)
        self.mem = mmap.mmap(self.mem_fd, size)
        table = vp.MemTable((vp.MemRegion(0, size, UVA, 0),))
        return self.ack(R.SET_MEM_TABLE, vp.encode_payload(vp.P.MEMTABLE, table), (self.mem_fd,))

    def ring_layout(self, index: int, num: int) -> tuple[int, int, int]:
        base = 0x10000 * (index + 1)
        return base, base + 16 * num, base + 0x8000

    def start_ring(self, index: int, num: int = 256, kick: int | None = None) -> int:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE; the KICK's ack value."""
        st = vp.P.STATE
        assert self.ack(R.SET_VRING_NUM, vp.encode_payload(st, vp.VringState(index, num))) == 0
        assert self.ack(R.SET_VRING_BASE, vp.encode_payload(st, vp.VringState(index, 0))) == 0
        desc, avail, used = self.ring_layout(index, num)
        addr = vp.VringAddr(index, 0, UVA + desc, UVA + used, UVA + avail)
        assert self.ack(R.SET_VRING_ADDR, vp.encode_payload(vp.P.ADDR, addr)) == 0
        assert self.ack(R.SET_VRING_CALL, vp.encode_payload(vp.P.FILE, vp.VringFile(
            index, self.call)), (self.call,)) == 0
        kfd = self.kick if kick is None else kick
        v = self.ack(R.SET_VRING_KICK, vp.encode_payload(vp.P.FILE, vp.VringFile(index, kfd)),
                     (kfd,))
        self.ack(R.SET_VRING_ENABLE, vp.encode_payload(st, vp.VringState(index, 1)))
        return v

    def post_tx(self, index: int, num: int, chains: list[list[tuple[int, int, int, int, int]]]
                ) -> None:
        """Write descriptors ``(slot, addr, len, flags, next)`` per chain and make the chains'
        heads available (split ring ``index`` as laid out by ``ring_layout``)."""
        assert self.mem is not None
        desc, avail, _used = self.ring_layout(index, num)
        idx = struct.unpack_from("<H", self.mem, avail + 2)[0]
        for chain in chains:
            for slot, addr, length, flags, nxt in chain:
                struct.pack_into("<QIHH", self.mem, desc + 16 * slot, addr, length, flags, nxt)
            struct.pack_into("<H", self.mem, avail + 4 + 2 * (idx % num), chain[0][0])
            idx = (idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, avail + 2, idx)
        os.eventfd_write(self.kick, 1)

    def used_idx(self, index: int, num: int) -> int:
        assert self.mem is not None
        return int(struct.unpack_from("<H", self.mem, self.ring_layout(index, num)[2] + 2)[0])

    def close(self) -> None:
        self.sock.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        for fd in (self.mem_fd, self.kick, self.call):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.mem_fd = -1


def wait_until(pred, timeout: float = 5.0, step: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
