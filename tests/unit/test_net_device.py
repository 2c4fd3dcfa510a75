"""virtio-net device model against the virtio-net driver model, in one process (no QEMU).

The driver (``net.driver.VirtioNetDriver``) runs the full §3.1.1 bring-up against ``VirtioNet``
over a tiny in-process transport; frames go through real split/packed rings in a
``BytearrayGuestMemory`` and an in-memory backend records/injects them.
"""

from __future__ import annotations

import struct

import pytest

from virtwire.backends.memory import MemoryBackend
from virtwire.memory import BytearrayGuestMemory
from virtwire.net.device import VirtioNet
from virtwire.net.driver import DmaAllocator, NetDriverConfig, VirtioNetDriver
from virtwire.net.frame import inet_checksum
from virtwire.net.header import VirtioNetHdr
from virtwire.net.options import parse_options
from virtwire.virtio import spec as s
from virtwire.virtio.pair import LocalNetTransport, RecordingInterrupt


class NetPair:
    """A ``VirtioNet`` with a ``MemoryBackend`` per pair, brought up by ``VirtioNetDriver``."""

    def __init__(self, *, options: str | None = None, vnet_hdr: bool = False,
                 offloads: bool = False, packed: bool = False, features: int | None = None,
                 pairs: int = 1, mrg_buf_len: int = 2048, rx_layout: str | None = None,
                 backends: list | None = None, mem_size: int = 32 << 20,
                 rx_fill: int | None = None) -> None:
        opts = parse_options(options)
        nq = int(opts.get("queues", 1))
        self.backends = backends or [MemoryBackend(f"m{i}", vnet_hdr=vnet_hdr,
                                                   offloads=offloads) for i in range(nq)]
        self.dev = VirtioNet(self.backends if nq > 1 else self.backends[0], options=options,
                             mac="02:00:00:00:00:01")
        self.mem = BytearrayGuestMemory(mem_size)
        self.irq = RecordingInterrupt()
        self.dev.attach(self.mem, self.irq)
        for i, b in enumerate(self.backends):
            b.on_readable = (lambda i=i: self.dev.backend_ready(i))
        cfg = NetDriverConfig(packed=packed, mrg_buf_len=mrg_buf_len, pairs=pairs,
                              rx_layout=rx_layout, queue_size=256, rx_fill=rx_fill)
        if features is not None:
            cfg.features = features
        self.drv = VirtioNetDriver(LocalNetTransport(self.dev), self.mem,
                                   DmaAllocator(0x10000, mem_size - 0x10000), cfg)
        self.drv.probe()

    @property
    def backend(self) -> MemoryBackend:
        return self.backends[0]


def _frame(n: int, seed: int = 0) -> bytes:
    hdr = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    body = bytes((seed + i * 7) & 0xFF for i in range(n - 14))
    return hdr + body


