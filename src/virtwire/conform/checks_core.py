"""Conformance checks of the device's core: features, reset, queues, frames, used lengths,
notifications and configuration space (virtio 1.2 §2, §3, §4.1, §5.1)."""

from __future__ import annotations

import time
from typing import Any

from virtwire.conform.context import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    Context,
    Exchange,
    MtuRuleBroken,
    Result,
    Skip,
    check,
    frame_limit,
    guard_tx,
    mismatch,
    test_frame,
)
from virtwire.conform.features import VHOST_ONLY_MASK, bit_findings, dependency_findings
from virtwire.conform.targets import Target
from virtwire.net.driver import VirtioNetDriver
from virtwire.virtio import spec
from virtwire.virtio.spec import bit

# ------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------


@check("features.dependencies", "Offered feature bits satisfy their dependencies",
       "virtio 1.2 §5.1.3.1 (each bit's 'Requires'), §2.2.2 (device MUST NOT offer a feature "
       "which requires another feature which was not offered)")
def c_feature_deps(ctx: Context) -> Result:
    raw = ctx.t.backend_offered()
    if raw is not None:
        offered, source = raw & ~bit(spec.VHOST_USER_F_PROTOCOL_FEATURES), "back end"
    else:
        offered, source = ctx.driver().offered, "device"
    fails, notes = dependency_findings(offered)
    data = {"offered": spec.feature_names(offered), "source": source, "notes": notes}
    tail = f" (notes: {'; '.join(notes)})" if notes else ""
    if fails:
        return Result(FAIL, "; ".join(fails) + tail, data)
    return Result(PASS, f"{len(data['offered'])} bits offered, every §5.1.3.1 requirement "
                        "present" + tail, data)


@check("features.reserved_bits", "No reserved, legacy-only or vhost-only bits with VERSION_1",
       "virtio 1.2 §2.2 (bit allocation; 41 to 49 reserved), §6 and §6.3 (transport and legacy "
       "bits), §5.1.3.2 (VIRTIO_NET_F_GSO legacy only)")
def c_reserved_bits(ctx: Context) -> Result:
    if ctx.t.legacy:
        return Result(SKIP, "legacy interface: legacy bits are its own")
    drv = ctx.driver()
    seen = drv.offered
    found = bit_findings(seen)  # what reaches the driver
    raw = ctx.t.backend_offered()
    d: dict[str, Any] = {"driver_sees": hex(seen)}
    if raw is not None:
        # vhost-user: the back end's own word may carry vhost protocol bits (the front end's
        # business); its legacy or reserved bits are the back end's finding
        own = bit_findings(raw & ~VHOST_ONLY_MASK)
        found = [f"back end offers {x}" for x in own] + [f"front end passes {x}" for x in found]
        d["back_end_offers"] = hex(raw)
        d["front_end_filtered"] = spec.feature_names(raw & ~seen)
    if not seen >> spec.VIRTIO_F_VERSION_1 & 1:
        return Result(SKIP, "VERSION_1 not offered", d)
    if found:
        return Result(WARN, "; ".join(found) + " (no MUST forbids it: a warning, a failure "
                      "under --strict)", d)
    return Result(PASS, "only bits virtio 1.2 defines for a modern net device", d)


@check("features.version_1", "A modern device offers VIRTIO_F_VERSION_1",
       "virtio 1.2 §6.2 (device MUST offer VIRTIO_F_VERSION_1); §4.1.2.1")
def c_version_1(ctx: Context) -> Result:
    if ctx.t.legacy:
        return Result(SKIP, "legacy interface: 32 feature bits, VERSION_1 cannot be offered")
    drv = ctx.driver()
    if drv.offered >> spec.VIRTIO_F_VERSION_1 & 1:
        return Result(PASS, "offered")
    return Result(FAIL, "VERSION_1 not offered by a non-legacy device")


@check("features.minimal_subset", "Device accepts a minimal feature subset and works with it",
       "virtio 1.2 §3.1.1 steps 4-6 and §2.2.2 (device SHOULD accept any valid subset); "
       "§5.1.6.3 (no MRG_RXBUF: each buffer holds a whole packet)")
