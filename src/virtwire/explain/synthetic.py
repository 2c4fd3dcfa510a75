"""Synthetic traces that follow the schema exactly: a guest driving a virtio-net device and pinging.

They are written through the real ``Tracer`` (with a fake clock), so every event has the shape a
host writes. Used by the tests of ``explain`` and by ``virtwire explain --example``; the sequence
follows what Linux 6.1's virtio_pci + virtio_net do (virtio 1.2 §3.1.1 Driver Requirements: Device
Initialization) and, for vhost-user, QEMU 7.2's message order.
"""

from __future__ import annotations

import io
from typing import IO

from virtwire.net import frame as fr
from virtwire.trace import Tracer, hexmask
from virtwire.virtio import spec

__all__ = ["pci_proxy_session", "vhost_user_session", "write_example"]

GUEST_MAC = "52:54:00:12:34:56"
PEER_MAC = "52:54:00:ab:cd:ef"
GUEST_IP = "10.0.2.15"
PEER_IP = "10.0.2.2"

OFFERED = spec.bit(spec.VIRTIO_F_VERSION_1, spec.VIRTIO_NET_F_MAC, spec.VIRTIO_NET_F_STATUS,
                   spec.VIRTIO_NET_F_MRG_RXBUF, spec.VIRTIO_F_EVENT_IDX,
                   spec.VIRTIO_F_INDIRECT_DESC, spec.VIRTIO_NET_F_CTRL_VQ,
                   spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_F_RING_PACKED)
ACCEPTED = OFFERED & ~spec.bit(spec.VIRTIO_NET_F_CSUM, spec.VIRTIO_F_RING_PACKED)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, dt: float = 0.0001) -> None:
        self.now += dt


def _status(tr: Tracer, clk: _Clock, old: int, new: int) -> int:
    clk.tick()
    tr.emit("status", "set", old=old, new=new,
            old_names=[n for b, n in spec.STATUS_NAMES.items() if old & b],
            new_names=[n for b, n in spec.STATUS_NAMES.items() if new & b])
    return new


def _frame(tr: Tracer, clk: _Clock, direction: str, q: int, data: bytes) -> None:
    clk.tick(0.00002)
    d = fr.decode(data)
    tr.emit("frame", "frame", dir=direction, len=len(data), q=q, summary=d["summary"], proto=d)


def _tx(tr: Tracer, clk: _Clock, data: bytes, head: int, irq: dict) -> None:
    clk.tick()
    tr.emit("kick", "kick", q=1)
    tr.emit("chain", "chain", q=1, head=head,
            descs=[[0x7E00000 + head * 0x1000, 12 + len(data), 0]], rlen=12 + len(data), wlen=0,
            indirect=False)
    _frame(tr, clk, "tx", 1, data)
    tr.emit("used", "used", q=1, id=head, len=0)
    tr.emit("used", "publish", q=1, n=1)
    if head % 2:
        tr.emit("irq", "suppressed", q=1)
    else:
        tr.emit("irq", "irq", q=1, **irq)


def _rx(tr: Tracer, clk: _Clock, data: bytes, head: int, irq: dict) -> None:
    clk.tick(0.0003)
    _frame(tr, clk, "rx", 0, data)
    tr.emit("chain", "chain", q=0, head=head, descs=[[0x7F00000 + head * 0x1000, 1526, 2]],
            rlen=0, wlen=1526, indirect=False)
    tr.emit("used", "used", q=0, id=head, len=12 + len(data))
    tr.emit("used", "publish", q=0, n=1)
    tr.emit("irq", "irq", q=0, **irq)


def _traffic(tr: Tracer, clk: _Clock, pings: int, irq: dict) -> None:
    _tx(tr, clk, fr.arp(1, GUEST_MAC, GUEST_IP, "00:00:00:00:00:00", PEER_IP), 0, irq)
    _rx(tr, clk, fr.arp(2, PEER_MAC, PEER_IP, GUEST_MAC, GUEST_IP), 0, irq)
    for seq in range(1, pings + 1):
        clk.tick(0.01)
        _tx(tr, clk, fr.icmp_echo(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, 0x4242, seq),
            seq % 256, irq)
        _rx(tr, clk, fr.icmp_echo(PEER_MAC, GUEST_MAC, PEER_IP, GUEST_IP, 0x4242, seq,
                                  reply=True), seq % 256, irq)


