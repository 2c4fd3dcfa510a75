"""Receive (§5.1.6.3, §5.1.6.4): backend frames into the guest's RX buffers.

The backend is read only once buffers for a frame exist, so no frame is lost while the guest
has none -- the device then enables notifications and waits for the RX kick (``rx_watch(pair,
False)`` tells a host's ``BackendPump`` to stop watching the backend fd meanwhile, and ``True``
again once buffers came). Chains popped for a frame but not consumed stay in the pair's *stash*
(in ring order) for the next frame.

Each frame is one *fill* step, chosen by strategy, then one *deliver* step:

- ``_fill_mergeable_tap``: MRG_RXBUF and a backend that cannot tell the next frame's length
  (TAP): read into the buffers of a typical frame plus a private overflow area; a bigger (GSO)
  frame's tail is then copied into further mergeable buffers, or, when the guest has too few,
  the frame is kept aside (``held``) until it has enough -- never truncated, never lost.
- ``_fill_mergeable``: MRG_RXBUF and a known length: as many chains as the frame needs.
- ``_fill_single``: without MRG_RXBUF one chain must hold the whole frame (big or small
  buffers); a frame that does not fit is dropped (``rx_drop_too_big``), the chain kept.
- ``_deliver``: checks (truncated, short, filter), hands the chains over, ``num_buffers``.

A round ends with an ``RxStep``. The native RX path (split and packed rings, MRG_RXBUF, a
TAP-shaped backend, frames not traced) runs first: ``native.NativeRx.burst`` is a step-by-step
mirror of this loop that stages used elements for every frame the fd has; at anything unusual
it stops and hands its stash (and a frame already read) to the Python path, which goes on from
exactly there -- same used ring, same counters, checked by the hostile-ring property tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum
from typing import Any

from virtwire import trace as _trace
from virtwire.memory import GuestMemory
from virtwire.net import native
from virtwire.net.backend import NetBackend
from virtwire.net.counters import RxCounters
from virtwire.net.ctrl import GUEST_OFFLOAD_MASK, RxFilter
from virtwire.net.header import ETH_HLEN, MAX_FRAME, NUM_BUFFERS_OFFSET, gather, scatter, skip
from virtwire.net.pair import QueuePair
from virtwire.virtio import spec as s
from virtwire.virtio.packed_ring import PackedQueue
from virtwire.virtio.queue import DeviceQueue
from virtwire.virtio.split_ring import SplitQueue

__all__ = ["Receive", "RxStep"]

log = logging.getLogger(__name__)

IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

_GSO_RX_MASK = s.bit(s.VIRTIO_NET_F_GUEST_TSO4, s.VIRTIO_NET_F_GUEST_TSO6,
                     s.VIRTIO_NET_F_GUEST_UFO)
_ZERO_HDR10 = bytes(10)


class RxStep(Enum):
    """How an RX round ended."""

    DONE = "done"  # the backend is empty
    MORE = "more"  # waiting for buffers, or the budget is spent: frames may be left
    RETRY = "retry"  # buffers arrived while notifications were re-enabled: go again


class _Fill(Enum):
    FRAME = 1  # a frame was read: deliver it
    STARVED = 2  # not enough buffers
    EMPTY = 3  # nothing pending
    NEXT = 4  # the frame was dropped or read aside: on to the next


class _Round:
    """What one RX round works with."""

    __slots__ = ("qi", "q", "mem", "p", "be", "cnt", "hl", "mrg", "vnet", "filt", "clear_flags")

    def __init__(self, qi: int, q: DeviceQueue, mem: GuestMemory, p: QueuePair, be: NetBackend,
                 cnt: RxCounters, hl: int, mrg: bool, filt: bool, clear_flags: bool) -> None:
        self.qi, self.q, self.mem, self.p, self.be, self.cnt = qi, q, mem, p, be, cnt
        self.hl, self.mrg, self.vnet, self.filt = hl, mrg, be.vnet_hdr, filt
        self.clear_flags = clear_flags


_NO_FRAME: tuple[list[memoryview], int, int] = ([], 0, 0)


class Receive:
    """The RX side of ``VirtioNet`` (a part of it; see module docstring)."""

    # Provided by VirtioNet / VirtioDevice:
    name: str
    mem: GuestMemory | None
    queues: list[Any]
    counters: list[Any]  # RxCounters on RX queues
    pairs: list[QueuePair]
    negotiated: int
    guest_offloads: int
    hdr_len: int
    mrg_rxbuf: bool
    mtu: int | None
    budget: int
    max_batches: int
    native: bool
    more_work: Callable[[int], None] | None
    rx_watch: Callable[[int, bool], None] | None
    rx_filter: RxFilter
    signal_used: Callable[[int], None]
    has_feature: Callable[[int], bool]
    native_lib: Callable[[], Any]

    def init_rx(self) -> None:
        self.bounce = bytearray(self.hdr_len + MAX_FRAME + 64)  # overflow / read-aside area
        self._rx_nat: native.NativeRx | None = None

    def _max_rx_len(self) -> int:
        """Buffers to prepare when the backend cannot tell the frame length."""
        if self.negotiated & _GSO_RX_MASK & (self.guest_offloads | ~GUEST_OFFLOAD_MASK):
            return self.hdr_len + MAX_FRAME
        return self.hdr_len + max(self.mtu or 1500, 1500) + ETH_HLEN + 4

    def process_rx(self, pair: int) -> bool:
        """Move frames from the backend into the guest's RX buffers (see module docstring).

        Returns True when frames may be left in the backend (budget or buffers ran out)."""
        for _ in range(64):
            step = self.rx_round(pair)
            if step is not RxStep.RETRY:
                return step is RxStep.MORE
        return True

    def rx_round(self, pair: int) -> RxStep:
        """One RX pass over ``pair``: the native burst (when it applies), then Python."""
        qi = 2 * pair
        q = self.queues[qi]
        mem = self.mem
        p = self.pairs[pair]
        be = p.backend
        if q is None or mem is None or be is None or not p.can_receive:
            return RxStep.DONE
        r = _Round(qi, q, mem, p, be, self.counters[qi], self.hdr_len, self.mrg_rxbuf,
                   self.rx_filter.active,
                   be.vnet_hdr and not self.has_feature(s.VIRTIO_NET_F_GUEST_CSUM))
        be.drain_wakeup()
        # RX kicks are only wanted while we wait for buffers (re-enabled when starved below).
        q.disable_notifications(mem)
        limit = self.budget * self.max_batches if self.more_work is not None else 1 << 62
        frames, stop, preread = self._rx_native(r, limit)
        starved = stop is native.RxStop.NO_BUFFERS
        # C stopped at an empty backend, no buffers or the limit: nothing left for Python.
        if stop not in (native.RxStop.EMPTY, native.RxStop.NO_BUFFERS, native.RxStop.LIMIT):
            k, starved = self._rx_frames(r, limit - frames, preread)
            frames += k
        return self._rx_finish(r, pair, frames, starved, limit)

    def _rx_frames(self, r: _Round, limit: int, preread: int) -> tuple[int, bool]:
        """Fill and deliver frames until the backend is empty, buffers run out (True) or
        ``limit`` frames went in."""
        frames = 0
        p = r.p
        while frames < limit:
            held = p.held
            want = len(held) if held is not None else r.be.pending_len()
            if want == 0:
                break
            if r.mrg and want is None:
                fill, (views, cap, n) = self._fill_mergeable_tap(r, preread)
                preread = 0
            elif r.mrg:
                fill, (views, cap, n) = self._fill_mergeable(r, want, held)
            else:
                fill, (views, cap, n) = self._fill_single(r, want, held)
            if fill is _Fill.STARVED:
                return frames, True
            if fill is _Fill.EMPTY:
                break
            if fill is _Fill.FRAME:
                frames += self._deliver(r, views, cap, n)
        return frames, False

    def _rx_finish(self, r: _Round, pair: int, frames: int, starved: bool,
                   limit: int) -> RxStep:
        """Publish, then the notification decisions: wait for buffers, or yield at the limit."""
        q, mem, p = r.q, r.mem, r.p
        if q.publish(mem):  # frames, and chains returned unused (too small for a header)
            self.signal_used(r.qi)
        if starved:
            r.cnt.rx_wait_buffers += 1
            if q.enable_notifications(mem):
                return RxStep.RETRY  # buffers arrived between our last pop and the re-enable
            if not p.rx_waiting:
                p.rx_waiting = True
                if self.rx_watch is not None:
                    self.rx_watch(pair, False)
            return RxStep.MORE
        if p.rx_waiting:
            p.rx_waiting = False
            if self.rx_watch is not None:
                self.rx_watch(pair, True)
        if frames >= limit:
            if self.more_work is not None:
                self.more_work(r.qi)
            return RxStep.MORE
        return RxStep.DONE

    # -- fill steps --------------------------------------------------------------------------
    def _read(self, r: _Round, views: list[memoryview], held: bytes | None) -> int:
        """Read the next frame (or the held one) into ``views``."""
        target = views if r.vnet else skip(views, r.hl)
        if held is not None:
            r.p.held = None
            return scatter(target, held)
        return self._recv(r.be, list(target))

    def _fill_mergeable(self, r: _Round, want: int, held: bytes | None
                        ) -> tuple[_Fill, tuple[list[memoryview], int, int]]:
        """MRG_RXBUF, known length: the chains the frame needs (§5.1.6.4)."""
        p = r.p
        need = want if r.vnet else want + r.hl
        if p.stash_cap < need:
            self._stash_more(r, need)
        if p.stash_cap < need:
            return _Fill.STARVED, _NO_FRAME
        stash = p.stash
        if stash[0][0].writable_len < need:
            views: list[memoryview] = []
            cap = 0
            for c, vs in stash:
                views.extend(vs)
                cap += c.writable_len
                if cap >= need:
                    break
        else:
            c0, views = stash[0]
            cap = c0.writable_len
        n = self._read(r, views, held)
        return (_Fill.FRAME, (views, cap, n)) if n else (_Fill.EMPTY, _NO_FRAME)

    def _fill_single(self, r: _Round, want: int | None, held: bytes | None
                     ) -> tuple[_Fill, tuple[list[memoryview], int, int]]:
        """Without MRG_RXBUF: one chain holds the frame (§5.1.6.3)."""
        p = r.p
        stash = p.stash
        need = self._max_rx_len() if want is None else (want if r.vnet else want + r.hl)
        if not stash and not self._stash_more(r, 1):
            return _Fill.STARVED, _NO_FRAME
        cap = stash[0][0].writable_len
        if cap < need:
            if want is not None:
                if held is not None:
                    p.held = None
                    self._count_rx_drop(r.cnt, "too_big")
                else:
                    r.be.recv([memoryview(self.bounce)])
                    self._count_rx_drop(r.cnt, "too_big")
                return _Fill.NEXT, _NO_FRAME
            # Unknown length and a chain smaller than the largest frame: read it aside (one
            # copy) so its length is known; it waits there until buffers suffice.
            n = r.be.recv([memoryview(self.bounce)])
            if n == 0:
                return _Fill.EMPTY, _NO_FRAME
            p.held = bytes(self.bounce[:n])
            r.cnt.rx_held += 1
            return _Fill.NEXT, _NO_FRAME
        views = stash[0][1]
        n = self._read(r, views, held)
        return (_Fill.FRAME, (views, cap, n)) if n else (_Fill.EMPTY, _NO_FRAME)

    def _fill_mergeable_tap(self, r: _Round, preread: int
                            ) -> tuple[_Fill, tuple[list[memoryview], int, int]]:
        """MRG_RXBUF, unknown length (a TAP): read into a typical frame's buffers plus the
        overflow area; a longer frame's tail is copied into further buffers, or the frame held.

        ``preread``: the native path already read a frame of that length into the stash's
        buffers and the overflow area (it stops there when the tail needs more chains)."""
        p, hl, vnet = r.p, r.hl, r.vnet
        window = hl + ETH_HLEN + 4 + max(self.mtu or 1500, 1500)
        if not preread:
            if p.stash_cap < window:
                self._stash_more(r, window)
            if p.stash_cap < hl + ETH_HLEN:
                return _Fill.STARVED, _NO_FRAME
        stash = p.stash
        views: list[memoryview] = []
        acc = 0
        k = 0
        for c, vs in stash:
            views.extend(vs)
            acc += c.writable_len
            k += 1
            if acc >= window:
                break
        bounce = memoryview(self.bounce)
        n = preread or self._recv(r.be, [*(views if vnet else skip(views, hl)), bounce])
        if n == 0:
            return _Fill.EMPTY, _NO_FRAME
        total = n if vnet else n + hl
        if total <= acc:
            return _Fill.FRAME, (views, acc, n)
        over = total - acc
        if over > len(bounce):
            self._count_rx_drop(r.cnt, "truncated")
            return _Fill.NEXT, _NO_FRAME
        r.cnt.rx_overflow += 1
        if p.stash_cap < total and not self._stash_more(r, total):
            # Not enough buffers for the whole frame yet: keep it aside (backend format).
            off = 0 if vnet else hl
            p.held = gather(views, acc - off, off) + bytes(bounce[:over])
            r.cnt.rx_held += 1
            return _Fill.NEXT, _NO_FRAME
        extra: list[memoryview] = []
        for i in range(k, len(stash)):
            c, vs = stash[i]
            extra.extend(vs)
            acc += c.writable_len
            if acc >= total:
                break
        scatter(extra, bounce[:over])
        return _Fill.FRAME, (views + extra, acc, n)

    @staticmethod
    def _recv(be: Any, bufs: list[memoryview]) -> int:
        """``be.recv(bufs)``; a guest's buffers in more pieces than one readv takes (IOV_MAX:
        it fails with EINVAL, which read as "nothing pending" spun the loop -- issue 14,
        defect 4) are filled by reading into one scratch buffer and copying."""
        if len(bufs) <= IOV_MAX:
            return int(be.recv(bufs))
        tmp = bytearray(min(sum(len(b) for b in bufs), 1 << 17))  # > any frame a backend gives
        n = int(be.recv([memoryview(tmp)]))
        if n:
            scatter(bufs, memoryview(tmp)[:n])
        return n

    def _stash_more(self, r: _Round, need: int) -> bool:
        """Pop RX chains (in batches) until the stash holds ``need`` bytes; False if the ring
        ran dry first. Chains too small for the header (§5.1.6.3.1) are returned unused."""
        p, q, mem, hl, cnt = r.p, r.q, r.mem, r.hl, r.cnt
        while p.stash_cap < need:
            chains = q.pop_batch(mem, 64)
            if not chains:
                return False
            for c in chains:
                if c.writable_len < hl:
                    q.push(mem, c, 0)
                    cnt.drops += 1
                    cnt.rx_bad_chain += 1
                    continue
                p.stash.append((c, list(c.writable(mem))))
                p.stash_cap += c.writable_len
        return True

    # -- deliver -----------------------------------------------------------------------------
    def _deliver(self, r: _Round, views: list[memoryview], cap: int, n: int) -> int:
        """Check the frame read into ``views`` and hand its chains to the guest; 1 when it
        went in, 0 when it was dropped or filtered (its buffers reused)."""
        hl, vnet, cnt = r.hl, r.vnet, r.cnt
        total = n if vnet else n + hl
        if total > cap:
            # tun reports the whole frame length even when our buffers cut it short.
            self._count_rx_drop(cnt, "truncated")
            return 0
        if vnet and n < hl:
            self._count_rx_drop(cnt, "short")
            return 0
        if r.filt and not self.rx_filter.accept(gather(views, 18, hl)):
            cnt.rx_filtered += 1
            return 0
        v0 = views[0]
        if vnet:
            if len(v0) >= 2 and v0[1]:
                cnt.rx_gso += 1
            if r.clear_flags:
                v0[0] = 0
        # Hand the chains over: mergeable may span several (§5.1.6.4).
        q, mem, p, stash, mrg = r.q, r.mem, r.p, r.p.stash, r.mrg
        used = 0
        left = total
        while stash and (left > 0 or used == 0):
            c, _vs = stash.popleft()
            w = min(c.writable_len, left)
            q.push(mem, c, w)
            p.stash_cap -= c.writable_len
            left -= w
            used += 1
            if not mrg:
                break
        self._write_num_buffers(views, used, hl, vnet)
        fh = _trace.FRAMES
        if fh is not None:
            fh("rx", list(views), r.qi, hl, total - hl)
        cnt.chains += used
        cnt.frames += 1
        cnt.bytes += total - hl
        return 1

    @staticmethod
    def _write_num_buffers(views: list[memoryview], used: int, hl: int, vnet: bool) -> None:
        v0 = views[0]
        if not vnet:
            # A plain backend: our own header (no offloads), num_buffers included.
            hb = _ZERO_HDR10 + used.to_bytes(2, "little") if hl == 12 else _ZERO_HDR10
            if len(v0) >= hl:
                v0[:hl] = hb
            else:
                scatter(views, hb)
        elif hl == 12:
            if len(v0) >= 12:
                v0[10] = used & 0xFF
                v0[11] = used >> 8
            else:
                scatter(views, used.to_bytes(2, "little"), NUM_BUFFERS_OFFSET)

    def _count_rx_drop(self, cnt: RxCounters, reason: str) -> None:
        n = cnt.drop("rx_drop_" + reason)
        if n & (n - 1) == 0:
            log.warning("%s: RX frame dropped: %s (%d so far)", self.name, reason, n)

    # -- native RX (``native.NativeRx``) -------------------------------------------------------
    def _rx_native(self, r: _Round, limit: int) -> tuple[int, native.RxStop | None, int]:
        """Frames from the backend's fd into mergeable RX chains in C, when that applies.
        Returns ``(frames, stop, preread)``; stop None: not run. On stop CHAIN and FRAME_LEFT
        the stash is moved to Python, which goes on from exactly where C stopped."""
        p, q = r.p, r.q
        if not (r.mrg and r.vnet and r.hl == 12 and p.held is None and self.native
                and _trace.FRAMES is None and isinstance(q, SplitQueue | PackedQueue)):
            return 0, None, 0
        fd = r.be.native_fd()
        if fd is None or fd < 0 or r.be.pending_len() is not None:
            return 0, None, 0
        nat = self._rx_nat
        if nat is None:
            lib = self.native_lib()
            if lib is None:
                return 0, None, 0
            nat = self._rx_nat = native.NativeRx(lib, self.bounce)
        if p.cstash is None:
            p.cstash = native.RxStash()
        if p.stash and not self._rx_load(p):
            return 0, native.RxStop.CHAIN, 0
        window = r.hl + ETH_HLEN + 4 + max(self.mtu or 1500, 1500)
        res = nat.burst(q, r.mem, p.cstash, fd, r.hl, window, r.clear_flags, limit,
                        self.rx_filter.c_form())
        if res is None:  # a ring outside guest RAM: the Python path reports it
            self.rx_spill(p, r.mem)
            return 0, native.RxStop.CHAIN, 0
        frames = res.frames
        if frames:
            cnt = r.cnt
            cnt.frames += frames
            cnt.bytes += res.bytes
            cnt.chains += res.chains
            cnt.rx_native += frames
        if res.gso or res.overflow or res.filtered or res.truncated or res.runt or res.errors:
            self._rx_native_rare(r, res)
        reads = res.reads
        if reads:
            r.be.count_native(rx_frames=reads, rx_bytes=res.read_bytes)
        stop = native.RX_STOPS[res.stop]
        if stop is native.RxStop.CHAIN or stop is native.RxStop.FRAME_LEFT:
            self.rx_spill(p, r.mem)
        return frames, stop, res.pending if stop is native.RxStop.FRAME_LEFT else 0

    def _rx_native_rare(self, r: _Round, res: Any) -> None:
        """The native burst's less common counts: GSO, overflow, filtered, drops, read errors."""
        cnt = r.cnt
        cnt.rx_gso += res.gso
        cnt.rx_overflow += res.overflow
        cnt.rx_filtered += res.filtered
        for _ in range(res.truncated):
            self._count_rx_drop(cnt, "truncated")
        for _ in range(res.runt):
            self._count_rx_drop(cnt, "short")
        if res.errors:
            r.be.count_native(rx_errors=res.errors)
            log.warning("%s: read failed: %s", r.be.name, os.strerror(res.err))

    def rx_spill(self, p: QueuePair, mem: GuestMemory | None) -> None:
        """Move the C stash's chains (already popped, in ring order) to the Python stash."""
        st = p.cstash
        if st is None or not st.c_count:
            return
        for c in st.spill():
            p.stash.append((c, list(c.writable(mem)) if mem is not None else []))
            p.stash_cap += c.writable_len

    def _rx_load(self, p: QueuePair) -> bool:
        """Move the Python stash to the C stash when every chain is plain; False leaves it."""
        assert p.cstash is not None
        if not p.cstash.load([c for c, _vs in p.stash], p.stash_cap):
            return False
        for _c, vs in p.stash:
            for v in vs:
                v.release()
        p.stash.clear()
        p.stash_cap = 0
        return True