def c_minimal(ctx: Context) -> Result:
    feats = 0 if ctx.t.legacy else bit(spec.VIRTIO_F_VERSION_1)
    drv = ctx.driver(features=feats | bit(spec.VIRTIO_NET_F_MAC))
    st = drv.t.get_status()
    if not ctx.t.legacy and not st & spec.VIRTIO_CONFIG_S_FEATURES_OK:
        return Result(FAIL, f"status {st:#x} lacks FEATURES_OK")
    if not ctx.t.has_peer:
        return Result(PASS, "FEATURES_OK accepted (no peer: data path not exercised)")
    ex = ctx.exchange(drv, ctx.rand_sizes(drv, 300))
    bad = mismatch(ex.sent_out, ex.got_out) + mismatch(ex.sent_in, ex.got_in)
    d = {"negotiated": spec.feature_names(drv.features), "hdr_len": drv.hdr_len,
         "rx_layout": drv.rx_layout}
    if bad:
        return Result(FAIL, f"{len(bad)} frames wrong: {bad[:4]}", d)
    return Result(PASS, f"300 frames each way with {d['negotiated']}", d)


@check("reset.semantics", "Reset returns status 0, disables queues; a device restarts cleanly",
       "virtio 1.2 §2.4 (device reset), §4.1.4.3.2 (device MUST present 0 in queue_enable on "
       "reset); vhost-user.rst GET_VRING_BASE (stop the ring, reply with the next avail index)")
def c_reset(ctx: Context) -> Result:
    drv = ctx.driver()
    if ctx.t.has_peer:
        ctx.exchange(drv, [100] * 20)
    details = []
    if ctx.t.kind == "vhost-user":
        fe: Any = drv.t
        tx_used = drv.mem.read_u16(drv.txqs[0].q.used_addr + 2) if not drv.has(
            spec.VIRTIO_F_RING_PACKED) else None
        rx_used = drv.mem.read_u16(drv.rxqs[0].q.used_addr + 2)
        drv.t.reset()
        bases = getattr(fe, "stopped_bases", {})
        want = {0: rx_used, 1: tx_used}
        # RX: the device consumed exactly the buffers it used (one per frame, mergeable)
        wrong = {i: (bases.get(i), w) for i, w in want.items() if w is not None and
                 bases.get(i) != w}
        if wrong:
            return Result(FAIL, "GET_VRING_BASE answered " + ", ".join(
                f"ring {i}: {g} (next avail should be {w})" for i, (g, w) in wrong.items()),
                {"bases": bases})
        details.append(f"GET_VRING_BASE {bases}")
    else:
        drv.t.reset()
        st = drv.t.get_status()
        if st != 0:
            return Result(FAIL, f"status reads {st:#x} after reset")
        if not ctx.t.legacy:
            on = [i for i in range(3) if drv.t.queue_enabled(i)]  # type: ignore[attr-defined]
            if on:
                return Result(FAIL, f"queue_enable still 1 for queues {on} after reset")
        details.append("status 0" + ("" if ctx.t.legacy else " and queue_enable 0")
                       + " after reset")
    # a second bring-up on the same device works end to end
    drv2 = ctx.driver()
    if ctx.t.has_peer:
        ex = ctx.exchange(drv2, ctx.rand_sizes(drv2, 100))
        bad = mismatch(ex.sent_out, ex.got_out) + mismatch(ex.sent_in, ex.got_in)
        if bad:
            return Result(FAIL, f"after reset: {bad[:4]}")
        details.append("100 frames each way after re-initialisation")
    return Result(PASS, "; ".join(details))


@check("reset.queue", "A single queue resets and restarts on new rings (RING_RESET)",
       "virtio 1.2 §2.6.1 (virtqueue reset), §4.1.4.3.2 (queue_reset reads 0 again once the "
       "queue is reset, and queue_enable 0)")