SIZES = [60, 61, 64, 128, 1000, 1514, 1515, 2047, 2048, 2049, 4096, 9000, 32768, 65535]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mrg", [True, False])
def test_tx_rx_sizes_intact(packed: bool, mrg: bool) -> None:
    p = NetPair(options=None if mrg else "mrg_rxbuf=off", packed=packed,
                rx_layout=None if mrg else "big")
    assert p.dev.mrg_rxbuf is mrg
    assert p.dev.has_feature(s.VIRTIO_F_RING_PACKED) is packed
    frames = [_frame(n, n) for n in SIZES]
    for f in frames:
        assert p.drv.send([f]) == 1
    assert p.backend.frames() == frames
    p.backend.inject_many(frames)
    got = p.drv.poll_receive(len(frames), timeout=2.0)
    assert [g.data for g in got] == frames
    if mrg:
        # A 65535-byte frame spans several 2048-byte buffers (§5.1.6.4 num_buffers).
        assert got[-1].num_buffers == -(-(65535 + 12) // 2048)
    c = p.dev.counters
    assert c[0]["frames"] == len(frames) and c[1]["frames"] == len(frames)
    assert c[0]["drops"] == 0 and c[1]["drops"] == 0


# --- checksum and segmentation offload semantics (§5.1.6.2) -------------------------------------
def _udp_partial(payload: bytes) -> tuple[bytes, int, int, bytes]:
    """An Ethernet/IPv4/UDP frame with a *partial* checksum (pseudo-header sum seeded), as a
    guest with NEEDS_CSUM sends it; returns (frame, csum_start, csum_offset, full_frame)."""
    import ipaddress

    src, dst = ipaddress.IPv4Address("10.0.0.1").packed, ipaddress.IPv4Address("10.0.0.2").packed
    ulen = 8 + len(payload)
    ip = bytearray(20)
    ip[0] = 0x45
    ip[2:4] = (20 + ulen).to_bytes(2, "big")
    ip[8], ip[9] = 64, 17
    ip[12:16], ip[16:20] = src, dst
    ip[10:12] = inet_checksum(bytes(ip)).to_bytes(2, "big")
    pseudo = src + dst + b"\x00\x11" + ulen.to_bytes(2, "big")
    udp = bytearray(struct.pack(">HHHH", 1234, 5678, ulen, 0) + payload)
    full_sum = inet_checksum(pseudo + bytes(udp))
    full_udp = bytearray(udp)
    full_udp[6:8] = (full_sum or 0xFFFF).to_bytes(2, "big")
    # partial: the checksum field holds the folded pseudo-header sum (not complemented)
    ps = (~inet_checksum(pseudo)) & 0xFFFF
    udp[6:8] = ps.to_bytes(2, "big")
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
    return eth + bytes(ip) + bytes(udp), 14 + 20, 6, eth + bytes(ip) + bytes(full_udp)


def test_needs_csum_finished_in_software_for_plain_backend() -> None:
    p = NetPair()
    frame, cs, co, full = _udp_partial(b"hello virtio" * 20)
    assert p.drv.send([frame], flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=cs,
                      csum_offset=co) == 1
    assert p.backend.frames() == [full]
    assert p.dev.counters[1]["tx_sw_csum"] == 1


def test_offload_backend_gets_header_untouched() -> None:
    p = NetPair(vnet_hdr=True, offloads=True)
    assert p.dev.has_feature(s.VIRTIO_NET_F_HOST_TSO4)
    frame, cs, co, _full = _udp_partial(b"x" * 3000)
    p.drv.send([frame], flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4,
               gso_size=1448, hdr_len=54, csum_start=cs, csum_offset=co)
    (h,) = p.backend.headers()
    assert (h.flags, h.gso_type, h.gso_size, h.csum_start, h.csum_offset) == (
        s.VIRTIO_NET_HDR_F_NEEDS_CSUM, s.VIRTIO_NET_HDR_GSO_TCPV4, 1448, cs, co)
    assert p.backend.frames() == [frame]
    assert "tx_sw_csum" not in p.dev.counters[1]


def test_host_tso_not_offered_without_backend_support() -> None:
    p = NetPair()
    assert not p.dev.offered_features >> s.VIRTIO_NET_F_HOST_TSO4 & 1
    assert p.dev.offered_features >> s.VIRTIO_NET_F_CSUM & 1


def test_rx_header_from_backend_keeps_offload_flags_only_when_negotiated() -> None:
    p = NetPair(vnet_hdr=True, offloads=True)
    f = _frame(200)
    p.backend.inject(f, VirtioNetHdr(flags=s.VIRTIO_NET_HDR_F_DATA_VALID))
    (g,) = p.drv.poll_receive(1, timeout=1.0)
    assert g.flags == s.VIRTIO_NET_HDR_F_DATA_VALID and g.data == f
    q = NetPair(vnet_hdr=True, offloads=True, options="guest_csum=off")
    assert not q.dev.has_feature(s.VIRTIO_NET_F_GUEST_CSUM)
    assert not q.dev.has_feature(s.VIRTIO_NET_F_GUEST_TSO4)  # lost its requirement
    q.backend.inject(f, VirtioNetHdr(flags=s.VIRTIO_NET_HDR_F_DATA_VALID))
    (g,) = q.drv.poll_receive(1, timeout=1.0)
    assert g.flags == 0 and g.data == f


# --- hostile TX headers and chains --------------------------------------------------------------
def _raw_tx(p: NetPair, hdr: bytes, frame: bytes) -> None:
    """Put one TX buffer with an arbitrary header on the ring (bypassing the driver's checks)."""
    tq = p.drv.txqs[0]
    g = p.drv.alloc.alloc(len(hdr) + len(frame) + 1, 64)
    p.mem.write(g, hdr + frame)
    tq.q.add(p.mem, [(g, len(hdr) + len(frame))], (), (g,))
    tq.posted += 1
    tq.q.publish(p.mem)
    p.dev.notify(1)


@pytest.mark.parametrize(
    "hdr,reason",
    [
        (VirtioNetHdr(flags=1, csum_start=5000, csum_offset=6), "bad_csum_offset"),
        (VirtioNetHdr(flags=1, csum_start=40, csum_offset=0xFFFF), "bad_csum_offset"),
        (VirtioNetHdr(gso_type=9, flags=1, gso_size=100), "bad_gso_type"),
        (VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, flags=1, gso_size=100),
         "gso_not_negotiated"),
        (VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_UDP, flags=1, gso_size=100),
         "gso_not_negotiated"),
    ],
)
def test_hostile_tx_header_dropped_and_counted(hdr: VirtioNetHdr, reason: str) -> None:
    p = NetPair()
    _raw_tx(p, hdr.pack(12), _frame(100))
    _raw_tx(p, VirtioNetHdr().pack(12), _frame(100, 1))  # the next good frame still goes
    c = p.dev.counters[1]
    assert c["tx_drop_" + reason] == 1 and c["drops"] == 1
    assert p.backend.frames() == [_frame(100, 1)]
    assert p.dev.active  # a bad frame is not a reason to reset the device
    p.drv.reap_tx()
    assert p.drv.txqs[0].posted == 0  # both chains were returned


