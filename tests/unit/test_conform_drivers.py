"""Driver conformance: each check passes for virtwire's own driver and fails for a driver
broken on purpose (virtwire's device in process observes it through the recording hook)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from virtwire.conform.context import test_frame
from virtwire.conform.drivers import DRIVER_CHECKS, observe_local
from virtwire.conform.suite import format_table
from virtwire.conform.targets_local import LocalTarget
from virtwire.net.driver import NetDriverConfig
from virtwire.virtio import spec as s

ACK, DRV, FOK, DOK = 1, 2, 8, 4
IDS = [c[0] for c in DRIVER_CHECKS]


def _statuses(rep: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["status"] for c in rep["checks"]}


def _traffic(t: LocalTarget) -> Any:
    import random

    drv = t.driver()
    rnd = random.Random(3)
    frames = [test_frame(rnd, rnd.randint(60, 1514)) for _ in range(200)]
    assert drv.send_all(frames) == 200
    for f in frames[:100]:
        t.peer_send(f)
    assert len(drv.poll_receive(100, 2)) == 100
    drv.set_promisc(True)
    drv.send([test_frame(rnd, 9000)], gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
             gso_size=1448, flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)
    return drv


def test_our_driver_is_clean() -> None:
    rep = observe_local(_traffic)
    st = _statuses(rep)
    assert set(st) == set(IDS)
    assert st == dict.fromkeys(IDS, "pass"), format_table(rep)
    assert "200" not in rep["checks"][0]["detail"] or True
    tx = next(c for c in rep["checks"] if c["id"] == "driver.tx_header")
    assert "transmit headers read" in tx["detail"]


def _only_fail(rep: dict[str, Any], cid: str, words: str) -> None:
    st = _statuses(rep)
    assert st[cid] == "fail", format_table(rep)
    c = next(c for c in rep["checks"] if c["id"] == cid)
    assert words in c["detail"], c["detail"]


def test_driver_ok_before_features_ok() -> None:
    def drive(t: LocalTarget) -> None:
        drv = t.driver(probe=False)
        tr = drv.t
        tr.reset()
        tr.set_status(ACK)
        tr.set_status(ACK | DRV)
        tr.set_driver_features(s.bit(s.VIRTIO_F_VERSION_1))
        tr.set_status(ACK | DRV | DOK)
    rep = observe_local(drive)
    _only_fail(rep, "driver.init_order", "DRIVER_OK without FEATURES_OK")
    _only_fail(rep, "driver.status", "not allowed")


def test_driver_skipping_acknowledge() -> None:
    def drive(t: LocalTarget) -> None:
        tr = t.driver(probe=False).t
        tr.reset()
        tr.set_status(DRV)
    _only_fail(observe_local(drive), "driver.init_order", "not ACKNOWLEDGE")


def test_features_not_offered_and_broken_dependencies() -> None:
    def drive(t: LocalTarget) -> None:
        tr = t.driver(probe=False).t
        tr.reset()
        tr.set_status(ACK)
        tr.set_status(ACK | DRV)
        tr.set_driver_features(s.bit(s.VIRTIO_F_VERSION_1, 50, s.VIRTIO_NET_F_HOST_TSO4))
        tr.set_status(ACK | DRV | FOK)
    rep = observe_local(drive)
    _only_fail(rep, "driver.features", "not offered")
    _only_fail(rep, "driver.features", "VIRTIO_NET_F_HOST_TSO4 Requires VIRTIO_NET_F_CSUM")


def _raw_tx_chain(t: LocalTarget, descs: list[tuple[int, int, int, int]],
                  avail_idx: int | None = None, heads: list[int] | None = None) -> None:
    """Write ``descs`` (addr, len, flags, next) at the transmit ring's table from slot 0, make
    head(s) available and kick: a driver that builds its own chains."""
    drv = t.driver(NetDriverConfig(features=s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MAC,
                                                  s.VIRTIO_F_INDIRECT_DESC)))
    q = drv.txqs[0].q
    mem = t.mem
    for i, (a, n, f, nx) in enumerate(descs):
        mem.write(q.desc_addr + 16 * i, struct.pack("<QIHH", a, n, f, nx))
    idx = mem.read_u16(q.avail_addr + 2)
    for k, h in enumerate(heads or [0]):
        mem.write_u16(q.avail_addr + 4 + 2 * ((idx + k) % q.size), h)
    mem.write_u16(q.avail_addr + 2, (idx + len(heads or [0]) if avail_idx is None
                                     else avail_idx) & 0xFFFF)
    drv.t.notify(drv.txqs[0].index)


BUF = 0x200000


def test_writable_before_readable() -> None:
    rep = observe_local(lambda t: _raw_tx_chain(
        t, [(BUF, 64, s.VIRTQ_DESC_F_WRITE | s.VIRTQ_DESC_F_NEXT, 1), (BUF + 64, 64, 0, 0)]))
    _only_fail(rep, "driver.write_after_read", "readable descriptor after writable")


@pytest.mark.parametrize(("table", "flags", "words"), [
    (24, s.VIRTQ_DESC_F_INDIRECT, "not a non-zero multiple of 16"),
    (32, s.VIRTQ_DESC_F_INDIRECT | s.VIRTQ_DESC_F_NEXT, "INDIRECT together with NEXT"),
])
def test_indirect_rules(table: int, flags: int, words: str) -> None:
    def drive(t: LocalTarget) -> None:
        t.mem.write(BUF, struct.pack("<QIHH", BUF + 0x1000, 100, 0, 0) * 2)
        _raw_tx_chain(t, [(BUF, table, flags, 1), (BUF + 0x1000, 100, 0, 0)])
    _only_fail(observe_local(drive), "driver.indirect", words)


def test_nested_indirect() -> None:
    def drive(t: LocalTarget) -> None:
        t.mem.write(BUF, struct.pack("<QIHH", BUF + 0x100, 16, s.VIRTQ_DESC_F_INDIRECT, 0))
        _raw_tx_chain(t, [(BUF, 16, s.VIRTQ_DESC_F_INDIRECT, 0)])
    _only_fail(observe_local(drive), "driver.indirect", "nested indirect")


def test_avail_idx_too_far_ahead() -> None:
    rep = observe_local(lambda t: _raw_tx_chain(t, [(BUF, 100, 0, 0)], avail_idx=1000))
    _only_fail(rep, "driver.avail_idx", "more than the queue size")


def test_buffer_reused_while_in_flight() -> None:
    # head 0 made available twice in one batch: the device pops it twice before using it
    def drive(t: LocalTarget) -> None:
        t.mem.write(BUF, bytes(12) + test_frame(__import__("random").Random(1), 100))
        _raw_tx_chain(t, [(BUF, 112, 0, 0)], heads=[0, 0])
    _only_fail(observe_local(drive), "driver.buffer_reuse", "before the device used it")


def test_oversized_non_gso_frame_breaks_the_mtu_rule() -> None:
    def drive(t: LocalTarget) -> None:
        import random

        drv = t.driver()
        assert drv.mtu == 1500
        drv.send([test_frame(random.Random(1), 4000)])
    _only_fail(observe_local(drive), "driver.tx_header", "above mtu 1500")


def test_gso_without_the_feature() -> None:
    # our driver refuses to do this (ValueError), so the header is written by hand
    def drive(t: LocalTarget) -> None:
        import random

        hdr = struct.pack("<BBHHHHH", 0, s.VIRTIO_NET_HDR_GSO_TCPV4, 54, 500, 0, 0, 0)
        t.mem.write(BUF, hdr + test_frame(random.Random(1), 1000))
        _raw_tx_chain(t, [(BUF, 1012, 0, 0)])
    _only_fail(observe_local(drive), "driver.tx_header", "device dropped a transmit frame")


def test_vhost_user_words_are_not_judged_for_dependencies() -> None:
    """Over vhost-user the back end sees the front end's word (QEMU keeps CTRL_VQ, passes
    GUEST_ANNOUNCE): no false failure for Linux; a bit never offered still fails."""
    from virtwire.conform.drivers import analyze

    def ev(cat: str, e: str, feats: int) -> dict[str, Any]:
        return {"cat": cat, "ev": e, "features": hex(feats)}
    offer = s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_GUEST_ANNOUNCE, s.VIRTIO_NET_F_MAC)
    ack = s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_GUEST_ANNOUNCE)
    events = [{"cat": "vhost", "ev": "msg"}, ev("feature", "offer", offer),
              ev("feature", "ack", ack)]
    assert _statuses(analyze(events, "x", "y"))["driver.features"] == "pass"
    assert _statuses(analyze(events[1:], "x", "y"))["driver.features"] == "fail"
    events.append(ev("feature", "ack", ack | s.bit(s.VIRTIO_NET_F_MQ)))
    assert _statuses(analyze(events, "x", "y"))["driver.features"] == "fail"


def _pci_events(reread: bool, late_enable: bool) -> list[dict[str, Any]]:
    def st(old: int, new: int) -> dict[str, Any]:
        return {"cat": "status", "ev": "set", "old": old, "new": new}

    def reg(ev: str, name: str) -> dict[str, Any]:
        return {"cat": "pci", "ev": ev, "reg": name}
    feats = hex(s.bit(s.VIRTIO_F_VERSION_1))
    ev = [st(0, 0), st(0, ACK), st(ACK, ACK | DRV),
          {"cat": "feature", "ev": "ack", "features": feats},
          st(ACK | DRV, ACK | DRV | FOK), reg("bar_write", "common_cfg.device_status")]
    if reread:
        ev.append(reg("bar_read", "common_cfg.device_status"))
    ev += [{"cat": "feature", "ev": "negotiated", "features": feats},
           reg("bar_write", "common_cfg.queue_enable"),
           st(ACK | DRV | FOK, ACK | DRV | FOK | DOK)]
    if late_enable:
        ev.append(reg("bar_write", "common_cfg.queue_enable"))
    return ev


def test_pci_features_ok_reread_and_late_queue_enable() -> None:
    from virtwire.conform.drivers import analyze

    def init(ev: list[dict[str, Any]]) -> dict[str, Any]:
        return next(c for c in analyze(ev, "x", "y")["checks"] if c["id"] == "driver.init_order")
    ok = init(_pci_events(True, False))
    assert ok["status"] == "pass" and "re-read" in ok["detail"]
    c = init(_pci_events(False, False))
    assert c["status"] == "fail" and "without re-reading device status" in c["detail"]
    c = init(_pci_events(True, True))
    assert c["status"] == "fail" and "queue_enable written after DRIVER_OK" in c["detail"]


def test_ctrl_command_for_a_feature_not_negotiated() -> None:
    def drive(t: LocalTarget) -> None:
        drv = t.driver(NetDriverConfig(features=s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MAC,
                                                      s.VIRTIO_NET_F_CTRL_VQ)))
        assert not drv.has(s.VIRTIO_NET_F_CTRL_RX)
        drv.ctrl(s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01")
    rep = observe_local(drive)
    c = next(c for c in rep["checks"] if c["id"] == "driver.ctrl")
    assert c["status"] == "warn" and "RX.PROMISC" in c["detail"], c
