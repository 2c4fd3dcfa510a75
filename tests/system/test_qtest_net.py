"""Our virtio-net driver brings up QEMU's own virtio-net-pci over qtest and exchanges frames.

Modern (disable-legacy=on, 0x1041) and transitional through the legacy I/O BAR (0x1000), with
the three receive-buffer layouts. 10,000 frames of random sizes each way, byte-exact, in order.
"""

from __future__ import annotations

import random
import time

import pytest

from virtwire.drive.qtest import QemuNetHarness
from virtwire.net.driver import DEFAULT_NET_FEATURES, DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.pci.driver import probe_pci_transport
from virtwire.virtio import spec

pytestmark = pytest.mark.system


def bring_up(h: QemuNetHarness, features: int = DEFAULT_NET_FEATURES,
             **cfg: object) -> VirtioNetDriver:
    t = probe_pci_transport(h.vm.qtest, legacy=h.transitional)
    alloc = DmaAllocator(0x100000, h.vm.ram_size - 0x100000)
    packed = "packed=on" in h.props
    config = NetDriverConfig(features=features, packed=packed, **cfg)  # type: ignore[arg-type]
    drv = VirtioNetDriver(t, h.vm.mem, alloc, config).probe()
    assert drv.has(spec.VIRTIO_F_RING_PACKED) == packed
    return drv


def recv_out(h: QemuNetHarness, drv: VirtioNetDriver, timeout: float) -> bytes | None:
    """The next frame the device sent to the peer, servicing the driver while waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = h.recv_from_device(0.002)
        if f is not None:
            return f
        drv.service()
    return None


def exchange(drv: VirtioNetDriver, h: QemuNetHarness, n: int, lo: int, hi: int,
             seed: int, batch: int = 64) -> None:
    rnd = random.Random(seed)
    out = [rnd.randbytes(rnd.randint(lo, hi)) for _ in range(n)]
    inn = [rnd.randbytes(rnd.randint(lo, hi)) for _ in range(n)]
    got_out: list[bytes] = []
    got_in: list[bytes] = []
    for k in range(0, n, batch):
        tx = out[k : k + batch]
        assert drv.send_all(tx, timeout=10) == len(tx)
        rx = inn[k : k + batch]
        for f in rx:
            h.send_to_device(f)
        for _ in tx:
            f = recv_out(h, drv, 10)
            assert f is not None, f"device transmitted only {len(got_out)} of {n}"
            got_out.append(f)
        frames = drv.poll_receive(len(rx), timeout=10)
        assert len(frames) == len(rx), f"driver received {len(got_in) + len(frames)} of {n}"
        got_in += [fr.data for fr in frames]
        for fr in frames:
            assert fr.flags & ~spec.VIRTIO_NET_HDR_F_DATA_VALID == 0
            assert fr.gso_type == spec.VIRTIO_NET_HDR_GSO_NONE
    assert got_out == out  # driver -> QEMU -> peer, byte-exact, in order
    assert got_in == inn  # peer -> QEMU -> driver, byte-exact, in order


@pytest.fixture(params=["modern", "transitional", "packed"])
def harness(request: pytest.FixtureRequest):
    props = "packed=on" if request.param == "packed" else ""
    with QemuNetHarness(transitional=request.param == "transitional", props=props,
                        name="vwd") as h:
        yield h


def test_bring_up_reads_config(harness: QemuNetHarness) -> None:
    drv = bring_up(harness)
    assert drv.legacy == harness.transitional
    assert drv.mac == bytes.fromhex("525400123456")
    assert drv.link_up
    st = drv.t.get_status()
    assert st == (spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER
                  | spec.VIRTIO_CONFIG_S_DRIVER_OK
                  | (0 if harness.transitional else spec.VIRTIO_CONFIG_S_FEATURES_OK))
    assert drv.has(spec.VIRTIO_F_VERSION_1) != harness.transitional
    assert drv.rx_layout == "mergeable"
    # link change via the monitor: status bit and a config-change ISR bit (§5.1.4, §4.1.4.5)
    qt = harness.vm.qtest
    irq = drv.t.fn.irq  # type: ignore[attr-defined]
    assert irq in (10, 11)  # routed through PIIX3 PIRQ registers by our "firmware"
    drv.t.read_isr()
    raises = qt.irq_raises.get(irq, 0)
    harness.vm.qmp.execute("set_link", name="n0", up=False)
    # INTx: the IOAPIC input line goes up (seen over qtest's irq intercept) ...
    assert drv.t.wait_interrupt(2.0) & spec.VIRTIO_PCI_ISR_CONFIG  # type: ignore[attr-defined]
    assert qt.irq_raises.get(irq, 0) == raises + 1
    # ... and reading the ISR lowered it (§4.1.4.5.1)
    qt.poll_async(0.05)
    assert not qt.irq_level.get(irq)
    assert not drv.link_up
    harness.vm.qmp.execute("set_link", name="n0", up=True)
    assert drv.link_up
    assert drv.set_promisc(True) == spec.VIRTIO_NET_OK
    assert drv.set_mac(bytes.fromhex("020000000009")) == spec.VIRTIO_NET_OK
    assert drv.vlan(42) == spec.VIRTIO_NET_OK
    drv.shutdown()
    assert drv.t.get_status() == 0


def test_10000_frames_each_way_byte_exact(harness: QemuNetHarness) -> None:
    drv = bring_up(harness)
    t0 = time.monotonic()
    exchange(drv, harness, 10_000, 60, 1514, seed=5)
    assert time.monotonic() - t0 < 120
    assert drv.stats.tx_frames == 10_000 and drv.stats.rx_frames == 10_000
    # EVENT_IDX: the driver kicked far less than once per frame
    assert drv.stats.kicks < 2_000


@pytest.mark.parametrize("layout", ["small", "big"])
def test_other_rx_layouts(harness: QemuNetHarness, layout: str) -> None:
    """Without MRG_RXBUF: small buffers (header + 1518) or Linux's big-packet chains."""
    feats = DEFAULT_NET_FEATURES & ~spec.bit(spec.VIRTIO_NET_F_MRG_RXBUF)
    drv = bring_up(harness, feats, rx_layout=layout)
    assert drv.rx_layout == layout
    assert drv.hdr_len == (10 if harness.transitional else 12)
    exchange(drv, harness, 500, 60, 9000 if layout == "big" else 1514, seed=7)