def test_gso_with_offloads_but_no_csum_flag_dropped() -> None:
    p = NetPair(vnet_hdr=True, offloads=True)
    _raw_tx(p, VirtioNetHdr(gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1000).pack(12),
            _frame(3000))
    _raw_tx(p, VirtioNetHdr(flags=1, gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, csum_start=34,
                            csum_offset=16, gso_size=0).pack(12), _frame(3000))
    c = p.dev.counters[1]
    assert c["tx_drop_gso_without_csum"] == 1 and c["tx_drop_bad_gso_size"] == 1
    assert p.backend.sent == []


def test_runt_and_short_header_dropped() -> None:
    p = NetPair()
    _raw_tx(p, b"\0" * 5, b"")
    _raw_tx(p, VirtioNetHdr().pack(12), b"\1" * 10)
    c = p.dev.counters[1]
    assert c["tx_drop_short_header"] == 1 and c["tx_drop_runt"] == 1
    assert p.backend.sent == []


def test_rx_chain_too_small_for_header_returned_unused() -> None:
    p = NetPair(rx_layout="small", options="mrg_rxbuf=off", rx_fill=0)
    rq = p.drv.rxqs[0]
    # One 4-byte writable chain: cannot even hold the header.
    g = p.drv.alloc.alloc(64, 64)
    p.backend.inject(_frame(100))
    rq.q.add(p.mem, (), [(g, 4)], "tiny")
    rq.q.publish(p.mem)
    p.dev.notify(0)
    assert p.dev.counters[0]["rx_bad_chain"] == 1
    assert rq.q.get_used(p.mem) == ("tiny", 0)
    assert len(p.backend.rx) == 1  # the frame waits for a usable buffer
    assert p.dev.active


# --- no loss without receive buffers; back-pressure ---------------------------------------------
def test_rx_waits_for_buffers_without_losing_frames() -> None:
    p = NetPair()
    # Take every posted buffer away by filling them, then stop refilling.
    p.drv.cfg.rx_fill = 0
    frames = [_frame(1000, i) for i in range(300)]
    p.backend.inject_many(frames)
    got = p.drv.receive()  # whatever fit in the 256 posted buffers
    assert 0 < len(got) < 300
    assert p.dev.counters[0]["rx_wait_buffers"] >= 1
    assert len(p.backend.rx) == 300 - len(got)  # the rest is still in the backend
    p.drv.cfg.rx_fill = None
    p.drv.refill(p.drv.rxqs[0])  # the RX kick re-arms the device
    got += p.drv.poll_receive(300 - len(got), timeout=2.0)
    assert [g.data for g in got] == frames
    assert p.dev.counters[0]["drops"] == 0


def test_tx_backpressure_keeps_frames_in_order() -> None:
    p = NetPair()
    p.backend.stall = True
    frames = [_frame(100 + i) for i in range(20)]
    assert p.drv.send(frames) == 20
    assert p.backend.sent == []
    assert p.dev.counters[1]["tx_backpressure"] >= 1
    p.backend.tx_limit = 3
    p.backend.unstall()  # wakes the device: pending frames go first, 3 per send call
    assert p.backend.frames() == frames
    p.drv.reap_tx()
    assert p.drv.txqs[0].posted == 0