def _queues(tr: Tracer, clk: _Clock, n: int = 3, size: int = 256) -> None:
    for q in range(n):
        base = 0x7000000 + q * 0x10000
        clk.tick()
        tr.emit("queue", "setup", q=q, size=size, desc=base, avail=base + 16 * size,
                used=base + 0x2000, packed=False)
        tr.emit("queue", "enable", q=q, enabled=True)


def pci_proxy_session(out: IO[str], pings: int = 4) -> None:
    """A guest probing our PCI proxy device, negotiating, setting up 3 queues and pinging."""
    clk = _Clock()
    tr = Tracer(out, clock=clk, close_out=False)
    tr.emit("host", "start", kind="pci-proxy", device="virtio-net")
    for off, reg, val in ((0x00, "vendor_id", 0x1AF4), (0x02, "device_id", 0x1041),
                          (0x08, "class", 0x020000), (0x34, "cap_ptr", 0x40)):
        clk.tick()
        tr.emit("pci", "cfg_read", off=off, size=2 if off < 4 else 4, val=val, reg=reg)
    for i, (name, ctype) in enumerate((("common_cfg", 1), ("notify_cfg", 2), ("isr_cfg", 3),
                                       ("device_cfg", 4), ("pci_cfg", 5))):
        at = 0x40 + 0x14 * i
        clk.tick()
        tr.emit("pci", "cfg_read", off=at + 3, size=1, val=ctype, reg=f"cap.{name}.cfg_type")
        tr.emit("pci", "cfg_read", off=at + 4, size=1, val=4, reg=f"cap.{name}.bar")
    clk.tick()
    tr.emit("pci", "cfg_write", off=0x20, size=4, val=0xFFFFFFFF, reg="bar4")
    tr.emit("pci", "bar_size", bar=4, size=0x4000, kind="mem32")
    tr.emit("pci", "cfg_read", off=0x20, size=4, val=0xFFFFC000, reg="bar4")
    tr.emit("pci", "cfg_write", off=0x20, size=4, val=0xFEBF0000, reg="bar4")
    tr.emit("pci", "bar_map", bar=4, addr=0xFEBF0000, size=0x4000, kind="mem32")
    tr.emit("pci", "cfg_write", off=0x04, size=2, val=0x0007, reg="command")
    st = _status(tr, clk, 0, 0)
    st = _status(tr, clk, st, spec.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    st = _status(tr, clk, st, st | spec.VIRTIO_CONFIG_S_DRIVER)
    tr.emit("pci", "bar_read", bar=4, off=4, size=4, val=OFFERED & 0xFFFFFFFF,
            reg="common_cfg.device_feature")
    tr.emit("feature", "offer", features=hexmask(OFFERED), names=spec.feature_names(OFFERED))
    tr.emit("pci", "bar_write", bar=4, off=12, size=4, val=ACCEPTED & 0xFFFFFFFF,
            reg="common_cfg.driver_feature")
    tr.emit("feature", "ack", sel=0, features=hexmask(ACCEPTED & 0xFFFFFFFF),
            names=spec.feature_names(ACCEPTED & 0xFFFFFFFF))
    tr.emit("feature", "ack", sel=1, features=hexmask(ACCEPTED >> 32 << 32),
            names=spec.feature_names(ACCEPTED >> 32 << 32))
    st = _status(tr, clk, st, st | spec.VIRTIO_CONFIG_S_FEATURES_OK)
    tr.emit("feature", "negotiated", features=hexmask(ACCEPTED),
            names=spec.feature_names(ACCEPTED))
    tr.emit("pci", "bar_read", bar=4, off=0x3000, size=4, val=0x12005452,
            reg="device_cfg.mac")
    for q in range(3):
        tr.emit("pci", "bar_write", bar=4, off=22, size=2, val=q, reg="common_cfg.queue_select")
        tr.emit("pci", "bar_write", bar=4, off=32, size=4, val=0x7000000 + q * 0x10000,
                reg="common_cfg.queue_desc")
    _queues(tr, clk)
    st = _status(tr, clk, st, st | spec.VIRTIO_CONFIG_S_DRIVER_OK)
    tr.emit("kick", "kick", q=0)
    irq = {"kind": "intx", "level": 1}
    tr.emit("config", "change", field="status", val=spec.VIRTIO_NET_S_LINK_UP)
    tr.emit("irq", "irq", q=-1, kind="intx", level=1)
    tr.emit("ctrl", "cmd", **{"class": 0, "cmd": 0}, class_name="RX", cmd_name="PROMISC",
            ack=0)
    _traffic(tr, clk, pings, irq)
    tr.emit("host", "stop", kind="pci-proxy")
    tr.close()


def vhost_user_session(out: IO[str], pings: int = 4) -> None:
    """QEMU's vhost-user handshake, then the guest driver loading, then ping (QEMU 7.2's order)."""
    clk = _Clock()
    tr = Tracer(out, clock=clk, close_out=False)
    tr.emit("host", "start", kind="vhost-user", socket="/tmp/vwt.sock")
    offered = OFFERED | spec.bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)

    def msg(req: str, code: int, payload: object = None, reply: object = None, fds: int = 0):
        clk.tick()
        tr.emit("vhost", "msg", req=f"VHOST_USER_{req}", code=code, size=8, fds=fds,
                payload=payload if payload is not None else {})
        if reply is not None:
            tr.emit("vhost", "reply", req=f"VHOST_USER_{req}", code=code, payload=reply)

    fpl = {"features": hexmask(offered), "names": spec.feature_names(offered)}
    ppl = {"features": "0x8009", "names": ["MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS"]}
    msg("GET_FEATURES", 1, reply=fpl)
    tr.emit("feature", "offer", **fpl)
    msg("GET_PROTOCOL_FEATURES", 15, reply=ppl)
    msg("SET_PROTOCOL_FEATURES", 16, ppl)
    msg("GET_QUEUE_NUM", 17, reply={"value": 2})
    msg("SET_OWNER", 3)
    msg("GET_FEATURES", 1, reply=fpl)
    for q in range(2):
        msg("SET_VRING_CALL", 13, {"index": q}, fds=1)
        msg("SET_VRING_ERR", 14, {"index": q}, fds=1)
    msg("SET_VRING_ENABLE", 18, {"index": 0, "num": 0})
    acc = (ACCEPTED & ~spec.bit(spec.VIRTIO_NET_F_CTRL_VQ)) | spec.bit(
        spec.VHOST_USER_F_PROTOCOL_FEATURES)
    msg("SET_FEATURES", 2, {"features": hexmask(acc), "names": spec.feature_names(acc)})
    tr.emit("feature", "negotiated", features=hexmask(acc), names=spec.feature_names(acc))
    msg("SET_MEM_TABLE", 5, {"regions": [{"guest_phys_addr": 0, "memory_size": 0x10000000,
                                          "userspace_addr": 0x7F0000000000, "mmap_offset": 0}]},
        reply={"ack": 0}, fds=1)
    for q in range(2):
        msg("SET_VRING_NUM", 8, {"index": q, "num": 256})
        msg("SET_VRING_BASE", 10, {"index": q, "num": 0})
        msg("SET_VRING_ADDR", 9, {"index": q, "desc": 0x7F0007000000 + q * 0x10000})
        msg("SET_VRING_KICK", 12, {"index": q}, fds=1)
        msg("SET_VRING_CALL", 13, {"index": q}, fds=1)
    _queues(tr, clk, n=2)
    msg("SET_VRING_ENABLE", 18, {"index": 0, "num": 1})
    tr.emit("kick", "kick", q=0)
    _traffic(tr, clk, pings, {"kind": "call"})
    tr.emit("host", "stop", kind="vhost-user")
    tr.close()


def write_example(path: str, kind: str = "pci-proxy", pings: int = 4) -> None:
    buf = io.StringIO()
    (pci_proxy_session if kind == "pci-proxy" else vhost_user_session)(buf, pings)
    with open(path, "w") as f:
        f.write(buf.getvalue())