def c_queue_reset(ctx: Context) -> Result:
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_F_RING_RESET):
        return Result(SKIP, "VIRTIO_F_RING_RESET not offered")
    if not hasattr(drv.t, "reset_queue"):
        return Result(SKIP, "this transport has no per-queue reset")
    if ctx.t.has_peer:
        ctx.exchange(drv, [200] * 20)
    done = []
    for qq in (drv.txqs[0], drv.rxqs[0]):
        if not drv.reset_queue(qq):
            return Result(FAIL, f"queue {qq.index}: queue_reset did not return to 0, or "
                                "queue_enable still 1")
        done.append(qq.index)
    if ctx.t.has_peer:
        ex = ctx.exchange(drv, ctx.rand_sizes(drv, 200))
        bad = mismatch(ex.sent_out, ex.got_out) + mismatch(ex.sent_in, ex.got_in)
        if bad:
            return Result(FAIL, f"after queue reset: {bad[:4]}")
    return Result(PASS, f"queues {done} reset (queue_reset back to 0, queue_enable 0) and "
                        "re-enabled on new rings; 200 frames each way afterwards")


@check("queue.size_limits", "Queue sizes are valid; a smaller driver-chosen size works",
       "virtio 1.2 §2.7 (split: power of 2, at most 32768), §4.1.4.3.2 (driver MAY reduce "
       "queue_size)")
def c_queue_sizes(ctx: Context) -> Result:
    drv = ctx.driver()
    sizes = {i: drv.t.queue_max_size(i) for i in range(2 + bool(drv.ctrlq))}
    bad = [f"queue {i}: {n}" for i, n in sizes.items()
           if n == 0 or n > spec.VIRTQ_MAX_SIZE or (n & (n - 1))]
    if bad:
        return Result(FAIL, f"invalid maximum sizes {bad}", {"max_sizes": sizes})
    if ctx.t.legacy:
        return Result(PASS, f"max sizes {sizes} (legacy: size fixed by the device)",
                      {"max_sizes": sizes})
    drv = ctx.driver(queue_size=64)
    if drv.txqs[0].size != 64:
        return Result(FAIL, f"could not use queue size 64 (got {drv.txqs[0].size})")
    msg = f"max sizes {sizes}; queue size 64 accepted"
    if ctx.t.has_peer:
        ex = ctx.exchange(drv, ctx.rand_sizes(drv, 500), batch=48)
        bad = mismatch(ex.sent_out, ex.got_out) + mismatch(ex.sent_in, ex.got_in)
        if bad:
            return Result(FAIL, f"with 64-entry queues: {bad[:4]}", {"max_sizes": sizes})
        msg += ", 500 frames each way through 64-entry rings"
    return Result(PASS, msg, {"max_sizes": sizes})


SIZES = [60, 61, 64, 128, 512, 1000, 1514, 1518, 2048, 4096, 9014, 16384, 32768, 65535]


def _bulk(ctx: Context, target: Target, packed: bool) -> tuple[VirtioNetDriver, Exchange]:
    key = f"bulk-{target.name}-{packed}"
    if key not in ctx.notes:
        drv = ctx.driver_on(target, packed=packed)
        if drv.has(spec.VIRTIO_F_RING_PACKED) != packed:
            raise Skip("packed ring not offered" if packed else "split ring refused")
        ex = ctx.exchange(drv, ctx.rand_sizes(drv, 2000), target)
        ctx.notes[key] = (drv, ex)
    return ctx.notes[key]


@check("frames.bulk", "2000 random-size frames each way arrive intact and in order",
       "virtio 1.2 §5.1.6.2 (transmit), §5.1.6.3-4 (receive, MRG_RXBUF num_buffers)")