def test_backend_drop_hook_and_reorder() -> None:
    p = NetPair(backends=[MemoryBackend("m", drop=lambda f: f[14] == 0xEE, reorder=True)])
    p.drv.send([_frame(100), b"\x02" * 12 + b"\x08\x00" + b"\xee" * 50])
    assert len(p.backend.sent) == 1 and p.backend.counters["drops"] == 1
    p.backend.inject_many([_frame(80, 1), _frame(81, 2)])
    got = p.drv.poll_receive(2, timeout=1.0)
    assert [g.data for g in got] == [_frame(81, 2), _frame(80, 1)]


def test_stop_rewinds_stashed_rx_chains() -> None:
    """A backend that cannot tell frame lengths (like TAP) makes the device stash chains for a
    64 KiB frame; stopping the ring (GET_VRING_BASE) must hand the unused ones back."""

    class Blind(MemoryBackend):
        def pending_len(self) -> int | None:
            return None if self.rx else 0

    b = Blind("blind")
    p = NetPair(backends=[b])
    b.inject(_frame(100))
    (g,) = p.drv.poll_receive(1, timeout=1.0)
    assert g.data == _frame(100)
    q = p.dev.queues[0]
    assert len(p.dev.pairs[0].stash) > 1  # prepared for the largest frame
    p.dev.queue_stopped(0)
    assert q.get_base() == q.next_used  # nothing popped but unused remains
    assert not p.dev.pairs[0].stash


# --- control queue (§5.1.6.5) -------------------------------------------------------------------
OK, ERR = s.VIRTIO_NET_OK, s.VIRTIO_NET_ERR
OTHER = b"\x02\x00\x00\x00\x00\x99"


def _to(dst: bytes, n: int = 100) -> bytes:
    return dst + b"\x02\x00\x00\x00\x00\x02\x08\x00" + b"\x55" * (n - 14)


def test_ctrl_rx_mode_and_mac_filter() -> None:
    p = NetPair()
    d = p.drv
    own = p.dev.mac
    # Promiscuous by default: anything is delivered.
    p.backend.inject(_to(OTHER))
    assert len(d.poll_receive(1, timeout=1.0)) == 1
    assert d.set_promisc(False) == OK
    assert d.set_mac_table([], [b"\x01\x00\x5e\x00\x00\x01"]) == OK
    frames = [_to(OTHER), _to(own), _to(b"\xff" * 6), _to(b"\x01\x00\x5e\x00\x00\x01"),
              _to(b"\x01\x00\x5e\x00\x00\x02")]
    p.backend.inject_many(frames)
    got = [g.data for g in d.poll_receive(3, timeout=1.0)]
    assert got == [frames[1], frames[2], frames[3]]
    assert p.dev.counters[0]["rx_filtered"] == 2
    assert d.set_allmulti(True) == OK
    p.backend.inject(frames[4])
    assert [g.data for g in d.poll_receive(1, timeout=1.0)] == [frames[4]]
    assert d.set_mac_table([OTHER], []) == OK
    p.backend.inject(frames[0])
    assert [g.data for g in d.poll_receive(1, timeout=1.0)] == [frames[0]]


def test_ctrl_mac_addr_set_updates_config() -> None:
    p = NetPair()
    new = b"\x02\x11\x22\x33\x44\x55"
    assert p.drv.set_mac(new) == OK
    assert bytes(p.dev.config[0:6]) == new and p.dev.mac == new
    assert p.drv.ctrl(s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_ADDR_SET, b"\1\2\3") == ERR


def test_ctrl_vlan_filter() -> None:
    p = NetPair()
    assert p.drv.vlan(5) == OK
    assert p.drv.vlan(4096) == ERR
    tagged = lambda vid: (p.dev.mac + b"\x02" * 6 + b"\x81\x00" + vid.to_bytes(2, "big")  # noqa: E731
                          + b"\x08\x00" + b"\0" * 60)
    p.backend.inject_many([tagged(7), tagged(5)])
    assert [g.data for g in p.drv.poll_receive(1, timeout=1.0)] == [tagged(5)]
    assert p.drv.vlan(5, add=False) == OK
    assert p.dev.vlans == set()


