"""trace's hook-site helpers against the real device classes: names, BAR sizing, queues."""

from __future__ import annotations

import io
import json

import pytest

from virtwire import trace
from virtwire.net.device import VirtioNet
from virtwire.pci.device import MODERN_BAR_SIZE, VirtioPciDevice
from virtwire.virtio import spec
from virtwire.virtio.pair import make_ring_pair
from virtwire.virtio.traced_queue import TracedQueue, wrap_queue

BASE = 0xFEBF0000


@pytest.fixture
def finish():
    """Tracing on into memory; call the fixture's value to stop and get the events."""
    buf = io.StringIO()
    trace.start(out=buf)

    def stop() -> list[dict]:
        trace.stop()
        return [json.loads(x) for x in buf.getvalue().splitlines()]

    yield stop
    trace.stop()


def _pci() -> VirtioPciDevice:
    return VirtioPciDevice(VirtioNet(mac="52:54:00:00:00:01"))


def test_config_names_cover_header_and_virtio_caps() -> None:
    dev = _pci()
    assert dev.config_reg_name(0, 4) == "vendor_id|device_id"
    assert dev.config_reg_name(8, 4) == "revision_id|prog_if|class"
    assert dev.config_reg_name(0x34) == "cap_ptr"
    assert dev.config_reg_name(0x21) == "bar4+1"
    names = {}
    for at in dev.pci.capabilities:
        names[dev.config_reg_name(at + 3)] = dev.config_read(at + 3, 1)
    assert names == {"cap.common_cfg.cfg_type": 1, "cap.notify_cfg.cfg_type": 2,
                     "cap.isr_cfg.cfg_type": 3, "cap.device_cfg.cfg_type": 4,
                     "cap.pci_cfg.cfg_type": 5}
    notify = dev.pci.capabilities[1]
    assert dev.config_reg_name(notify + 16) == "cap.notify_cfg.notify_off_multiplier"
    assert dev.config_reg_name(0xFC) .startswith("cap.")


def test_bar_sizing_and_programming(finish) -> None:
    dev = _pci()
    for v in (0xFFFFFFFF, BASE):
        dev.config_write(0x20, 4, v)
    dev.config_write(0x14, 4, 0xFFFFFFFF)  # an unimplemented BAR: no sizing event
    events = finish()
    got = [(e["ev"], e.get("bar"), e.get("size"), e.get("addr")) for e in events
           if e.get("cat") == "pci" and e["ev"].startswith("bar_")]
    assert got == [("bar_size", 4, MODERN_BAR_SIZE, None), ("bar_map", 4, MODERN_BAR_SIZE, BASE)]


def test_bar_register_names_and_feature_offer(finish) -> None:
    dev = _pci()
    dev.config_write(0x20, 4, BASE)
    for off, w, want in ((4, 4, "common_cfg.device_feature"), (20, 1, "common_cfg.device_status"),
                         (32, 4, "common_cfg.queue_desc_lo"), (0x1000, 1, "isr"),
                         (0x2000, 1, "device_cfg.mac"), (0x2006, 2, "device_cfg.status")):
        assert dev.bar_reg_name(4, off) == want
        dev.bar_read(BASE + off, w, True)
    assert dev.bar_reg_name(4, 0x3004) == "notify.q1"
    events = finish()
    offer = [e for e in events if e.get("cat") == "feature"]
    assert len(offer) == 1
    assert offer[0]["names"] == spec.feature_names(dev.device.offered_features)
    regs = [e["reg"] for e in events if e.get("ev") == "bar_read"]
    assert regs[0] == "common_cfg.device_feature" and regs[-1] == "device_cfg.status"


def test_vhost_payloads_are_decoded(finish) -> None:
    from virtwire.hosts.vhost_user_proto import MemRegion, MemTable, VringAddr

    trace.vhost_message("SET_FEATURES", 2, 8, 0, spec.bit(spec.VIRTIO_F_VERSION_1,
                                                          spec.VIRTIO_NET_F_MAC))
    trace.vhost_message("VHOST_USER_SET_MEM_TABLE", 5, 40, 1,
                        MemTable((MemRegion(0, 1 << 28, 0x7F0000000000, 0, 9),)))
    trace.vhost_message("SET_VRING_ADDR", 9, 40, 0, VringAddr(1, 0, 0x10, 0x20, 0x30))
    trace.vhost_reply("GET_FEATURES", 1, spec.bit(spec.VIRTIO_F_VERSION_1))
    events = finish()
    ev = [e for e in events if e["cat"] in ("vhost", "feature")]
    assert ev[0]["req"] == "VHOST_USER_SET_FEATURES"
    assert ev[0]["payload"] == {"features": "0x100000020", "names": ["MAC", "VERSION_1"]}
    assert ev[1]["payload"]["regions"][0]["userspace_addr"] == 0x7F0000000000
    assert ev[2]["payload"]["desc_user_addr"] == 0x10
    assert ev[3]["ev"] == "reply" and ev[4] == {**ev[4], "cat": "feature", "ev": "offer",
                                                "names": ["VERSION_1"]}


def test_wrap_queue_reports_chains_and_used(finish) -> None:
    rp = make_ring_pair("split", 16)
    ring = wrap_queue(rp.device, 3)
    assert isinstance(ring, TracedQueue) and ring.size == 16
    rp.device = ring
    rp.add([b"abcd"], [8], "t1")
    rp.driver.publish(rp.mem)
    served = rp.serve()
    assert len(served) == 1 and rp.collect() == [("t1", 4)]
    ring.ready = False  # attribute writes reach the ring
    assert ring.traced_ring.ready is False
    events = finish()
    ev = [e for e in events if e["cat"] in ("queue", "chain", "used")]
    assert ev[0]["ev"] == "setup" and ev[0]["q"] == 3 and ev[0]["size"] == 16
    assert ev[0]["desc"] == rp.driver.layout()[0] and ev[0]["used"] == rp.driver.layout()[2]
    ch = ev[1]
    assert ch["ev"] == "chain" and ch["rlen"] == 4 and ch["wlen"] == 8
    assert [d[1:] for d in ch["descs"]] == [[4, spec.VIRTQ_DESC_F_NEXT],
                                            [8, spec.VIRTQ_DESC_F_WRITE]]
    assert ev[2] == {**ev[2], "ev": "used", "q": 3, "len": 4}
    assert ev[3] == {**ev[3], "ev": "publish", "n": 1}


def test_wrap_queue_is_identity_when_off() -> None:
    trace.stop()
    rp = make_ring_pair("split", 8)
    assert wrap_queue(rp.device, 0) is rp.device


def test_helpers_are_no_ops_when_off() -> None:
    trace.stop()
    dev = _pci()
    dev.config_read(0, 2)
    dev.bar_read(BASE, 4, True)
    trace.vhost_message("GET_FEATURES", 1, 0, 0, None)
    trace.status_change(0, 1)
    trace.features_event("ack", 1)
    assert trace.TRACE is None


def test_ctrl_command_names() -> None:
    # the one table of control-command names (the device's ctrl events use it)
    assert spec.ctrl_names(spec.VIRTIO_NET_CTRL_RX, spec.VIRTIO_NET_CTRL_RX_PROMISC) == \
        ("RX", "PROMISC")
    assert spec.ctrl_names(spec.VIRTIO_NET_CTRL_MQ, spec.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) == \
        ("MQ", "VQ_PAIRS_SET")
    assert spec.ctrl_names(9, 9) == ("9", "9")
