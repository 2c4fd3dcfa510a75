"""Our driver as a vhost-user front end against DPDK's vhost PMD (testpmd), byte-exact."""

from __future__ import annotations

import random

import pytest

from virtwire.conform.dpdk import Testpmd
from virtwire.drive.vhost_user_frontend import VhostUserFrontend
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.virtio import spec

pytestmark = pytest.mark.system


def swap_macs(f: bytes) -> bytes:
    return f[6:12] + f[0:6] + f[12:]


@pytest.mark.parametrize("mode,packed", [("io", False), ("macswap", False), ("io", True)])
def test_frames_through_testpmd(mode: str, packed: bool) -> None:
    with Testpmd(mode, name="vwd") as tp:
        fe = VhostUserFrontend(tp.sock, mem_size=64 << 20)
        try:
            drv = VirtioNetDriver(fe, fe.mem, DmaAllocator(0x10000, fe.mem_size - 0x10000),
                                  NetDriverConfig(packed=packed)).probe()
            assert drv.has(spec.VIRTIO_F_RING_PACKED) == packed
            assert drv.has(spec.VIRTIO_NET_F_MRG_RXBUF) and drv.has(spec.VIRTIO_F_VERSION_1)
            # the start sequence QEMU uses (vhost_dev_start), in order
            starts = [i for i, n in enumerate(fe.log) if n == "SET_MEM_TABLE"]
            assert len(starts) == 1 and fe.log.index("SET_FEATURES") < starts[0]
            assert fe.log.count("SET_VRING_KICK") == 2 and fe.log.count("SET_VRING_CALL") == 2
            rnd = random.Random(11)
            frames = [rnd.randbytes(rnd.randint(60, 1514)) for _ in range(5000)]
            got: list[bytes] = []
            for k in range(0, len(frames), 32):
                batch = frames[k : k + 32]
                assert drv.send_all(batch, timeout=10) == len(batch)
                rx = drv.poll_receive(len(batch), timeout=10)
                assert len(rx) == len(batch), f"testpmd returned {len(got) + len(rx)} of {k + 32}"
                got += [f.data for f in rx]
            want = frames if mode == "io" else [swap_macs(f) for f in frames]
            assert got == want
            assert drv.stats.stall_kicks == 0
            drv.shutdown()
            # GET_VRING_BASE stopped both rings at the position where we left them
            assert fe.stopped_bases.keys() == {0, 1}
        finally:
            fe.close()
