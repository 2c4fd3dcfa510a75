"""The vhost-user back end against a scripted front end over a socketpair (no QEMU).

A memfd is the "guest RAM"; the test maps it at a fake front-end virtual address, drives a split
ring with the driver model and checks that the hosted ``LoopbackDevice`` echoes buffers, that the
call eventfd fires, and that hostile messages are refused without a crash or an fd leak.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

from virtwire.hosts import vhost_user_proto as vp
from virtwire.hosts.vhost_device import VirtioDeviceHost, build_rarp
from virtwire.hosts.vhost_user import VhostUserBackend
from virtwire.hosts.vhost_user_proto import (
    MemRegion,
    MemTable,
    P,
    VringAddr,
    VringFile,
    VringState,
)
from virtwire.hosts.vhost_user_proto import (
    VhostUserRequest as R,
)
from virtwire.loop import EventFd, EventLoop
from virtwire.memory import MmapGuestMemory
from virtwire.virtio import spec
from virtwire.virtio.driver import GuestAllocator
from virtwire.virtio.pair import LoopbackDevice
from virtwire.virtio.split_ring import SplitDriverQueue

RAM = 1 << 20
UVA = 0x7F12_3450_0000
GPA = 0x0


class FrontEnd:
    """A minimal scripted vhost-user front end (what QEMU does, message by message)."""

    def __init__(self, backend: VhostUserBackend, loop: EventLoop, sock: socket.socket):
        self.be, self.loop, self.sock = backend, loop, sock
        self.memfd = os.memfd_create("vwv-ram")
        os.ftruncate(self.memfd, RAM)
        self.mem = MmapGuestMemory()
        self.mem.map_fd(self.memfd, GPA, RAM, 0, UVA)
        self.alloc = GuestAllocator(0x1000, RAM - 0x1000)
        self.kicks: dict[int, EventFd] = {}
        self.calls: dict[int, EventFd] = {}

    def send(self, req, kind=P.NONE, value=None, fds=(), need_reply=False, raw=None):
        body = raw if raw is not None else vp.encode_payload(kind, value)
        vp.send_message(self.sock, vp.encode(req, body, need_reply=need_reply), fds)
        self.loop.run_once(0.5)

    def reply(self, req):
        self.sock.settimeout(2.0)
        msg = vp.recv_message(self.sock)
        assert msg is not None
        return vp.decode_reply(req, msg)

    def call(self, req, kind=P.NONE, value=None):
        self.send(req, kind, value)
        return self.reply(req)

    def handshake(self, features: int, nrings: int = 1, size: int = 64):
        offered = self.call(R.GET_FEATURES)
        assert offered >> spec.VHOST_USER_F_PROTOCOL_FEATURES & 1
        pf = self.call(R.GET_PROTOCOL_FEATURES)
        self.send(R.SET_PROTOCOL_FEATURES, P.U64, pf & spec.bit(
            vp.VHOST_USER_PROTOCOL_F_REPLY_ACK, vp.VHOST_USER_PROTOCOL_F_MQ))
        self.send(R.SET_OWNER)
        self.send(R.SET_FEATURES, P.U64, features | spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES))
        table = MemTable((MemRegion(GPA, RAM, UVA, 0),))
        self.send(R.SET_MEM_TABLE, P.MEMTABLE, table, fds=[self.memfd], need_reply=True)
        assert self.reply(R.SET_MEM_TABLE) == 0
        queues = []
        for i in range(nrings):
            q = SplitDriverQueue.allocate(self.alloc, size)
            q.setup(self.mem)
            d, a, u = q.layout()
            self.send(R.SET_VRING_NUM, P.STATE, VringState(i, size))
            self.send(R.SET_VRING_BASE, P.STATE, VringState(i, 0))
            self.send(R.SET_VRING_ADDR, P.ADDR, VringAddr(i, 0, UVA + d, UVA + u, UVA + a, 0))
            self.kicks[i], self.calls[i] = EventFd(), EventFd()
            self.send(R.SET_VRING_CALL, P.FILE, VringFile(i, 0), fds=[self.calls[i].fd])
            self.send(R.SET_VRING_KICK, P.FILE, VringFile(i, 0), fds=[self.kicks[i].fd])
            self.send(R.SET_VRING_ENABLE, P.STATE, VringState(i, 1))
            queues.append(q)
        return queues

    def close(self):
        for e in (*self.kicks.values(), *self.calls.values()):
            e.close()
        self.mem.close()
        os.close(self.memfd)


@pytest.fixture
def setup(tmp_path):
    loop = EventLoop(raise_errors=True)
    dev = LoopbackDevice([256, 256])
    host = VirtioDeviceHost(dev)
    be = VhostUserBackend(host, loop, str(tmp_path / "vwv-be.sock"), server=True, name="vwv")
    be.start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(be.path)
    loop.run_once(0.5)
    assert be.conn is not None
    fe = FrontEnd(be, loop, sock)
    yield fe, be, dev, loop
    fe.close()
    sock.close()
    be.close()
    loop.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_handshake_then_loopback_through_the_ring(setup):
    fe, be, dev, loop = setup
    feats = spec.bit(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_F_EVENT_IDX)
    (q,) = fe.handshake(feats)
    assert be.vrings[0].started and be.vrings[0].enabled
    out = fe.alloc.alloc(64)
    inb = fe.alloc.alloc(64)
    fe.mem.write(out, b"ping through vhost-user")
    q.add(fe.mem, [(out, 23)], [(inb, 64)], token="t1")
    q.publish(fe.mem)
    assert q.kick_needed(fe.mem)
    fe.kicks[0].write(1)
    loop.run_once(0.5)
    assert q.get_used(fe.mem) == ("t1", 23)
    assert fe.mem.read(inb, 23) == b"ping through vhost-user"
    assert fe.calls[0].read() == 1  # one interrupt for the batch
    st = be.stats()["rings"][0]
    assert st["kicks"] == 1 and st["interrupts"] == 1
    # GET_VRING_BASE stops the ring and returns the next avail index.
    assert fe.call(R.GET_VRING_BASE, P.STATE, VringState(0, 0)) == VringState(0, 1)
    assert not be.vrings[0].started


def test_batch_of_kicks_is_one_interrupt(setup):
    fe, be, dev, loop = setup
    (q,) = fe.handshake(spec.bit(spec.VIRTIO_F_VERSION_1))
    for i in range(8):
        out, inb = fe.alloc.alloc(16), fe.alloc.alloc(16)
        fe.mem.write(out, bytes([i]) * 16)
        q.add(fe.mem, [(out, 16)], [(inb, 16)], token=i)
        q.publish(fe.mem)
        fe.kicks[0].write(1)
    loop.run_once(0.5)
    got = [q.get_used(fe.mem) for _ in range(8)]
    assert [g[0] for g in got] == list(range(8))
    assert fe.calls[0].read() == 1


def test_restart_resumes_from_used_idx(setup):
    """A new connection with base 0 but used.idx 1 in memory resumes at 1 (QEMU's restore)."""
    fe, be, dev, loop = setup
    (q,) = fe.handshake(spec.bit(spec.VIRTIO_F_VERSION_1))
    out, inb = fe.alloc.alloc(16), fe.alloc.alloc(16)
    q.add(fe.mem, [(out, 16)], [(inb, 16)], token=0)
    q.publish(fe.mem)
    fe.kicks[0].write(1)
    loop.run_once(0.5)
    assert q.get_used(fe.mem) == (0, 16)
    be.disconnect("test restart")
    assert be.mem is None and not be.vrings[0].started
    sock2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock2.connect(be.path)
    loop.run_once(0.5)
    fe.sock.close()
    fe.sock = sock2
    fe.call(R.GET_FEATURES)
    fe.send(R.SET_FEATURES, P.U64, spec.bit(spec.VIRTIO_F_VERSION_1))
    fe.send(R.SET_MEM_TABLE, P.MEMTABLE, MemTable((MemRegion(GPA, RAM, UVA, 0),)),
            fds=[fe.memfd])
    d, a, u = q.layout()
    fe.send(R.SET_VRING_NUM, P.STATE, VringState(0, 64))
    fe.send(R.SET_VRING_BASE, P.STATE, VringState(0, 0))
    fe.send(R.SET_VRING_ADDR, P.ADDR, VringAddr(0, 0, UVA + d, UVA + u, UVA + a, 0))
    k2, c2 = EventFd(), EventFd()
    fe.send(R.SET_VRING_CALL, P.FILE, VringFile(0, 0), fds=[c2.fd])
    fe.send(R.SET_VRING_KICK, P.FILE, VringFile(0, 0), fds=[k2.fd])
    assert be.vrings[0].started and be.vrings[0].queue.get_base() == 1
    out, inb = fe.alloc.alloc(16), fe.alloc.alloc(16)
    fe.mem.write(out, b"after restart!!!")
    q.add(fe.mem, [(out, 16)], [(inb, 16)], token=1)
    q.publish(fe.mem)
    k2.write(1)
    loop.run_once(0.5)
    assert q.get_used(fe.mem) == (1, 16)
    assert fe.mem.read(inb, 16) == b"after restart!!!"
    k2.close()
    c2.close()


def test_hostile_messages_are_refused_and_fds_closed(setup, caplog):
    fe, be, dev, loop = setup
    fe.handshake(spec.bit(spec.VIRTIO_F_VERSION_1))
    before = _fd_count()
    stray = EventFd()
    cases = [
        (R.SET_VRING_NUM, P.STATE, VringState(7, 64), (), "out of range"),
        (R.SET_VRING_NUM, P.STATE, VringState(1, 100), (), "not a power of 2"),
        (R.SET_VRING_NUM, P.STATE, VringState(1, 0), (), "outside 1.."),
        (R.SET_VRING_ADDR, P.ADDR, VringAddr(0, 0, 0xDEAD0000, 0, 0, 0), (), "in no region"),
        (R.SET_VRING_CALL, P.FILE, VringFile(9, 0), (stray.fd,), "out of range"),
        (R.SET_VRING_ENABLE, P.STATE, VringState(0, 2), (), "not 0 or 1"),
        (R.SET_FEATURES, P.U64, 1 << 63, (), "were not offered"),
        (R.SET_PROTOCOL_FEATURES, P.U64, 1 << 40, (), "not offered"),
        (R.NET_SET_MTU, P.U64, 10, (), "outside 68"),
        (R.SET_LOG_FD, P.NONE, None, (stray.fd,), "not supported"),
        (R.SET_MEM_TABLE, P.MEMTABLE, MemTable((MemRegion(0, RAM, UVA, 0),)), (stray.fd,),
         "not a memfd or regular file"),  # an eventfd is not memory
        (R.SET_MEM_TABLE, P.MEMTABLE, MemTable((MemRegion(0, RAM * 4, UVA, 0),)), (fe.memfd,),
         "beyond its file"),
    ]
    for req, kind, value, fds, reason in cases:
        caplog.clear()
        fe.send(req, kind, value, fds=list(fds), need_reply=True)
        assert fe.reply(req) == 1, req  # REPLY_ACK failure
        if reason:
            assert reason in caplog.text, (req, caplog.text)
    # Wrong fd count for a message that never carries one, and a truncated payload.
    fe.send(R.SET_OWNER, fds=[stray.fd], need_reply=True)
    assert fe.reply(R.SET_OWNER) == 1
    fe.send(R.SET_VRING_BASE, raw=b"\x00\x01", need_reply=True)
    assert fe.reply(R.SET_VRING_BASE) == 1
    stray.close()
    assert _fd_count() == before  # every fd we sent was closed by the back end
    assert be.conn is not None and be.vrings[0].started  # still serving
    # The ring still works after all that.
    assert fe.call(R.GET_QUEUE_NUM) == 1


def test_garbage_stream_drops_the_connection_without_a_crash(setup, caplog):
    fe, be, dev, loop = setup
    fe.sock.sendall(struct.pack("<III", 1, 0x3, 0))  # version 3
    loop.run_once(0.5)
    assert be.conn is None and "version" in caplog.text
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a new front end is welcome
    sock.connect(be.path)
    loop.run_once(0.5)
    assert be.conn is not None
    sock.close()


def test_get_config_and_rarp_frame():
    assert len(build_rarp(bytes(range(6)))) == 60
    frame = build_rarp(b"\x52\x54\x00\x00\x00\x01")
    assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"
    assert frame[6:12] == frame[22:28] == b"\x52\x54\x00\x00\x00\x01"


def test_add_mem_reg_is_reference_counted_across_queue_pairs(setup):
    """QEMU with MQ runs one vhost device per pair on one socket: each adds every region."""
    fe, be, dev, loop = setup
    region = MemRegion(GPA, RAM, UVA, 0)
    fe.send(R.SET_PROTOCOL_FEATURES, P.U64, spec.bit(vp.VHOST_USER_PROTOCOL_F_REPLY_ACK,
                                                     vp.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS))
    fe.send(R.SET_FEATURES, P.U64, spec.bit(spec.VIRTIO_F_VERSION_1))
    for _ in range(2):
        fe.send(R.ADD_MEM_REG, P.MEMREG, region, fds=[fe.memfd], need_reply=True)
        assert fe.reply(R.ADD_MEM_REG) == 0
    assert len(be.mem.regions) == 1
    fe.send(R.REM_MEM_REG, P.MEMREG, region, need_reply=True)
    assert fe.reply(R.REM_MEM_REG) == 0
    assert len(be.mem.regions) == 1  # the other pair still uses it
    fe.send(R.REM_MEM_REG, P.MEMREG, region, need_reply=True)
    assert fe.reply(R.REM_MEM_REG) == 0
    assert len(be.mem.regions) == 0
    # An overlapping but different region is refused.
    fe.send(R.ADD_MEM_REG, P.MEMREG, region, fds=[fe.memfd], need_reply=True)
    assert fe.reply(R.ADD_MEM_REG) == 0
    fe.send(R.ADD_MEM_REG, P.MEMREG, MemRegion(GPA + 4096, 4096, UVA + 8192, 0),
            fds=[fe.memfd], need_reply=True)
    assert fe.reply(R.ADD_MEM_REG) == 1


def test_client_mode_connects_and_reconnects(tmp_path):
    """server=off: we connect to the front end's socket, and again after it went away."""
    loop = EventLoop(raise_errors=True)
    path = str(tmp_path / "vwv-fe.sock")
    be = VhostUserBackend(VirtioDeviceHost(LoopbackDevice([64, 64])), loop, path, server=False,
                          reconnect=0.05)
    be.start()  # nobody listens yet: retried
    loop.run(timeout=0.1)
    assert be.conn is None
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    lst.settimeout(2)
    try:
        for n in (1, 2):
            assert loop.run_until(lambda n=n: be.connections == n, 2.0)
            conn, _ = lst.accept()
            vp.send_message(conn, vp.encode(R.GET_FEATURES))
            loop.run_once(0.5)
            conn.settimeout(2)
            msg = vp.recv_message(conn)
            assert msg is not None and vp.decode_reply(R.GET_FEATURES, msg) >> 32 & 1
            conn.close()  # the front end restarts
            loop.run_once(0.5)
            assert be.conn is None
    finally:
        lst.close()
        be.close()
        loop.close()


@pytest.mark.parametrize("size", [8, 16, 64])
def test_packed_position_read_back_from_the_ring(size):
    """After a crash QEMU re-sends a stale packed base: the flags tell the real position."""
    import random

    from virtwire.hosts.vhost_rings import packed_position_from_ring
    from virtwire.virtio.pair import make_ring_pair

    rp = make_ring_pair("packed", size)
    desc = rp.driver.layout()[0]
    rnd = random.Random(size)
    assert packed_position_from_ring(rp.mem, desc, size) == rp.device.get_base()  # fresh
    held: dict[int, tuple] = {}
    tok = 0
    for _ in range(300):
        for _ in range(rnd.randint(0, min(size, rp.driver.num_free))):
            tok += 1
            held[tok] = rp.add([], [16], token=tok)  # one slot per buffer (as Linux's RX)
        rp.driver.publish(rp.mem)
        # The device serves only part of what is available; nothing stays in flight.
        rp.serve(limit=rnd.randint(0, size))
        for t, _n in rp.collect():
            ob, ib = held.pop(t)
            rp.free_buffers(ob + ib)
        assert packed_position_from_ring(rp.mem, desc, size) == rp.device.get_base()


def test_packed_position_refuses_multi_slot_chains():
    from virtwire.hosts.vhost_rings import packed_position_from_ring
    from virtwire.virtio.pair import make_ring_pair

    rp = make_ring_pair("packed", 16)
    desc = rp.driver.layout()[0]
    wrong = 0
    held: dict[int, tuple] = {}
    for tok in range(1, 80):
        if rp.driver.num_free >= 3:
            held[tok] = rp.add([b"a" * 8, b"b" * 8, b"c" * 8], [], token=tok)  # 3 slots
        rp.driver.publish(rp.mem)
        rp.serve(limit=1)
        for t, _n in rp.collect():
            ob, ib = held.pop(t)
            rp.free_buffers(ob + ib)
        got = packed_position_from_ring(rp.mem, desc, 16)
        if got is not None and got != rp.device.get_base():
            wrong += 1
    assert wrong == 0  # ambiguous rings answer None, never a wrong position