@pytest.mark.parametrize(
    "cls,cmd,data",
    [
        (99, 0, b""),  # unknown class
        (s.VIRTIO_NET_CTRL_RX, 77, b"\1"),  # unknown command
        (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_PROMISC, b""),  # missing data
        (s.VIRTIO_NET_CTRL_RX, s.VIRTIO_NET_CTRL_RX_PROMISC, b"\1\1"),  # extra data
        (s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_TABLE_SET, b"\xff\xff\xff\xff"),
        (s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 1) + b"\1"),
        (s.VIRTIO_NET_CTRL_MAC, s.VIRTIO_NET_CTRL_MAC_TABLE_SET,
         struct.pack("<I", 0) + struct.pack("<I", 0) + b"junk"),
        (s.VIRTIO_NET_CTRL_MQ, s.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 2)),  # no MQ
        (s.VIRTIO_NET_CTRL_GUEST_OFFLOADS, s.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
         struct.pack("<Q", 1 << 40)),
    ],
)
def test_bad_ctrl_commands_answer_err(cls: int, cmd: int, data: bytes) -> None:
    p = NetPair()
    assert p.drv.ctrl(cls, cmd, data) == ERR
    assert p.dev.active and p.dev.ctrl_counters["err"] == 1
    assert p.drv.set_promisc(True) == OK  # still serving


