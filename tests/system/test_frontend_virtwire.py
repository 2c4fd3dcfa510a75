"""Our driver as a vhost-user front end against virtwire's own back end (``virtwire serve``).

The back end runs as a separate process in a namespace of ours with its port on a TAP; the test
holds an AF_PACKET socket on that TAP. Frames both ways, byte-exact, split and packed rings.
"""

from __future__ import annotations

import random

import pytest

from virtwire.conform.peers import ETH_P_EXPERIMENTAL, MAGIC, VirtwireServe
from virtwire.drive.vhost_user_frontend import VhostUserFrontend
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.virtio import spec

pytestmark = pytest.mark.system


def test_frame(rnd: random.Random, n: int) -> bytes:
    head = bytes.fromhex("020000000001020000000002") + ETH_P_EXPERIMENTAL.to_bytes(2, "big")
    return head + MAGIC + rnd.randbytes(n - 18)


test_frame.__test__ = False  # type: ignore[attr-defined]


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_frames_through_virtwire_serve(packed: bool) -> None:
    with VirtwireServe(name="vwd") as vw:
        fe = VhostUserFrontend(vw.sock_path)
        try:
            drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                                  NetDriverConfig(packed=packed)).probe()
            assert drv.has(spec.VIRTIO_F_RING_PACKED) == packed
            # config space came from the back end (GET_CONFIG), not the front end's default
            assert drv.mac == bytes.fromhex("525400123456")
            rnd = random.Random(21)
            n = 3000
            out = [test_frame(rnd, rnd.randint(60, 1514)) for _ in range(n)]
            inn = [test_frame(rnd, rnd.randint(60, 1514)) for _ in range(n)]
            got_out: list[bytes] = []
            got_in: list[bytes] = []
            for k in range(0, n, 32):
                assert drv.send_all(out[k : k + 32], timeout=10) == len(out[k : k + 32])
                for f in inn[k : k + 32]:
                    vw.send_to_device(f)
                for _ in out[k : k + 32]:
                    f = vw.recv_from_device(10)
                    assert f is not None, f"TAP saw {len(got_out)} of {n}: {vw.log_tail()}"
                    got_out.append(f)
                rx = drv.poll_receive(len(inn[k : k + 32]), timeout=10)
                got_in += [r.data for r in rx]
                assert len(got_in) == min(n, k + 32)
            assert got_out == out
            assert got_in == inn
            assert drv.stats.stall_kicks == 0
            drv.shutdown()
        finally:
            fe.close()
