"""Conformance checks of offloads (checksum, TSO, GSO receive), MSI-X and the control queue
(virtio 1.2 §5.1.6)."""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any

from virtwire.conform.context import (
    DST,
    FAIL,
    PASS,
    SKIP,
    SRC,
    WARN,
    Context,
    Result,
    check,
    frame_limit,
    guard_tx,
    test_frame,
)
from virtwire.conform.peers import MAGIC
from virtwire.net.driver import NetDriverConfig, VirtioNetDriver
from virtwire.net.frame import inet_checksum
from virtwire.net.header import finish_checksum
from virtwire.virtio import spec


def _udp_frame(payload: bytes) -> tuple[bytes, bytes]:
    """(complete frame, frame with the partial pseudo-header checksum Linux sends)."""
    src, dst = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + inet_checksum(ip).to_bytes(2, "big") + ip[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", 4000, 5000, ulen, 0) + payload
    full = inet_checksum(pseudo + udp) or 0xFFFF
    partial_sum = (~inet_checksum(pseudo)) & 0xFFFF  # folded pseudo-header sum, not inverted
    eth = DST + SRC + b"\x08\x00"
    udp_full = udp[:6] + full.to_bytes(2, "big") + udp[8:]
    udp_part = udp[:6] + partial_sum.to_bytes(2, "big") + udp[8:]
    return eth + ip + udp_full, eth + ip + udp_part


def _finished(frame: bytes, start: int, off: int) -> bytes:
    """``frame`` with its NEEDS_CSUM checksum completed (``net.header.finish_checksum``);
    unchanged when the checksum field lies outside it."""
    f = bytearray(frame)
    with contextlib.suppress(ValueError):
        finish_checksum(f, start, off)
    return bytes(f)


@check("offload.tx_csum", "NEEDS_CSUM transmit: the checksum is completed (or carried)",
       "virtio 1.2 §5.1.6.2 (VIRTIO_NET_F_CSUM: device completes the checksum from csum_start "
       "at csum_offset), §5.1.6.4 (GUEST_CSUM: NEEDS_CSUM on receive); frames above mtu + 14 "
       "only with MTU not negotiated (§5.1.4.1)")
def c_csum(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_NET_F_CSUM):
        return Result(SKIP, "VIRTIO_NET_F_CSUM not offered (for QEMU: the dgram netdev has no "
                            "virtio-net header, so QEMU withdraws every offload)")
    limit = frame_limit(drv)
    payloads = (18, 600, 1400, 8000, 30000)
    small = [n for n in payloads if limit is None or 46 + n <= limit]
    big = [n for n in payloads if n not in small]
    tally = {"ok": 0, "partial": 0}
    notes: list[str] = []
    for n in small:
        _csum_one(ctx, drv, n, tally, notes)
    if big:
        drv = ctx.driver_without_mtu()
        for n in big:
            _csum_one(ctx, drv, n, tally, notes)
    how = ("" if not big else f"; payloads {big} on a driver that did not negotiate MTU "
           f"(mtu {limit - 14 if limit else '-'}, §5.1.4.1)")
    d = {"mtu_policy": how.lstrip("; ") or "all frames within the MTU"}
    if tally["ok"] != len(payloads):
        return Result(FAIL, "; ".join(notes) + how, d)
    partial_ok = tally["partial"]
    where = ("with a valid checksum" if not partial_ok else
             f"to the TAP as CHECKSUM_PARTIAL ({partial_ok} of 5, marked TP_STATUS_CSUMNOTREADY: "
             "the kernel completes it)")
    return Result(PASS, f"5 UDP frames (18..30000 B payload) with NEEDS_CSUM delivered {where}"
                        + how, d)


def _csum_one(ctx: Context, drv: VirtioNetDriver, n: int, tally: dict[str, int],
              notes: list[str]) -> None:
    payload = MAGIC + ctx.rnd.randbytes(n)
    full, partial = _udp_frame(payload)
    ctx.send(drv, [partial], flags=spec.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34,
             csum_offset=6)
    if ctx.t.loopback:
        rx = drv.poll_receive(1, 3)
        if not rx:
            notes.append(f"{n}: lost")
            return
        r = rx[0]
        got: bytes | None = r.data
        if r.flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            got = _finished(r.data, r.csum_start, r.csum_offset)
    else:
        got, csum_not_ready = _peer_any(ctx, drv)
        if got is not None and got == partial and csum_not_ready:
            # handed to the TAP as CHECKSUM_PARTIAL (auxdata TP_STATUS_CSUMNOTREADY): the
            # kernel completes it where needed, exactly as for a local sender
            tally["partial"] += 1
            tally["ok"] += 1
            return
    if got == full:
        tally["ok"] += 1
    else:
        notes.append(f"{n}: {'lost' if got is None else 'checksum wrong'}")


def _peer_any(ctx: Context, drv: VirtioNetDriver) -> tuple[bytes | None, bool]:
    """Next frame to DST from the peer, and (TAP peers) whether the kernel marked it
    CHECKSUM_PARTIAL (PACKET_AUXDATA's TP_STATUS_CSUMNOTREADY)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        got = ctx.t.peer_recv_meta(0.01)
        if got is not None and got[0][:6] == DST:
            return got
        drv.service()
    return None, False


def _tcp_gso_frame(payload: bytes, mss: int = 1448) -> tuple[bytes, bytes]:
    """(frame with the partial pseudo-header TCP checksum, 10-byte virtio_net_hdr) for a
    TCP/IPv4 GSO request of ``payload`` (§5.1.6.2: NEEDS_CSUM + GSO_TCPV4, hdr_len 54)."""
    src, dst = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    tlen = 20 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tlen, 7, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + inet_checksum(ip).to_bytes(2, "big") + ip[12:]
    pseudo = src + dst + struct.pack("!BBH", 0, 6, tlen)
    partial = (~inet_checksum(pseudo)) & 0xFFFF
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 1, 5 << 4, 0x18, 65535, partial, 0)
    frame = DST + SRC + b"\x08\x00" + ip + tcp + payload
    hdr = struct.pack("<BBHHHH", spec.VIRTIO_NET_HDR_F_NEEDS_CSUM, spec.VIRTIO_NET_HDR_GSO_TCPV4,
                      54, mss, 34, 16)
    return frame, hdr


def _tcp_payload_ok(segs: list[bytes], payload: bytes) -> str | None:
    """None if ``segs`` are valid TCP/IPv4 segments whose payloads concatenate to ``payload``."""
    got = bytearray()
    for f in segs:
        ihl = (f[14] & 0xF) * 4
        tot = int.from_bytes(f[16:18], "big")
        if inet_checksum(f[14 : 14 + ihl]) != 0:
            return "bad IPv4 header checksum in a segment"
        tcp = f[14 + ihl : 14 + tot]
        src, dst = f[26:30], f[30:34]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        if inet_checksum(pseudo + tcp) != 0:
            return "bad TCP checksum in a segment"
        got += tcp[(tcp[12] >> 4) * 4 :]
    return None if bytes(got) == payload else f"payload {len(got)} B differs from {len(payload)} B"


@check("offload.tx_tso", "GSO_TCPV4 transmit: a 20000-byte TCP frame leaves intact",
       "virtio 1.2 §5.1.6.2 (HOST_TSO4: the device segments, or hands the GSO frame on, using "
       "gso_size / hdr_len)")
def c_tso(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_NET_F_HOST_TSO4):
        return Result(SKIP, "VIRTIO_NET_F_HOST_TSO4 not offered")
    payload = MAGIC + ctx.rnd.randbytes(20000 - 4)
    frame, _ = _tcp_gso_frame(payload)
    ctx.send(drv, [frame], flags=spec.VIRTIO_NET_HDR_F_NEEDS_CSUM,
             gso_type=spec.VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54, gso_size=1448,
             csum_start=34, csum_offset=16)
    segs: list[bytes] = []
    have = 0
    deadline = time.monotonic() + 4
    while have < len(payload) and time.monotonic() < deadline:
        if ctx.t.loopback:
            rx = drv.poll_receive(1, 0.2)
            got = (rx[0].data, bool(rx[0].flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM)) if rx else None
        else:
            f, partial = _peer_any(ctx, drv)
            got = (f, partial) if f is not None else None
        if got is None:
            continue
        f, partial = got
        if f == frame and partial:
            return Result(PASS, "handed on as one GSO frame (CHECKSUM_PARTIAL at the peer), "
                                "bytes intact")
        segs.append(f)
        have += len(f) - 54
    if not segs:
        return Result(FAIL, "nothing arrived")
    why = _tcp_payload_ok(segs, payload)
    if why:
        return Result(FAIL, f"{len(segs)} segments: {why}")
    return Result(PASS, f"segmented into {len(segs)} valid TCP segments, payload intact")


@check("offload.rx_gso", "A GSO TCP frame from the peer reaches the driver intact",
       "virtio 1.2 §5.1.6.4 (GUEST_TSO4: device MAY deliver a GSO frame with gso_type and "
       "NEEDS_CSUM/DATA_VALID; otherwise segments), §5.1.6.3 (big or mergeable buffers)")
def c_rx_gso(ctx: Context) -> Result:
    if not ctx.t.can_inject_gso:
        return Result(SKIP, "the peer cannot inject frames with a virtio-net header")
    drv = ctx.driver()
    payload = MAGIC + ctx.rnd.randbytes(20000 - 4)
    frame, hdr = _tcp_gso_frame(payload)
    ctx.t.peer_send_gso(hdr, frame)
    frames = []
    have = 0
    deadline = time.monotonic() + 4
    while have < len(payload) and time.monotonic() < deadline:
        for r in drv.poll_receive(1, 0.2):
            if r.data[:6] != DST:
                continue
            frames.append(r)
            have += len(r.data) - 54
    if not frames:
        return Result(FAIL, "nothing arrived")
    f0 = frames[0]
    d = {"frames": len(frames), "gso_type": f0.gso_type, "gso_size": f0.gso_size,
         "flags": f0.flags, "negotiated_guest_tso4": drv.has(spec.VIRTIO_NET_F_GUEST_TSO4)}
    if len(frames) == 1 and f0.gso_type & ~spec.VIRTIO_NET_HDR_GSO_ECN:
        if not drv.has(spec.VIRTIO_NET_F_GUEST_TSO4):
            return Result(FAIL, "GSO frame delivered although GUEST_TSO4 was not negotiated", d)
        data = f0.data
        if f0.flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            data = _finished(data, f0.csum_start, f0.csum_offset)
        why = _tcp_payload_ok([data], payload)
        if why or f0.gso_type != spec.VIRTIO_NET_HDR_GSO_TCPV4 or f0.gso_size != 1448:
            return Result(FAIL, f"GSO frame: {why or 'gso fields wrong'}", d)
        return Result(PASS, f"one {len(f0.data)}-byte GSO_TCPV4 frame (gso_size {f0.gso_size}, "
                            f"flags {f0.flags:#x}), payload intact", d)
    why = _tcp_payload_ok([f.data for f in frames], payload)
    if why:
        return Result(FAIL, f"{len(frames)} frames: {why}", d)
    return Result(PASS, f"{len(frames)} segments, payload intact", d)


@check("irq.msix", "MSI-X: vectors read back, config and queue messages go to their vectors",
       "virtio 1.2 §4.1.4.3 (msix_config, queue_msix_vector), §4.1.5.1.2 (device returns "
       "NO_VECTOR when it cannot map; notifications use the mapped vector)")
def c_msix(ctx: Context) -> Result:
    if ctx.t.kind != "pci" or ctx.t.legacy or not hasattr(ctx.t, "MSIX_MAILBOX"):
        return Result(SKIP, "MSI-X is a PCI (modern interface) facility here")
    try:
        drv: Any = ctx.t.driver(NetDriverConfig(interrupts=True), msix=True)  # type: ignore[call-arg]
    except Exception as e:  # noqa: BLE001 - MSI-X is optional for virtio-pci (§4.1.5.1.2)
        if "no MSI-X capability" in str(e):
            return Result(SKIP, "the device has no MSI-X capability (INTx only; optional)")
        raise
    t = drv.t
    mem = drv.mem
    d: dict[str, Any] = {"table_size": t.msix_table_size, "config_vector": t.config_vector,
                         "queue_vectors": dict(t.queue_vectors)}
    want = {q: 1 + q for q in t.queue_vectors}
    if t.config_vector != 0 or t.queue_vectors != want:
        return Result(FAIL, f"vectors read back {t.config_vector}/{t.queue_vectors}, "
                            f"wrote 0/{want}", d)
    for v in range(t.msix_table_size):
        t.msix_fired(mem, v)  # clear anything from bring-up
    try:
        ctx.t.set_link(False)
        time.sleep(0.05)
        cfg_ok = t.msix_fired(mem, 0)
    finally:
        ctx.t.set_link(True)
    time.sleep(0.05)
    for v in range(t.msix_table_size):
        t.msix_fired(mem, v)
    txi = drv.txqs[0].index
    ctx.send(drv, [test_frame(ctx.rnd, 100)])
    deadline = time.monotonic() + 2
    q_ok = False
    while time.monotonic() < deadline and not q_ok:
        q_ok = t.msix_fired(mem, 1 + txi)
        time.sleep(0.002)
    wrong = [v for v in range(t.msix_table_size) if v != 1 + txi and t.msix_fired(mem, v)]
    if ctx.t.has_peer:
        ctx.t.peer_drain()
    d.update(config_message=cfg_ok, queue_message=q_ok, other_vectors=wrong)
    drv.t.disable_msix()
    if not cfg_ok or not q_ok:
        return Result(FAIL, ("no configuration-change message on vector 0; " if not cfg_ok else "")
                      + ("no used-buffer message on the transmit queue's vector" if not q_ok
                         else ""), d)
    return Result(PASS, f"{d['table_size']} vectors; config change -> vector 0, transmit used "
                        f"buffer -> vector {1 + txi}" + (f" (also {wrong})" if wrong else ""), d)


@check("ctrl.mq", "Multiqueue: two queue pairs enabled by the control queue carry frames",
       "virtio 1.2 §5.1.6.5.5 (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; device MUST NOT queue packets "
       "on receive queues beyond the set number), §5.1.2 (controlq index 2N)")
def c_mq(ctx: Context) -> Result:
    probe = ctx.driver()
    if not probe.has(spec.VIRTIO_NET_F_MQ) or probe.max_pairs < 2:
        return Result(SKIP, "VIRTIO_NET_F_MQ with 2+ pairs not offered")
    if not ctx.t.has_peer or ctx.t.loopback:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver(pairs=2)
    if drv.pairs != 2 or drv.ctrlq is None or drv.ctrlq.index != 2 * drv.max_pairs:
        return Result(FAIL, f"pairs {drv.pairs}, controlq index "
                            f"{drv.ctrlq.index if drv.ctrlq else None}")
    sent_out: list[bytes] = []
    for q in (0, 1):
        fr = [test_frame(ctx.rnd, n) for n in ctx.rand_sizes(drv, 50)]
        guard_tx(drv, fr)
        if drv.send_all(fr, queue=q) != len(fr):
            return Result(FAIL, f"transmitq{q} stuck")
        sent_out += fr
    got_out = [Context.peer_recv(ctx.t, drv, 3) for _ in sent_out]
    inn = [test_frame(ctx.rnd, n) for n in ctx.rand_sizes(drv, 100)]
    for f in inn:
        ctx.t.peer_send(f)
    got_in: list[bytes] = []
    per_q = [0, 0]
    deadline = time.monotonic() + 5
    while len(got_in) < len(inn) and time.monotonic() < deadline:
        for q in (0, 1):
            rx = drv.receive(queue=q)
            per_q[q] += len(rx)
            got_in += [r.data for r in rx]
        drv.service()
    d = {"rx_per_queue": per_q, "max_pairs": drv.max_pairs}
    lost_out = sum(1 for s_, g in zip(sent_out, got_out) if s_ != g)
    if lost_out:
        return Result(FAIL, f"{lost_out} of 100 frames sent on two transmit queues wrong", d)
    if sorted(got_in) != sorted(inn):
        return Result(FAIL, f"received {len(got_in)} of {len(inn)} intact", d)
    return Result(PASS, f"2 pairs set (controlq at {drv.ctrlq.index}); 100 frames out on both "
                        f"transmit queues, 100 in (per receive queue {per_q})", d)


@check("ctrl.commands", "Control queue commands are acknowledged",
       "virtio 1.2 §5.1.6.5 (rx mode, MAC, VLAN: device MUST answer VIRTIO_NET_OK or ERR)")
def c_ctrl(ctx: Context) -> Result:
    drv = ctx.driver()
    if drv.ctrlq is None:
        why = ("vhost-user: the control queue belongs to the front end (QEMU emulates it), "
               "not the back end" if ctx.t.kind == "vhost-user" else "CTRL_VQ not offered")
        return Result(SKIP, why)
    acks = {}
    if drv.has(spec.VIRTIO_NET_F_CTRL_RX):
        acks["promisc on"] = drv.set_promisc(True)
        acks["allmulti on"] = drv.set_allmulti(True)
        acks["promisc off"] = drv.set_promisc(False)
    if drv.has(spec.VIRTIO_NET_F_CTRL_MAC_ADDR):
        acks["mac addr set"] = drv.set_mac(bytes.fromhex("020000000077"))
    acks["mac table set"] = drv.set_mac_table([bytes.fromhex("020000000078")], [])
    if drv.has(spec.VIRTIO_NET_F_CTRL_VLAN):
        acks["vlan add 42"] = drv.vlan(42, True)
        acks["vlan del 42"] = drv.vlan(42, False)
    if drv.has(spec.VIRTIO_NET_F_MQ):
        acks["mq pairs 1"] = drv.set_queue_pairs(1)
    # an unknown class must be refused, not accepted (§5.1.6.5)
    bogus = drv.ctrl(0x7E, 0)
    bad = {k: v for k, v in acks.items() if v != spec.VIRTIO_NET_OK}
    d = {"acks": acks, "unknown_class_ack": bogus}
    if bad:
        return Result(FAIL, f"refused: {bad}", d)
    if bogus == spec.VIRTIO_NET_OK:
        return Result(WARN, "an unknown command class was acknowledged OK", d)
    return Result(PASS, f"{len(acks)} commands acknowledged, unknown class refused", d)


# ------------------------------------------------------------------------------------------------