def test_ctrl_guest_offloads_reconfigures_backend() -> None:
    from virtwire.net.driver import DEFAULT_NET_FEATURES

    p = NetPair(vnet_hdr=True, offloads=True,
                features=DEFAULT_NET_FEATURES | 1 << s.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
    assert p.backend.features >> s.VIRTIO_NET_F_GUEST_TSO4 & 1
    only_csum = struct.pack("<Q", 1 << s.VIRTIO_NET_F_GUEST_CSUM)
    assert p.drv.ctrl(s.VIRTIO_NET_CTRL_GUEST_OFFLOADS, s.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                      only_csum) == OK
    assert not p.backend.features >> s.VIRTIO_NET_F_GUEST_TSO4 & 1
    assert p.backend.features >> s.VIRTIO_NET_F_GUEST_CSUM & 1


def test_announce_and_link_status() -> None:
    p = NetPair()
    cfg_irqs = p.irq.config_count
    gen = p.dev.config_generation
    p.dev.set_link(False)
    assert not p.drv.link_up
    assert p.irq.config_count == cfg_irqs + 1 and p.dev.config_generation == gen + 1
    p.dev.set_link(True)
    assert p.drv.link_up
    assert p.dev.announce()
    st = int.from_bytes(p.dev.config[6:8], "little")
    assert st & s.VIRTIO_NET_S_ANNOUNCE
    assert p.drv.announce_ack() == OK
    st = int.from_bytes(p.dev.config[6:8], "little")
    assert st == s.VIRTIO_NET_S_LINK_UP


def test_bad_ctrl_chain_is_not_a_crash() -> None:
    p = NetPair()
    cq = p.drv.ctrlq
    g = p.drv.alloc.alloc(64, 64)
    cq.q.add(p.mem, [(g, 2)], (), "noack")  # no writable ack byte
    cq.q.publish(p.mem)
    p.dev.notify(cq.index)
    assert cq.q.get_used(p.mem) == ("noack", 0)
    assert p.dev.ctrl_counters["bad_chains"] == 1 and p.dev.active


# --- multiqueue (§5.1.6.5.5) --------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_mq_two_pairs(packed: bool) -> None:
    p = NetPair(options="queues=2", pairs=2, packed=packed)
    assert p.dev.has_feature(s.VIRTIO_NET_F_MQ)
    assert p.dev.curr_pairs == 2
    assert p.dev.ctrl_index() == 4 and p.drv.ctrlq.index == 4
    a, b = _frame(300, 1), _frame(400, 2)
    p.drv.send([a], queue=0)
    p.drv.send([b], queue=1)
    assert p.backends[0].frames() == [a] and p.backends[1].frames() == [b]
    p.backends[1].inject(b)
    p.backends[0].inject(a)
    assert [g.data for g in p.drv.poll_receive(1, timeout=1.0, queue=1)] == [b]
    assert [g.data for g in p.drv.poll_receive(1, timeout=1.0, queue=0)] == [a]
    assert p.dev.counters[2]["frames"] == 1 and p.dev.counters[3]["frames"] == 1
    assert p.drv.set_queue_pairs(3) == ERR
    assert p.drv.set_queue_pairs(0) == ERR
    assert p.drv.set_queue_pairs(1) == OK
    assert not p.dev.pairs[1].enabled


def test_mq_device_driver_without_mq_uses_queue_2_for_ctrl() -> None:
    p = NetPair(options="queues=2", features=~(1 << s.VIRTIO_NET_F_MQ))
    assert not p.dev.has_feature(s.VIRTIO_NET_F_MQ)
    assert p.dev.ctrl_index() == 2 and p.dev.queue_role(2) == ("ctrl", -1)
    assert p.drv.set_promisc(False) == OK
    p.drv.send([_frame(100)])
    assert p.backends[0].frames() == [_frame(100)]


# --- features, options, config ------------------------------------------------------------------
def test_options_switch_features_off() -> None:
    d = VirtioNet(MemoryBackend(offloads=True), options="mrg_rxbuf=off,csum=off,packed=off,"
                  "ctrl_vq=off,event_idx=off", mac="02:00:00:00:00:01")
    f = d.offered_features
    for b in (s.VIRTIO_NET_F_MRG_RXBUF, s.VIRTIO_NET_F_CSUM, s.VIRTIO_NET_F_HOST_TSO4,
              s.VIRTIO_F_RING_PACKED, s.VIRTIO_NET_F_CTRL_VQ, s.VIRTIO_NET_F_CTRL_RX,
              s.VIRTIO_NET_F_MQ, s.VIRTIO_F_EVENT_IDX):
        assert not f >> b & 1, s.FEATURE_NAMES[b]
    assert f >> s.VIRTIO_NET_F_GUEST_CSUM & 1 and f >> s.VIRTIO_F_VERSION_1 & 1
    assert d.num_queues == 2
    with pytest.raises(ValueError, match="unknown virtio-net option"):
        VirtioNet(options="bogus=on")
    with pytest.raises(ValueError, match="on/off"):
        VirtioNet(options="mrg_rxbuf=maybe")


def test_config_layout() -> None:
    d = VirtioNet([MemoryBackend(), MemoryBackend(), MemoryBackend()], options="queues=3",
                  mac="02:aa:bb:cc:dd:ee", mtu=9000)
    assert d.num_queues == 7
    assert bytes(d.config[0:6]) == bytes.fromhex("02aabbccddee")
    assert d.config_read(s.VIRTIO_NET_CONFIG_STATUS, 2) == s.VIRTIO_NET_S_LINK_UP
    assert d.config_read(s.VIRTIO_NET_CONFIG_MAX_VQ_PAIRS, 2) == 3
    assert d.config_read(s.VIRTIO_NET_CONFIG_MTU, 2) == 9000
    assert d.offered_features >> s.VIRTIO_NET_F_MTU & 1


def test_feature_dependencies_refused_at_features_ok() -> None:
    d = VirtioNet(MemoryBackend())
    A, D, F = (s.VIRTIO_CONFIG_S_ACKNOWLEDGE, s.VIRTIO_CONFIG_S_DRIVER,
               s.VIRTIO_CONFIG_S_FEATURES_OK)
    d.write_status(A)
    d.write_status(A | D)
    d.set_driver_features(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_GUEST_TSO4))
    assert not d.write_status(A | D | F)
    assert not d.status & F and "GUEST_TSO4 requires GUEST_CSUM" in d.last_error


def test_stats_are_json() -> None:
    import json

    p = NetPair()
    p.drv.send([_frame(100)])
    st = json.loads(json.dumps(p.dev.stats()))
    assert st["queues"][1]["name"] == "tx0" and st["queues"][1]["frames"] == 1
    assert st["queues"][2]["name"] == "ctrl"
    assert st["backends"][0]["tx_frames"] == 1


