"""The conformance checks: named, each citing the spec clause it tests, run by our driver.

Theory of operation
-------------------
A check is a function ``(Context) -> Result`` registered in ``CHECKS`` with an id
(``area.name``), a title and the clause of virtio 1.2 (or vhost-user.rst) it enforces. The
``Context`` hands out fresh drivers for the target (each one resets the device and re-runs
§3.1.1), and exchanges frames with the target's peer (a socket QEMU's netdev talks to, a TAP's
packet socket, or testpmd's loopback). A check passes, fails (the device broke a MUST, with the
evidence in ``detail``), warns (a SHOULD) or is skipped (the feature is not offered, or the
target gives no way to observe it -- the reason is in ``detail``). One failing check never stops
the others: exceptions inside a check become a ``fail`` with the exception text, since a device
fault surfacing as ``DeviceFault`` *is* a finding.

Frames sent by the suite carry EtherType 0x88B5 and a magic (``peers.is_test_frame``) so a
peer can ignore unrelated traffic.
"""

from __future__ import annotations

import contextlib
import random
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtwire.conform.peers import ETH_P_EXPERIMENTAL, MAGIC
from virtwire.conform.targets import Target
from virtwire.net.driver import NetDriverConfig, VirtioNetDriver
from virtwire.net.frame import inet_checksum
from virtwire.net.header import finish_checksum
from virtwire.virtio import spec
from virtwire.virtio.spec import bit

__all__ = ["Result", "Check", "CHECKS", "run_suite", "Context"]

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"


@dataclass
class Result:
    status: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    clause: str
    fn: Callable[[Context], Result]


CHECKS: list[Check] = []


