"""``serve.Server`` end to end in one process: the Python vhost-user front end + driver against
our back end, device and an in-memory frame backend (no QEMU, no TAP)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import threading

import pytest

from virtwire.config import parse_port
from virtwire.drive.vhost_user_frontend import VhostUserFrontend
from virtwire.hosts.vhost_user_proto import VhostUserRequest as R
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.serve import build, query_stats
from virtwire.virtio import spec


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def served(request, tmp_path):
    packed = request.param
    sock = str(tmp_path / "vwv.sock")
    srv = build([parse_port(f"vhost-user,path={sock},backend=memory,queue_size=256,"
                            f"packed={'on' if packed else 'off'}")])
    srv.start(sock + ".ctl")
    srv.loop.call_every(0.02, lambda: None)  # lets loop.stop() from this thread take effect
    t = threading.Thread(target=srv.loop.run, daemon=True)
    t.start()
    try:
        yield srv, sock, packed
    finally:
        srv.loop.stop()
        t.join(5)
        srv.close()


def test_frames_both_ways_and_counters(served):
    srv, sock, packed = served
    be = srv.ports[0].backends[0]
    fe = VhostUserFrontend(sock, mem_size=32 << 20)
    try:
        drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                              NetDriverConfig(packed=packed)).probe()
        assert drv.has(spec.VIRTIO_F_RING_PACKED) == packed
        rnd = random.Random(3)
        out = [rnd.randbytes(rnd.randint(60, 1514)) for _ in range(300)]
        assert drv.send_all(out, timeout=10) == len(out)
        deadline = 0
        while len(be.frames()) < len(out) and deadline < 200:
            threading.Event().wait(0.02)
            deadline += 1
        assert be.frames() == out
        back = [rnd.randbytes(rnd.randint(60, 1514)) for _ in range(300)]
        for f in back:
            be.inject(f)
        got = drv.poll_receive(len(back), timeout=10)
        assert [g.data for g in got] == back
        st = query_stats(sock + ".ctl")
        rings = {r["role"]: r for r in st["ports"][0]["vhost_user"]["rings"]}
        assert rings["tx0"]["frames"] == 300 and rings["rx0"]["frames"] == 300
        assert rings["tx0"]["kicks"] >= 1  # (interrupts depend on the driver polling or not)
        assert st["ports"][0]["vhost_user"]["connected"]
        # SEND_RARP: an announcement leaves through the backend; NET_SET_MTU reaches the device.
        fe._set(R.SEND_RARP, struct.pack("<Q", int.from_bytes(b"\x52\x54\x00\xab\xcd\xef",
                                                              "little")))
        fe._set(R.NET_SET_MTU, struct.pack("<Q", 9000))
        deadline = 0
        while be.frames()[-1][12:14] != b"\x80\x35" and deadline < 100:
            threading.Event().wait(0.02)
            deadline += 1
        rarp = be.frames()[-1]
        assert rarp[12:14] == b"\x80\x35" and rarp[6:12] == b"\x52\x54\x00\xab\xcd\xef"
        assert srv.ports[0].device.mtu == 9000
        drv.shutdown()
    finally:
        fe.close()


def test_sigusr1_dumps_counters_as_json(served, capfd):
    srv, sock, _packed = served
    os.kill(os.getpid(), signal.SIGUSR1)
    err = ""
    for _ in range(500):  # the loop's thread writes it; on a loaded machine that takes a while
        err += capfd.readouterr().err
        if any(x.startswith("{") for x in err.splitlines()):
            break
        threading.Event().wait(0.02)
    line = [x for x in err.splitlines() if x.startswith("{")][0]
    assert json.loads(line)["ports"][0]["vhost_user"]["path"] == sock