def test_start_direct_without_transport() -> None:
    """The status walk an in-process host uses (vhost-user's VirtioDeviceHost does the same)."""
    from virtwire.virtio.split_ring import SplitDriverQueue

    b = MemoryBackend()
    d = VirtioNet(b, options="ctrl_vq=off")
    mem = BytearrayGuestMemory(4 << 20)
    alloc = DmaAllocator(0x10000, (4 << 20) - 0x10000)
    qs = []
    for i in range(2):
        q = SplitDriverQueue.allocate(alloc, 64)
        q.setup(mem)
        d.set_queue_size(i, 64)
        d.set_queue_addresses(i, *q.layout())
        d.set_queue_ready(i)
        qs.append(q)
    d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_MRG_RXBUF), mem)
    assert d.active and d.hdr_len == 12
    g = alloc.alloc(200, 64)
    mem.write(g, bytes(12) + _frame(100))
    qs[1].add(mem, [(g, 112)], (), "t")
    qs[1].publish(mem)
    d.notify(1)
    assert b.frames() == [_frame(100)]
    from virtwire.virtio.errors import FeatureError

    with pytest.raises(FeatureError, match="not offered"):  # memory backend: no TSO offered
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_HOST_TSO4), mem)
    with pytest.raises(FeatureError, match="requires"):
        d.start_direct(s.bit(s.VIRTIO_F_VERSION_1, s.VIRTIO_NET_F_GUEST_TSO4), mem)