def check(id_: str, title: str, clause: str) -> Callable[[Callable[[Context], Result]],
                                                         Callable[[Context], Result]]:
    def deco(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        CHECKS.append(Check(id_, title, clause, fn))
        return fn
    return deco


# ------------------------------------------------------------------------------------------------
# frames and exchange
# ------------------------------------------------------------------------------------------------

DST = bytes.fromhex("020000000002")
SRC = bytes.fromhex("020000000001")


def test_frame(rnd: random.Random, n: int) -> bytes:
    n = max(n, 18)
    return DST + SRC + ETH_P_EXPERIMENTAL.to_bytes(2, "big") + MAGIC + rnd.randbytes(n - 18)


test_frame.__test__ = False  # type: ignore[attr-defined]


@dataclass
class Exchange:
    sent_out: list[bytes]
    got_out: list[bytes | None]
    sent_in: list[bytes]
    got_in: list[bytes]
    rx_meta: list[Any]


class Context:
    """What a check works with: the target, fresh drivers, frame exchange helpers."""

    def __init__(self, target: Target, seed: int = 1) -> None:
        self.t = target
        self.rnd = random.Random(seed)
        self.notes: dict[str, Any] = {}
        self._current: VirtioNetDriver | None = None

    def driver(self, **cfg: Any) -> VirtioNetDriver:
        return self.driver_on(self.t, **cfg)

    def driver_on(self, target: Target, **cfg: Any) -> VirtioNetDriver:
        # A watchdog kick is a finding (notify.no_stall): wait long enough that a busy host
        # delaying a correct device is not mistaken for a stall.
        cfg.setdefault("stall_kick_after", 0.25)
        drv = target.driver(NetDriverConfig(**cfg))
        self._current = drv
        return drv

    def exchange(self, drv: VirtioNetDriver, sizes: list[int], target: Target | None = None,
                 batch: int = 32, timeout: float = 5.0) -> Exchange:
        """Send frames of ``sizes`` out and (with a peer) the same number in, batch by batch."""
        t = target or self.t
        out = [test_frame(self.rnd, n) for n in sizes]
        inn = out if t.loopback else [test_frame(self.rnd, n) for n in sizes]
        ex = Exchange(out, [], inn, [], [])
        for k in range(0, len(out), batch):
            b = out[k : k + batch]
            if drv.send_all(b, timeout=timeout) != len(b):
                raise AssertionError(f"transmit ring stuck after {k} frames")
            if not t.loopback:
                for _ in b:
                    ex.got_out.append(self._peer_recv(t, drv, timeout))
                for f in inn[k : k + batch]:
                    t.peer_send(f)
            rx = drv.poll_receive(len(b), timeout=timeout)
            ex.got_in += [r.data for r in rx]
            ex.rx_meta += rx
            if len(rx) < len(b):
                break
        if t.loopback:
            ex.got_out = list(ex.got_in)  # what came back is what went out
        return ex

    @staticmethod
    def _peer_recv(t: Target, drv: VirtioNetDriver, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = t.peer_recv(0.002)
            if f is not None:
                return f
            drv.service()
        return None


def _mismatch(sent: list[bytes], got: list[Any]) -> list[str]:
    bad = []
    for i, s in enumerate(sent):
        g = got[i] if i < len(got) else None
        if g is None:
            bad.append(f"#{i} ({len(s)} B) lost")
        elif g != s:
            if len(g) != len(s):
                bad.append(f"#{i} ({len(s)} B) arrived as {len(g)} B")
            else:
                bad.append(f"#{i} ({len(s)} B) corrupted")
    return bad


# ------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------


@check("features.dependencies", "Offered feature bits satisfy their dependencies",
       "virtio 1.2 §5.1.3.1 (device MUST NOT offer a feature which requires another feature "
       "which was not offered)")
def c_feature_deps(ctx: Context) -> Result:
    raw = ctx.t.backend_offered()
    drv = ctx.driver()
    offered = drv.offered if raw is None else raw & ~bit(spec.VHOST_USER_F_PROTOCOL_FEATURES)
    bad = []
    for feat, reqs in spec.NET_FEATURE_REQUIRES.items():
        if offered >> feat & 1:
            missing = [spec.FEATURE_NAMES[r] for r in reqs if not offered >> r & 1]
            if missing:
                bad.append(f"{spec.FEATURE_NAMES[feat]} without {'+'.join(missing)}")
    for feat, anyof in spec.NET_FEATURE_REQUIRES_ANY.items():
        if offered >> feat & 1 and not any(offered >> r & 1 for r in anyof):
            bad.append(f"{spec.FEATURE_NAMES[feat]} without any of "
                       f"{'/'.join(spec.FEATURE_NAMES[r] for r in anyof)}")
    data = {"offered": spec.feature_names(offered), "source": "back end" if raw else "device"}
    if bad:
        return Result(FAIL, "; ".join(bad), data)
    return Result(PASS, f"{len(data['offered'])} bits offered, all dependencies present", data)


@check("features.version_1", "A modern device offers VIRTIO_F_VERSION_1",
       "virtio 1.2 §6.1 (device MUST offer VIRTIO_F_VERSION_1); §4.1.2.1")
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
    ex = ctx.exchange(drv, [ctx.rnd.randint(60, 1514) for _ in range(300)])
    bad = _mismatch(ex.sent_out, ex.got_out) + _mismatch(ex.sent_in, ex.got_in)
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
        ex = ctx.exchange(drv2, [ctx.rnd.randint(60, 1514) for _ in range(100)])
        bad = _mismatch(ex.sent_out, ex.got_out) + _mismatch(ex.sent_in, ex.got_in)
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
        ex = ctx.exchange(drv, [ctx.rnd.randint(60, 1514) for _ in range(200)])
        bad = _mismatch(ex.sent_out, ex.got_out) + _mismatch(ex.sent_in, ex.got_in)
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
        ex = ctx.exchange(drv, [ctx.rnd.randint(60, 1514) for _ in range(500)], batch=48)
        bad = _mismatch(ex.sent_out, ex.got_out) + _mismatch(ex.sent_in, ex.got_in)
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
            raise _Skip("packed ring not offered" if packed else "split ring refused")
        ex = ctx.exchange(drv, [ctx.rnd.randint(60, 1514) for _ in range(2000)], target)
        ctx.notes[key] = (drv, ex)
    return ctx.notes[key]


class _Skip(Exception):
    pass


@check("frames.bulk", "2000 random-size frames each way arrive intact and in order",
       "virtio 1.2 §5.1.6.2 (transmit), §5.1.6.3-4 (receive, MRG_RXBUF num_buffers)")
def c_bulk(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv, ex = _bulk(ctx, ctx.t, False)
    bad = _mismatch(ex.sent_out, ex.got_out) + _mismatch(ex.sent_in, ex.got_in)
    d = {"negotiated": spec.feature_names(drv.features), "stats": drv.stats.as_dict()}
    if bad:
        return Result(FAIL, f"{len(bad)} of {2 * len(ex.sent_out)} wrong: {bad[:4]}", d)
    return Result(PASS, f"{len(ex.sent_out)} each way, byte-exact ({drv.rx_layout} RX "
                        f"buffers, {drv.stats.kicks} kicks)", d)


@check("frames.sizes", "Frames of 60..65535 bytes arrive intact in both directions",
       "virtio 1.2 §5.1.6.2, §5.1.6.3.1 (MRG_RXBUF: device MUST use as many buffers as needed), "
       "§5.1.6.4")
def c_sizes(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver()
    per = {}
    fails = []
    for n in SIZES:
        try:
            ex = ctx.exchange(drv, [n] * 2, batch=2, timeout=3)
        except Exception as e:  # noqa: BLE001 - recorded as the finding for this size
            per[n] = f"error: {e}"
            fails.append(n)
            drv = ctx.driver()
            continue
        bo = _mismatch(ex.sent_out, ex.got_out)
        bi = _mismatch(ex.sent_in, ex.got_in)
        per[n] = "ok" if not (bo or bi) else "; ".join(
            ([f"out: {bo[0]}"] if bo else []) + ([f"in: {bi[0]}"] if bi else []))
        if bo or bi:
            fails.append(n)
    d = {"per_size": per, "rx_layout": drv.rx_layout}
    if fails:
        return Result(FAIL, "sizes failing: " + ", ".join(f"{n} ({per[n]})" for n in fails), d)
    return Result(PASS, f"{len(SIZES)} sizes from 60 to 65535 intact both ways", d)


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
    except _Skip as e:
        return Result(SKIP, str(e))
    bad = _mismatch(ex.sent_in, ex.got_in) + _mismatch(ex.sent_out, ex.got_out)
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
        raise _Skip("packed ring not offered" if packed else "split ring refused")
    for _ in range(rounds):
        frames = [test_frame(ctx.rnd, ctx.rnd.randint(60, 1514)) for _ in range(burst)]
        if drv.send_all(frames, timeout=5) != burst:
            raise AssertionError("transmit ring stuck")
        time.sleep(0.01)
        if target.loopback:
            got = [r.data for r in drv.poll_receive(burst, 5)]
        else:
            got = [Context._peer_recv(target, drv, 5) for _ in frames]
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
        except _Skip as e:
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
    drv.send(frames[:1])
    if not settle(u + 1):
        return Result(FAIL, "transmit buffer not used")
    time.sleep(0.02)
    u0 = used_idx()
    mem.write_u16(ev_rx, (mem.read_u16(rq.used_addr + 2) + 0x4000) & 0xFFFF)
    mem.write_u16(ev_tx, (u0 + 0x4000) & 0xFFFF)  # far ahead: no notification wanted
    _irq_pending(ctx, drv, 1)
    drv.send(frames)
    if not settle(u0 + 8):
        return Result(FAIL, "transmit buffers not used")
    time.sleep(0.05)
    spurious = _irq_pending(ctx, drv, 1)
    u1 = used_idx()
    mem.write_u16(ev_tx, u1)  # the next used element reaches used_event: MUST notify
    drv.send(frames[:1])
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
    mac_after = drv.mac
    t = drv.t
    t.reset()
    t.set_status(spec.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    t.set_status(spec.VIRTIO_CONFIG_S_ACKNOWLEDGE | spec.VIRTIO_CONFIG_S_DRIVER)
    early = t.read_config(0, 6)
    status = t.read_config(6, 2)
    t.reset()
    d = {"mac_before": early.hex(":"), "mac_after": mac_after.hex(":"),
         "status_before": int.from_bytes(status, "little")}
    if early != mac_after:
        return Result(FAIL, f"MAC read before FEATURES_OK {d['mac_before']} differs from "
                            f"{d['mac_after']}", d)
    return Result(PASS, f"MAC {d['mac_before']} and status readable after ACKNOWLEDGE|DRIVER", d)


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
       "at csum_offset), §5.1.6.4 (GUEST_CSUM: NEEDS_CSUM on receive)")
def c_csum(ctx: Context) -> Result:
    if not ctx.t.has_peer:
        return Result(SKIP, "no peer to exchange frames with")
    drv = ctx.driver()
    if not drv.has(spec.VIRTIO_NET_F_CSUM):
        return Result(SKIP, "VIRTIO_NET_F_CSUM not offered (for QEMU: the dgram netdev has no "
                            "virtio-net header, so QEMU withdraws every offload)")
    ok = partial_ok = 0
    notes = []
    for n in (18, 600, 1400, 8000, 30000):
        payload = MAGIC + ctx.rnd.randbytes(n)
        full, partial = _udp_frame(payload)
        drv.send([partial], flags=spec.VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
        if ctx.t.loopback:
            rx = drv.poll_receive(1, 3)
            if not rx:
                notes.append(f"{n}: lost")
                continue
            r = rx[0]
            got = r.data
            if r.flags & spec.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                got = _finished(got, r.csum_start, r.csum_offset)
        else:
            got, csum_not_ready = _peer_any(ctx, drv)
            if got is not None and got == partial and csum_not_ready:
                # handed to the TAP as CHECKSUM_PARTIAL (auxdata TP_STATUS_CSUMNOTREADY): the
                # kernel completes it where needed, exactly as for a local sender
                partial_ok += 1
                ok += 1
                continue
        if got == full:
            ok += 1
        else:
            notes.append(f"{n}: {'lost' if got is None else 'checksum wrong'}")
    if ok != 5:
        return Result(FAIL, "; ".join(notes))
    how = ("with a valid checksum" if not partial_ok else
           f"to the TAP as CHECKSUM_PARTIAL ({partial_ok} of 5, marked TP_STATUS_CSUMNOTREADY: "
           "the kernel completes it)")
    return Result(PASS, f"5 UDP frames (18..30000 B payload) with NEEDS_CSUM delivered {how}")


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
    drv.send([frame], flags=spec.VIRTIO_NET_HDR_F_NEEDS_CSUM,
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
    if ctx.t.kind != "pci" or ctx.t.legacy:
        return Result(SKIP, "MSI-X is a PCI (modern interface) facility here")
    drv: Any = ctx.t.driver(NetDriverConfig(interrupts=True), msix=True)  # type: ignore[call-arg]
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
    drv.send([test_frame(ctx.rnd, 100)])
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
        fr = [test_frame(ctx.rnd, ctx.rnd.randint(60, 1514)) for _ in range(50)]
        if drv.send_all(fr, queue=q) != len(fr):
            return Result(FAIL, f"transmitq{q} stuck")
        sent_out += fr
    got_out = [Context._peer_recv(ctx.t, drv, 3) for _ in sent_out]
    inn = [test_frame(ctx.rnd, ctx.rnd.randint(60, 1514)) for _ in range(100)]
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


def run_suite(target: Target, only: list[str] | None = None, seed: int = 1) -> dict[str, Any]:
    """Run every check (or ``only`` those ids / id prefixes) against an opened target."""
    ctx = Context(target, seed)
    results = []
    for c in CHECKS:
        if only and not any(c.id == o or c.id.startswith(o + ".") or c.id.startswith(o)
                            for o in only):
            continue
        t0 = time.monotonic()
        try:
            r = c.fn(ctx)
        except _Skip as e:
            r = Result(SKIP, str(e))
        except Exception as e:  # noqa: BLE001 - a device fault is a finding, not a crash
            tb = traceback.extract_tb(e.__traceback__)[-1]
            r = Result(FAIL, f"{type(e).__name__}: {e} (at {tb.name}:{tb.lineno})")
        results.append({"id": c.id, "title": c.title, "clause": c.clause, "status": r.status,
                        "detail": r.detail, "data": r.data,
                        "seconds": round(time.monotonic() - t0, 3)})
    summary = {s: sum(1 for r in results if r["status"] == s) for s in (PASS, FAIL, WARN, SKIP)}
    return {"target": target.name, "description": target.description, "checks": results,
            "summary": summary}


def format_table(report: dict[str, Any], width: int = 100) -> str:
    """A readable table: one line per check, the detail wrapped under it."""
    import textwrap

    mark = {PASS: "PASS", FAIL: "FAIL", WARN: "WARN", SKIP: "skip"}
    lines = [f"virtwire conform {report['target']}: {report['description']}", ""]
    idw = max(len(r["id"]) for r in report["checks"]) if report["checks"] else 10
    for r in report["checks"]:
        lines.append(f"  {mark[r['status']]}  {r['id']:<{idw}}  {r['title']}")
        for ln in textwrap.wrap(r["detail"], width - idw - 10):
            lines.append(f"        {'':<{idw}}  {ln}")
    s = report["summary"]
    lines += ["", f"  {s['pass']} passed, {s['fail']} failed, {s['warn']} warnings, "
                  f"{s['skip']} skipped"]
    return "\n".join(lines)