def c_bulk(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv, ex = _bulk(ctx, ctx.t, False)
    bad = mismatch(ex.sent_out, ex.got_out) + mismatch(ex.sent_in, ex.got_in)
    d = {"negotiated": spec.feature_names(drv.features), "stats": drv.stats.as_dict()}
    if bad:
        return Result(FAIL, f"{len(bad)} of {2 * len(ex.sent_out)} wrong: {bad[:4]}", d)
    return Result(PASS, f"{len(ex.sent_out)} each way, byte-exact ({drv.rx_layout} RX "
                        f"buffers, {drv.stats.kicks} kicks)", d)


@check("frames.sizes", "Frames of 60..65535 bytes arrive intact in both directions",
       "virtio 1.2 §5.1.6.2, §5.1.6.3.1 (MRG_RXBUF: device MUST use as many buffers as needed), "
       "§5.1.6.4; frames above mtu + 14 only with MTU not negotiated (§5.1.4.1)")
def c_sizes(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver()
    limit = frame_limit(drv)
    small = [n for n in SIZES if limit is None or n <= limit]
    big = [n for n in SIZES if n not in small]
    per: dict[int, str] = {}
    fails: list[int] = []
    _sizes_on(ctx, drv, small, per, fails, ctx.driver)
    how = "VIRTIO_NET_F_MTU not negotiated (not offered)" if limit is None else (
        f"{small[0]}..{small[-1]} B with VIRTIO_NET_F_MTU negotiated (mtu {drv.mtu})")
    if big:
        _sizes_on(ctx, ctx.driver_without_mtu(), big, per, fails, ctx.driver_without_mtu)
        how += f"; {big[0]}..{big[-1]} B on a driver that did not negotiate MTU (§5.1.4.1)"
    d = {"per_size": per, "mtu_policy": how}
    if fails:
        return Result(FAIL, "sizes failing: " + ", ".join(f"{n} ({per[n]})" for n in fails)
                      + f" [{how}]", d)
    return Result(PASS, f"{len(SIZES)} sizes from 60 to 65535 intact both ways ({how})", d)


def _sizes_on(ctx: Context, drv: VirtioNetDriver, sizes: list[int], per: dict[int, str],
              fails: list[int], fresh: Any) -> None:
    for n in sizes:
        try:
            ex = ctx.exchange(drv, [n] * 2, batch=2, timeout=3)
        except MtuRuleBroken:
            raise
        except Exception as e:  # noqa: BLE001 - recorded as the finding for this size
            per[n] = f"error: {e}"
            fails.append(n)
            drv = fresh()
            continue
        bo = mismatch(ex.sent_out, ex.got_out)
        bi = mismatch(ex.sent_in, ex.got_in)
        per[n] = "ok" if not (bo or bi) else "; ".join(
            ([f"out: {bo[0]}"] if bo else []) + ([f"in: {bi[0]}"] if bi else []))
        if bo or bi:
            fails.append(n)


@check("used.num_buffers", "MRG_RXBUF: num_buffers counts the buffers each frame spans",
       "virtio 1.2 §5.1.6.4 (device MUST set num_buffers to the number of descriptors the "
       "packet spans), §5.1.6.3.1")
def c_num_buffers(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver_without_mtu()
    if drv.rx_layout != "mergeable":
        return Result(SKIP, "VIRTIO_NET_F_MRG_RXBUF not negotiated")
    buf = drv.cfg.mrg_buf_len
    seen: dict[int, list[int]] = {}
    for n in (60, 1514, 2100, 4000, 9014, 30000, 65535):
        ex = ctx.exchange(drv, [n] * 2, batch=2, timeout=3)
        bad = mismatch(ex.sent_in, ex.got_in)
        if bad:
            return Result(FAIL, f"{n} B: {bad[0]}", {"num_buffers": seen})
        seen[n] = [r.num_buffers for r in ex.rx_meta]
    least = {n: -(-(n + drv.hdr_len) // buf) for n in seen}
    fewer = {n: v for n, v in seen.items() if min(v) < least[n]}
    d = {"num_buffers": seen, "at_least": least, "buffer_len": buf}
    if fewer:
        return Result(FAIL, f"num_buffers below the buffers the frame needs: {fewer}", d)
    more = {n: v for n, v in seen.items() if max(v) > least[n]}
    return Result(PASS, "num_buffers = buffers spanned for 60..65535 B frames (driver checks "
                        "each against the used ring)" + (f"; more than the minimum: {more}"
                                                          if more else ""), d)


@check("used.rx_len", "Receive used lengths equal header + frame bytes written",
       "virtio 1.2 §2.7.8 / §2.8.4 (len = bytes written into the buffer), §5.1.6.4")
def c_rx_len(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv, ex = _bulk(ctx, ctx.t, False)
    wrong = [(len(s), len(g)) for s, g in zip(ex.sent_in, ex.got_in) if len(s) != len(g)]
    if wrong:
        return Result(FAIL, f"{len(wrong)} used lengths wrong, e.g. (sent, reported) {wrong[:4]}")
    return Result(PASS, f"{len(ex.got_in)} used lengths = {drv.hdr_len} + frame length")


@check("used.tx_len", "Transmit used lengths are 0 (nothing written)",
       "virtio 1.2 §2.7.8 (len: bytes written into the device-writable part)")
def c_tx_len(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv, ex = _bulk(ctx, ctx.t, False)
    n = drv.stats.tx_used_len_nonzero
    if n:
        return Result(FAIL, f"{n} of {len(ex.sent_out)} transmit buffers returned with len != 0")
    return Result(PASS, f"{len(ex.sent_out)} transmit buffers returned with len 0")


@check("used.packed_write_flag", "Packed ring: used descriptors with a length carry WRITE",
       "virtio 1.2 §2.8.4 (Element Length is reserved for used descriptors without "
       "VIRTQ_DESC_F_WRITE)")
def c_packed_write(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    pt = ctx.t.packed_variant()
    if pt is None:
        return Result(SKIP, "no packed ring on this interface")
    try:
        drv, ex = _bulk(ctx, pt, True)
    except Skip as e:
        return Result(SKIP, str(e))
    bad = mismatch(ex.sent_in, ex.got_in) + mismatch(ex.sent_out, ex.got_out)
    n = drv.stats.used_len_without_write
    d = {"used_len_without_write": n, "frames_wrong": len(bad)}
    if n:
        return Result(FAIL, f"{n} of {len(ex.got_in)} receive buffers used with a length but "
                            "without VIRTQ_DESC_F_WRITE (Linux-style drivers read len anyway; "
                            "frames intact: " + ("yes" if not bad else f"no, {bad[:3]}") + ")", d)
    if bad:
        return Result(FAIL, f"packed ring frames wrong: {bad[:4]}", d)
    return Result(PASS, f"{len(ex.got_in)} used descriptors, all with WRITE; frames intact", d)


def _burst_rounds(ctx: Context, target: Target, packed: bool, rounds: int = 30,
                  burst: int = 48) -> VirtioNetDriver:
    """Transmit bursts the peer does not read for a moment (a peer that falls behind: the
    device's send path meets back-pressure), then drain; the driver kicks only when asked."""
    drv = ctx.driver_on(target, packed=packed)
    if drv.has(spec.VIRTIO_F_RING_PACKED) != packed:
        raise Skip("packed ring not offered" if packed else "split ring refused")
    for _ in range(rounds):
        frames = [test_frame(ctx.rnd, n) for n in ctx.rand_sizes(drv, burst)]
        guard_tx(drv, frames)
        if drv.send_all(frames, timeout=5) != burst:
            raise AssertionError("transmit ring stuck")
        time.sleep(0.01)
        if target.loopback:
            got = [r.data for r in drv.poll_receive(burst, 5)]
        else:
            got = [Context.peer_recv(target, drv, 5) for _ in frames]
        if got != frames:
            raise AssertionError("frames lost or changed during a burst")
    return drv


@check("notify.no_stall", "The device's event index lets a spec-following driver progress",
       "virtio 1.2 §2.7.10 / §2.8.10 (driver notifies only when avail_event / the device event "
       "structure asks; the device must ask for every notification it needs)")
def c_no_stall(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    out = {}
    fails = []
    variants: list[tuple[str, Target | None, bool]] = [("split", ctx.t, False)]
    variants.append(("packed", ctx.t.packed_variant(), True))
    for name, tg, packed in variants:
        if tg is None:
            out[name] = "n/a"
            continue
        try:
            drv, _ex = _bulk(ctx, tg, packed)
            burst = _burst_rounds(ctx, tg, packed)
        except Skip as e:
            out[name] = str(e)
            continue
        k = drv.stats.stall_kicks + burst.stats.stall_kicks
        out[name] = (f"{k} watchdog kicks, {drv.stats.kicks + burst.stats.kicks} requested "
                     "kicks")
        if k:
            fails.append(f"{name}: transmit stalled {k} times until an unrequested kick")
    if fails:
        return Result(FAIL, "; ".join(fails), out)
    return Result(PASS, "; ".join(f"{k}: {v}" for k, v in out.items()) +
                  " (2000 frames, then 30 bursts of 48 the peer reads late)", out)


def _irq_pending(ctx: Context, drv: VirtioNetDriver, qindex: int) -> bool:
    if ctx.t.kind == "vhost-user":
        import os

        fe: Any = drv.t
        try:
            return bool(os.eventfd_read(fe.rings[qindex].call_fd))
        except BlockingIOError:
            return False
    return bool(drv.t.read_isr() & spec.VIRTIO_PCI_ISR_QUEUE)


@check("notify.used_event", "Used-buffer notifications follow used_event (EVENT_IDX)",
       "virtio 1.2 §2.7.7.2 (idx reaching used_event: device MUST notify; otherwise SHOULD NOT)")
def c_used_event(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer: nothing makes the device use buffers")
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_F_EVENT_IDX):
        return Result(SKIP, "EVENT_IDX not offered")
    mem = drv.mem
    tq = drv.txqs[0].q
    rq = drv.rxqs[0].q
    ev_tx = tq.avail_addr + 4 + 2 * tq.size
    ev_rx = rq.avail_addr + 4 + 2 * rq.size

    def used_idx() -> int:
        return mem.read_u16(tq.used_addr + 2)

    def settle(want: int) -> bool:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if used_idx() == want & 0xFFFF:
                return True
            time.sleep(0.001)
        return False

    frames = [test_frame(ctx.rnd, 200) for _ in range(8)]
    # warm-up: a device may notify unconditionally once after reset (QEMU does)
    u = used_idx()
    ctx.send(drv, frames[:1])
    if not settle(u + 1):
        return Result(FAIL, "transmit buffer not used")
    time.sleep(0.02)
    u0 = used_idx()
    mem.write_u16(ev_rx, (mem.read_u16(rq.used_addr + 2) + 0x4000) & 0xFFFF)
    mem.write_u16(ev_tx, (u0 + 0x4000) & 0xFFFF)  # far ahead: no notification wanted
    _irq_pending(ctx, drv, 1)
    ctx.send(drv, frames)
    if not settle(u0 + 8):
        return Result(FAIL, "transmit buffers not used")
    time.sleep(0.05)
    spurious = _irq_pending(ctx, drv, 1)
    u1 = used_idx()
    mem.write_u16(ev_tx, u1)  # the next used element reaches used_event: MUST notify
    ctx.send(drv, frames[:1])
    if not settle(u1 + 1):
        return Result(FAIL, "transmit buffer not used")
    deadline = time.monotonic() + 2
    got = False
    while time.monotonic() < deadline and not got:
        got = _irq_pending(ctx, drv, 1)
        time.sleep(0.002)
    if not ctx.t.loopback:
        ctx.t.peer_drain()
    d = {"notified_when_not_wanted": spurious, "notified_at_used_event": got}
    if not got:
        return Result(FAIL, "no notification when used idx reached used_event", d)
    if spurious:
        return Result(WARN, "notified although used_event was far ahead (SHOULD NOT)", d)
    return Result(PASS, "silent while used_event was ahead, notified when it was reached", d)


@check("config.net_fields", "MAC, status, MTU and max pairs are readable and in range",
       "virtio 1.2 §5.1.4, §5.1.4.2 (mtu between 68 and 65535; max_virtqueue_pairs 1..0x8000)")
def c_config(ctx: Context) -> Result:
    drv = ctx.driver()
    d: dict[str, Any] = {"mac": drv.mac.hex(":"), "status": drv.status, "mtu": drv.mtu,
                         "max_pairs": drv.max_pairs,
                         "source": "device config space" if ctx.t.kind == "pci" else
                         ("back end GET_CONFIG" if getattr(drv.t, "protocol_features", 0) >> 9 & 1
                          else "front end (back end has no CONFIG)")}
    bad = []
    if drv.has(spec.VIRTIO_NET_F_MAC) and (drv.mac[0] & 1 or drv.mac == bytes(6)):
        bad.append(f"MAC {d['mac']} is multicast or zero")
    if drv.has(spec.VIRTIO_NET_F_STATUS) and not drv.status & spec.VIRTIO_NET_S_LINK_UP:
        bad.append(f"status {drv.status:#x} without LINK_UP on a connected link")
    if drv.has(spec.VIRTIO_NET_F_MTU) and not 68 <= drv.mtu <= 65535:
        bad.append(f"mtu {drv.mtu} outside 68..65535")
    if bad:
        return Result(FAIL, "; ".join(bad), d)
    return Result(PASS, f"MAC {d['mac']}, status {drv.status:#x}, mtu {drv.mtu or '-'} "
                        f"({d['source']})", d)


@check("config.before_features_ok", "Device config is readable before FEATURES_OK",
       "virtio 1.2 §2.5.1 / §3.1.1 (device MUST allow reading any device-specific "
       "configuration field before FEATURES_OK is set)")
def c_config_early(ctx: Context) -> Result:
    if ctx.t.kind == "vhost-user":
        fe: Any = ctx.driver().t
        if not getattr(fe, "protocol_features", 0) >> 9 & 1:
            return Result(SKIP, "no VHOST_USER_PROTOCOL_F_CONFIG: the front end supplies config")
    drv = ctx.driver()
    after = {"mac": drv.mac.hex(":")}
    fields = [("mac", 0, 6, None)]
    for name, off, feat, val in (("status", 6, spec.VIRTIO_NET_F_STATUS, drv.status),
                                 ("max_virtqueue_pairs", 8, spec.VIRTIO_NET_F_MQ, drv.max_pairs),
                                 ("mtu", 10, spec.VIRTIO_NET_F_MTU, drv.mtu)):
        if drv.has(feat):  # the field exists (§5.1.4): compare it
            fields.append((name, off, 2, feat))
            after[name] = val
    t = drv.t
    t.reset()
    t.set_status(spec.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    t.set_status(spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER)
    before: dict[str, Any] = {}
    for name, off, n, _feat in fields:
        raw = t.read_config(off, n)
        before[name] = raw.hex(":") if name == "mac" else int.from_bytes(raw, "little")
    t.reset()
    d = {"before_features_ok": before, "after_driver_ok": after}
    diff = [f"{k} {before[k]} before, {after[k]} after" for k in after if before[k] != after[k]]
    if diff:
        return Result(FAIL, "config read before FEATURES_OK differs: " + "; ".join(diff), d)
    return Result(PASS, f"{', '.join(before)} read after ACKNOWLEDGE|DRIVER equal what the "
                        "driver read after FEATURES_OK", d)


@check("config.generation", "A link change is visible: status, config interrupt, generation",
       "virtio 1.2 §4.1.4.3.1 (device MUST present a changed config_generation after a read "
       "config field changed), §4.1.4.5 (ISR bit 1), §5.1.4 (VIRTIO_NET_S_LINK_UP)")
def c_generation(ctx: Context) -> Result:
    if not ctx.t.can_set_link:
        return Result(SKIP, "the target offers no way to change the link from outside")
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_NET_F_STATUS):
        return Result(SKIP, "VIRTIO_NET_F_STATUS not offered")
    t: Any = drv.t
    g0 = t.config_generation()
    up0 = drv.link_up
    t.read_isr()
    ctx.t.set_link(False)
    try:
        g1 = t.config_generation()
        up1 = drv.link_up
        isr = t.read_isr()
    finally:
        ctx.t.set_link(True)
    d = {"generation": [g0, g1], "link_up": [up0, up1], "isr": isr}
    bad = []
    if up1 or not up0:
        bad.append(f"LINK_UP {up0}->{up1}")
    if not isr & spec.VIRTIO_PCI_ISR_CONFIG:
        bad.append(f"ISR {isr:#x} without the configuration-change bit")
    if not ctx.t.legacy and g1 == g0:
        bad.append(f"config_generation stayed {g0}")
    if bad:
        return Result(FAIL, "; ".join(bad), d)
    return Result(PASS, "link down cleared LINK_UP, raised ISR bit 1" +
                  ("" if ctx.t.legacy else f", generation {g0}->{g1}"), d)