# --- two devices on one switch ------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_two_devices_on_a_switch(packed: bool) -> None:
    from virtwire.backends.switch import L2Switch
    from virtwire.net.frame import decode, icmp_echo

    sw = L2Switch("t")
    a = NetPair(backends=[sw.port("a")], packed=packed)
    b = NetPair(backends=[sw.port("b")], packed=packed, options="mrg_rxbuf=off",
                rx_layout="small")
    a.dev.mac, b.dev.mac = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
    ping = icmp_echo("02:00:00:00:00:0a", "ff:ff:ff:ff:ff:ff", "10.0.0.1", "10.0.0.2", 7, 1)
    assert a.drv.send([ping]) == 1
    (got,) = b.drv.poll_receive(1, timeout=1.0)
    assert got.data == ping
    pong = icmp_echo("02:00:00:00:00:0b", "02:00:00:00:00:0a", "10.0.0.2", "10.0.0.1", 7, 1,
                     reply=True)
    assert b.drv.send([pong]) == 1
    (got,) = a.drv.poll_receive(1, timeout=1.0)
    assert decode(got.data)["icmp"]["name"] == "echo reply"
    assert sw.counters["forwarded"] == 1 and sw.counters["flooded"] == 1
    big = [_frame(1514, i)[:6].replace(b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x0b")
           + _frame(1514, i)[6:] for i in range(200)]
    assert a.drv.send_all(big, timeout=2.0) == 200
    assert [g.data for g in b.drv.poll_receive(200, timeout=2.0)] == big


def test_unknown_length_backend_with_few_buffers_holds_frame_no_loss() -> None:
    """TAP-like backend, guest offers fewer buffers than a 64 KiB frame needs: the frame is read
    aside and delivered when enough buffers exist, never truncated or lost."""

    class Blind(MemoryBackend):
        def pending_len(self) -> int | None:
            return None if self.rx else 0

    b = Blind("blind")
    p = NetPair(backends=[b], rx_fill=4)  # 4 x 2048 bytes: below the 64 KiB maximum
    big = _frame(20000, 3)
    b.inject(big)
    assert p.drv.receive() == []
    assert p.dev.pairs[0].held == big and p.dev.counters[0]["rx_held"] == 1
    p.drv.cfg.rx_fill = None
    p.drv.refill(p.drv.rxqs[0])
    (g,) = p.drv.poll_receive(1, timeout=1.0)
    assert g.data == big and g.num_buffers == -(-(20000 + 12) // 2048)
    b.inject(_frame(100, 4))
    (g,) = p.drv.poll_receive(1, timeout=1.0)
    assert g.data == _frame(100, 4)
    assert p.dev.counters[0]["drops"] == 0


@pytest.mark.parametrize("vnet", [False, True])
def test_unknown_length_big_frame_overflows_into_more_buffers(vnet: bool) -> None:
    """TAP-like: a frame bigger than the read window spills into a private area and is then
    copied into further mergeable buffers; small frames stay zero-copy."""

    class Blind(MemoryBackend):
        def pending_len(self) -> int | None:
            return None if self.rx else 0

    b = Blind("blind", vnet_hdr=vnet)
    p = NetPair(backends=[b])
    frames = [_frame(100, 1), _frame(10000, 2), _frame(1514, 3), _frame(65535, 4)]
    b.inject_many(frames)
    got = p.drv.poll_receive(4, timeout=2.0)
    assert [g.data for g in got] == frames
    assert [g.num_buffers for g in got] == [1, 5, 1, 33]
    assert p.dev.counters[0]["rx_overflow"] == 2 and p.dev.counters[0]["drops"] == 0


def test_trace_frames_and_ctrl(tmp_path) -> None:
    import json

    from virtwire import trace
    from virtwire.backends.null import NullBackend
    from virtwire.net.frame import decode

    path = tmp_path / "t.jsonl"
    trace.start(str(path), decode=decode)
    try:
        p = NetPair(backends=[NullBackend()])
        p.drv.send([_frame(100)])
        assert p.drv.set_promisc(False) == OK
        p.dev.set_link(False)
    finally:
        trace.stop()
    ev = [json.loads(line) for line in path.read_text().splitlines()]
    frames = [e for e in ev if e["cat"] == "frame"]
    assert frames and frames[0]["dir"] == "tx" and frames[0]["len"] == 100
    assert "tx_native" not in p.dev.counters[1]  # frames traced: the C path stays off
    ctrl = [e for e in ev if e["cat"] == "ctrl"]
    assert any(e["class_name"] == "RX" and e["cmd_name"] == "PROMISC" and e["ack"] == 0
               for e in ctrl)
    assert any(e["cat"] == "config" and e.get("link") == "down" for e in ev)


def test_tso_across_switch_whole_or_segmented() -> None:
    from virtwire.backends.switch import L2Switch

    sw = L2Switch("t")
    a = NetPair(backends=[sw.port("a")])
    b = NetPair(backends=[sw.port("b")])
    c = NetPair(backends=[sw.port("c")], options="guest_tso4=off,guest_tso6=off,guest_ecn=off")
    assert a.dev.has_feature(s.VIRTIO_NET_F_HOST_TSO4)
    import ipaddress

    payload = bytes(range(200)) * 20
    tcp = struct.pack(">HHIIBBHHH", 1, 2, 100, 7, 5 << 4, 0x18, 1000, 0, 0)
    ip = bytearray(20)
    ip[0], ip[8], ip[9] = 0x45, 64, 6
    ip[2:4] = (40 + len(payload)).to_bytes(2, "big")
    ip[12:16] = ipaddress.IPv4Address("10.0.0.1").packed
    ip[16:20] = ipaddress.IPv4Address("10.0.0.2").packed
    ip[10:12] = inet_checksum(bytes(ip)).to_bytes(2, "big")
    frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x0a\x08\x00" + bytes(ip) + tcp + payload
    assert a.drv.send([frame], flags=s.VIRTIO_NET_HDR_F_NEEDS_CSUM,
                      gso_type=s.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448,
                      csum_start=34, csum_offset=16) == 1
    (gb,) = b.drv.poll_receive(1, timeout=1.0)
    assert gb.gso_type == s.VIRTIO_NET_HDR_GSO_TCPV4 and gb.data == frame
    gc = c.drv.poll_receive(3, timeout=1.0)
    assert [len(g.data) for g in gc] == [54 + 1448, 54 + 1448, 54 + 1104]
    assert b"".join(g.data[54:] for g in gc) == payload
    assert a.dev.counters[1]["tx_gso"] == 1 and b.dev.counters[0]["rx_gso"] == 1


def test_stop_returns_stash_unwritten_when_not_the_ring_tail() -> None:
    class Blind(MemoryBackend):
        def pending_len(self) -> int | None:
            return None if self.rx else 0

    b = Blind("blind")
    p = NetPair(backends=[b], rx_fill=0)
    rq = p.drv.rxqs[0]
    for tok, n in (("c1", 2048), ("c2", 2048), ("c3", 4)):
        rq.q.add(p.mem, (), [(p.drv.alloc.alloc(2048, 64), n)], tok)
    b.inject(_frame(100))
    rq.q.publish(p.mem)
    p.dev.notify(0)
    q = p.dev.queues[0]
    assert len(p.dev.pairs[0].stash) == 1  # c2; c3 (too small) was returned at once
    p.dev.queue_stopped(0)
    used = []
    while (u := rq.q.get_used(p.mem)) is not None:
        used.append((u[0], u[1]))
    assert used == [("c3", 0), ("c1", 112), ("c2", 0)]
    assert q.get_base() == q.next_used == 3
